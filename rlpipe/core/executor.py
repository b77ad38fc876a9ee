"""The executor: runs a stage graph under a placement plan.

:class:`Executor` runs one thread per stage, connected by bounded queues.  The
data source feeds the head stages one item (micro-batch) at a time and closes
each global batch with a barrier.  A stage processes item ``k`` of step ``n``
once every upstream has delivered it and, on a *blocking* edge (the plan's
choice), once that upstream has passed the barrier of step ``n``; then, after
the last item, it runs its barrier work and passes the barrier on.  The source
starts step ``n`` only when the policy version is at least ``n - lag``, which
bounds staleness: ``lag`` is 0 when the head stage (rollout) time-shares
devices with the sink (trainer), ``train.max_staleness`` otherwise.

With offload, roles that share devices hand them over cleanly: a stage passes
its barrier to the roles it time-shares with only after its ``offload()``, and
an offloaded stage's ``onload()`` waits until every other offloaded role that
shares one of its devices has finished its ``offload()`` (a ``device_wait``
span), so the devices never hold two time-sharing roles' state at once.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from rlpipe.core.errors import StageError
from rlpipe.core.graph import SOURCE, StageGraph
from rlpipe.core.placement import PlacementPlan, time_shared
from rlpipe.core.stage import (
    UNTRACED,
    BarrierStage,
    Batch,
    OffloadableStage,
    Stage,
    StageContext,
    StatefulStage,
    Tracer,
)


@attrs.frozen
class _Item:
    sender: str
    step: int
    index: int
    batch: Batch


@attrs.frozen
class _Barrier:
    sender: str
    step: int
    count: int


@attrs.frozen
class _End:
    sender: str


class _Stopped(Exception):
    """Unwinds a stage thread when the run is stopping."""


@attrs.frozen(kw_only=True)
class RunSummary:
    """What a run did.

    Attributes:
        steps: global steps every terminal stage completed (counting steps
            completed before a resume).
        policy_version: the policy version at the end.
        items: items processed per role in this run.
        stopped: the run was stopped early by :meth:`Executor.request_stop`.
    """

    steps: int
    policy_version: int
    items: Mapping[str, int]
    stopped: bool = False


@attrs.frozen(kw_only=True)
class Snapshot:
    """A consistent cut of a run after global step ``step``, for a checkpoint.

    Attributes:
        step: the last global step every stateful stage has completed.
        states: ``role -> stage.state()`` taken right after the role's barrier
            of ``step``.
        pending: ``role -> step -> index -> fields`` that each head stage added
            to the items of steps ``step + 1 .. step + lag``: generated, not
            yet trained on.  Replaying them on resume neither drops nor repeats
            a sample.
        policy_version: the policy version after ``step``.
    """

    step: int
    states: Mapping[str, Any]
    pending: Mapping[str, Mapping[int, Mapping[int, Mapping[str, Any]]]]
    policy_version: int


class Executor:
    """Runs a :class:`StageGraph` of stages under a :class:`PlacementPlan`.

    Args:
        graph: the checked stage graph.
        stages: one :class:`Stage` per role in the graph.
        plan: the placement plan; its boundaries say which edges block, its
            offload flags which stages are offloaded between uses.  ``None``
            runs everything streaming, nothing offloaded.
        max_staleness: how many policy versions rollout may run ahead when it
            does not time-share devices with the trainer.
        hooks: a pluggy hook relay for lifecycle hooks, or ``None``.
        trace: where spans go (a :class:`~rlpipe.core.stage.Tracer`, such as
            :class:`rlpipe.runtime.trace.Trace`); by default nothing is recorded.
        queue_size: bound of each stage's inbox.
        on_step: called with the step number when the sink has passed a
            global batch's barrier (from the sink's thread), e.g. to log metrics.
        snapshot_every: take a :class:`Snapshot` after every N-th step (0: only
            after the last step and when stopped); ``None`` takes none.
        on_snapshot: receives each complete :class:`Snapshot`, on a worker
            thread of its own (e.g. to write a checkpoint); the run waits for
            it before it returns.
    """

    def __init__(self, graph: StageGraph, stages: Mapping[str, Stage], plan: PlacementPlan | None = None, *,
                 max_staleness: int = 0, seed: int = 0, hooks: Any = None, trace: Tracer | None = None,
                 queue_size: int = 8, poll_s: float = 0.05, on_step: Callable[[int], None] | None = None,
                 snapshot_every: int | None = None, on_snapshot: Callable[[Snapshot], None] | None = None):
        missing = [r for r in graph.order if r not in stages]
        if missing:
            raise ValueError(f"no stage for role(s) {', '.join(missing)}")
        self.graph, self.stages, self.plan = graph, dict(stages), plan
        self.seed, self.hooks, self.on_step = seed, hooks, on_step
        self.trace: Tracer = UNTRACED if trace is None else trace
        self.lag = self._lag(max_staleness)
        self._poll = poll_s
        self._queue_size = queue_size
        self._stop = threading.Event()
        self._error: StageError | None = None
        self._error_lock = threading.Lock()
        self._version = 0
        self._version_cond = threading.Condition()
        self._done: dict[str, int] = defaultdict(int)
        self._items: dict[str, int] = defaultdict(int)
        self._final = -1  # the last step the non-head stages run
        self._source_end: int | None = None  # the first step the data source could not fill
        self._decided: dict[str, int] = defaultdict(int)
        self._stop_requested = False
        # -- snapshots ---------------------------------------------------------------
        self.snapshot_every, self.on_snapshot = snapshot_every, on_snapshot
        self._stateful = tuple(r for r in graph.order if isinstance(self.stages[r], StatefulStage))
        self._snap_lock = threading.Lock()
        self._states: dict[int, dict[str, Any]] = defaultdict(dict)
        self._recorded: dict[str, dict[int, dict[int, Mapping[str, Any]]]] = {h: defaultdict(dict) for h in graph.heads}
        self._counts: dict[str, dict[int, int]] = {h: {} for h in graph.heads}
        self._snapshot_queue: queue.Queue = queue.Queue()
        # -- the hand-over of time-shared devices -------------------------------------
        self._sharers = self._device_sharers()
        self._handover = threading.Condition()
        self._resident: set[str] = set()  # offloading roles whose state is on their devices

    def _lag(self, max_staleness: int) -> int:
        if self.plan is None or self.graph.sink is None:
            return max_staleness
        sink = self.plan.role(self.graph.sink)
        if any(time_shared(self.plan.role(h), sink) for h in self.graph.heads if h != self.graph.sink):
            return 0
        return max_staleness

    def _offloads(self, role: str) -> bool:
        return self.plan is not None and self.plan.role(role).offload

    def _device_sharers(self) -> dict[str, frozenset[str]]:
        """For each role the executor offloads, the other offloaded roles that
        share at least one of its devices: the roles it hands the devices to and
        takes them from."""
        if self.plan is None:
            return {}
        takers = [r for r in self.graph.order if self._offloads(r) and isinstance(self.stages[r], OffloadableStage)]
        devices = {r: set(self.plan.role(r).devices) for r in takers}
        return {r: frozenset(o for o in takers if o != r and devices[r] & devices[o]) for r in takers}

    def _take_devices(self, role: str, step: int) -> None:
        """Waits until no other offloaded role sharing ``role``'s devices holds
        them (its ``offload()`` has returned), then marks ``role`` as holding
        them.  Roles start offloaded, so the first to come takes the devices at
        once; the wait shows as a ``device_wait`` span."""
        sharers = self._sharers.get(role, frozenset())
        with self._handover:
            if self._resident & sharers:
                start, held_by = self.trace.now_us(), sorted(self._resident & sharers)
                while self._resident & sharers:
                    if self._stop.is_set():
                        raise _Stopped
                    self._handover.wait(timeout=self._poll)
                self.trace.complete(role, "device_wait", start, self.trace.now_us(), step=step, held_by=held_by)
            self._resident.add(role)

    def _release_devices(self, role: str) -> None:
        with self._handover:
            self._resident.discard(role)
            self._handover.notify_all()

    def _blocking(self, upstream: str, role: str) -> bool:
        return self.plan is not None and upstream != SOURCE and self.plan.is_blocking(upstream, role)

    @property
    def failure(self) -> StageError | None:
        """The first stage failure as soon as it happens (:meth:`run` raises it
        only once every thread has stopped)."""
        return self._error

    @property
    def policy_version(self) -> int:
        with self._version_cond:
            return self._version

    def request_stop(self, at: int | None = None, *, extra_steps: int = 0) -> int:
        """Stops the run at the next consistent point: every stage finishes the
        steps that some stateful stage has already started, a snapshot is
        taken after the last of them, and the run returns.  Thread-safe and
        idempotent (e.g. from a signal handler); returns the last step.

        A multi-process run stops every process after the same step: process
        0 asks for ``extra_steps=1`` (no other process can have decided that
        step's barrier yet) and the others for ``at`` that step.
        """
        with self._version_cond:
            if not self._stop_requested:
                # _decided[r]: the first step whose barrier r has not yet decided
                # on (snapshot or not); every such barrier will see the new _final.
                started = max((self._decided[r] for r in (*self._stateful, *self.graph.terminals)), default=0)
                self._final = min(self._final, started + extra_steps if at is None else at)
                self._stop_requested = True
            self._version_cond.notify_all()
            return self._final

    # -- queue helpers that notice a stopping run ----------------------------------

    def _put(self, role: str, msg: Any) -> None:
        q = self._inbox[role]
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                q.put(msg, timeout=self._poll)
                return
            except queue.Full:
                continue

    def _get(self, role: str) -> Any:
        q = self._inbox[role]
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                return q.get(timeout=self._poll)
            except queue.Empty:
                continue

    def _fail(self, role: str, step: int, index: int | None, exc: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = StageError(role, step, index, exc)
                self._error.__cause__ = exc
                if self.hooks is not None and role not in (SOURCE, "checkpoint"):
                    try:
                        self.hooks.rlpipe_on_stage_error(role=role, error=exc, context=self._context(role, step, index))
                    except Exception:  # noqa: BLE001 - an observer must not mask the real error
                        pass
        self._stop.set()
        with self._version_cond:
            self._version_cond.notify_all()

    def _context(self, role: str, step: int, index: int | None) -> StageContext:
        return StageContext(role=role, step=step, index=index, policy_version=self.policy_version,
                            behavior_version=max(0, step - self.lag), seed=self.seed, trace=self.trace)

    def _last_step(self, role: str) -> int:
        """Heads run ``lag`` steps past the others when snapshots are taken: the
        last snapshot then holds the rollouts a longer run would train on next."""
        look_ahead = self.lag if role in self.graph.heads and self.snapshot_every is not None else 0
        with self._version_cond:
            return self._final + look_ahead

    # -- threads ----------------------------------------------------------------------

    def _run_source(self, source: Iterator[Sequence[Batch]], start: int) -> None:
        step = start
        try:
            while True:
                last = lambda: max(self._last_step(h) for h in self.graph.heads)  # noqa: E731 - a stop may lower it
                with self._version_cond:
                    while self._version < step - self.lag and not self._stop.is_set() and step <= last():
                        self._version_cond.wait(timeout=self._poll)
                if self._stop.is_set():
                    return
                if step > last():
                    break
                try:
                    items = list(next(source))
                except StopIteration:
                    with self._version_cond:  # the data ran out: the run ends with the last full step
                        self._final = min(self._final, step - 1)
                        self._source_end = step
                        self._version_cond.notify_all()
                    self._offer_snapshots()
                    break
                for index, batch in enumerate(items):
                    if not isinstance(batch, Batch):
                        batch = Batch(batch)
                    for head in self.graph.heads:
                        self._put(head, _Item(SOURCE, step, index, batch))
                self.trace.instant(SOURCE, "global_batch", step=step, items=len(items), policy_version=self.policy_version)
                for head in self.graph.heads:
                    self._put(head, _Barrier(SOURCE, step, len(items)))
                step += 1
            for head in self.graph.heads:
                self._put(head, _End(SOURCE))
        except _Stopped:
            return
        except Exception as exc:  # noqa: BLE001 - reported as the source's failure
            self._fail(SOURCE, step, None, exc)

    def _run_stage(self, role: str, start: int) -> None:
        stage = self.stages[role]
        ups = self.graph.upstream(role) or [SOURCE]
        downs = self.graph.downstream(role)
        blocking = [u for u in ups if self._blocking(u, role)]
        offloads = self._offloads(role) and isinstance(stage, OffloadableStage)
        head = role in self.graph.heads
        items: dict[int, dict[int, dict[str, Batch]]] = defaultdict(lambda: defaultdict(dict))
        barriers: dict[int, dict[str, int]] = defaultdict(dict)
        ended: set[str] = set()
        step, index = start, 0
        # A stage placed with offload starts in host memory (its factory builds
        # it there), so time-sharing roles never hold the devices together.
        on_device = not offloads
        wait_start: float | None = None

        # Downstream roles that time-share devices with this one get its barrier
        # only after its offload: they cannot use the devices before anyway.
        after_offload = {d for d in downs if offloads and self.plan is not None
                         and time_shared(self.plan.role(role), self.plan.role(d))}

        def onload() -> None:
            nonlocal on_device
            if offloads and not on_device:
                self._take_devices(role, step)
                with self.trace.span(role, "onload", step=step):
                    stage.onload()
                on_device = True

        def offload() -> None:
            nonlocal on_device
            if offloads and on_device:
                with self.trace.span(role, "offload", step=step):
                    stage.offload()
                on_device = False
                self._release_devices(role)

        def end() -> None:
            for d in downs:
                self._put(d, _End(role))

        try:
            while True:
                if step > self._last_step(role):
                    return end()
                # Look-ahead steps of a head are recorded for the snapshot, not sent on.
                forward = not head or step <= self._final
                have = items[step].get(index, {})
                ready = len(have) == len(ups)
                released = all(u in barriers[step] for u in blocking)
                if ready and not released and wait_start is None:
                    wait_start = self.trace.now_us()
                if ready and released:
                    if wait_start is not None:
                        self.trace.complete(role, "barrier_wait", wait_start, self.trace.now_us(), step=step)
                        wait_start = None
                    batch = have[ups[0]]
                    for u in ups[1:]:
                        batch = batch.merge(have[u])
                    del items[step][index]
                    replayed = self._replay.get(role, {}).get(step, {}).get(index)
                    if replayed is not None:
                        out = batch.add(**replayed)
                        self._check_output(role, batch, out)
                        self.trace.instant(role, "replayed", step=step, index=index)
                    else:
                        onload()
                        out = self._process(role, stage, batch, step, index)
                    if head:
                        self._record(role, step, index, {f: out[f] for f in out if f not in batch})
                    if forward:
                        for d in downs:
                            self._put(d, _Item(role, step, index, out))
                    index += 1
                    continue
                if len(barriers[step]) == len(ups):
                    counts = set(barriers[step].values())
                    if len(counts) != 1:
                        raise RuntimeError(f"upstream stages disagree on the size of global batch {step}: {dict(barriers[step])}")
                    if index == counts.pop():
                        onload()
                        self._barrier(role, stage, step, index)
                        # The phase switch: this role's device buffers are released
                        # before any role sharing its devices onloads (_take_devices).
                        if forward:
                            for d in downs:
                                if d not in after_offload:
                                    self._put(d, _Barrier(role, step, index))
                        offload()
                        if forward:
                            for d in downs:
                                if d in after_offload:
                                    self._put(d, _Barrier(role, step, index))
                        del items[step], barriers[step]
                        step, index = step + 1, 0
                        continue
                if len(ended) == len(ups) and not items[step] and not barriers[step]:
                    return end()
                msg = self._get(role)
                if isinstance(msg, _Item):
                    items[msg.step][msg.index][msg.sender] = msg.batch
                elif isinstance(msg, _Barrier):
                    barriers[msg.step][msg.sender] = msg.count
                else:
                    ended.add(msg.sender)
        except _Stopped:
            return
        except StageError as exc:
            self._fail(role, exc.step, exc.index, exc.cause)
        except Exception as exc:  # noqa: BLE001 - any failure stops the run, named
            self._fail(role, step, index, exc)

    def _process(self, role: str, stage: Stage, batch: Batch, step: int, index: int) -> Batch:
        ctx = self._context(role, step, index)
        try:
            if self.hooks is not None:
                self.hooks.rlpipe_before_stage(role=role, batch=batch, context=ctx)
            with self.trace.span(role, "process", step=step, index=index, policy_version=ctx.policy_version):
                out = stage.process(batch, context=ctx)
            self._check_output(role, batch, out)
            if self.hooks is not None:
                self.hooks.rlpipe_after_stage(role=role, batch=out, context=ctx)
        except Exception as exc:
            raise StageError(role, step, index, exc) from exc
        self._items[role] += 1
        return out

    def _check_output(self, role: str, batch: Batch, out: Any) -> None:
        if not isinstance(out, Batch):
            raise TypeError(f"process() returned {type(out).__name__}, expected a Batch (return batch.add(...))")
        changed = [f for f in batch if f not in out or out[f] is not batch[f]]
        if changed:
            raise ValueError(f"process() dropped or replaced field(s) {', '.join(changed)}; stages only add fields")
        added = set(out) - set(batch)
        declared = self.graph.produces.get(role, frozenset())
        if added != declared:
            parts = []
            if declared - added:
                parts.append(f"did not produce declared field(s) {', '.join(sorted(declared - added))}")
            if added - declared:
                parts.append(f"produced undeclared field(s) {', '.join(sorted(added - declared))}")
            raise ValueError("process() " + " and ".join(parts))

    def _barrier(self, role: str, stage: Stage, step: int, count: int) -> None:
        ctx = self._context(role, step, None)
        try:
            if self.hooks is not None:
                self.hooks.rlpipe_before_stage(role=role, batch=None, context=ctx)
            if isinstance(stage, BarrierStage):
                with self.trace.span(role, "barrier", step=step, items=count, policy_version=ctx.policy_version):
                    stage.on_barrier(context=ctx)
            if self.hooks is not None:
                self.hooks.rlpipe_after_stage(role=role, batch=None, context=ctx)
            if self._snapshot_due(role, step):
                with self.trace.span(role, "snapshot", step=step):
                    state = stage.state()
                with self._snap_lock:
                    self._states[step][role] = state
        except Exception as exc:
            raise StageError(role, step, None, exc) from exc
        if self.on_step is not None and role == self.graph.sink:
            try:
                self.on_step(step)
            except Exception as exc:
                raise StageError(role, step, None, exc) from exc
        with self._version_cond:
            self._done[role] += 1
            self._version = min(self._done[t] for t in self.graph.terminals)
            self._version_cond.notify_all()
        if head := (role in self.graph.heads):
            with self._snap_lock:
                self._counts[role][step] = count
        if role in self._stateful or head:
            self._offer_snapshots()

    # -- snapshots ---------------------------------------------------------------------

    def _snapshot_due(self, role: str, step: int) -> bool:
        """Whether ``role`` snapshots its state after the barrier of ``step``;
        decided under the lock :meth:`request_stop` takes, so a stop never
        lands between a barrier's decision and the next step."""
        with self._version_cond:
            self._decided[role] = step + 1
            if self.snapshot_every is None or role not in self._stateful:
                return False
            return step == self._final or (self.snapshot_every > 0 and (step + 1) % self.snapshot_every == 0)

    def _record(self, role: str, step: int, index: int, fields: Mapping[str, Any]) -> None:
        if self.snapshot_every is None:
            return
        with self._snap_lock:
            self._recorded[role][step][index] = fields

    def _offer_snapshots(self) -> None:
        """Hands every snapshot whose pieces are all in to the snapshot worker."""
        with self._snap_lock:
            for step in sorted(self._states):
                if set(self._states[step]) != set(self._stateful):
                    break
                last = step + self.lag
                with self._version_cond:
                    if self._source_end is not None:
                        last = min(last, self._source_end - 1)
                wanted = range(step + 1, last + 1)
                if any(s not in self._counts[h] or len(self._recorded[h][s]) != self._counts[h][s]
                       for h in self.graph.heads for s in wanted):
                    break
                pending = {h: {s: dict(self._recorded[h][s]) for s in wanted} for h in self.graph.heads}
                self._snapshot_queue.put(Snapshot(step=step, states=self._states.pop(step), pending=pending,
                                                  policy_version=step + 1))
                for h in self.graph.heads:  # later snapshots need only later steps
                    for s in [s for s in self._recorded[h] if s <= step]:
                        del self._recorded[h][s]

    def _run_snapshots(self) -> None:
        while True:
            snap = self._snapshot_queue.get()
            if snap is None:
                return
            if self._error is not None:
                continue
            try:
                with self.trace.span("checkpoint", "save", step=snap.step, policy_version=snap.policy_version):
                    self.on_snapshot(snap)
            except Exception as exc:  # noqa: BLE001 - a failed save stops the run, named
                self._fail("checkpoint", snap.step, None, exc)

    # -- driver ----------------------------------------------------------------------

    def run(self, source: Iterable[Sequence[Batch]], *, steps: int, start_step: int = 0,
            replay: Mapping[str, Mapping[int, Mapping[int, Mapping[str, Any]]]] | None = None) -> RunSummary:
        """Runs global steps ``start_step .. steps - 1`` from ``source`` (which
        yields the items of step ``start_step`` first); returns when every stage
        has passed the last barrier.

        Args:
            start_step: the first step, when resuming: the policy version is
                taken to be ``start_step`` (one update per step before it).
            replay: ``role -> step -> index -> fields`` a head stage produced
                before the run was interrupted (a :class:`Snapshot`'s
                ``pending``); those items are not processed again.

        Raises:
            StageError: the first stage failure, naming the role, step and item;
                every thread has stopped when it is raised.
        """
        self._inbox = {r: queue.Queue(maxsize=self._queue_size) for r in self.graph.order}
        with self._handover:
            self._resident = set()  # offloaded stages start in host memory
        self._steps = steps
        self._replay = {h: {s: dict(v) for s, v in by_step.items()} for h, by_step in (replay or {}).items()}
        with self._version_cond:
            self._version = start_step
            self._final = min(self._final if self._stop_requested else steps - 1, steps - 1)
            for r in self.graph.order:
                self._done[r] = self._decided[r] = start_step
        threads = [threading.Thread(target=self._run_source, args=(iter(source), start_step), name="rlpipe-source", daemon=True)]
        threads += [threading.Thread(target=self._run_stage, args=(r, start_step), name=f"rlpipe-stage-{r}", daemon=True)
                    for r in self.graph.order]
        saver = None
        if self.snapshot_every is not None and self.on_snapshot is not None:
            saver = threading.Thread(target=self._run_snapshots, name="rlpipe-checkpoint", daemon=True)
            saver.start()
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.1)
        except BaseException:
            self._stop.set()
            for t in threads:
                t.join()
            raise
        finally:
            if saver is not None:
                self._snapshot_queue.put(None)
                while saver.is_alive():
                    saver.join(timeout=0.1)
        if self._error is not None:
            raise self._error
        return RunSummary(steps=min(self._done[t] for t in self.graph.terminals) if self.graph.terminals else 0,
                          policy_version=self.policy_version, items=dict(self._items), stopped=self._stop_requested)
