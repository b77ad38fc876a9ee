"""The executor: streaming vs. blocking edges, bounded staleness, offload calls,
lifecycle hooks, and failures that stop the run cleanly.

Overlap is asserted structurally: a stage waits (with a generous timeout) for
an event that only an overlapping schedule can set, so the tests do not depend
on timing; they fail if the overlap cannot happen.
"""

import threading
import types

import numpy as np
import pytest
import yaml
from helpers import EXAMPLES, config

from rlpipe import Batch, Executor, StageError, Trace, build_graph, hookimpl
from rlpipe.core.plugins import load_registry
from rlpipe.runtime.planning import plan_run
from rlpipe.testing import RecordingStage, fake_devices, register_plugin

ITEMS = 4
WAIT_S = 10.0


def source(steps, items=ITEMS):
    for step in range(steps):
        yield [Batch(prompt_tokens=np.full((2, 3), step * 10 + i), prompt_mask=np.ones((2, 3))) for i in range(items)]


def f(value=0):
    return lambda batch, ctx: np.asarray(value)


def seed(name, **train):
    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    data.setdefault("train", {}).update(train)
    return data


def builtin_pipeline(registry, data, log, overrides=None):
    """Plans the built-in rollout/reward/reference/trainer roles and gives each a recording stage."""
    planned = plan_run(config(registry, data), registry, fake_devices(8))
    stages = {
        "rollout": RecordingStage("rollout", {k: f() for k in registry.roles["rollout"].produces}, log=log),
        "reward": RecordingStage("reward", {"rewards": f()}, log=log),
        "reference": RecordingStage("reference", {"ref_logprobs": f()}, log=log),
        "trainer": RecordingStage("trainer", log=log),
    }
    stages.update(overrides or {})
    return planned, stages


def positions(log, event, role, step=None):
    return [i for i, e in enumerate(log) if e[0] == event and e[1] == role and (step is None or e[2] == step)]


def test_blocking_edges_hold_reference_until_rollouts_barrier_and_roles_take_turns(registry):
    log, ref_started = [], threading.Event()

    class Rollout(RecordingStage):
        def process(self, batch, *, context):
            if (context.step, context.index) == (0, ITEMS - 1):
                # A streaming edge would let the reference start meanwhile; a blocking one must not.
                log.append(("waited", "rollout", 0, ref_started.wait(0.5)))
            return super().process(batch, context=context)

    class Reference(RecordingStage):
        def process(self, batch, *, context):
            ref_started.set()
            return super().process(batch, context=context)

    planned, stages = builtin_pipeline(registry, seed("colocated_offload"), log, {
        "rollout": Rollout("rollout", {k: f() for k in registry.roles["rollout"].produces}, log=log),
        "reference": Reference("reference", {"ref_logprobs": f()}, log=log)})
    ex = Executor(planned.graph, stages, planned.plan, max_staleness=3)
    assert ex.lag == 0  # rollout time-shares with the trainer: strictly on-policy
    summary = ex.run(source(3), steps=3)
    assert summary.steps == 3 and summary.policy_version == 3
    assert ("waited", "rollout", 0, False) in log
    for step in range(3):
        assert min(positions(log, "process", "reference", step)) > max(positions(log, "process", "rollout", step))
        assert min(positions(log, "process", "trainer", step)) > max(positions(log, "process", "reference", step))
    # the next rollout starts only after the trainer's barrier (on-policy)
    for step in range(1, 3):
        assert min(positions(log, "process", "rollout", step)) > positions(log, "barrier", "trainer", step - 1)[0]
    # time-sharing: at most one device role's state on the devices at any moment;
    # the reward role works on the host, is never offloaded and may run at any time
    loaded = set()
    for event, r, *_ in log:
        if event == "onload":
            loaded.add(r)
            assert len(loaded) == 1, f"{loaded} on the devices together"
        elif event == "offload":
            loaded.discard(r)
        elif event == "process" and r != "reward":
            assert loaded == {r}, f"{r} processed while not loaded"
    assert len(positions(log, "onload", "rollout")) == len(positions(log, "offload", "rollout")) == 3
    assert positions(log, "onload", "reward") == positions(log, "offload", "reward") == []
    assert len(positions(log, "process", "reward")) == 3 * ITEMS


