"""A training run: prompts from a task, the planned stages, the executor, the run directory.

The path from ``rlpipe train`` down: resolve config and plugins
(:mod:`rlpipe.core.config`), plan placement (:func:`rlpipe.runtime.planning.plan_run`),
build each role's stage on its placement (:func:`~rlpipe.runtime.planning.build_stages`),
connect the trainer's weight publish to the rollout, restore the latest
checkpoint when the run directory has one, and run the stage graph
(:class:`rlpipe.core.executor.Executor`) on items made from the task's examples.

The run directory (docs/runs.md) holds ``config.yaml`` (resolved),
``plan.json``, ``metrics.jsonl`` (one object per step, written as each step
ends), ``checkpoints/`` (orbax, :mod:`rlpipe.runtime.checkpoint`) and
``trace.json`` (Chrome trace events, written at the end, also after a failure).

In a multi-process run (:mod:`rlpipe.runtime.distributed`, docs/scaling.md) every
process calls :func:`train` with the same config: process 0 alone writes
``config.yaml``, ``plan.json``, ``metrics.jsonl`` and TensorBoard; every
process writes its own timeline (``trace.json`` for process 0,
``trace.<i>.json`` for process ``i``) and its part of each checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from rlpipe import __version__
from rlpipe.core.config import dump_yaml
from rlpipe.core.errors import RunError, UsageError
from rlpipe.core.executor import Executor, RunSummary, Snapshot
from rlpipe.core.plugins import Registry
from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import StatefulStage, WeightReceiver, weight_publisher
from rlpipe.models.prompts import PromptCounters, prompt_items
from rlpipe.runtime import distributed
from rlpipe.runtime.checkpoint import (
    CheckpointError,
    RunCheckpointer,
    base_changes,
    base_identity,
)
from rlpipe.runtime.planning import build_stages, plan_run
from rlpipe.runtime.run_config import RunConfig
from rlpipe.runtime.trace import Trace

#: Config keys a resumed run may change; any other change is refused.
RESUMABLE_CHANGES = ("train.steps", "checkpoint.", "telemetry.")


# -- the run directory -------------------------------------------------------------------


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): data}


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every config key that differs and that a resumed
    run may not change (see :data:`RESUMABLE_CHANGES`)."""
    a, b = _flat(before), _flat(after)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUMABLE_CHANGES) or a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        out.append(f"{key}: {a.get(key, '<absent>')!r} in the run, {b.get(key, '<absent>')!r} now")
    return out


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drops the rows of steps after ``last_step`` (written after the checkpoint
    a run resumes from), so every step appears exactly once."""
    if not path.exists():
        return
    keep = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    tmp.replace(path)


class RunControl:
    """Lets another thread (a signal handler) stop a run cleanly.

    :meth:`request_stop` asks the run to finish the steps already started,
    write a checkpoint and return; it may be called before the run starts.
    In a multi-process run the request goes to process 0, which picks the
    step every process stops after (see :func:`_coordinate`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: Executor | None = None
        self.stop_requested = False

    def attach(self, executor: Executor) -> None:
        with self._lock:
            self._executor = executor
            if self.stop_requested:
                self._stop(executor)

    def request_stop(self) -> None:
        with self._lock:
            self.stop_requested = True
            if self._executor is not None:
                self._stop(self._executor)

    @staticmethod
    def _stop(executor: Executor) -> None:
        session = distributed.current()
        if session is None:
            executor.request_stop()
        else:
            session.request_stop()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def trace_file(run_dir: Path, process_index: int = 0) -> Path:
    """The timeline a process writes: ``trace.json`` for process 0 (the one
    ``rlpipe report`` reads), ``trace.<i>.json`` for process ``i``."""
    return run_dir / ("trace.json" if process_index == 0 else f"trace.{process_index}.json")


def _check_multiprocess_plan(planned: Any, session: distributed.Session | None, stateful: Any = ()) -> None:
    """What a multi-process run needs of the plan: process 0 writes the
    metrics, so it holds some of the sink's devices (the built-in policies give
    the trainer device 0 first); and a stateful role on a single process must
    be on process 0 (see :func:`rlpipe.runtime.checkpoint.single_process`)."""
    if session is None:
        return
    import jax

    by_id = {d.id: d for d in jax.devices()}
    processes = {r.name: {by_id[i].process_index for i in r.devices} for r in planned.plan.roles}
    sink = planned.graph.sink
    if sink is not None and 0 not in processes[sink]:
        raise UsageError(f"roles.{sink}: in a multi-process run the {sink} must have a device of process 0 "
                         f"(it writes the metrics); it has devices {list(planned.plan.role(sink).devices)}")
    for role in stateful:
        if len(processes[role]) == 1 and processes[role] != {0}:
            raise UsageError(f"roles.{role}: its state lives on process {min(processes[role])} alone, which a "
                             "multi-process checkpoint cannot hold; give it devices of process 0 or of several processes")


def _same_config(config: RunConfig, session: distributed.Session) -> None:
    """Every process must run the same config (the same command): compares
    each process's resolved config with process 0's, naming the first key
    that differs."""
    mine = json.dumps(config.to_dict(), sort_keys=True, default=str)
    theirs = session.exchange("config", mine)
    if theirs != mine:
        a, b = _flat(json.loads(theirs)), _flat(json.loads(mine))
        key = next((k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")), "?")
        raise UsageError(f"process {session.process_index} runs another config than process 0 ({key}: "
                         f"{a.get(key, '<absent>')!r} there, {b.get(key, '<absent>')!r} here); every process must "
                         "run the same command")


class _SamePrompts:
    """Checks that this process made the same prompts as process 0: arrays fed to
    programs that span processes are assembled from each process's own copy
    (:func:`rlpipe.runtime.distributed.put`), so data that differs between processes
    would silently mix.  The check never makes the data source wait for
    process 0; steps not yet comparable are compared later, the rest at the
    end of the run (:meth:`finish`)."""

    def __init__(self, session: distributed.Session):
        self.session = session
        self.unchecked: list[tuple[int, str]] = []

    def wrap(self, source: Any, start_step: int) -> Any:
        import hashlib

        import numpy as np

        for step, items in enumerate(source, start_step):
            digest = hashlib.sha256()
            for item in items:
                for name in ("prompt_tokens", "prompt_mask"):
                    digest.update(np.ascontiguousarray(item[name]).tobytes())
            self.unchecked.append((step, digest.hexdigest()))
            self.check()
            yield items

    def check(self, wait_s: float = 0) -> None:
        for step, value in list(self.unchecked):
            same = self.session.agree(f"prompts/{step}", value, wait_s=wait_s)
            if same is False:
                raise RuntimeError(f"the prompts of step {step} differ from process 0's; every process must build "
                                   "the same data (same task, files and seed)")
            if same:
                self.unchecked.remove((step, value))

    def finish(self) -> None:
        try:
            self.check(wait_s=10)
        except RuntimeError as exc:
            raise RunError(str(exc)) from None


def _coordinate(executor: Executor, session: distributed.Session) -> threading.Event:
    """What the processes of a multi-process run must agree on while it runs;
    until the returned event is set.

    * A stage failure ends the run on every process: the others may be
      waiting in a collective for this one, and a thread of this one for them.
    * A stop (a signal to any process) ends every process after the same
      step: process 0 picks it one step past what it has started, which no
      process can have passed (each barrier's device work needs them all),
      and the others stop there too.
    """
    done = threading.Event()

    def watch() -> None:
        stopping = False
        while not done.wait(0.2):
            failure = executor.failure
            if failure is not None:
                session.fail(failure.exit_code, failure.lines()[0])
                return
            if stopping:
                continue
            with contextlib.suppress(Exception):  # the coordinator going away is the watchdog's business
                if session.is_primary and session.stop_requested():
                    session.announce_stop(executor.request_stop(extra_steps=1))
                    stopping = True
                elif not session.is_primary and (step := session.stop_step()) is not None:
                    executor.request_stop(at=step)
                    stopping = True

    threading.Thread(target=watch, name="rlpipe-coordinate", daemon=True).start()
    return done


def train(config: RunConfig, registry: Registry, *, run_dir: str | Path,
          report: Callable[[dict[str, Any]], None] | None = None, resume: bool = True,
          control: RunControl | None = None, log: Callable[[str], None] | None = None) -> RunSummary:
    """Runs ``config`` and writes the run directory; returns the executor's summary.

    A start that fails (a config, plan, dataset or model error before the
    first step runs) removes the directories it created, so no empty run
    directory is left behind; once steps run, the directory stays, whatever
    happens.

    Args:
        report: called with each step's metrics (for a progress display).
        resume: continue from the latest checkpoint in ``run_dir`` if there is
            one (the default); otherwise ``run_dir`` must hold no checkpoint.
        control: lets a signal handler stop the run at a checkpoint.
        log: receives one-line messages about what the run does (where it
            starts or resumes from, checkpoints).

    Raises:
        CheckpointError: the checkpoint is unreadable or does not fit ``config``.
        UsageError: ``run_dir`` cannot be written.
    """
    run_dir = Path(run_dir)
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # innermost first
    started = threading.Event()
    try:
        return _train(config, registry, run_dir=run_dir, report=report, resume=resume, control=control, log=log,
                      started=started)
    except BaseException:
        session = distributed.current()
        if not started.is_set() and (session is None or session.is_primary):
            import shutil

            for d in created:  # what this call created and nothing has run in
                shutil.rmtree(d, ignore_errors=True)
        raise


def _train(config: RunConfig, registry: Registry, *, run_dir: Path, report: Callable[[dict[str, Any]], None] | None,
           resume: bool, control: RunControl | None, log: Callable[[str], None] | None,
           started: threading.Event) -> RunSummary:
    log = log or (lambda message: None)
    run_dir = Path(run_dir)
    session = distributed.current()
    primary = session is None or session.is_primary
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{run_dir}: cannot create the run directory: {exc.strerror or exc}") from exc
    planned = plan_run(config, registry)
    config = planned.config
    if session is not None:
        _same_config(config, session)
    _check_multiprocess_plan(planned, session)
    checkpointer = RunCheckpointer(run_dir / "checkpoints", keep=config.checkpoint.keep,
                                   asynchronous=config.checkpoint.asynchronous)
    latest = checkpointer.latest_step()
    if latest is not None and not resume:
        raise CheckpointError(f"{run_dir}: holds checkpoints (latest step {latest}); resume it or choose another run directory")
    meta = checkpointer.meta(latest) if latest is not None else None
    base = base_identity(config.model)  # with LoRA: checkpoints record the base they hold no copy of
    if meta is not None:
        changed = config_changes(meta["config"], config.to_dict()) + base_changes(meta.get("base"), base)
        if changed:
            raise CheckpointError([f"{run_dir / 'checkpoints' / str(latest)}: config changed incompatibly since the "
                                   f"checkpoint was written: {c}" for c in changed][0])
    steps = config.train.steps
    if latest is not None and latest + 1 >= steps:
        # Recognised before any model is built: nothing to do.
        started.set()
        checkpointer.close()
        log(f"{run_dir}: the run already completed step {latest} ({latest + 1} of {_count(steps, 'step')}); "
            "raise --steps to continue it")
        return RunSummary(steps=latest + 1, policy_version=meta["policy_version"] if meta else latest + 1, items={})
    if latest is not None:
        log(f"training {_count(steps, 'step')} in {run_dir}: resuming from the checkpoint of step {latest} "
            f"(policy version {meta['policy_version'] if meta else '?'}), {_count(steps - latest - 1, 'step')} to go")
    elif (run_dir / "config.yaml").exists():
        log(f"training {_count(steps, 'step')} in {run_dir}: it has no checkpoint yet, so the run starts from step 0")
    else:
        log(f"training {_count(steps, 'step')} in a new run directory {run_dir}")

    # The task first: a bad dataset is reported before any model is built.
    task = registry.get("rlpipe_tasks", config.task.name, path="task.name").factory(config.task.options)
    context = BuildContext(run_config=config, registry=registry, seed=config.train.seed)
    stages = build_stages(planned, context=context)
    trainer = stages.get(planned.graph.sink) if planned.graph.sink else None
    # Weight sync by capability, never by role name: every stage that receives
    # weights is subscribed to the stage that publishes them (the sink).
    try:
        publisher = weight_publisher(stages, planned.graph.sink)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if publisher is not None:
        for stage in stages.values():
            if stage is not publisher and isinstance(stage, WeightReceiver):
                publisher.subscribe(stage.load_weights)
    stateful = {r: s for r, s in stages.items() if isinstance(s, StatefulStage)}
    _check_multiprocess_plan(planned, session, stateful)

    start_step, replay = 0, {}
    if meta is not None:
        states, replay, meta = checkpointer.restore(latest, templates={r: s.state() for r, s in stateful.items()})
        for role, state in states.items():
            stateful[role].restore(state)
        if publisher is not None:
            publisher.publish()  # the receivers continue from the restored policy
        start_step = latest + 1
    metrics_path = run_dir / "metrics.jsonl"
    if primary:
        _truncate_metrics(metrics_path, start_step - 1)

    from rlpipe.models.loading import load_tokenizer

    counters = PromptCounters(**(meta or {}).get("prompt_counters", {}))
    source = prompt_items(task, load_tokenizer(config.model), seed=config.train.seed,
                          prompts_per_item=config.train.prompts_per_item, items_per_step=config.train.items_per_step,
                          start_step=start_step, max_prompt_tokens=config.task.max_prompt_tokens,
                          overlong=config.task.overlong_prompts, counters=counters)
    prompts_check = _SamePrompts(session) if session is not None else None
    if prompts_check is not None:
        source = prompts_check.wrap(source, start_step)

    if session is not None:
        session.barrier("read-run-dir")  # every process has read config.yaml before process 0 rewrites it
    if primary:
        (run_dir / "config.yaml").write_text(dump_yaml(config))
        (run_dir / "plan.json").write_text(json.dumps(planned.plan.to_json(), indent=2) + "\n")
    sink = None
    if config.telemetry.tensorboard and primary:  # created up front: a missing extra is a config error, not a stage failure
        from rlpipe.runtime.tensorboard import TensorBoardSink

        sink = TensorBoardSink(run_dir / "tensorboard")
    trace = _RunTrace(process_index=distributed.process_index(), sink=planned.graph.sink)
    trace_path = trace_file(run_dir, distributed.process_index())
    if start_step:
        trace.continue_from(trace_path)
        trace.instant("source", "resumed", step=start_step)
    if session is not None:  # a process stopped by the watchdog still leaves its timeline
        session.on_abort(lambda: trace.write(trace_path))
    last = [time.perf_counter()]

    def on_snapshot(snap: Snapshot) -> None:
        checkpointer.save(snap.step, states=snap.states, pending=snap.pending, meta={
            "policy_version": snap.policy_version, "data_position": snap.step + 1, "seed": config.train.seed,
            "metric_step": snap.step, "rlpipe_version": __version__, "config": config.to_dict(),
            "prompt_counters": attrs.asdict(counters), **({"base": base} if base is not None else {})})
        log(f"checkpoint of step {snap.step} started")

    with metrics_path.open("a") if primary else open(os.devnull, "w") as metrics_file:
        def on_step(step: int) -> None:
            now = time.perf_counter()
            # The sink snapshots its state for a checkpoint between its barrier and this call (the
            # end-of-run checkpoint after the last step): that is checkpoint time, not step time.
            snapshot = trace.sink_snapshot_s.pop(step, 0.0)
            row: dict[str, Any] = {"step": step, "time/step_s": now - last[0] - snapshot}
            if snapshot:
                row["time/checkpoint_s"] = snapshot
            last[0] = now
            row.update(getattr(trainer, "last_metrics", {}) or {})
            for role, stage in stages.items():  # other training roles' metrics, by role (critic/value_loss)
                if stage is not trainer:
                    row.update({f"{role}/{k}": v for k, v in (getattr(stage, "last_metrics", None) or {}).items()})
            row.setdefault("reward/mean", float("nan"))
            for role, stage in stages.items():  # scorers that count failed calls (reward/failures)
                failures = getattr(stage, "failures", None)
                if isinstance(failures, int) and not isinstance(failures, bool):
                    row[f"{role}/failures"] = failures
            row["policy_version"] = getattr(trainer, "version", step + 1)
            row.update(counters.metrics())
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()  # a crash never loses a finished step
            if sink is not None:
                sink.write(row)
            if report is not None:
                report(row)

        executor = Executor(planned.graph, stages, planned.plan, max_staleness=config.train.max_staleness,
                            seed=config.train.seed, hooks=registry.hook, trace=trace,
                            on_step=on_step if primary else None,  # process 0 writes metrics and progress
                            snapshot_every=config.checkpoint.every, on_snapshot=on_snapshot)
        if control is not None:
            control.attach(executor)
        watching = _coordinate(executor, session) if session is not None else threading.Event()
        try:
            started.set()
            summary = executor.run(source, steps=config.train.steps, start_step=start_step, replay=replay)
            if prompts_check is not None:
                prompts_check.finish()
            return summary
        finally:
            watching.set()
            try:
                checkpointer.close()  # an asynchronous save finishes before the process may exit
            finally:
                trace.write(trace_path)
                if sink is not None:
                    sink.close()


class _RunTrace(Trace):
    """The run's timeline, which also notes how long each ``snapshot`` span
    of the sink (``sink``: its role) took, by step: the executor copies the
    sink's state for a checkpoint after the sink's barrier and before
    ``on_step``, so the metrics row of that step can leave the copy out of
    ``time/step_s`` and report it as ``time/checkpoint_s``."""

    def __init__(self, *, process_index: int = 0, sink: str | None = None):
        super().__init__(process_index=process_index)
        self._sink = sink
        self.sink_snapshot_s: dict[int, float] = {}  # taken out by on_step

    def complete(self, track: str, name: str, start_us: float, end_us: float, **args: Any) -> None:
        super().complete(track, name, start_us, end_us, **args)
        if track == self._sink and name == "snapshot" and isinstance(args.get("step"), int):
            self.sink_snapshot_s[args["step"]] = max(end_us - start_us, 0.0) / 1e6
