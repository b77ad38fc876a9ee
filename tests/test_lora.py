"""LoRA adapters (rlpipe.models.lora): an exact no-op at start, merged and
unmerged forwards that agree, the base model without a copy, gradients that
reach only the adapters, shardings, and an export that PEFT loads."""

from __future__ import annotations

import json

import attrs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding

from rlpipe.core.config import ConfigValueError
from rlpipe.models.config import DecoderConfig
from rlpipe.models.decoder import Decoder, Linear, sequence_logprobs
from rlpipe.models.hf import from_pretrained, save_pretrained
from rlpipe.models.lora import (
    ATTENTION_TARGETS,
    TARGETS,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    LoRAParam,
    adapter_bytes,
    adapter_state,
    apply_lora,
    base_graphdef,
    base_state,
    merge,
    save_merged,
    save_peft,
)
from rlpipe.models.sharding import shardings_for

LLAMA = DecoderConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5)
# Tied embeddings and q/k/v biases: the other paths through the name mapping.
QWEN2 = attrs.evolve(LLAMA, architecture="qwen2", qkv_bias=True, tie_embeddings=True, rope_theta=1e6)


def decoder(config: DecoderConfig = LLAMA, seed: int = 0, dtype=jnp.float32) -> Decoder:
    model = Decoder(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(params=seed))
    if config.qkv_bias:  # biases start at zero; make them count
        key = jax.random.key(seed + 100)
        for attn in (layer.self_attn for layer in model.layers):
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                key, sub = jax.random.split(key)
                proj.bias[...] = (0.1 * jax.random.normal(sub, proj.bias.shape)).astype(dtype)
    return model


def tokens(batch: int = 2, seq: int = 12, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).randint(0, LLAMA.vocab_size, (batch, seq)))


@nnx.jit
def _logits(model, ids):
    return model(ids)


def logits(model, ids) -> np.ndarray:
    return np.asarray(_logits(model, ids))


def perturb(model: nnx.Module, seed: int = 0, size: float = 0.3) -> None:
    """Random non-zero adapters (both factors), as after some training."""
    key = jax.random.key(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            key, ka, kb = jax.random.split(key, 3)
            node.lora_a[...] = node.lora_a[...] + size * jax.random.normal(ka, node.lora_a.shape)
            node.lora_b[...] = size * jax.random.normal(kb, node.lora_b.shape)


def name(path) -> str:
    """``['layers'][0]['self_attn']['q_proj']['kernel']``: a leaf's path without the Variable's ``.value``."""
    return jax.tree_util.keystr(path).removesuffix(".value")


def names(state) -> list[str]:
    return [name(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]


def expected_adapter_params(config: DecoderConfig, lora: LoRAConfig) -> int:
    h, d, f = config.hidden_size, config.dim_per_head, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}
    return config.num_layers * sum(lora.rank * sum(dims[t]) for t in lora.targets)


# -- config --------------------------------------------------------------------


def test_config_defaults_and_canonical_targets():
    c = LoRAConfig(rank=8)
    assert c.targets == TARGETS and c.alpha == 32.0 and c.dropout == 0.0 and c.scale == 4.0
    assert LoRAConfig(rank=2, targets=["v_proj", "q_proj"]) == LoRAConfig(rank=2, targets=("q_proj", "v_proj"))
    assert LoRAConfig(rank=2, targets="o_proj").targets == ("o_proj",)
    assert LoRAConfig(rank=2, alpha=4).alpha == 4.0


@pytest.mark.parametrize("kwargs, field, words", [
    ({"rank": 0}, "rank", "integer >= 1"),
    ({"rank": 2.5}, "rank", "integer >= 1"),
    ({"rank": True}, "rank", "integer >= 1"),
    ({"rank": 4, "alpha": 0}, "alpha", "positive"),
    ({"rank": 4, "alpha": float("nan")}, "alpha", "positive"),
    ({"rank": 4, "targets": ["q_prj"]}, "targets", "did you mean 'q_proj'"),
    ({"rank": 4, "targets": ["q_proj", "q_proj"]}, "targets", "named twice: q_proj"),
    ({"rank": 4, "targets": []}, "targets", "no projections"),
    ({"rank": 4, "dropout": 0.1}, "dropout", "dropout is not supported"),
])
def test_config_errors_name_the_field_and_the_reason(kwargs, field, words):
    with pytest.raises(ConfigValueError) as e:
        LoRAConfig(**kwargs)
    assert e.value.subpath == (field,)
    assert words in str(e.value)


# -- the layer -----------------------------------------------------------------


@pytest.mark.parametrize("config, dtype", [(LLAMA, jnp.float32), (QWEN2, jnp.float32), (LLAMA, jnp.bfloat16)],
                         ids=["llama", "qwen2", "llama-bfloat16"])
def test_adapters_start_as_an_exact_noop(config, dtype):
    model = decoder(config, dtype=dtype)
    ids = tokens()
    before = logits(model, ids)
    plain_names = names(nnx.state(model))
    kernel = model.layers[0].self_attn.q_proj.kernel[...]
    apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(params=1))
    assert isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    assert model.layers[0].self_attn.q_proj.kernel[...] is kernel  # the base arrays are adopted, not copied
    assert names(base_state(nnx.state(model))) == plain_names  # the base keeps its paths
    np.testing.assert_array_equal(logits(model, ids), before)
    # The base stays in its dtype; the adapters, which train, are float32.
    assert model.layers[0].mlp.down_proj.kernel.dtype == dtype
    assert model.layers[0].mlp.down_proj.lora_b.dtype == jnp.float32