def test_with_offload_the_host_reward_role_streams_while_rollout_still_generates(registry):
    log, reward_started = [], threading.Event()

    class Rollout(RecordingStage):
        def process(self, batch, *, context):
            if context.index == ITEMS - 1:  # the last item waits for the reward role to have started
                log.append(("waited", "rollout", context.step, reward_started.wait(WAIT_S)))
            return super().process(batch, context=context)

    class Reward(RecordingStage):
        def process(self, batch, *, context):
            out = super().process(batch, context=context)
            reward_started.set()
            return out

    planned, stages = builtin_pipeline(registry, seed("colocated_offload"), log, {
        "rollout": Rollout("rollout", {k: f() for k in registry.roles["rollout"].produces}, log=log),
        "reward": Reward("reward", {"rewards": f()}, log=log)})
    assert not planned.plan.is_blocking("rollout", "reward") and planned.plan.is_blocking("rollout", "reference")
    Executor(planned.graph, stages, planned.plan).run(source(1), steps=1)
    assert ("waited", "rollout", 0, True) in log
    assert min(positions(log, "process", "reward", 0)) < max(positions(log, "process", "rollout", 0))
    assert min(positions(log, "process", "reference", 0)) > max(positions(log, "process", "rollout", 0))


def test_without_offload_reference_starts_before_rollout_finishes_the_global_batch(registry):
    log, first_ref = [], threading.Event()

    class Rollout(RecordingStage):
        def process(self, batch, *, context):
            if context.index == ITEMS - 1:  # the last item waits for the reference to have started
                log.append(("waited", "rollout", context.step, first_ref.wait(WAIT_S)))
            return super().process(batch, context=context)

    class Reference(RecordingStage):
        def process(self, batch, *, context):
            out = super().process(batch, context=context)
            first_ref.set()
            return out

    rollout = Rollout("rollout", {k: f() for k in registry.roles["rollout"].produces}, log=log)
    reference = Reference("reference", {"ref_logprobs": f()}, log=log)
    planned, stages = builtin_pipeline(registry, seed("colocated"), log, {"rollout": rollout, "reference": reference})
    Executor(planned.graph, stages, planned.plan).run(source(1), steps=1)
    assert ("waited", "rollout", 0, True) in log
    assert min(positions(log, "process", "reference", 0)) < max(positions(log, "process", "rollout", 0))
    assert not [e for e in log if e[0] in ("onload", "offload")]


@pytest.mark.parametrize("name", ["colocated", "disaggregated"])
def test_with_staleness_rollout_of_the_next_batch_overlaps_training(registry, name):
    log, next_rollout = [], threading.Event()

    class Rollout(RecordingStage):
        def process(self, batch, *, context):
            if context.step == 1:
                next_rollout.set()
            return super().process(batch, context=context)

    class Trainer(RecordingStage):
        def on_barrier(self, *, context):
            if context.step == 0:  # the trainer's first update waits until rollout has begun batch 1
                log.append(("waited", "trainer", 0, next_rollout.wait(WAIT_S)))
            super().on_barrier(context=context)

    rollout = Rollout("rollout", {"completion_tokens": f(), "completion_mask": f(), "rollout_logprobs": f(),
                                  "policy_version": lambda b, ctx: np.asarray(ctx.policy_version)}, log=log)
    planned, stages = builtin_pipeline(registry, seed(name, max_staleness=1), log, {"rollout": rollout, "trainer": Trainer("trainer", log=log)})
    ex = Executor(planned.graph, stages, planned.plan, max_staleness=1)
    assert ex.lag == 1
    ex.run(source(4), steps=4)
    assert ("waited", "trainer", 0, True) in log


