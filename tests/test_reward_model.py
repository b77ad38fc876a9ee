"""The reward-model role: scores equal transformers' sequence-classification
logits, checkpoint errors name the problem, and the role trains end to end in
the three seed placements (colocated, offloaded, disaggregated)."""

from __future__ import annotations

import json

import attrs
import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from helpers import EXAMPLES, config  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from rlpipe import Batch, BuildContext, StageContext  # noqa: E402
from rlpipe.cli.main import cli  # noqa: E402
from rlpipe.core.errors import ConfigError  # noqa: E402
from rlpipe.models.hf import CheckpointError, from_pretrained_classifier  # noqa: E402
from rlpipe.models.tokenizer import load_tokenizer  # noqa: E402
from rlpipe.runtime import weights  # noqa: E402
from rlpipe.runtime.planning import plan_run  # noqa: E402
from rlpipe.testing import fake_devices  # noqa: E402

#: End to end: every test here trains, resumes or runs processes (`-m "not slow"` skips them).
pytestmark = pytest.mark.slow

PAD = 0
# The tiny policy preset's vocabulary, so the policy's token ids are valid here.
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, num_labels=1, pad_token_id=PAD, attn_implementation="eager")


def torch_classifier(kind: str):
    torch.manual_seed({"llama": 0, "qwen2": 1}[kind])
    if kind == "llama":
        model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**SHAPE, rope_theta=500000.0))
    else:  # q/k/v biases
        model = transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(**SHAPE, rope_theta=1000000.0))
    with torch.no_grad():  # biases start at zero and norms at one; make every tensor count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name == "score.weight":
                p.normal_(0.0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for kind in ("llama", "qwen2"):
        model = torch_classifier(kind)
        path = tmp_path_factory.mktemp(f"rm-{kind}")
        model.save_pretrained(path)
        out[kind] = (path, model)
    return out


@pytest.fixture(scope="module")
def registry():
    from rlpipe.core.plugins import load_registry

    return load_registry(warn=lambda m: None)


def build_stage(registry, data):
    cfg = config(registry, data)
    planned = plan_run(cfg, registry, fake_devices(8))
    spec = planned.roles["reward_model"]
    ctx = BuildContext(run_config=cfg, registry=registry, seed=cfg.train.seed)
    return spec.factory(cfg.roles["reward_model"], planned.plan.role("reward_model"), context=ctx), planned


def scored_batch():
    """Three prompts (right-padded char tokens), two completions each of varied
    lengths, with junk (never pad) under the masked positions."""
    tok = load_tokenizer("char")
    ids = [tok.encode(t) for t in ["12+7=", "reverse 345:", "9*9="]]
    width = max(map(len, ids))
    prompts, pmask = np.zeros((3, width), np.int32), np.zeros((3, width), np.int32)
    for i, row in enumerate(ids):
        prompts[i, :len(row)], pmask[i, :len(row)] = row, 1
    rng = np.random.RandomState(0)
    n = 7
    comp = rng.randint(1, SHAPE["vocab_size"], (3, 2, n)).astype(np.int32)
    lengths = np.array([[7, 3], [1, 5], [6, 7]])
    cmask = (np.arange(n)[None, None, :] < lengths[..., None]).astype(np.int32)
    return Batch(prompt_tokens=prompts, prompt_mask=pmask, completion_tokens=comp, completion_mask=cmask)


def torch_scores(model, batch) -> np.ndarray:
    """transformers' ``logits[:, 0]`` of each prompt + completion, right-padded with the pad id."""
    prompts, pmask = batch["prompt_tokens"], batch["prompt_mask"].astype(bool)
    comp, cmask = batch["completion_tokens"], batch["completion_mask"].astype(bool)
    seqs = [np.concatenate([prompts[i][pmask[i]], comp[i, j][cmask[i, j]]])
            for i in range(comp.shape[0]) for j in range(comp.shape[1])]
    width = max(map(len, seqs))
    ids, mask = np.full((len(seqs), width), PAD, np.int64), np.zeros((len(seqs), width), np.int64)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = s, 1
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert logits.shape == (len(seqs), 1)
    return logits[:, 0].numpy().reshape(comp.shape[:2])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_scores_equal_transformers_sequence_classification(registry, checkpoints, kind):
    path, model = checkpoints[kind]
    # 6 rows, micro-batches of 8 split over fsdp=8: padding rows are dropped.
    stage, planned = build_stage(registry, {"roles": {"reward_model": {"checkpoint": str(path)}}})
    assert planned.plan.role("reward_model").mesh.shape == (8, 1)
    batch = scored_batch()
    out = stage.process(batch, context=StageContext(role="reward_model", step=0, index=0, seed=0))
    scores = out["reward_model_scores"]
    assert scores.shape == (3, 2) and scores.dtype == np.float32
    want = torch_scores(model, batch)
    assert np.abs(want).max() > 1e-2  # a real signal, not all zeros
    np.testing.assert_allclose(scores, want, atol=1e-4, rtol=1e-4)


def test_a_completion_attention_mask_is_what_is_scored(registry, checkpoints):
    """Agentic episodes: environment tokens (attended, not trained on) are scored too."""
    path, model = checkpoints["llama"]
    stage, _ = build_stage(registry, {"roles": {"reward_model": {"checkpoint": str(path), "micro_batch_size": 3}}})
    batch = scored_batch()
    attend = batch["completion_mask"].copy()
    loss = attend.copy()
    loss[..., 0] = 0  # the first token is the environment's
    with_env = Batch(**{**{k: batch[k] for k in batch}, "completion_mask": loss, "completion_attention_mask": attend})
    out = stage.process(with_env, context=StageContext(role="reward_model", step=0, index=0, seed=0))
    np.testing.assert_allclose(out["reward_model_scores"], torch_scores(model, batch), atol=1e-4, rtol=1e-4)


def test_classifier_checkpoint_errors_name_the_problem(checkpoints, tmp_path):
    path, _ = checkpoints["llama"]
    model, head = from_pretrained_classifier(path)
    assert head.shape == (64, 1) and head.dtype == np.float32 and model.lm_head is None

    two = tmp_path / "two"
    two.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    (two / "config.json").write_text(json.dumps({**cfg, "id2label": {"0": "a", "1": "b"}}))
    (two / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="num_labels is 2"):
        from_pretrained_classifier(two)

    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="needs a sequence-classification checkpoint.*'LlamaForCausalLM'"):
        from_pretrained_classifier(lm)

    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "score.weight"}, headless / "model.safetensors")
    with pytest.raises(CheckpointError, match="no score.weight"):
        from_pretrained_classifier(headless)