def test_adapter_state_is_exactly_the_adapters():
    model = decoder()
    lora = LoRAConfig(rank=3, targets=ATTENTION_TARGETS + ("down_proj",))
    apply_lora(model, lora, rngs=nnx.Rngs(params=1))
    adapters = nnx.state(model, LoRAParam)
    found = names(adapters)
    expected = [f"['layers'][{i}]['{parent}']['{t}']['{f}']" for i in range(LLAMA.num_layers)
                for parent, t in [("self_attn", t) for t in ATTENTION_TARGETS] + [("mlp", "down_proj")]
                for f in ("lora_a", "lora_b")]
    assert sorted(found) == sorted(expected)
    assert names(adapter_state(nnx.state(model))) == found
    count = sum(x.size for x in jax.tree.leaves(adapters))
    assert count == expected_adapter_params(LLAMA, lora)
    assert adapter_bytes(nnx.state(model)) == 4 * count  # float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adapters))
    # B starts at zero, A does not.
    layer = model.layers[1].self_attn.v_proj
    assert not np.any(np.asarray(layer.lora_b[...])) and np.all(np.abs(np.asarray(layer.lora_a[...])) > 0)
    assert layer.lora_a.shape == (LLAMA.hidden_size, 3) and layer.lora_b.shape == (3, LLAMA.num_kv_heads * LLAMA.dim_per_head)
    assert type(model.layers[0].mlp.gate_proj) is Linear  # not a target


def test_apply_lora_errors():
    model = decoder()
    apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(params=1))
    with pytest.raises(LoRAError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(params=1))

    class Head(nnx.Module):
        def __init__(self):
            self.value_head = Linear(4, 1, bias=True, param_dtype=jnp.float32, rngs=nnx.Rngs(0))

    with pytest.raises(LoRAError, match="no q_proj, v_proj projection"):
        apply_lora(Head(), LoRAConfig(rank=2, targets=["q_proj", "v_proj"]), rngs=nnx.Rngs(0))


def test_a_module_holding_a_decoder_gets_adapters_in_its_trunk_only():
    class ValueModel(nnx.Module):  # the critic's shape: a trunk and a value head
        def __init__(self):
            self.trunk = decoder()
            self.value_head = Linear(LLAMA.hidden_size, 1, bias=True, param_dtype=jnp.float32, rngs=nnx.Rngs(0))

    model = ValueModel()
    plain = nnx.graphdef(model)
    apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(params=1))
    assert type(model.value_head) is Linear
    assert len(jax.tree.leaves(nnx.state(model, LoRAParam))) == 2 * len(TARGETS) * LLAMA.num_layers
    assert base_graphdef(model) == plain


# -- merged, base view ---------------------------------------------------------


