"""Hugging Face checkpoints: rlpipe's logits against transformers', sharded
loading, export that transformers reads, and errors that name the problem."""

from __future__ import annotations

import json
import shutil

import attrs
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from rlpipe.core.placement import MeshSpec, RolePlacement, make_mesh  # noqa: E402
from rlpipe.models.config import DecoderConfig, RopeScaling  # noqa: E402
from rlpipe.models.decoder import Decoder  # noqa: E402
from rlpipe.models.hf import (  # noqa: E402
    CheckpointError,
    config_from_hf,
    from_pretrained,
    save_pretrained,
)

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, attn_implementation="eager")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          # Small, so that the test's wavelengths fall in all three regimes of the scaling.
          "original_max_position_embeddings": 16}


def torch_model(kind: str):
    torch.manual_seed({"llama": 0, "qwen2": 1}[kind])
    if kind == "llama":  # untied, Llama-3 rope scaling
        cfg = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3)
        model = transformers.LlamaForCausalLM(cfg)
    else:  # tied, q/k/v biases
        cfg = transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True, rope_theta=1000000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # biases start at zero and norms at one; make every tensor count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``kind -> (directory, torch model)``; the Qwen2 one saved as several shards."""
    out = {}
    for kind in ("llama", "qwen2"):
        model = torch_model(kind)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path, max_shard_size="40KB" if kind == "qwen2" else "50GB")
        out[kind] = (path, model)
    assert (out["qwen2"][0] / "model.safetensors.index.json").is_file()
    assert len(list(out["qwen2"][0].glob("model-*.safetensors"))) > 1
    return out


# transformers renamed from_pretrained's `torch_dtype` to `dtype` in 4.56.
_DTYPE_KW = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"


def hf_load(path, dtype="auto"):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **{_DTYPE_KW: dtype}).eval()


def tokens(batch=2, seq=24, seed=0):
    return np.random.RandomState(seed).randint(0, SHAPE["vocab_size"], (batch, seq))


def torch_logits(model, ids, mask=None):
    kwargs = {}
    if mask is not None:
        kwargs = dict(attention_mask=torch.tensor(mask, dtype=torch.long),
                      position_ids=torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0)))
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def logits(model, ids, mask=None) -> np.ndarray:
    """rlpipe's logits; one compiled forward rather than an op-by-op one (faster tests)."""
    mask = np.ones_like(ids) if mask is None else mask
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask, bool)))


def params(model) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.slow
def test_logits_match_transformers(checkpoints, kind):
    path, ref = checkpoints[kind]
    model = from_pretrained(path)
    assert model.config.tie_embeddings == (kind == "qwen2")
    assert model.config.qkv_bias == (kind == "qwen2")
    assert (model.config.rope_scaling is not None) == (kind == "llama")
    assert model.embed_tokens[...].dtype == jnp.float32
    ids = tokens()
    np.testing.assert_allclose(logits(model, ids), torch_logits(ref, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_left_padded_batch_matches_transformers(checkpoints, kind):
    path, ref = checkpoints[kind]
    model = from_pretrained(path)
    ids = tokens(3, 20, seed=1)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :12] = 0
    ours = logits(model, ids, mask)
    theirs = torch_logits(ref, ids, mask)
    real = mask.astype(bool)  # logits at padding are meaningless in both
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(2, 4), (8, 1)], ids=["2x4", "8x1"])
def test_loads_sharded_onto_a_mesh(checkpoints, shape):
    path, _ = checkpoints["llama"]
    mesh = make_mesh(RolePlacement(name="x", devices=range(8), mesh=MeshSpec(shape, ("fsdp", "tp"))))
    model = from_pretrained(path, mesh=mesh)
    single = from_pretrained(path)

    tp = "tp" if shape[1] > 1 else None
    q = model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.mesh.shape == dict(zip(("fsdp", "tp"), shape))
    assert q.sharding.spec == P("fsdp", tp)
    assert q.addressable_shards[0].data.shape == (64 // shape[0], 64 // shape[1])
    assert model.embed_tokens[...].sharding.spec == P(tp, "fsdp")
    assert model.layers[1].mlp.down_proj.kernel[...].sharding.spec == P(tp, "fsdp")
    assert model.lm_head.kernel[...].sharding.spec == P("fsdp", tp)

    ours, reference = params(model), params(single)
    assert ours.keys() == reference.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)
    ids = tokens()
    np.testing.assert_allclose(logits(model, ids), logits(single, ids), atol=1e-5, rtol=0)


