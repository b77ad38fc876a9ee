"""Snapshots of a running stage graph, the basis of exact resume.

A toy graph with no model: ``gen`` (the head) produces a number from the
behaviour policy version it is told to use; ``learner`` (the stateful sink)
folds every item into its state.  Its state after N steps therefore encodes
which samples it trained on and which policy version produced each, so an
interrupted-and-resumed run equals an uninterrupted one exactly when nothing
was dropped, repeated or generated with the wrong version.
"""

import threading

import numpy as np
import pytest

from rlpipe import Batch, Executor, build_graph
from rlpipe.core.config import RoleConfig
from rlpipe.core.specs import RoleSpec

ITEMS = 3


def spec(name, consumes, produces, sink=False):
    return RoleSpec(name=name, description="", config_type=RoleConfig, consumes=set(consumes),
                    produces=set(produces), sink=sink, factory=None)


GRAPH = build_graph({"gen": spec("gen", {"prompt_tokens"}, {"sample"}),
                     "learner": spec("learner", {"sample"}, set(), sink=True)})


class Gen:
    def __init__(self):
        self.calls = []

    def process(self, batch, *, context):
        self.calls.append((context.step, context.index))
        # The "policy" a sample comes from is the behaviour version; the value
        # also depends on the prompt, so a dropped or repeated item shows.
        return batch.add(sample=np.asarray(batch["prompt_tokens"]).sum() * 1000 + context.behavior_version)


class Learner:
    def __init__(self):
        self.total = np.zeros((), np.int64)
        self.seen = []
        self.pending = []

    def process(self, batch, *, context):
        self.pending.append(int(batch["sample"]))
        self.seen.append((context.step, context.index, int(batch["sample"])))
        return batch

    def on_barrier(self, *, context):
        # Order-sensitive fold: a different order or set of samples changes it.
        for s in self.pending:
            self.total = self.total * 31 % 1_000_000_007 + s
        self.pending = []

    def state(self):
        return {"total": np.array(self.total), "steps": len(self.seen)}

    def restore(self, state):
        self.total = np.asarray(state["total"]).astype(np.int64)


def source(start=0):
    step = start
    while True:
        yield [Batch(prompt_tokens=np.full((2,), step * 10 + i)) for i in range(ITEMS)]
        step += 1


def run(steps, *, lag, start=0, replay=None, every=1, learner=None, on_step=None):
    gen, learner = Gen(), learner or Learner()
    snaps = []
    ex = Executor(GRAPH, {"gen": gen, "learner": learner}, max_staleness=lag, snapshot_every=every,
                  on_snapshot=snaps.append, on_step=on_step)
    summary = ex.run(source(start), steps=steps, start_step=start, replay=replay)
    return summary, snaps, gen, learner, ex


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_each_snapshot_holds_the_state_after_its_step_and_the_rollouts_of_the_next_lag_steps(lag):
    summary, snaps, gen, learner, _ = run(4, lag=lag)
    assert summary.steps == 4 and not summary.stopped
    assert [s.step for s in snaps] == [0, 1, 2, 3]
    for s in snaps:
        assert s.policy_version == s.step + 1
        assert sorted(s.pending.get("gen", {})) == list(range(s.step + 1, s.step + 1 + lag))
        for step, by_index in s.pending.get("gen", {}).items():
            assert sorted(by_index) == list(range(ITEMS))
            # generated with exactly the fixed lag's policy version
            assert all(int(f["sample"]) % 1000 == max(0, step - lag) for f in by_index.values())
    # the head ran `lag` steps past the end so the last snapshot can continue the run
    assert max(step for step, _ in gen.calls) == 3 + lag


@pytest.mark.parametrize("lag", [0, 1, 2])
@pytest.mark.parametrize("stop_after", [0, 1, 2])
def test_resuming_from_any_snapshot_equals_the_uninterrupted_run(lag, stop_after):
    _, _, _, full, _ = run(5, lag=lag)
    _, snaps, _, _, _ = run(5, lag=lag)
    snap = snaps[stop_after]
    resumed = Learner()
    resumed.restore(snap.states["learner"])
    _, _, gen, resumed, _ = run(5, lag=lag, start=snap.step + 1, replay=snap.pending, learner=resumed)
    assert int(resumed.total) == int(full.total)
    # the replayed steps were not generated again
    assert all(step > snap.step + lag for step, _ in gen.calls)


def test_samples_use_the_fixed_lag_version_whatever_the_timing():
    _, _, _, learner, _ = run(4, lag=1)
    versions = {(step, idx): sample % 1000 for step, idx, sample in learner.seen}
    assert versions == {(s, i): max(0, s - 1) for s in range(4) for i in range(ITEMS)}


def test_request_stop_ends_at_a_step_with_a_snapshot_of_it():
    stopped = threading.Event()
    holder = {}

    def on_step(step):
        if step == 1:
            holder["ex"].request_stop()
            stopped.set()

    gen, learner, snaps = Gen(), Learner(), []
    ex = Executor(GRAPH, {"gen": gen, "learner": learner}, max_staleness=1, snapshot_every=0,
                  on_snapshot=snaps.append, on_step=on_step)
    holder["ex"] = ex
    summary = ex.run(source(), steps=100)
    assert stopped.is_set() and summary.stopped
    last = summary.steps - 1
    assert last in (1, 2)  # the step that had started when the stop came
    assert [s.step for s in snaps] == [last]  # every=0: only the final snapshot
    assert sorted(snaps[0].pending["gen"]) == [last + 1]
    # and it resumes exactly
    _, _, _, full, _ = run(last + 4, lag=1, every=0)
    resumed = Learner()
    resumed.restore(snaps[0].states["learner"])
    run(last + 4, lag=1, every=0, start=last + 1, replay=snaps[0].pending, learner=resumed)
    assert int(resumed.total) == int(full.total)


def test_without_snapshots_the_head_does_not_run_ahead_of_the_last_step():
    gen, learner = Gen(), Learner()
    Executor(GRAPH, {"gen": gen, "learner": learner}, max_staleness=2).run(source(), steps=3)
    assert max(step for step, _ in gen.calls) == 2


def test_a_failing_snapshot_writer_stops_the_run_naming_the_checkpoint():
    from rlpipe import StageError

    def boom(snap):
        raise OSError("disk full")

    ex = Executor(GRAPH, {"gen": Gen(), "learner": Learner()}, snapshot_every=1, on_snapshot=boom)
    with pytest.raises(StageError) as info:
        ex.run(source(), steps=5)
    assert info.value.role == "checkpoint" and "disk full" in str(info.value)