@pytest.mark.parametrize("config", [LLAMA, QWEN2], ids=["llama", "qwen2"])
def test_merged_weights_give_the_adapted_logits(config):
    model = decoder(config)
    ids = tokens()
    base_logits = logits(model, ids)
    plain_graphdef = nnx.graphdef(model)
    lora = LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    apply_lora(model, lora, rngs=nnx.Rngs(params=1))
    perturb(model)
    adapted = logits(model, ids)
    assert np.max(np.abs(adapted - base_logits)) > 1e-2  # the adapters do something

    state = nnx.state(model)
    merged = merge(state, lora)
    assert names(merged) == names(base_state(state))
    assert base_graphdef(model) == plain_graphdef
    # Untargeted kernels (and everything else) are the base arrays themselves.
    assert merged["layers"][0]["self_attn"]["k_proj"]["kernel"][...] is model.layers[0].self_attn.k_proj.kernel[...]
    np.testing.assert_allclose(logits(nnx.merge(plain_graphdef, merged), ids), adapted, atol=1e-5, rtol=0)
    # merge is a pure function: it runs under jit, on a base state and adapters received apart.
    rejoined = jax.jit(lambda b, a: merge(nnx.merge_state(b, a), lora))(base_state(state), adapter_state(state))
    np.testing.assert_allclose(logits(nnx.merge(plain_graphdef, rejoined), ids), adapted, atol=1e-5, rtol=0)


def test_base_view_is_the_base_model_without_a_copy():
    model = decoder(QWEN2)
    ids = tokens()
    before = logits(model, ids)
    apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(params=1))
    perturb(model)
    state = nnx.state(model)
    view = nnx.merge(base_graphdef(model), base_state(state))
    assert type(view.layers[0].self_attn.q_proj) is Linear
    for (_, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(base_state(state)),
                              jax.tree_util.tree_leaves_with_path(nnx.state(view))):
        assert a is b  # the same buffers
    np.testing.assert_array_equal(logits(view, ids), before)


# -- training ------------------------------------------------------------------


def _adapter_loss(graphdef, adapters, base, ids, remat):
    model = nnx.merge(graphdef, adapters, base)
    mask = jnp.ones(ids.shape, bool)
    lp = sequence_logprobs(model, ids[:, :4], mask[:, :4], ids[:, 4:], mask[:, 4:], remat=remat)
    return -jnp.mean(lp)


def test_gradients_reach_only_the_adapters_and_remat_agrees():
    model = decoder()
    apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(params=1))
    graphdef, adapters, base = nnx.split(model, LoRAParam, ...)
    ids = tokens()
    grad = jax.jit(jax.value_and_grad(_adapter_loss, argnums=1), static_argnums=(0, 4))

    loss, g = grad(graphdef, adapters, base, ids, False)
    assert jax.tree.structure(g) == jax.tree.structure(adapters)
    for p, x in jax.tree_util.tree_leaves_with_path(g):
        x = np.asarray(x)
        assert np.all(np.isfinite(x))
        if name(p).endswith("['lora_b']"):
            assert np.any(x != 0), name(p)
        else:  # d/dA is proportional to B, which is zero
            assert not np.any(x), name(p)

    # remat (a scan over the stacked layer states, adapters included) gives the same values.
    loss_r, g_r = grad(graphdef, adapters, base, ids, True)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g_r, g)

    # One SGD step: B is no longer zero, so A's gradient is not either; the loss goes down.
    stepped = jax.tree.map(lambda a, d: a - 0.1 * d, adapters, g)
    loss2, g2 = grad(graphdef, stepped, base, ids, True)
    assert loss2 < loss
    for p, x in jax.tree_util.tree_leaves_with_path(g2):
        assert np.all(np.isfinite(np.asarray(x))) and np.any(np.asarray(x) != 0), name(p)

    # The forward alone, with non-zero adapters, through both paths.
    mask = jnp.ones(ids.shape, bool)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    fwd = nnx.jit(lambda m, remat: m.forward(ids, positions, mask, remat=remat)[0], static_argnums=1)
    perturb(model)
    np.testing.assert_allclose(fwd(model, True), fwd(model, False), atol=1e-5, rtol=0)


# -- sharding ------------------------------------------------------------------