def test_staleness_is_bounded_by_the_lag(registry):
    seen = []

    class Rollout(RecordingStage):
        def process(self, batch, *, context):
            seen.append(context.step - context.policy_version)
            return super().process(batch, context=context)

    for lag in (0, 2):
        seen.clear()
        log = []
        planned, stages = builtin_pipeline(registry, seed("disaggregated"), log, {
            "rollout": Rollout("rollout", {k: f() for k in registry.roles["rollout"].produces}, log=log),
            "trainer": RecordingStage("trainer", log=log, delay=0.01)})
        Executor(planned.graph, stages, planned.plan, max_staleness=lag).run(source(6), steps=6)
        assert seen and max(seen) <= lag and min(seen) >= 0


def test_on_policy_rollout_never_runs_ahead_without_offload(registry):
    log = []
    planned, stages = builtin_pipeline(registry, seed("colocated"), log)
    Executor(planned.graph, stages, planned.plan, max_staleness=0).run(source(3), steps=3)
    for step in range(1, 3):
        assert min(positions(log, "process", "rollout", step)) > positions(log, "barrier", "trainer", step - 1)[0]


def test_two_branches_join_at_the_trainer(registry):
    log, got = [], []

    class Trainer(RecordingStage):
        def process(self, batch, *, context):
            got.append(set(batch))
            return super().process(batch, context=context)

    # ppo's GAE needs the critic's values; a KL weight keeps the reference in the graph too
    planned = plan_run(config(registry, {"algorithm": {"name": "ppo", "options": {"kl_beta": 0.04}}}), registry, fake_devices(8))
    assert set(planned.graph.order) == {"rollout", "reward", "reference", "critic", "trainer"}
    stages = {
        "rollout": RecordingStage("rollout", {k: f() for k in registry.roles["rollout"].produces}, log=log),
        "reward": RecordingStage("reward", {"rewards": f()}, log=log),
        "reference": RecordingStage("reference", {"ref_logprobs": f()}, log=log, delay=0.002),
        "critic": RecordingStage("critic", {"values": f()}, log=log),
        "trainer": Trainer("trainer", log=log),
    }
    Executor(planned.graph, stages, planned.plan).run(source(2), steps=2)
    assert len(got) == 2 * ITEMS
    assert all({"ref_logprobs", "values", "rewards", "completion_tokens", "prompt_tokens"} <= fields for fields in got)


def rlpipe_threads():
    return [t for t in threading.enumerate() if t.name.startswith("rlpipe-")]


def test_a_failing_stage_stops_the_run_naming_stage_and_step(registry):
    log, errors = [], []
    plugin = types.SimpleNamespace(rlpipe_on_stage_error=hookimpl(lambda role, error, context: errors.append((role, context.step))))
    with register_plugin(plugin, name="observer"):
        reg = load_registry(warn=lambda m: None)
    planned, stages = builtin_pipeline(reg, seed("colocated", max_staleness=2), log,
                                       {"reference": RecordingStage("reference", {"ref_logprobs": f()}, log=log, fail_at=(1, 2))})
    with pytest.raises(StageError) as e:
        Executor(planned.graph, stages, planned.plan, max_staleness=2, hooks=reg.hook).run(source(50), steps=50)
    assert str(e.value) == "stage 'reference' failed at step 1, micro-batch 2: RuntimeError: reference exploded"
    assert (e.value.role, e.value.step, e.value.index) == ("reference", 1, 2)
    assert errors == [("reference", 1)]
    assert rlpipe_threads() == []
    assert max(e[2] for e in log if e[0] == "process" and e[1] == "rollout") < 50


def test_a_stage_that_breaks_the_field_contract_is_stopped(registry):
    class Liar(RecordingStage):
        def process(self, batch, *, context):
            return batch.add(wrong=1)

    log = []
    planned, stages = builtin_pipeline(registry, None, log, {"reference": Liar("reference", log=log)})
    with pytest.raises(StageError, match="did not produce declared field\\(s\\) ref_logprobs and produced undeclared field\\(s\\) wrong"):
        Executor(planned.graph, stages, planned.plan).run(source(1), steps=1)

    class Dropper(RecordingStage):
        def process(self, batch, *, context):
            return Batch(ref_logprobs=1)

    planned, stages = builtin_pipeline(registry, None, log, {"reference": Dropper("reference", log=log)})
    with pytest.raises(StageError, match="dropped or replaced field"):
        Executor(planned.graph, stages, planned.plan).run(source(1), steps=1)
    assert rlpipe_threads() == []


