"""The phase switch of time-shared devices: with offload, a role's device
buffers are released (its ``offload()`` has returned) before any role sharing
those devices onloads — downstream or not.

Offloads are made slow on purpose (a real host transfer takes time): an
executor that hands the devices on before the offload has finished lets the
next role onload meanwhile, and these tests catch it.
"""

import threading
import time

import numpy as np
import pytest
import yaml
from helpers import EXAMPLES, config

from rlpipe import Batch, BuildContext, Executor, Trace
from rlpipe.core.placement import (
    MeshSpec,
    PlanContext,
    RolePlacement,
    finish_plan,
    time_shared,
)
from rlpipe.models.loading import load_tokenizer
from rlpipe.models.prompts import prompt_items
from rlpipe.runtime import weights
from rlpipe.runtime.planning import build_stages, plan_run

#: End to end: every test here trains, resumes or runs processes (`-m "not slow"` skips them).
pytestmark = pytest.mark.slow
from rlpipe.testing import RecordingStage, fake_devices

ITEMS = 2
SLOW_OFFLOAD_S = 0.15


def seed(name, **sections):
    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return data


def source(steps, items=ITEMS):
    for step in range(steps):
        yield [Batch(prompt_tokens=np.full((2, 3), step * 10 + i), prompt_mask=np.ones((2, 3))) for i in range(items)]


def time_sharing_pairs(plan):
    """Pairs of offloaded roles that share devices."""
    offloaded = [r for r in plan.roles if r.offload]
    return [(a.name, b.name) for a in offloaded for b in offloaded if a.name != b.name and time_shared(a, b)]


def resident_intervals(trace, role):
    """(start of onload, end of the following offload) per residency of ``role``, in µs."""
    spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in trace.events(role) if e["name"] in ("onload", "offload"))
    out, start = [], None
    for s, e, name in spans:
        if name == "onload":
            assert start is None, f"{role} onloaded twice without offloading"
            start = s
        else:
            assert start is not None, f"{role} offloaded while not onloaded"
            out.append((start, e))
            start = None
    assert start is None, f"{role} ended the run on the devices"
    return out


def assert_clean_switches(trace, plan):
    """No ``onload`` or ``process`` span of a role begins while a role that
    time-shares its devices is resident (between its onload and the end of
    its offload)."""
    pairs = time_sharing_pairs(plan)
    assert pairs
    for a, b in pairs:
        held = resident_intervals(trace, b)
        assert held
        for e in trace.events(a):
            if e["name"] in ("onload", "process"):
                for start, end in held:
                    assert not start <= e["ts"] < end, (
                        f"{a} began {e['name']} (step {e['args'].get('step')}) at {e['ts']:.0f}µs while {b} held the "
                        f"devices ({start:.0f}–{end:.0f}µs)")


class Residency:
    """Which roles have their state on the devices, and every moment two
    time-sharing roles were there together."""

    def __init__(self, plan):
        self.sharing = {r.name: {b for a, b in time_sharing_pairs(plan) if a == r.name} for r in plan.roles}
        self.resident: set[str] = set()
        self.clashes: list[tuple[str, str, set[str]]] = []
        self.lock = threading.Lock()

    def check(self, event, role):
        with self.lock:
            together = self.resident & self.sharing[role]
            if together:
                self.clashes.append((event, role, together))


def recording_stage(role, produces, log, residency, *, slow_offload=SLOW_OFFLOAD_S):
    class Resident(RecordingStage):
        def process(self, batch, *, context):
            residency.check("process", role)
            return super().process(batch, context=context)

        def onload(self):
            residency.check("onload", role)
            with residency.lock:
                residency.resident.add(role)
            super().onload()

        def offload(self):
            super().offload()
            time.sleep(slow_offload)  # the device buffers are still held while the transfer runs
            with residency.lock:
                residency.resident.discard(role)

    return Resident(role, produces, log=log)


def zeros(_batch, _ctx):
    return np.asarray(0)


