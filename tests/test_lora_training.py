"""LoRA through the roles (issue 18, phase 2): the trainer trains only the
adapters over a frozen base, the rollout receives only the adapters, the
reference is the base model, checkpoints hold the adapters, and the memory
estimates show it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import config

from rlpipe import Batch, BuildContext, StageContext
from rlpipe.core.placement import MeshSpec, RolePlacement
from rlpipe.models.lora import LoRAConfig, LoRAParam

P, G, N = 4, 2, 6
LORA = {"rank": 4, "alpha": 8}


def lora_config(registry, trainer=None, **model):
    return config(registry, {"model": {"lora": LORA, **model},
                             "roles": {"trainer": {"micro_batch_size": 4, "learning_rate": 1e-2, **(trainer or {})}}})


def placement(role, devices=(0,)):
    return RolePlacement(name=role, devices=list(devices), mesh=MeshSpec((len(devices), 1), ("fsdp", "tp")))


def context(cfg, registry):
    return BuildContext(run_config=cfg, registry=registry, seed=0)


def trainer(registry, cfg):
    from rlpipe.roles.trainer_stage import TrainerStage
    from rlpipe.runtime.planning import make_algorithm

    _, algorithm = make_algorithm(cfg, registry)
    return TrainerStage(cfg.roles["trainer"], placement("trainer"), context=context(cfg, registry), algorithm=algorithm)


def item(seed=7, rewards=None):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(5, 90, size=(P, 5)).astype(np.int32)
    comp = rng.integers(5, 90, size=(P, G, N)).astype(np.int32)
    return Batch(prompt_tokens=prompt, prompt_mask=np.ones_like(prompt), completion_tokens=comp,
                 completion_mask=np.ones((P, G, N), np.int32),
                 rollout_logprobs=np.full((P, G, N), -4.0, np.float32),
                 ref_logprobs=np.full((P, G, N), -4.0, np.float32),
                 rewards=rng.random((P, G)).astype(np.float32) if rewards is None else rewards, policy_version=np.zeros((P,), np.int32))


def host(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def step(t, batch, s=0):
    t.process(batch, context=StageContext(role="trainer", step=s, index=0))
    t.on_barrier(context=StageContext(role="trainer", step=s))


# -- config ------------------------------------------------------------------------


def test_model_lora_config_is_optional_and_typed(registry):
    assert config(registry).model.lora is None
    assert config(registry, {"model": {"lora": {"rank": 2, "targets": ["v_proj", "q_proj"]}}}).model.lora == \
        LoRAConfig(rank=2, targets=("q_proj", "v_proj"))


# -- the trainer -------------------------------------------------------------------


def test_trainer_trains_only_the_adapters(registry):
    t = trainer(registry, lora_config(registry))
    # Only adapters are trainable; the base is frozen, in the compute dtype (float32 on the CPU), not duplicated.
    assert all(isinstance(v, LoRAParam) for v in jax.tree.leaves(t.params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    assert not any(isinstance(v, LoRAParam) for v in jax.tree.leaves(t.frozen, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    n_adapter = sum(x.size for x in jax.tree.leaves(t.params))
    # AdamW's state: two moments per adapter parameter, plus step counts (scalars).
    opt_leaves = jax.tree.leaves(t.opt_state)
    assert sum(x.size for x in opt_leaves if x.ndim) == 2 * n_adapter
    # XLA's own count: the update program's arguments are the adapters, their AdamW moments and
    # their accumulated gradients (plus scalars) — no base weights, no float32 master of them.
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(t.params))
    acc = t._zeros(t.params)
    analysis = t._apply.lower(t.params, t.opt_state, acc).compile().memory_analysis()
    if analysis is not None:
        assert 4 * adapter_bytes <= analysis.argument_size_in_bytes <= 4 * adapter_bytes + 64
        assert analysis.argument_size_in_bytes < sum(x.nbytes for x in jax.tree.leaves(t.frozen))
    base_before, adapters_before = host(t.frozen), host(t.params)
    step(t, item())
    assert t.last_metrics["skipped_updates"] == 0
    for a, b in zip(host(t.frozen), base_before):
        np.testing.assert_array_equal(a, b)  # bit-identical base
    changed = [not np.array_equal(a, b) for a, b in zip(host(t.params), adapters_before)]
    assert any(changed)


def test_lora_training_lowers_the_loss(registry):
    """Several updates on one batch with positive advantages for its completions
    raise their log-probs: the adapters learn."""
    cfg = lora_config(registry, trainer={"learning_rate": 3e-2})
    t = trainer(registry, cfg)
    rewards = np.zeros((P, G), np.float32)
    rewards[:, 0] = 1.0  # generation 0 of every prompt is good
    batch = item(rewards=rewards)
    rows = {"prompt": np.repeat(batch["prompt_tokens"], G, 0), "prompt_mask": np.repeat(batch["prompt_mask"], G, 0),
            "completion": batch["completion_tokens"].reshape(P * G, N),
            "completion_mask": batch["completion_mask"].reshape(P * G, N).astype(np.float32)}

    def mean_logp():
        return float(np.asarray(t._logprobs(t.params, t.frozen, rows)).mean())

    before = mean_logp()
    for s in range(4):
        step(t, batch, s)
    lp = np.asarray(t._logprobs(t.params, t.frozen, rows)).reshape(P, G, N)
    assert lp[:, 0].mean() > before  # the rewarded completions became more likely
    assert lp[:, 0].mean() - lp[:, 1].mean() > 0


# -- the rollout: adapter-only weight sync ----------------------------------------------


def rollout(registry, cfg, devices=(0,)):
    from rlpipe.roles.rollout_stage import RolloutStage

    return RolloutStage(cfg.roles["rollout"], placement("rollout", devices), context=context(cfg, registry))


def rows_of(batch):
    return {"prompt": np.repeat(batch["prompt_tokens"], G, 0), "prompt_mask": np.repeat(batch["prompt_mask"], G, 0),
            "completion": batch["completion_tokens"].reshape(P * G, N),
            "completion_mask": batch["completion_mask"].reshape(P * G, N).astype(np.float32)}


def logprobs(graphdef, state, rows, temperature=1.0):
    from rlpipe.models.decoder import sequence_logprobs

    fn = jax.jit(lambda s, r: sequence_logprobs(nnx.merge(graphdef, s), r["prompt"], r["prompt_mask"],
                                                r["completion"], r["completion_mask"], temperature))
    return np.asarray(fn(state, rows))


@pytest.mark.parametrize("devices", [(0,), (1,)], ids=["shared-devices", "other-devices"])
def test_rollout_receives_only_adapters_and_matches_the_trainer(registry, devices):
    cfg = lora_config(registry)
    t, r = trainer(registry, cfg), rollout(registry, cfg, devices)
    assert r.holder.adapters
    base = r.holder.base
    # On the trainer's devices the rollout holds no base of its own: it is the trainer's frozen one.
    assert (r.holder.shared is t.base_weights) == (devices == (0,))
    # Trainer and rollout start identical (adapters drawn from the run's seed).
    for a, b in zip(host(t.params), host(r.holder._states[0])):
        np.testing.assert_array_equal(a, b)
    received = []
    t.subscribe(lambda s, v: (received.append(s), r.load_weights(s, v)))
    step(t, item())
    assert r.policy_version == 1
    # What moved is the adapters alone, and the rollout's base is still the one it loaded.
    assert all(isinstance(v, LoRAParam)
               for v in jax.tree.leaves(received[0], is_leaf=lambda x: isinstance(x, nnx.Variable)))
    assert t.sync_bytes == sum(x.nbytes for x in jax.tree.leaves(t.params))
    assert r.holder.base is base
    temperature = t.temperature
    rows = rows_of(item(seed=3))
    want = np.asarray(t._logprobs(t.params, t.frozen, rows))
    got = logprobs(r.holder.graphdef, r.holder.state, rows, temperature)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # ...and that policy is not the initial one: the update reached the rollout.
    composed = logprobs(r.holder.graphdef, nnx.merge_state(base, r.holder._states[1]), rows, temperature)
    np.testing.assert_array_equal(composed, got)
    assert not np.allclose(logprobs(r.holder.graphdef, nnx.merge_state(base, jax.tree.map(jnp.zeros_like, r.holder._states[1])),
                                    rows, temperature), got)


# -- the reference: the base model, for free ---------------------------------------------


def reference(registry, cfg, devices=(0,)):
    from rlpipe.roles.reference_stage import ReferenceStage

    return ReferenceStage(cfg.roles["reference"], placement("reference", devices), context=context(cfg, registry))


def with_reference(registry):
    return config(registry, {"model": {"lora": LORA}, "algorithm": {"name": "grpo", "options": {"kl_beta": 0.1}},
                             "roles": {"reference": {}, "trainer": {"micro_batch_size": 4, "learning_rate": 1e-2}}})


@pytest.mark.parametrize("devices", [(0,), (1,)], ids=["colocated", "disaggregated"])
def test_reference_is_the_base_model_shared_when_colocated(registry, devices):
    from rlpipe.models.loading import load_model

    cfg = with_reference(registry)
    t = trainer(registry, cfg)
    ref = reference(registry, cfg, devices)
    colocated = devices == (0,)
    assert (ref.holder.shared is t.base_weights) == colocated
    if colocated:  # the same arrays, not a copy
        for a, b in zip(jax.tree.leaves(ref.holder.state), jax.tree.leaves(t.frozen)):
            assert a is b
    step(t, item())  # the adapters move; the reference does not
    full = item(seed=3)
    batch = Batch(**{k: full[k] for k in ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask")})
    out = ref.process(batch, context=StageContext(role="reference", step=0, index=0))
    from rlpipe.core.placement import make_mesh

    base = load_model(cfg.model, mesh=make_mesh(placement("x", devices)), seed=0)  # built independently
    want = logprobs(*nnx.split(base), rows_of(batch), t.temperature).reshape(P, G, N)
    np.testing.assert_allclose(out["ref_logprobs"], want, rtol=1e-6, atol=1e-6)
    # ...which is not the trained policy any more.
    policy = np.asarray(t._logprobs(t.params, t.frozen, rows_of(batch))).reshape(P, G, N)
    assert not np.allclose(policy, want, atol=1e-6)


# -- a run end to end: checkpoints hold the adapters; export ------------------------------------

SMALL = ["train.prompts_per_item=2", "train.items_per_step=2", "roles.rollout.max_new_tokens=2",
         "roles.rollout.num_generations=4", "roles.trainer.micro_batch_size=8", "checkpoint.every=1",
         "checkpoint.keep=10", "model.lora.rank=4", "model.lora.alpha=8", "roles.trainer.learning_rate=1e-2"]


def run_config(registry, steps, *extra):
    from rlpipe.app.defaults import DEFAULT_CONFIG
    from rlpipe.runtime.run_config import load_config

    return load_config(registry, defaults=DEFAULT_CONFIG, overrides=[*SMALL, f"train.steps={steps}", *extra])


def saved_arrays(run_dir, step):
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "stage.trainer")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def test_lora_run_checkpoints_the_adapters_and_exports(tmp_path, registry):
    from click.testing import CliRunner

    from rlpipe.app.driver import train
    from rlpipe.cli.main import cli
    from rlpipe.models import hf
    from rlpipe.models.loading import load_policy
    from rlpipe.models.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
    from rlpipe.runtime.checkpoint import RunCheckpointer

    run_dir = tmp_path / "run"
    cfg = run_config(registry, 2)
    train(cfg, registry, run_dir=run_dir)
    arrays = saved_arrays(run_dir, 1)
    params = [k for k in arrays if k.startswith("['params']")]
    assert params and all(k.removesuffix("['value']").endswith(("['lora_a']", "['lora_b']")) for k in params), params[:3]
    model = load_policy(cfg.model, seed=cfg.train.seed)
    n_adapter = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
    assert sum(arrays[k].size for k in params) == n_adapter
    # The optimizer state: AdamW's two moments per adapter parameter (and scalar counts).
    assert sum(v.size for k, v in arrays.items() if k.startswith("['opt_state']") and v.ndim) == 2 * n_adapter
    # Each weight sync moved the float32 adapters alone; the trace says how many bytes.
    syncs = [e for e in json_of((run_dir / "trace.json").read_text())["traceEvents"] if e.get("name") == "weight_sync"]
    assert len(syncs) == 2 and all(e["args"]["bytes"] == 4 * n_adapter for e in syncs)
    meta = RunCheckpointer(run_dir / "checkpoints", primary=False).meta(1)
    assert meta["base"] == {"preset": "tiny", "random_init": "preset"}

    result = CliRunner().invoke(cli, ["export", str(run_dir), "--adapters", str(tmp_path / "adapter"),
                                      "--merged", str(tmp_path / "merged"), "--json"])
    assert result.exit_code == 0, result.output
    assert json_of(result.stdout)["checkpoint_step"] == 1
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE).is_file() and (tmp_path / "adapter" / ADAPTER_CONFIG_FILE).is_file()
    # The merged checkpoint computes the trained policy: the base plus the checkpoint's adapters.
    from rlpipe.cli.export import trained_policy

    policy, _ = trained_policy(run_dir, cfg, None, role="trainer")
    merged = hf.from_pretrained(tmp_path / "merged")
    tokens = np.arange(1, 9, dtype=np.int32)[None]
    np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(policy(tokens)), rtol=1e-5, atol=1e-5)
    # ...and not the base model: the adapters trained (B left zero).
    assert any(np.abs(np.asarray(m.lora_b[...])).max() > 0 for _, m in nnx.iter_graph(policy) if hasattr(m, "lora_b"))
    # rlpipe eval reads the adapters-only checkpoint and evaluates the base plus them.
    evaluated = CliRunner().invoke(cli, ["eval", str(run_dir), "-n", "4", "-k", "0", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json_of(evaluated.stdout)["checkpoint_step"] == 1
    # --adapters refuses a run that trained the whole model; nothing is written.
    full = tmp_path / "full"
    train(run_config(registry, 1, "model.lora=null"), registry, run_dir=full)
    refused = CliRunner().invoke(cli, ["export", str(full), "--adapters", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "model.lora is not set" in refused.stderr
    assert not (tmp_path / "x").exists()


def json_of(text):
    import json

    return json.loads(text)


# -- the plan's memory estimates --------------------------------------------------------------


def test_plan_shows_what_lora_saves(registry):
    from rlpipe.models import memory
    from rlpipe.runtime.planning import plan_run
    from rlpipe.testing import fake_devices

    kl = {"algorithm": {"name": "grpo", "options": {"kl_beta": 0.1}}, "roles": {"reference": {}}}

    def planned(data, n=1):
        return plan_run(config(registry, data), registry, fake_devices(n)).memory

    full, lora = planned(kl), planned({**kl, "model": {"lora": LORA}})
    shape = memory.model_shape(config(registry).model)
    adapters = memory.lora_parameter_bytes(shape, LoRAConfig(**LORA), memory.MeshSpec((1, 1), ("fsdp", "tp")))
    assert adapters == 4 * sum(int(np.prod(s)) for _, s in memory.lora_parameters(shape, LoRAConfig(**LORA)))
    # The trainer: AdamW's moments and the gradients cover the adapters alone; the base counts once.
    assert lora["trainer"].optimizer_state == 2 * adapters < full["trainer"].optimizer_state
    assert lora["trainer"].gradients == adapters
    assert lora["trainer"].parameters == full["trainer"].parameters + adapters  # float32 on the CPU: same base bytes
    # The reference on the trainer's devices and mesh holds nothing of its own.
    assert full["reference"].parameters > 0 and lora["reference"].parameters == 0
    # What the trainer really holds matches (1 device: nothing sharded).
    t = trainer(registry, lora_config(registry))
    assert sum(x.nbytes for x in jax.tree.leaves(t.params)) == adapters
    # A disaggregated reference (its own mesh) loads the base.
    apart = planned({**kl, "model": {"lora": LORA},
                     "roles": {"reference": {"mesh": {"shape": [1, 1], "axes": ["fsdp", "tp"]}}}}, n=2)
    assert apart["reference"].parameters == full["reference"].parameters


# -- the three seed placements on 8 fake devices; exact resume ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("example", ["colocated", "colocated_offload", "disaggregated"])
def test_lora_trains_in_every_seed_placement(tmp_path, registry, example):
    from helpers import EXAMPLES

    from rlpipe.app.defaults import DEFAULT_CONFIG
    from rlpipe.app.driver import train
    from rlpipe.runtime.run_config import load_config

    cfg = load_config(registry, defaults=DEFAULT_CONFIG, files=[EXAMPLES / f"{example}.yaml"],
                      overrides=["train.steps=2", "model.lora.rank=4", "algorithm.options.kl_beta=0.05",
                                 "roles.reference.micro_batch_size=8"])
    summary = train(cfg, registry, run_dir=tmp_path / "run")
    assert summary.steps == 2
    rows = [json_of(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["skipped_updates"] == 0 for r in rows)


@pytest.mark.slow
def test_lora_run_resumes_bit_identically(tmp_path, registry):
    from rlpipe.app.driver import train

    keys = ("step", "loss", "reward/mean", "grad_norm", "policy_version")
    full, part = tmp_path / "full", tmp_path / "part"
    train(run_config(registry, 3), registry, run_dir=full)
    train(run_config(registry, 2), registry, run_dir=part)
    train(run_config(registry, 3), registry, run_dir=part)  # resumes from step 1's checkpoint
    rows = [[{k: r[k] for k in keys if k in r} for r in map(json_of, (d / "metrics.jsonl").read_text().splitlines())]
            for d in (full, part)]
    assert rows[0] == rows[1]
    a, b = saved_arrays(full, 2), saved_arrays(part, 2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