def test_a_failing_source_is_reported_as_the_source(registry):
    def bad_source():
        yield from source(1)
        raise OSError("dataset vanished")

    log = []
    planned, stages = builtin_pipeline(registry, None, log)
    with pytest.raises(StageError, match="stage 'source' failed at step 1: OSError: dataset vanished"):
        Executor(planned.graph, stages, planned.plan).run(bad_source(), steps=3)
    assert rlpipe_threads() == []


def test_a_short_source_ends_the_run_after_its_last_batch(registry):
    log = []
    planned, stages = builtin_pipeline(registry, None, log)
    summary = Executor(planned.graph, stages, planned.plan).run(source(2), steps=10)
    assert summary.steps == 2 and len(positions(log, "barrier", "trainer")) == 2


def test_lifecycle_hooks_see_every_item_and_barrier(registry):
    calls = []
    lock = threading.Lock()

    def before(role, batch, context):
        with lock:
            calls.append(("before", role, context.step, context.index))

    def after(role, batch, context):
        with lock:
            calls.append(("after", role, context.step, context.index, None if batch is None else "ref_logprobs" in batch))

    plugin = types.SimpleNamespace(rlpipe_before_stage=hookimpl(before), rlpipe_after_stage=hookimpl(after))
    with register_plugin(plugin, name="observer"):
        reg = load_registry(warn=lambda m: None)
    log = []
    planned, stages = builtin_pipeline(reg, None, log)
    Executor(planned.graph, stages, planned.plan, hooks=reg.hook).run(source(2), steps=2)
    per_role = 2 * (ITEMS + 1)  # items plus one barrier per step
    for r in ("rollout", "reward", "reference", "trainer"):
        assert len([c for c in calls if c[0] == "before" and c[1] == r]) == per_role
    assert ("after", "reference", 0, 0, True) in calls
    assert ("after", "trainer", 1, None, None) in calls


def test_trace_has_a_track_per_role_with_step_and_version(registry):
    log = []
    planned, stages = builtin_pipeline(registry, seed("colocated_offload"), log)
    ex = Executor(planned.graph, stages, planned.plan, trace=Trace())
    ex.run(source(2), steps=2)
    chrome = ex.trace.to_chrome()
    names = {e["args"]["name"] for e in chrome["traceEvents"] if e["ph"] == "M"}
    assert {"rollout", "reward", "reference", "trainer", "source"} <= names
    spans = {(ex.trace.track_of(e), e["name"]) for e in ex.trace.events()}
    assert {("reference", "barrier_wait"), ("trainer", "onload"), ("trainer", "offload"), ("rollout", "process"),
            ("reward", "process")} <= spans
    # the host reward role streams and stays in host memory: it neither waits at a barrier nor moves
    assert not {("reward", "barrier_wait"), ("reward", "onload"), ("reward", "offload")} & spans
    assert all("step" in e["args"] for e in ex.trace.events() if e["ph"] == "X")


def test_stages_without_a_plan_stream_everything():
    from rlpipe import RoleConfig, RoleSpec

    log = []
    specs = {"gen": RoleSpec(name="gen", description="", config_type=RoleConfig, consumes={"prompt_tokens"}, produces={"y"}),
             "train": RoleSpec(name="train", description="", config_type=RoleConfig, consumes={"y"}, sink=True)}
    g = build_graph(specs)
    summary = Executor(g, {"gen": RecordingStage("gen", {"y": f(1)}, log=log), "train": RecordingStage("train", log=log)}).run(source(2), steps=2)
    assert summary.items == {"gen": 2 * ITEMS, "train": 2 * ITEMS}