def test_no_two_time_sharing_roles_are_resident_together(registry):
    steps = 2
    planned = plan_run(config(registry, seed("colocated_offload")), registry, fake_devices(8))
    plan = planned.plan
    log, residency = [], Residency(plan)
    stages = {
        "rollout": recording_stage("rollout", {k: zeros for k in registry.roles["rollout"].produces}, log, residency),
        "reward": RecordingStage("reward", {"rewards": zeros}, log=log),
        "reference": recording_stage("reference", {"ref_logprobs": zeros}, log, residency),
        "trainer": recording_stage("trainer", {}, log, residency),
    }
    trace = Trace()
    summary = Executor(planned.graph, stages, plan, trace=trace).run(source(steps), steps=steps)
    assert summary.steps == steps
    assert residency.clashes == []
    assert residency.resident == set()
    assert_clean_switches(trace, plan)
    # the hand-over covers roles that are not neighbours in the graph: the
    # trainer of step n and the rollout of step n + 1
    assert ("rollout", "trainer") in time_sharing_pairs(plan)
    for role in ("rollout", "reference", "trainer"):
        assert [e[0] for e in log if e[1] == role and e[0] in ("onload", "offload")] == ["onload", "offload"] * steps
    # every span the executor promises is still there
    names = {(trace.track_of(e), e["name"]) for e in trace.events()}
    assert {("reference", "barrier_wait"), ("trainer", "barrier"), ("rollout", "process"), ("rollout", "onload"),
            ("rollout", "offload")} <= names


def test_roles_sharing_devices_without_an_edge_take_turns(registry):
    """Two offloaded roles on the same devices that the graph does not connect
    (the rollout and the trainer here; the trainer's barrier lets the next
    rollout start) still hand the devices over only after the offload: the
    one that waited records a ``device_wait`` span, which reports do not
    count as busy time."""
    planned = plan_run(config(registry, seed("colocated_offload")), registry, fake_devices(8))
    log, residency = [], Residency(planned.plan)
    stages = {
        "rollout": recording_stage("rollout", {k: zeros for k in registry.roles["rollout"].produces}, log, residency),
        "reward": RecordingStage("reward", {"rewards": zeros}, log=log),
        "reference": recording_stage("reference", {"ref_logprobs": zeros}, log, residency),
        "trainer": recording_stage("trainer", {}, log, residency, slow_offload=0.5),
    }
    trace = Trace()
    Executor(planned.graph, stages, planned.plan, trace=trace).run(source(2), steps=2)
    assert residency.clashes == []
    assert_clean_switches(trace, planned.plan)
    waits = [e for e in trace.events("rollout") if e["name"] == "device_wait"]
    assert [e["args"]["step"] for e in waits] == [1] and waits[0]["args"]["held_by"] == ["trainer"]
    trainer_offload = next(e for e in trace.events("trainer") if e["name"] == "offload" and e["args"]["step"] == 0)
    rollout_onload = next(e for e in trace.events("rollout") if e["name"] == "onload" and e["args"]["step"] == 1)
    assert rollout_onload["ts"] >= trainer_offload["ts"] + trainer_offload["dur"]


