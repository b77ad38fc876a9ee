"""The rollout and reference roles as stages on their placements: shapes and
versions, agreement between the two, weight sync, offload, and both running in
the executor under the time-shared seed placement."""

import jax
import numpy as np
import pytest
import yaml
from flax import nnx
from helpers import EXAMPLES, config

from rlpipe import Batch, BuildContext, Executor, StageContext, Trace
from rlpipe.core.placement import make_mesh
from rlpipe.models.loading import init_sharded
from rlpipe.models.tokenizer import load_tokenizer
from rlpipe.runtime import weights
from rlpipe.runtime.planning import plan_run
from rlpipe.testing import RecordingStage, fake_devices

G, N = 2, 8


def seed_config(registry, name, **extra):
    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    data.setdefault("roles", {}).setdefault("rollout", {}).update({"num_generations": G, "max_new_tokens": N, "temperature": 1.0})
    for k, v in extra.items():
        data.setdefault(k, {}).update(v)
    return config(registry, data)


def build(registry, cfg, role):
    planned = plan_run(cfg, registry, fake_devices(8))
    spec = planned.roles[role]
    ctx = BuildContext(run_config=cfg, registry=registry, seed=cfg.train.seed)
    return spec.factory(cfg.roles[role], planned.plan.role(role), context=ctx), planned


def prompts():
    tok = load_tokenizer("char")
    texts = ["12+7=", "reverse 345:", "9*9="]
    ids = [tok.encode(t) for t in texts]
    width = max(map(len, ids))
    toks = np.zeros((len(ids), width), np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    for i, row in enumerate(ids):  # right-padded on purpose: stages must not care
        toks[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return Batch(prompt_tokens=toks, prompt_mask=mask)


def ctx(role, step=0, index=0, behavior_version=0):
    return StageContext(role=role, step=step, index=index, seed=0, behavior_version=behavior_version)


@pytest.fixture(scope="module")
def colocated(registry_module):
    cfg = seed_config(registry_module, "colocated")
    rollout, planned = build(registry_module, cfg, "rollout")
    reference, _ = build(registry_module, cfg, "reference")
    return cfg, planned, rollout, reference


@pytest.fixture(scope="module")
def registry_module():
    from rlpipe.core.plugins import load_registry

    return load_registry(warn=lambda m: None)


def test_rollout_produces_grouped_completions_with_its_policy_version(colocated):
    _, _, rollout, _ = colocated
    out = rollout.process(prompts(), context=ctx("rollout"))
    assert out["completion_tokens"].shape == (3, G, N) == out["completion_mask"].shape == out["rollout_logprobs"].shape
    np.testing.assert_array_equal(out["policy_version"], [0, 0, 0])
    again = rollout.process(prompts(), context=ctx("rollout"))
    np.testing.assert_array_equal(out["completion_tokens"], again["completion_tokens"])  # deterministic per (seed, step, index)
    other = rollout.process(prompts(), context=ctx("rollout", index=1))
    assert not np.array_equal(out["completion_tokens"], other["completion_tokens"])
    assert not np.array_equal(out["completion_tokens"][:, 0], out["completion_tokens"][:, 1])  # the group differs


def test_reference_scores_equal_rollout_logprobs_for_the_initial_policy(colocated):
    """Rollout on a [1, 4] mesh and reference on a [4, 1] mesh hold the same
    initial weights, so at temperature 1 their per-token log-probs agree."""
    _, planned, rollout, reference = colocated
    assert planned.plan.role("rollout").mesh.shape == (1, 4) and planned.plan.role("reference").mesh.shape == (4, 1)
    out = reference.process(rollout.process(prompts(), context=ctx("rollout")), context=ctx("reference"))
    mask = out["completion_mask"].astype(bool)
    assert out["ref_logprobs"].shape == (3, G, N)
    np.testing.assert_allclose(out["ref_logprobs"][mask], out["rollout_logprobs"][mask], atol=1e-4)
    assert (out["ref_logprobs"][~mask] == 0).all()


def test_weight_sync_changes_the_policy_and_its_version(colocated, registry_module):
    cfg, planned, rollout, _ = colocated
    trainer_mesh = make_mesh(planned.plan.role("trainer"))  # same devices, other mesh shape
    new = nnx.split(init_sharded(rollout.holder.config, trainer_mesh, seed=99))[1]
    before = rollout.process(prompts(), context=ctx("rollout"))
    rollout.load_weights(new, version=1)
    assert rollout.holder.versions() == [0, 1]  # a step with behaviour version 0 may still come
    after = rollout.process(prompts(), context=ctx("rollout", step=1, behavior_version=1))
    np.testing.assert_array_equal(after["policy_version"], [1, 1, 1])
    assert rollout.holder.versions() == [1]  # no later step needs version 0
    with pytest.raises(RuntimeError, match="must be generated with policy version 2"):
        rollout.process(prompts(), context=ctx("rollout", step=2, behavior_version=2))
    assert not np.array_equal(before["rollout_logprobs"], after["rollout_logprobs"])
    for leaf, sh in zip(jax.tree_util.tree_leaves(rollout.holder.state), jax.tree_util.tree_leaves(rollout.holder.shardings)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)  # re-laid for the rollout's own mesh


def test_offloaded_stages_start_on_the_host_and_come_back(registry_module):
    cfg = seed_config(registry_module, "colocated_offload")
    reference, planned = build(registry_module, cfg, "reference")
    assert planned.plan.role("reference").offload
    assert weights.device_bytes(reference.holder.state) == 0
    reference.onload()
    assert weights.device_bytes(reference.holder.state) > 0
    reference.offload()
    assert weights.device_bytes(reference.holder.state) == 0


def test_rollout_and_reference_run_time_shared_in_the_executor(registry_module):
    """The colocated+offload seed on 8 fake devices: real rollout and reference
    stages, stand-ins for reward and trainer.  While the trainer works, neither
    model holds device memory."""
    cfg = seed_config(registry_module, "colocated_offload")
    rollout, planned = build(registry_module, cfg, "rollout")
    reference, _ = build(registry_module, cfg, "reference")
    seen = []

    class Trainer(RecordingStage):
        def process(self, batch, *, context):
            seen.append((weights.device_bytes(rollout.holder.state), weights.device_bytes(reference.holder.state),
                         batch["ref_logprobs"].shape))
            return super().process(batch, context=context)

    stages = {"rollout": rollout, "reference": reference,
              "reward": RecordingStage("reward", {"rewards": lambda b, c: np.zeros(b["completion_tokens"].shape[:2], np.float32)}),
              "trainer": Trainer("trainer")}
    ex = Executor(planned.graph, stages, planned.plan, trace=Trace())
    ex.run([[prompts(), prompts()]] * 2, steps=2)
    assert seen == [(0, 0, (3, G, N))] * 4
    names = {(ex.trace.track_of(e), e["name"]) for e in ex.trace.events()}
    assert {("rollout", "onload"), ("rollout", "offload"), ("reference", "onload"), ("reference", "offload")} <= names