def rlpipe_model(config: DecoderConfig, seed: int = 0):
    """A decoder whose every parameter (biases and norms too) is random.

    Filled with numpy rather than the decoder's own initialiser, which would
    compile one small program per parameter shape.
    """
    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def fill(path, x):
        centre = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(centre + 0.1 * rng.standard_normal(x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


EXPORTS = {
    "llama-untied-llama3": DecoderConfig(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                                         num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=500000.0,
                                         rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                                  original_max_position_embeddings=16),
                                         rms_norm_eps=1e-5),
    "qwen2-tied-head_dim": DecoderConfig(architecture="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128,
                                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24, qkv_bias=True,
                                         tie_embeddings=True, rope_theta=1000000.0),
    # transformers' Llama attention_bias also biases o_proj: export writes zeros there.
    "llama-attention_bias": DecoderConfig(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                                          num_layers=2, num_heads=4, num_kv_heads=2, qkv_bias=True),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_save_pretrained_is_read_by_transformers(tmp_path, name):
    model = rlpipe_model(EXPORTS[name])
    save_pretrained(model, tmp_path)
    ref = hf_load(tmp_path, torch.float32)
    assert type(ref).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model.config.architecture]
    ids = tokens()
    np.testing.assert_allclose(logits(model, ids), torch_logits(ref, ids), atol=1e-4, rtol=0)
    # ... and rlpipe reads back the same shape (config.json always spells head_dim out).
    assert from_pretrained(tmp_path).config == attrs.evolve(model.config, head_dim=model.config.dim_per_head)


def test_sharded_save_round_trips_exactly(tmp_path):
    mesh = make_mesh(RolePlacement(name="x", devices=range(8), mesh=MeshSpec((2, 4), ("fsdp", "tp"))))
    original = rlpipe_model(EXPORTS["llama-untied-llama3"], seed=3)
    sharded = from_pretrained(_saved(original, tmp_path / "a"), mesh=mesh)  # gathered from 8 devices below
    save_pretrained(sharded, tmp_path / "b", max_shard_bytes=40_000)

    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "b").glob("model-*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    assert not (tmp_path / "b" / "model.safetensors").exists()

    loaded = from_pretrained(tmp_path / "b")
    assert loaded.config == attrs.evolve(original.config, head_dim=16)
    ours, reference = params(loaded), params(original)
    assert ours.keys() == reference.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)

    # Saving again as one file removes the shards, which would otherwise mix in.
    save_pretrained(loaded, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["config.json", "model.safetensors"]


def _saved(model, path):
    save_pretrained(model, path)
    return path


def test_bfloat16_checkpoint_loads(tmp_path, checkpoints):
    _, ref = checkpoints["llama"]
    half = torch_model("llama").to(torch.bfloat16)
    half.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"

    model = from_pretrained(tmp_path)  # keeps the checkpoint's dtype
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    assert model.dtype == jnp.bfloat16
    ids = tokens()
    np.testing.assert_allclose(logits(model, ids), torch_logits(ref, ids), atol=5e-2, rtol=0)

    wide = from_pretrained(tmp_path, dtype="float32")  # bf16 values, exactly, in float32
    assert wide.layers[1].self_attn.k_proj.kernel[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(wide.layers[1].self_attn.k_proj.kernel[...]),
                                  half.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T)
    np.testing.assert_array_equal(np.asarray(wide.embed_tokens[...]), half.model.embed_tokens.weight.detach().float().numpy())


def test_save_pretrained_in_bfloat16(tmp_path, checkpoints):
    model = from_pretrained(checkpoints["qwen2"][0])
    save_pretrained(model, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ref = hf_load(tmp_path)
    assert ref.model.embed_tokens.weight.dtype == torch.bfloat16
    half = from_pretrained(tmp_path)
    assert half.embed_tokens[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(half.embed_tokens[...]), np.asarray(model.embed_tokens[...].astype(jnp.bfloat16)))


# -- errors --------------------------------------------------------------------


def _copy(checkpoints, kind, tmp_path):
    dst = tmp_path / kind
    shutil.copytree(checkpoints[kind][0], dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints, "llama", tmp_path)
    _edit_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        from_pretrained(path)


def test_unsupported_rope_scaling_is_named():
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(CheckpointError, match="'yarn'"):
        config_from_hf(hf)
    hf["rope_scaling"] = None
    hf["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0}
    with pytest.raises(CheckpointError, match="'dynamic'"):
        config_from_hf(hf)


def test_config_reads_both_transformers_spellings():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    v4 = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}}})
    v5 = config_from_hf({**base, "rope_parameters": {**LLAMA3, "rope_theta": 5e5}})
    assert v4 == v5
    assert v5.rope_theta == 5e5 and v5.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                                   original_max_position_embeddings=16)