def test_the_hand_over_is_per_device(registry):
    """A trainer on all 8 devices, the rollout on 0-3 and the reference on
    4-7, all offloaded: the rollout and the reference share no device, so the
    reference onloads while the rollout still works; the trainer shares with
    both and waits for both offloads."""
    planned = plan_run(config(registry, seed("colocated_offload")), registry, fake_devices(8))
    graph = planned.graph
    roles = [RolePlacement(name="rollout", devices=range(4), mesh=MeshSpec.default(4), offload=True),
             RolePlacement(name="reward", devices=range(8), mesh=MeshSpec.default(8)),
             RolePlacement(name="reference", devices=range(4, 8), mesh=MeshSpec.default(4), offload=True),
             RolePlacement(name="trainer", devices=range(8), mesh=MeshSpec.default(8), offload=True)]
    plan = finish_plan("test", roles, fake_devices(8), PlanContext(edges=graph.edge_pairs(), sink="trainer", host_roles={"reward"}))
    assert not plan.is_blocking("rollout", "reference") and plan.is_blocking("reference", "trainer")
    assert sorted(time_sharing_pairs(plan)) == [("reference", "trainer"), ("rollout", "trainer"),
                                                ("trainer", "reference"), ("trainer", "rollout")]
    log, residency = [], Residency(plan)
    rollout = recording_stage("rollout", {k: zeros for k in registry.roles["rollout"].produces}, log, residency)
    rollout.delay = 0.2  # the reference gets item 0 while the rollout still generates item 1
    stages = {"rollout": rollout, "reward": RecordingStage("reward", {"rewards": zeros}, log=log),
              "reference": recording_stage("reference", {"ref_logprobs": zeros}, log, residency),
              "trainer": recording_stage("trainer", {}, log, residency)}
    trace = Trace()
    assert Executor(graph, stages, plan, trace=trace).run(source(2), steps=2).steps == 2
    assert residency.clashes == []
    assert_clean_switches(trace, plan)
    first = {r: next(e for e in trace.events(r) if e["name"] == name)
             for r, name in (("reference", "onload"), ("rollout", "offload"))}
    assert first["reference"]["ts"] < first["rollout"]["ts"]  # disjoint devices: no hand-over between them


# -- the real built-in roles on 8 fake CPU devices -----------------------------------


def held_device_bytes(stages):
    """Bytes of each offloaded role's own state in device memory, read without
    the roles' locks (a role in the middle of its offload still holds them)."""
    return {
        "rollout": weights.device_bytes(stages["rollout"].holder._states),
        "reference": weights.device_bytes(stages["reference"].holder._states),
        "trainer": weights.device_bytes((stages["trainer"].params, stages["trainer"].opt_state)),
    }


def test_real_roles_release_the_devices_before_the_next_role_onloads(registry):
    cfg = config(registry, seed("colocated_offload",
                                train={"prompts_per_item": 2, "items_per_step": 2, "steps": 2},
                                roles={"rollout": {"max_new_tokens": 4, "num_generations": 2},
                                       "trainer": {"micro_batch_size": 4}}))
    planned = plan_run(cfg, registry, fake_devices(8))
    assert {r.name for r in planned.plan.roles if r.offload} == {"rollout", "reference", "trainer"}
    stages = build_stages(planned, context=BuildContext(run_config=cfg, registry=registry, seed=cfg.train.seed))
    stages["trainer"].subscribe(stages["rollout"].load_weights)
    assert held_device_bytes(stages) == {"rollout": 0, "reference": 0, "trainer": 0}  # they start on the host

    at_onload = []
    for role in ("rollout", "reference", "trainer"):
        stage = stages[role]

        def onload(stage=stage, role=role, real=stage.onload):
            at_onload.append((role, held_device_bytes(stages)))
            real()

        def offload(real=stage.offload):
            real()
            time.sleep(SLOW_OFFLOAD_S)  # a slow host transfer: the next role must not onload meanwhile

        stage.onload, stage.offload = onload, offload  # the executor calls the instance's methods

    task = registry.get("rlpipe_tasks", cfg.task.name, path="task.name").factory(cfg.task.options)
    items = prompt_items(task, load_tokenizer(cfg.model), seed=cfg.train.seed, prompts_per_item=2, items_per_step=2)
    trace = Trace()
    summary = Executor(planned.graph, stages, planned.plan, trace=trace).run(items, steps=2)
    assert summary.steps == 2
    assert [role for role, _ in at_onload] == ["rollout", "reference", "trainer"] * 2
    for role, held in at_onload:
        others = {r: b for r, b in held.items() if r != role}
        assert others == {r: 0 for r in others}, f"{role} onloaded while {others} bytes of the others were on the devices"
    assert_clean_switches(trace, planned.plan)
    assert held_device_bytes(stages) == {"rollout": 0, "reference": 0, "trainer": 0}
