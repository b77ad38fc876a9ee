#!/usr/bin/env python
"""Pipeline overlap of real training runs: step time, stage busy time and overlap per placement.

Usage::

    python benchmarks/pipeline.py                       # 3 placements x {sync, async}, 8 steps each (~3 min on 2 cores)
    python benchmarks/pipeline.py --steps 14 --warmup 4 # longer runs
    python benchmarks/pipeline.py --placements disaggregated --modes async --keep-runs runs/bench
    python benchmarks/pipeline.py --config examples/smollm2_arithmetic.yaml --set model.preset=smollm2-135m-instruct \
        --modes sync --steps 3 --warmup 1                   # the pretrained model in the three placements

Runs a few steps of real training (``rlpipe.app.driver.train``) for each seed
placement (``examples/colocated.yaml``, ``examples/colocated_offload.yaml``,
``examples/disaggregated.yaml``) synchronously (``train.max_staleness: 0``) and
asynchronously (``max_staleness: 1``), on 8 fake CPU devices unless the
machine has 8 devices of its own, with the tiny preset and small batches
(``SHAPE`` below).  The first ``--warmup`` steps (compilation) are left out;
every figure covers the remaining steps.  One JSON line per measurement on
stdout (``name``, ``value``, ``unit``, ``ceiling``, ``ratio`` and descriptive
fields), a table on stderr.

Definitions (timeline terms as in docs/runs.md, ``rlpipe.app.timeline``):

* **window**: from the moment the trainer (the graph's sink) finished the
  last warm-up step to the moment it finished the last step (the ends of its
  ``barrier`` spans).  Every span inside it counts, whatever its step (the
  rollout of step n+1 running beside the trainer's step n), clipped to it.
* ``pipeline_step_time``: the window's wall time / measured steps (the mean
  of ``time/step_s`` in ``metrics.jsonl`` over those steps, to within the
  time between the barrier's end and the metrics row being written; the rows
  are kept as ``metrics_step_times_s``).
* ``pipeline_stage_busy``: per role, its busy time in the window (union of its
  spans but ``barrier_wait``) / measured steps: seconds of work per step.
  ``device_wait_s`` is the part of it spent waiting for another role to
  release shared devices (below); ``by_kind_s`` splits it by span name.
* ``pipeline_overlap_ratio``: the sum of all roles' busy times over the
  window's wall time.  Above 1 means stages ran at the same time.
* ``pipeline_step_over_slowest_stage``: the step time over the busiest role's
  busy time per step (= window wall time / that role's busy time).  1.0 is a
  perfect pipeline, bound by its slowest stage; the issue's target for the
  disaggregated asynchronous run is at most 1.15 (``target``).

**Colocated roles take turns on their devices.**  Two multi-device programs
with collectives running at once on the same devices can deadlock XLA:CPU,
so every stage runs its device work under ``rlpipe.runtime.devices.on_devices``,
a per-device lock.  The rollout's ``generate`` and the reference's
``logprobs`` spans start *before* the lock is taken, so a colocated role
waiting for the trainer to finish looks busy on the timeline.  This script
measures those waits (it wraps ``on_devices`` in the role modules for the run,
and reports them as ``device_wait_s``) and gives every overlap figure a
``..._excluding_device_wait`` twin: that is the overlap of real work.  For
colocated placements the device programs never overlap, so whatever overlap
remains there is host work (batching, rewards, Python) running beside a device
program.  Compilation (JAX's own ``/jax/core/compile/*`` events) is counted
too: ``compile_s`` per step says how much of a measured step was still tracing
or compiling.

On this CPU, "devices" are threads of one process sharing two cores: a
disaggregated placement gives each group its own devices, not its own cores,
so its overlap measures the scheduling, not a hardware speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fake_devices
from results import Sink, log, record, stdout_sink

from rlpipe.app import timeline as tl

# Importing rlpipe starts JAX, so rlpipe is imported inside the functions:
# importing this module (run_all.py does) must leave the device count open.

ROOT = Path(__file__).resolve().parent.parent
PLACEMENTS = {
    "colocated": ROOT / "examples" / "colocated.yaml",
    "colocated_offload": ROOT / "examples" / "colocated_offload.yaml",
    "disaggregated": ROOT / "examples" / "disaggregated.yaml",
}
MODES = {"sync": 0, "async": 1}
#: Small batches on the tiny preset: a global batch of 2 items x 8 prompts x 4
#: completions of 8 tokens, one pass of the trainer over it.
SHAPE = (
    "model.preset=tiny",
    "train.prompts_per_item=8",
    "train.items_per_step=2",
    "roles.rollout.num_generations=4",
    "roles.rollout.max_new_tokens=8",
    "roles.reference.micro_batch_size=32",
    "roles.trainer.micro_batch_size=32",
    "roles.trainer.num_iterations=1",
    "checkpoint.every=0",
)
#: Spans that are a stage's jitted computation (see :func:`framework_overhead`).
COMPUTE_SPANS = ("generate", "logprobs", "train")
STAGE_THREAD = "rlpipe-stage-"
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
DISAGGREGATED_TARGET = 1.15

Interval = tuple[float, float]


# Interval arithmetic is rlpipe.app.timeline's: union, intersect, subtract, clip, length.


def total(intervals: Sequence[Interval]) -> float:
    """Covered time: overlaps count once."""
    return tl.length(tl.union(intervals))


# -- a probed training run -------------------------------------------------------------------


@dataclass
class TrainingRun:
    """What a run left behind, plus what the probe saw (times in trace seconds)."""

    run_dir: Path
    steps: int
    plan: dict[str, Any]
    host_roles: set[str]
    #: The graph's sink (the trainer): its barrier ends each step.
    sink: str
    metrics: list[dict[str, Any]]
    spans: list[Any]
    #: role -> intervals spent waiting for the device lock / holding it.
    device_wait: dict[str, list[Interval]] = field(default_factory=dict)
    device_hold: dict[str, list[Interval]] = field(default_factory=dict)
    #: (event, role or thread name, start, end) of every trace/lower/compile JAX reported.
    compiles: list[tuple[str, str, float, float]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def roles(self) -> list[str]:
        return [r["name"] for r in self.plan["roles"]]

    def step_end(self, step: int) -> float:
        """When the sink finished ``step`` (the end of its ``barrier`` span)."""
        ends = [s.end for s in self.spans if s.role == self.sink and s.name == "barrier" and s.step == step]
        if not ends:
            raise RuntimeError(f"{self.run_dir}: the trace has no barrier of step {step} on the {self.sink!r} track")
        return max(ends)

    def window(self, warmup: int):
        """The measured steps ``warmup .. steps-1``: from the moment the sink
        finished step ``warmup - 1`` to the moment it finished the last step.

        Its wall time is the measured steps' total step time; every span inside
        it counts, whatever its step (the rollout of step n+1 running beside
        the trainer's step n), and nothing of the warm-up steps does.
        """
        return tl.Window(start=self.step_end(warmup - 1), end=self.step_end(self.steps - 1),
                         steps=tuple(range(warmup, self.steps)))


class _Probe:
    """Wraps ``on_devices`` in the role modules to time lock waits and holds,
    keeps the run's ``Trace`` to convert times, and listens to JAX's compile events."""

    def __init__(self) -> None:
        self.trace = None
        self.locks: list[tuple[str, float, float, float]] = []  # thread, asked, got, released (perf_counter)
        self.compiles: list[tuple[str, str, float, float]] = []
        self._mutex = threading.Lock()

    def _wrap(self, original):
        probe = self

        @contextlib.contextmanager
        def on_devices(where: Any, *args: Any, **kwargs: Any) -> Iterator[None]:
            asked = time.perf_counter()
            with original(where, *args, **kwargs):
                got = time.perf_counter()
                try:
                    yield
                finally:
                    with probe._mutex:
                        probe.locks.append((threading.current_thread().name, asked, got, time.perf_counter()))

        return on_devices

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if event in COMPILE_EVENTS:
            end = time.perf_counter()
            with self._mutex:
                self.compiles.append((event.rsplit("/", 1)[-1], threading.current_thread().name, end - duration, end))

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Probe]:
        import jax

        import rlpipe.app.driver as train_module
        import rlpipe.roles.critic_stage as critic_stage
        import rlpipe.roles.reference_stage as reference_stage
        import rlpipe.roles.rollout_stage as rollout_stage
        import rlpipe.roles.trainer_stage as trainer_stage

        probe = self
        # The class the driver makes its run's trace with (its own subclass of Trace, where it has one).
        trace_name = "_RunTrace" if hasattr(train_module, "_RunTrace") else "Trace"
        original_trace = getattr(train_module, trace_name)

        class RecordingTrace(original_trace):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                probe.trace = self

        saved = {m: m.on_devices for m in (rollout_stage, reference_stage, trainer_stage, critic_stage) if hasattr(m, "on_devices")}
        if not saved:
            log("note: the role modules no longer import on_devices; device waits are not measured")
        setattr(train_module, trace_name, RecordingTrace)
        for module, original in saved.items():
            module.on_devices = self._wrap(original)
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        try:
            yield self
        finally:
            jax.monitoring.unregister_event_duration_listener(self._on_event)
            for module, original in saved.items():
                module.on_devices = original
            setattr(train_module, trace_name, original_trace)

    def to_trace_time(self) -> float:
        """perf_counter() - this = seconds on the trace's clock."""
        if self.trace is None:
            raise RuntimeError("the run made no Trace")
        return time.perf_counter() - self.trace.now_us() / 1e6


def _role_of(thread: str) -> str:
    return thread[len(STAGE_THREAD):] if thread.startswith(STAGE_THREAD) else thread


def run_training(config_files: Sequence[str | Path] = (), overrides: Sequence[str] = (), *, run_dir: str | Path,
                 registry: Any = None) -> TrainingRun:
    """Trains with the embedded defaults, ``config_files`` and ``overrides``
    (``key=value``) into a fresh ``run_dir``, with the probe installed."""
    from rlpipe.app.defaults import DEFAULT_CONFIG
    from rlpipe.app.driver import train
    from rlpipe.core.plugins import load_registry
    from rlpipe.runtime.run_config import load_config

    registry = registry or load_registry(warn=lambda message: None)
    config = load_config(registry, defaults=DEFAULT_CONFIG, files=[str(f) for f in config_files], overrides=list(overrides))
    run_dir = Path(run_dir)
    probe = _Probe()
    start = time.perf_counter()
    with probe.installed():
        train(config, registry, run_dir=run_dir, resume=False)
    wall = time.perf_counter() - start
    offset = probe.to_trace_time()
    plan = json.loads((run_dir / "plan.json").read_text())
    roles = registry.provided("rlpipe_roles")
    host = {r["name"] for r in plan["roles"] if r["name"] in roles and not roles[r["name"]].spec.uses_devices}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    sink = next((r["name"] for r in plan["roles"] if r["name"] in roles and roles[r["name"]].spec.sink), "trainer")
    run = TrainingRun(run_dir=run_dir, steps=config.train.steps, plan=plan, host_roles=host, sink=sink, metrics=metrics,
                      spans=tl.load_trace(run_dir / "trace.json"), wall_s=wall)
    for thread, asked, got, released in probe.locks:
        role = _role_of(thread)
        if got - asked > 0:
            run.device_wait.setdefault(role, []).append((asked - offset, got - offset))
        run.device_hold.setdefault(role, []).append((got - offset, released - offset))
    run.compiles = [(ev, _role_of(th), s - offset, e - offset) for ev, th, s, e in probe.compiles]
    return run


# -- analysis --------------------------------------------------------------------------------


def mean_step_time(run: TrainingRun, warmup: int) -> tuple[float, list[float]]:
    times = [r["time/step_s"] for r in run.metrics if isinstance(r.get("step"), int) and r["step"] >= warmup]
    if not times:
        raise RuntimeError(f"{run.run_dir}: no metrics rows after the {warmup} warm-up steps")
    return statistics.fmean(times), times


def _clip(intervals: Sequence[Interval], window) -> list[Interval]:
    return tl.clip(tl.union(intervals), window.start, window.end)


def analyse_run(run: TrainingRun, warmup: int) -> dict[str, Any]:
    """Busy time, device waits and compile time per role over the measured window."""
    window = run.window(warmup)
    if window is None or window.wall <= 0:
        raise RuntimeError(f"{run.run_dir}: the trace has no measured steps")
    groups = tl.device_groups(run.plan, host_roles=run.host_roles)
    summary = tl.analyse(run.spans, groups, window)
    step_s, times = mean_step_time(run, warmup)
    roles = {}
    for usage in summary.roles:
        if usage.role not in run.roles:
            continue  # the checkpoint track
        busy = tl.busy_intervals(run.spans, [usage.role], window=window)
        wait = total(tl.intersect(_clip(run.device_wait.get(usage.role, []), window), busy))
        roles[usage.role] = {"group": usage.group, "busy_s": usage.busy_s, "device_wait_s": wait,
                             "by_kind": dict(usage.by_kind)}
    compiles = [(s, e) for _, _, s, e in run.compiles]
    return {
        "window": window, "wall_s": window.wall, "step_s": step_s, "step_times_s": times, "roles": roles,
        "groups": {g.group.name: list(g.group.roles) for g in summary.groups if set(g.group.roles) <= set(run.roles)},
        "compile_s": total(_clip(compiles, window)),
        "compiles": sum(1 for ev, _, s, e in run.compiles
                        if ev == "backend_compile_duration" and e > window.start and s < window.end),
        "lag": max((r.get("staleness_max", 0) or 0 for r in run.metrics if r.get("step", -1) >= warmup), default=0),
    }


def pipeline_records(run: TrainingRun, warmup: int, **labels: Any) -> list[dict[str, Any]]:
    """The records of one placement and mode (see the module docstring)."""
    a = analyse_run(run, warmup)
    wall = a["wall_s"]
    n_steps = run.steps - warmup
    per_step = 1 / n_steps  # window seconds -> seconds per step
    out = [record("pipeline_step_time", wall / n_steps, "s", **labels, steps_measured=n_steps, warmup_steps=warmup,
                  metrics_step_times_s=[round(t, 4) for t in a["step_times_s"]], window_wall_s=wall,
                  lag=a["lag"], compile_s=a["compile_s"] * per_step, compiles_in_window=a["compiles"])]
    for role, r in a["roles"].items():
        out.append(record("pipeline_stage_busy", r["busy_s"] * per_step, "s", role=role, group=r["group"], **labels,
                          busy_fraction=r["busy_s"] / wall, device_wait_s=r["device_wait_s"] * per_step,
                          by_kind_s={k: v * per_step for k, v in r["by_kind"].items()}))
    busy = {role: r["busy_s"] for role, r in a["roles"].items()}
    work = {role: r["busy_s"] - r["device_wait_s"] for role, r in a["roles"].items()}
    out.append(record("pipeline_overlap_ratio", sum(busy.values()) / wall, "x", **labels,
                      excluding_device_wait=sum(work.values()) / wall,
                      by_group={g: sum(busy[r] for r in roles if r in busy) / wall for g, roles in a["groups"].items()},
                      by_group_excluding_device_wait={g: sum(work[r] for r in roles if r in work) / wall
                                                      for g, roles in a["groups"].items()}))
    slowest = max(busy, key=busy.get)
    slowest_work = max(work, key=work.get)
    group_work = {g: sum(work[r] for r in roles if r in work) for g, roles in a["groups"].items() if g != "host"}
    busiest_group = max(group_work, key=group_work.get)
    extra = {"target": DISAGGREGATED_TARGET} if labels.get("placement") == "disaggregated" and labels.get("mode") == "async" else {}
    out.append(record("pipeline_step_over_slowest_stage", wall / busy[slowest], "x", **labels, **extra,
                      slowest_stage=slowest, slowest_stage_busy_per_step_s=busy[slowest] * per_step,
                      excluding_device_wait=wall / work[slowest_work] if work[slowest_work] > 0 else None,
                      slowest_stage_excluding_device_wait=slowest_work,
                      over_busiest_device_group=wall / group_work[busiest_group] if group_work[busiest_group] > 0 else None,
                      busiest_device_group=busiest_group))
    return out


def framework_overhead(run: TrainingRun, warmup: int) -> dict[str, Any]:
    """Time outside the stages' jitted computations, as a share of the window's wall time.

    Inside a jitted computation: the union over roles of their ``generate``,
    ``logprobs`` and ``train`` spans, less the time a role spent in them
    waiting for another role's device lock.  Everything else in the window is
    overhead, attributed (each second once, in this order) to:

    * ``weight_sync``: publishing new weights (re-lay or cast on the devices);
    * ``offload_onload``: moving state to host memory and back;
    * ``untraced_device_work``: other stretches under a device lock (the
      trainer's pass over the old policy's log-probs before ``train``, the
      reference's or rollout's input transfer);
    * ``stage_host_work``: the rest of ``process``/``barrier``/``snapshot``
      spans: batching, padding, advantages, metrics, Python;
    * ``between_stages``: no stage span at all: the executor's queues and
      threads, the data source, idle time while a stage waits for its inputs.
    """
    window = run.window(warmup)
    by_role: dict[str, dict[str, list[Interval]]] = {}
    for s in run.spans:
        by_role.setdefault(s.role, {}).setdefault(s.name, []).append((s.start, s.end))
    compute: list[Interval] = []
    for role, kinds in by_role.items():
        spans = [iv for k in COMPUTE_SPANS for iv in kinds.get(k, [])]
        compute += tl.subtract(spans, run.device_wait.get(role, []))
    compute = _clip(compute, window)
    outside = tl.subtract([(window.start, window.end)], compute)

    def spans_named(*names: str) -> list[Interval]:
        return [iv for kinds in by_role.values() for n in names for iv in kinds.get(n, [])]

    parts: dict[str, float] = {}
    rest = outside
    for name, intervals in (("weight_sync", spans_named("weight_sync")),
                            ("offload_onload", spans_named("offload", "onload")),
                            ("untraced_device_work", [iv for ivs in run.device_hold.values() for iv in ivs]),
                            ("stage_host_work", spans_named("process", "barrier", "snapshot"))):
        part = tl.intersect(rest, intervals)
        parts[name] = total(part)
        rest = tl.subtract(rest, part)
    parts["between_stages"] = total(rest)
    wall = window.wall
    return {"fraction": total(outside) / wall, "wall_s": wall, "compute_s": total(compute),
            "parts_fraction": {k: v / wall for k, v in parts.items()},
            "compile_fraction": total(_clip([(s, e) for _, _, s, e in run.compiles], window)) / wall,
            "steps": list(window.steps)}


# -- the command --------------------------------------------------------------------------------


def summary_table(records: Sequence[dict[str, Any]]) -> None:
    """One row per placement and mode."""
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    roles: list[str] = []
    for r in records:
        key = (r.get("placement"), r.get("mode"))
        row = runs.setdefault(key, {})
        if r["name"] == "pipeline_step_time":
            row["step"], row["lag"], row["compile"] = r["value"], r["lag"], r["compile_s"]
        elif r["name"] == "pipeline_stage_busy":
            row[r["role"]] = (r["value"], r["device_wait_s"])
            if r["role"] not in roles:
                roles.append(r["role"])
        elif r["name"] == "pipeline_overlap_ratio":
            row["overlap"], row["overlap_x"] = r["value"], r["excluding_device_wait"]
        elif r["name"] == "pipeline_step_over_slowest_stage":
            row["slow"], row["slow_x"] = r["value"], r["excluding_device_wait"]
    head = ["placement", "mode", "lag", "step s", "compile s", *[f"{r} s (wait)" for r in roles],
            "overlap", "overlap excl. wait", "step/slowest", "excl. wait"]
    rows = [head]
    for (placement, mode), row in runs.items():
        def f(x, fmt="{:.3f}"):
            return "-" if x is None else fmt.format(x)

        rows.append([placement, mode, str(row.get("lag", "-")), f(row.get("step")), f(row.get("compile")),
                     *[f"{row[r][0]:.3f} ({row[r][1]:.3f})" if r in row else "-" for r in roles],
                     f(row.get("overlap"), "{:.2f}"), f(row.get("overlap_x"), "{:.2f}"),
                     f(row.get("slow"), "{:.2f}"), f(row.get("slow_x"), "{:.2f}")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    log("")
    for i, row in enumerate(rows):
        log("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            log("  ".join("-" * w for w in widths))
    log("per step, over the measured steps; (wait): time a role's spans spent waiting for another role's device lock")


def measure(*, placements: Sequence[str] = tuple(PLACEMENTS), modes: Sequence[str] = tuple(MODES), steps: int = 8,
            warmup: int = 2, overrides: Sequence[str] = (), run_root: str | Path | None = None,
            configs: Sequence[str | Path] = (), emit: Sink | None = None) -> list[dict[str, Any]]:
    """Runs every placement in every mode and returns the records.

    Args:
        configs: config files applied before each placement's file (e.g. the
            SmolLM2 example: the placement's meshes then apply to that run).
        run_root: where the run directories go (``<placement>-<mode>``); a
            temporary directory, deleted afterwards, when ``None``.
    """
    import jax

    emit = emit or stdout_sink()
    if steps <= warmup:
        raise ValueError(f"steps ({steps}) must exceed the warm-up steps ({warmup})")
    devices = jax.devices()
    base = {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "devices": len(devices),
            "jax": jax.__version__}
    records: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        root = Path(run_root) if run_root else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rlpipe-pipeline-")))
        for placement in placements:
            for mode in modes:
                run_dir = root / f"{placement}-{mode}"
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                log(f"{placement}, {mode}: {steps} steps ...")
                started = time.perf_counter()
                run = run_training([*configs, PLACEMENTS[placement]],
                                   [*SHAPE, f"train.steps={steps}", f"train.max_staleness={MODES[mode]}", *overrides],
                                   run_dir=run_dir)
                log(f"{placement}, {mode}: done in {time.perf_counter() - started:.1f} s")
                for rec in pipeline_records(run, warmup, placement=placement, mode=mode,
                                            max_staleness=MODES[mode], **base):
                    records.append(emit(rec))
    return records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                   help="sync: train.max_staleness=0; async: max_staleness=1")
    p.add_argument("--steps", type=int, default=8, help="steps per run, warm-up included (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out (compilation; default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (after the benchmark's small shape)")
    p.add_argument("--config", dest="configs", action="append", default=[], metavar="FILE",
                   help="a config file applied before each placement's (e.g. examples/smollm2_arithmetic.yaml; "
                        "then also --set model.preset=... where the benchmark's small shape sets tiny)")
    p.add_argument("--keep-runs", metavar="DIR", default=None, help="keep the run directories under DIR")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices to ask for (default 8)")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps <= args.warmup:
        p.error("need --warmup >= 1 and --steps > --warmup")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    fake_devices.request(args.devices)
    records = measure(placements=args.placements, modes=args.modes, steps=args.steps, warmup=args.warmup,
                      overrides=args.overrides, run_root=args.keep_runs, configs=args.configs)
    summary_table(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