def test_missing_and_misshapen_tensors_are_named_together(checkpoints, tmp_path):
    path = _copy(checkpoints, "llama", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)  # should be [32, 64]
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((3,), np.float32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        from_pretrained(path)
    err = info.value
    assert err.missing == ["model.layers.1.mlp.up_proj.weight"]
    assert err.unexpected == ["model.layers.0.self_attn.extra.weight"]
    assert err.mismatched == [("model.layers.0.self_attn.k_proj.weight", (32, 64), (64, 64))]
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.0.self_attn.extra.weight", "[64, 64]", "[32, 64]"):
        assert name in str(err)


def test_untied_checkpoint_without_lm_head_is_missing_it(checkpoints, tmp_path):
    path = _copy(checkpoints, "llama", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): lm_head\.weight"):
        from_pretrained(path)


def test_tied_checkpoint_ignores_a_stored_lm_head(checkpoints, tmp_path):
    path = _copy(checkpoints, "qwen2", tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    save_file({"lm_head.weight": np.ones((96, 64), np.float32)}, path / "extra.safetensors", metadata={"format": "pt"})
    index["weight_map"]["lm_head.weight"] = "extra.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = from_pretrained(path)
    ids = tokens()
    np.testing.assert_allclose(logits(model, ids), torch_logits(checkpoints["qwen2"][1], ids), atol=1e-4, rtol=0)


def test_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="has no config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="is not a directory"):
        from_pretrained(tmp_path / "nope")


def test_directory_without_weights(checkpoints, tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    shutil.copy(checkpoints["llama"][0] / "config.json", path)
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        from_pretrained(path)


def test_llama_o_proj_bias_must_be_zero(tmp_path):
    save_pretrained(rlpipe_model(EXPORTS["llama-attention_bias"]), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert not tensors["model.layers.1.self_attn.o_proj.bias"].any()
    tensors["model.layers.1.self_attn.o_proj.bias"][3] = 0.5
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"non-zero: model\.layers\.1\.self_attn\.o_proj\.bias$"):
        from_pretrained(tmp_path)


def test_unknown_dtype_is_rejected(checkpoints):
    with pytest.raises(ValueError, match="int8"):
        from_pretrained(checkpoints["llama"][0], dtype="int8")


def test_corrupt_weights_file_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints, "llama", tmp_path)
    (path / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file") as info:
        from_pretrained(path)
    assert isinstance(info.value, ValueError)
