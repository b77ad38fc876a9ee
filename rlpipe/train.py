"""A training run: prompts from a task, the planned stages, the executor, the run directory.

The path from ``rlpipe train`` down: resolve config and plugins
(:mod:`rlpipe.core.config`), plan placement (:func:`rlpipe.core.planning.plan_run`),
build each role's stage on its placement (:func:`~rlpipe.core.planning.build_stages`),
connect the trainer's weight publish to the rollout, restore the latest
checkpoint when the run directory has one, and run the stage graph
(:class:`rlpipe.core.graph.Executor`) on items made from the task's examples.

The run directory (docs/runs.md) holds ``config.yaml`` (resolved),
``plan.json``, ``metrics.jsonl`` (one object per step, written as each step
ends), ``checkpoints/`` (orbax, :mod:`rlpipe.core.checkpoint`) and
``trace.json`` (Chrome trace events, written at the end, also after a failure).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from rlpipe import __version__
from rlpipe.core.checkpoint import CheckpointError, RunCheckpointer
from rlpipe.core.config import RunConfig, dump_yaml
from rlpipe.core.errors import UsageError
from rlpipe.core.graph import Executor, RunSummary, Snapshot
from rlpipe.core.planning import build_stages, plan_run
from rlpipe.core.plugins import Registry
from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import StatefulStage
from rlpipe.data import PromptCounters, prompt_items
from rlpipe.core.telemetry import Trace

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
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: Executor | None = None
        self.stop_requested = False

    def attach(self, executor: Executor) -> None:
        with self._lock:
            self._executor = executor
            if self.stop_requested:
                executor.request_stop()

    def request_stop(self) -> None:
        with self._lock:
            self.stop_requested = True
            if self._executor is not None:
                self._executor.request_stop()


def train(config: RunConfig, registry: Registry, *, run_dir: str | Path,
          report: Callable[[dict[str, Any]], None] | None = None, resume: bool = True,
          control: RunControl | None = None, log: Callable[[str], None] | None = None) -> RunSummary:
    """Runs ``config`` and writes the run directory; returns the executor's summary.

    Args:
        report: called with each step's metrics (for a progress display).
        resume: continue from the latest checkpoint in ``run_dir`` if there is
            one (the default); otherwise ``run_dir`` must hold no checkpoint.
        control: lets a signal handler stop the run at a checkpoint.
        log: receives one-line messages about what the run does (resume, checkpoints).

    Raises:
        CheckpointError: the checkpoint is unreadable or does not fit ``config``.
        UsageError: ``run_dir`` cannot be written.
    """
    log = log or (lambda message: None)
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{run_dir}: cannot create the run directory: {exc.strerror or exc}") from exc
    planned = plan_run(config, registry)
    config = planned.config
    checkpointer = RunCheckpointer(run_dir / "checkpoints", keep=config.checkpoint.keep,
                                   asynchronous=config.checkpoint.asynchronous)
    latest = checkpointer.latest_step()
    if latest is not None and not resume:
        raise CheckpointError(f"{run_dir}: holds checkpoints (latest step {latest}); resume it or choose another run directory")
    meta = checkpointer.meta(latest) if latest is not None else None
    if meta is not None:
        changed = config_changes(meta["config"], config.to_dict())
        if changed:
            raise CheckpointError([f"{run_dir / 'checkpoints' / str(latest)}: config changed incompatibly since the "
                                   f"checkpoint was written: {c}" for c in changed][0])

    # The task first: a bad dataset is reported before any model is built.
    task = registry.get("rlpipe_tasks", config.task.name, path="task.name").factory(config.task.options)
    context = BuildContext(run_config=config, registry=registry, seed=config.train.seed)
    stages = build_stages(planned, context=context)
    trainer = stages.get(planned.graph.sink) if planned.graph.sink else None
    rollout = stages.get("rollout")
    if trainer is not None and rollout is not None and hasattr(trainer, "subscribe") and hasattr(rollout, "load_weights"):
        trainer.subscribe(rollout.load_weights)
    stateful = {r: s for r, s in stages.items() if isinstance(s, StatefulStage)}

    start_step, replay = 0, {}
    if meta is not None:
        states, replay, meta = checkpointer.restore(latest, templates={r: s.state() for r, s in stateful.items()})
        for role, state in states.items():
            stateful[role].restore(state)
        if hasattr(trainer, "publish"):
            trainer.publish()  # the rollout continues from the restored policy
        start_step = latest + 1
        log(f"resuming from the checkpoint of step {latest} (policy version {meta['policy_version']})")
    metrics_path = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start_step - 1)

    from rlpipe.models.loading import load_tokenizer

    counters = PromptCounters(**(meta or {}).get("prompt_counters", {}))
    source = prompt_items(task, load_tokenizer(config.model), seed=config.train.seed,
                          prompts_per_item=config.train.prompts_per_item, items_per_step=config.train.items_per_step,
                          start_step=start_step, max_prompt_tokens=config.task.max_prompt_tokens,
                          overlong=config.task.overlong_prompts, counters=counters)

    (run_dir / "config.yaml").write_text(dump_yaml(config))
    (run_dir / "plan.json").write_text(json.dumps(planned.plan.to_json(), indent=2) + "\n")
    sink = None
    if config.telemetry.tensorboard:  # created up front: a missing extra is a config error, not a stage failure
        from rlpipe.tensorboard import TensorBoardSink

        sink = TensorBoardSink(run_dir / "tensorboard")
    trace = Trace()
    if start_step:
        trace.continue_from(run_dir / "trace.json")
        trace.instant("source", "resumed", step=start_step)
    last = [time.perf_counter()]

    def on_snapshot(snap: Snapshot) -> None:
        checkpointer.save(snap.step, states=snap.states, pending=snap.pending, meta={
            "policy_version": snap.policy_version, "data_position": snap.step + 1, "seed": config.train.seed,
            "metric_step": snap.step, "rlpipe_version": __version__, "config": config.to_dict(),
            "prompt_counters": attrs.asdict(counters)})
        log(f"checkpoint of step {snap.step} started")

    with metrics_path.open("a") as metrics_file:
        def on_step(step: int) -> None:
            now = time.perf_counter()
            row: dict[str, Any] = {"step": step, "time/step_s": now - last[0]}
            last[0] = now
            row.update(getattr(trainer, "last_metrics", {}) or {})
            for role, stage in stages.items():  # other training roles' metrics, by role (critic/value_loss)
                if stage is not trainer:
                    row.update({f"{role}/{k}": v for k, v in (getattr(stage, "last_metrics", None) or {}).items()})
            row.setdefault("reward/mean", float("nan"))
            reward_stage = stages.get("reward")
            if reward_stage is not None and hasattr(reward_stage, "failures"):
                row["reward/failures"] = reward_stage.failures
            row["policy_version"] = getattr(trainer, "version", step + 1)
            row.update(counters.metrics())
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()  # a crash never loses a finished step
            if sink is not None:
                sink.write(row)
            if report is not None:
                report(row)

        executor = Executor(planned.graph, stages, planned.plan, max_staleness=config.train.max_staleness,
                            seed=config.train.seed, hooks=registry.hook, trace=trace, on_step=on_step,
                            snapshot_every=config.checkpoint.every, on_snapshot=on_snapshot)
        if control is not None:
            control.attach(executor)
        try:
            if start_step >= config.train.steps:
                log(f"the run already completed step {start_step - 1}; raise --steps to continue it")
                return RunSummary(steps=start_step, policy_version=start_step, items={})
            return executor.run(source, steps=config.train.steps, start_step=start_step, replay=replay)
        finally:
            try:
                checkpointer.close()  # an asynchronous save finishes before the process may exit
            finally:
                trace.write(run_dir / "trace.json")
                if sink is not None:
                    sink.close()