def test_adapters_lay_out_on_a_mesh_like_their_kernels():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    model = decoder()
    ids = tokens()
    plain = shardings_for(nnx.state(model), mesh)
    apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(params=1))
    perturb(model)
    expected = logits(model, ids)
    state = nnx.state(model)
    shardings = shardings_for(state, mesh)
    assert jax.tree.leaves(shardings_for(base_state(state), mesh)) == jax.tree.leaves(plain)  # base unchanged
    flat = {name(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    for leaf, spec in flat.items():
        if leaf.endswith(("['lora_a']", "['lora_b']")):
            kernel = flat[leaf.rsplit("[", 1)[0] + "['kernel']"]
            spec = tuple(spec) + (None,) * (2 - len(spec))
            kernel = tuple(kernel) + (None,) * (2 - len(kernel))
            # A [in, r] may share the kernel's `in` axis, B [r, out] its `out` axis; r is never split.
            if leaf.endswith("['lora_a']"):
                assert spec[0] in (None, kernel[0]) and spec[1] is None, (leaf, spec)
            else:
                assert spec[0] is None and spec[1] in (None, kernel[1]), (leaf, spec)
    sharded = jax.device_put(state, shardings)
    graphdef = nnx.graphdef(model)
    out = jax.jit(lambda s: nnx.merge(graphdef, s)(ids))(sharded)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)
    assert isinstance(sharded["layers"][0]["self_attn"]["q_proj"]["lora_b"][...].sharding, NamedSharding)


# -- export: PEFT as the oracle ------------------------------------------------


def test_peft_layout(tmp_path):
    from safetensors.numpy import load_file

    model = decoder(QWEN2)
    lora = LoRAConfig(rank=4, alpha=16, targets=("q_proj", "k_proj", "down_proj"))
    apply_lora(model, lora, rngs=nnx.Rngs(params=1))
    perturb(model)
    save_peft(tmp_path, nnx.state(model), lora, QWEN2, base_model_name_or_path="/ckpt/base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 16.0, 0.0)
    assert cfg["target_modules"] == ["q_proj", "k_proj", "down_proj"]
    assert cfg["base_model_name_or_path"] == "/ckpt/base"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * 3 * QWEN2.num_layers
    q = model.layers[1].self_attn.q_proj
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, QWEN2.hidden_size) and b.shape == (QWEN2.num_heads * QWEN2.dim_per_head, 4)
    np.testing.assert_array_equal(a, np.asarray(q.lora_a[...]).T)
    np.testing.assert_array_equal(b, np.asarray(q.lora_b[...]).T)
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in tensors


def test_save_peft_checks_the_model_config(tmp_path):
    model = decoder()
    apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(params=1))
    with pytest.raises(LoRAError, match="do not fit"):
        save_peft(tmp_path, nnx.state(model), LoRAConfig(rank=2), attrs.evolve(LLAMA, intermediate_size=64))
    with pytest.raises(LoRAError, match="no LoRA adapters"):
        save_peft(tmp_path, nnx.state(decoder()), LoRAConfig(rank=2), LLAMA)


def _torch_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


@pytest.mark.parametrize("config, targets", [(LLAMA, TARGETS), (QWEN2, ("q_proj", "v_proj", "gate_proj"))],
                         ids=["llama-all", "qwen2-some"])
def test_peft_and_transformers_load_the_exports(tmp_path, config, targets):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import torch

    model = decoder(config)
    save_pretrained(model, tmp_path / "base")
    lora = LoRAConfig(rank=4, alpha=8, targets=targets)
    apply_lora(model, lora, rngs=nnx.Rngs(params=1))
    perturb(model)
    ids = tokens()
    ours = logits(model, ids)
    state = nnx.state(model)
    save_peft(tmp_path / "adapter", adapter_state(state), lora, config)
    save_merged(tmp_path / "merged", state, lora, config)

    def hf(path):
        # transformers renamed from_pretrained's `torch_dtype` to `dtype` in 4.56.
        kw = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
        return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                                 **{kw: torch.float32}).eval()

    with_adapter = peft.PeftModel.from_pretrained(hf(tmp_path / "base"), tmp_path / "adapter").eval()
    np.testing.assert_allclose(_torch_logits(with_adapter, ids), ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_torch_logits(hf(tmp_path / "merged"), ids), ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits(from_pretrained(tmp_path / "merged"), ids), ours, atol=1e-5, rtol=0)