def test_config_requires_a_checkpoint_and_a_matching_vocabulary(registry, tmp_path):
    with pytest.raises(ConfigError, match="roles.reward_model.checkpoint: required"):
        config(registry, {"roles": {"reward_model": {}}})
    torch.manual_seed(0)
    small = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**{**SHAPE, "vocab_size": 64}))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(ConfigError, match="vocabulary \\(64\\) is smaller than the policy tokenizer's \\(100\\)"):
        build_stage(registry, {"roles": {"reward_model": {"checkpoint": str(tmp_path / "small")}}})


def test_offloaded_reward_model_starts_on_the_host_and_comes_back(registry, checkpoints):
    data = yaml.safe_load((EXAMPLES / "colocated_offload.yaml").read_text())
    data["roles"]["reward_model"] = {"checkpoint": str(checkpoints["llama"][0])}
    stage, planned = build_stage(registry, data)
    assert planned.plan.role("reward_model").offload
    assert weights.device_bytes(stage.holder.state) == 0 and weights.device_bytes(stage.head) == 0
    stage.onload()
    assert weights.device_bytes(stage.holder.state) > 0 and weights.device_bytes(stage.head) > 0
    stage.offload()
    assert weights.device_bytes(stage.holder.state) == 0 and weights.device_bytes(stage.head) == 0


def test_memory_estimate_counts_the_trunk_and_head(registry, checkpoints):
    from rlpipe.core.placement import MeshSpec
    from rlpipe.models import memory
    from rlpipe.roles.reward_model import checkpoint_shape, estimate_memory

    cfg = config(registry, {"roles": {"reward_model": {"checkpoint": str(checkpoints["qwen2"][0])}}})
    shape = checkpoint_shape(cfg.roles["reward_model"].checkpoint)
    assert shape.qkv_bias and shape.tie_embeddings and shape.vocab_size == 128
    mesh = MeshSpec(shape=(4, 1), axes=("fsdp", "tp"))
    est = estimate_memory(cfg.roles["reward_model"], cfg, mesh)
    assert est.parameters == memory.decoder_parameter_bytes(shape, mesh, 4) + 64 * 4
    assert est.activations > 0


SMALL = ["--set", "train.prompts_per_item=2", "--set", "train.items_per_step=2",
         "--set", "roles.rollout.max_new_tokens=4", "--set", "roles.rollout.num_generations=2",
         "--set", "roles.trainer.micro_batch_size=4"]


def _reward_terms_supported() -> bool:
    from rlpipe.roles.reward import RewardConfig

    return "terms" in attrs.fields_dict(RewardConfig)


@pytest.mark.parametrize(("seed", "extra"), [("colocated", {}), ("colocated_offload", {}),
                                             ("disaggregated", {"colocate_with": "reference"})])
def test_the_seed_placements_train_with_a_reward_model(tmp_path, checkpoints, seed, extra):
    run_dir = tmp_path / "run"
    section = {"checkpoint": str(checkpoints["llama"][0]), "micro_batch_size": 4, **extra}
    args = ["train", "--steps", "2", "--run-dir", str(run_dir), "-q", "-c", str(EXAMPLES / f"{seed}.yaml"), *SMALL,
            "--set", f"roles.reward_model={json.dumps(section)}"]
    if _reward_terms_supported():
        args += ["--set", "roles.reward.terms={reward_model_scores: 0.5}"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["policy_version"] for row in rows] == [1, 2]
    plan = json.loads((run_dir / "plan.json").read_text())
    role = {x["name"]: x for x in plan["roles"]}["reward_model"]
    assert role["offload"] is (seed == "colocated_offload")
    if seed == "disaggregated":
        assert role["devices"] == {x["name"]: x for x in plan["roles"]}["reference"]["devices"]
    edges = {(b["from"], b["to"]) for b in plan["boundaries"]}
    if _reward_terms_supported():
        # The reward role weighs the scores into `rewards` and logs their mean.
        assert ("reward_model", "reward") in edges
        assert all(np.isfinite(row["reward/reward_model_scores"]) for row in rows)
    else:
        # Nobody consumes its scores: they flow into the trainer's batch.
        assert ("reward_model", "trainer") in edges
    trace = json.loads((run_dir / "trace.json").read_text())
    track = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    spans = {(track[e["tid"]], e["name"]) for e in trace["traceEvents"] if e["ph"] == "X"}
    assert ("reward_model", "score") in spans
    assert (("reward_model", "offload") in spans) is (seed == "colocated_offload")
