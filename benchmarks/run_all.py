#!/usr/bin/env python
"""The whole benchmark suite in one process, one JSON line per measurement.

Usage::

    python benchmarks/run_all.py                                  # CPU: tiny preset, table on stdout (~3 min on 2 cores)
    python benchmarks/run_all.py --json > results.jsonl           # JSON lines on stdout, table on stderr
    python benchmarks/run_all.py --preset qwen2.5-0.5b --json --out $OUT/results.jsonl   # the H200 run

Every record has ``name``, ``value``, ``unit``, ``ceiling`` and ``ratio``
(``value / ceiling``; both ``None`` where no physical limit applies), plus
``suite`` (the part that made it), the platform, and descriptive fields
(benchmarks/results.py).  With ``--out FILE`` the records are also written to
FILE, each as soon as it is measured, so a run cut short keeps what it had.
A part that fails is reported as a ``<suite>_error`` record (value ``None``,
the exception in ``error``) and the others still run; the exit status is
then 1.

Parts, in the order they run (the real runs first, so that the device's
peak-memory counter reflects them and not the micro-benchmarks):

``run``
    a real training run of the embedded default config (``rlpipe train``
    with no arguments: tiny preset, 512 completions a step), ``--run-steps``
    steps of which ``--run-warmup`` are left out.  ``framework_overhead``:
    the share of the measured wall time in which no stage is inside a jitted
    computation: the union over roles of their ``generate``, ``logprobs`` and
    ``train`` spans, less the time a role waited in them for another role's
    device lock (benchmarks/pipeline.py, ``framework_overhead``, defines the
    parts the rest is split into).  Target: at most 5 %.  Also ``run_step_time``.
    With another ``--preset``, a second real run of that preset (2 steps,
    the same config otherwise) for ``memory_peak``.
``memory``
    per role, ``memory_estimate`` (``rlpipe plan``'s ``memory_estimate_bytes``,
    per device) and ``memory_resident``: the bytes of the role's arrays on its
    most loaded device right after it is built (parameters, and the
    trainer's optimizer state), against the estimate's parameter and
    optimizer part (``over_estimate``); ``memory_peak``: each device's
    ``peak_bytes_in_use`` after the real run of the preset against the plan's
    estimated peak for that device, with the device's ``bytes_limit`` as
    ceiling.  JAX's CPU backend reports no memory statistics, so on a CPU
    ``memory_peak`` has value ``None`` and needs a GPU.
``train_memory``
    benchmarks/train_memory.py: XLA's own ``memory_analysis()`` of the
    trainer's step (remat on and off), the reference's log-probs and the
    rollout's prefill at 8 x (512 + 1536) tokens, compiled with abstract
    inputs (nothing allocated), each next to the estimator's figure
    (``estimate_over_temp``).
``transfer``
    ``copy_bandwidth`` (a jitted in-place ``a + 1``, benchmarks/rollout.py),
    ``host_to_device_bandwidth`` / ``device_to_host_bandwidth`` (one large
    array moved with ``jax.device_put`` between the ``device`` and
    ``pinned_host`` memory kinds); ``offload_bandwidth`` / ``onload_bandwidth``:
    the trainer's parameters and optimizer state moved by
    ``rlpipe.runtime.weights.offload`` / ``onload``, against the bandwidth of the
    same direction; ``weight_sync_bandwidth``: ``rlpipe.runtime.weights.sync``
    of float32 parameters to bfloat16 on the same device (bytes read + written
    per second) against ``copy_bandwidth``, with ``compiles_per_call`` and the
    time of the same cast compiled once (``cached_cast_s``).
``rollout_dp``
    benchmarks/rollout.py's data-parallel case: mesh (1, 1) against (n, 1)
    over every device of the process, rows and KV cache split over ``fsdp``
    (tokens/s and per-device cache bytes); needs 2 or more devices.
``rollout``, ``train_step``, ``agentic``
    benchmarks/rollout.py, benchmarks/train_step.py and benchmarks/agentic.py
    (multi-turn episodes: KV cache kept between turns vs prefilled every
    turn) at the preset's settings (``SETTINGS``).
``startup``
    benchmarks/startup.py: the wall time of ``rlpipe --version``, ``--help``,
    ``roles list`` and ``plugins list`` as fresh processes (median of
    ``--repeats``, default 5), and which of jax, flax, optax, orbax each imports.
``pipeline`` (with ``--pipeline``)
    benchmarks/pipeline.py: the three seed placements, synchronous and
    asynchronous, on 8 devices (fake CPU devices unless the machine has 8).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fake_devices
import results
from results import Sink, log, record, timed

GB = 1e9
MIB = 1 << 20

#: Per preset: the rollout and train-step shapes (the H200 ones for Qwen2.5-0.5B,
#: docs/performance.md), and the real run's extra overrides.
SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": {"dtype": "float32", "rollout_batch": [8, 32], "prompt_len": 32, "new_tokens": 64,
             "train_batch": 8, "seq": 128, "nominal_bandwidth": None,
             "agentic": {"episodes": 64, "turns": 4, "prompt_tokens": 16, "turn_tokens": 16, "observation_tokens": 8}},
    "qwen2.5-0.5b": {"dtype": "bfloat16", "rollout_batch": [64, 256], "prompt_len": 64, "new_tokens": 960,
                     "train_batch": 8, "seq": 1024, "nominal_bandwidth": 4300,
                     "agentic": {"episodes": 256, "turns": 8, "prompt_tokens": 64, "turn_tokens": 64, "observation_tokens": 32}},
}
#: Array sizes of the bandwidth probes (MiB), by platform: large enough to
#: leave the caches, small enough for a shared workstation.
PROBE_MIB = {"cpu": {"copy": 256, "host": 256}, "accelerator": {"copy": 4096, "host": 1024}}
OVERHEAD_TARGET = 0.05
PARTS = ("run", "memory", "train_memory", "transfer", "rollout", "rollout_dp", "train_step", "agentic", "startup",
         "pipeline")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(SETTINGS))
    p.add_argument("--json", action="store_true", help="JSON lines on stdout (the table goes to stderr)")
    p.add_argument("--out", metavar="FILE", help="also write the JSON lines to FILE")
    p.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    p.add_argument("--pipeline", action="store_true",
                   help="also run benchmarks/pipeline.py's placements (needs 8 devices; on a CPU asks for 8 fake ones)")
    p.add_argument("--run-steps", type=int, default=8, help="steps of the real training run (default 8)")
    p.add_argument("--run-warmup", type=int, default=3, help="its first steps left out (default 3)")
    p.add_argument("--run-set", action="append", default=[], metavar="KEY=VALUE", help="override for the real runs")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="override the preset's dtype (rollout, train step, runs)")
    p.add_argument("--rollout-batch", type=int, nargs="+", help="override the rollout batch sizes")
    p.add_argument("--new-tokens", type=int, help="override the rollout's new tokens")
    p.add_argument("--train-batch", type=int, help="override the train step's batch")
    p.add_argument("--seq", type=int, help="override the train step's sequence length")
    p.add_argument("--repeats", type=int, help="timed repeats per micro-benchmark (default: the scripts' own)")
    p.add_argument("--pipeline-steps", type=int, default=8)
    args = p.parse_args(argv)
    if args.run_warmup < 1 or args.run_steps <= args.run_warmup:
        p.error("need --run-warmup >= 1 and --run-steps > --run-warmup")
    return args


# -- parts ---------------------------------------------------------------------------------------


def _device_bytes(arrays) -> tuple[dict[int, int], int]:
    """Bytes per device id in device memory, and bytes in host memory kinds."""
    per_device: dict[int, int] = {}
    host = 0
    for a in arrays:
        kind = a.sharding.memory_kind
        for shard in a.addressable_shards:
            n = shard.data.nbytes
            if kind in (None, "device"):
                per_device[shard.device.id] = per_device.get(shard.device.id, 0) + n
            else:
                host += n
    return per_device, host


def stage_arrays(stage: Any) -> list[Any]:
    """Every JAX array a stage holds in its attributes (and its model holder's), once each."""
    import jax

    found: dict[int, Any] = {}
    owners = [stage] + ([stage.holder] if hasattr(stage, "holder") else [])
    for owner in owners:
        for value in vars(owner).values():
            for leaf in jax.tree_util.tree_leaves(value):
                if isinstance(leaf, jax.Array):
                    found[id(leaf)] = leaf
    return list(found.values())


def run_config_overrides(preset: str, dtype: str, steps: int, extra: Sequence[str] = ()) -> list[str]:
    return [f"model.preset={preset}", f"model.dtype={dtype}", f"train.steps={steps}", "checkpoint.every=0", *extra]


def part_run(args: argparse.Namespace, emit: Sink, state: dict[str, Any]) -> None:
    """The real run of the tiny preset: framework overhead and step time."""
    import pipeline

    root = Path(state["tmp"])
    run = pipeline.run_training([], run_config_overrides("tiny", "float32", args.run_steps, args.run_set),
                                run_dir=root / "run-tiny")
    state["runs"]["tiny"] = run
    overhead = pipeline.framework_overhead(run, args.run_warmup)
    n = args.run_steps - args.run_warmup
    common = {"preset": "tiny", "steps_measured": n, "warmup_steps": args.run_warmup, "config": "embedded default"}
    emit(record("run_step_time", overhead["wall_s"] / n, "s", **common,
                metrics_step_times_s=[round(r["time/step_s"], 4) for r in run.metrics if r["step"] >= args.run_warmup],
                compile_fraction=overhead["compile_fraction"]))
    emit(record("framework_overhead", overhead["fraction"], "fraction", **common, target=OVERHEAD_TARGET,
                parts_fraction=overhead["parts_fraction"], compile_fraction=overhead["compile_fraction"],
                inside_jitted_s=overhead["compute_s"], window_wall_s=overhead["wall_s"],
                definition="1 - |union over roles of generate/logprobs/train spans, less device-lock waits| / wall"))
    if args.preset != "tiny":
        log(f"real run of {args.preset} for the peak-memory figures ...")
        state["runs"][args.preset] = pipeline.run_training(
            [], run_config_overrides(args.preset, state["dtype"], 2, args.run_set),
            run_dir=root / f"run-{args.preset}")
    state["peak"] = _memory_stats()


def _memory_stats() -> dict[int, dict[str, int] | None]:
    import jax

    out = {}
    for d in jax.local_devices():
        try:
            out[d.id] = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without statistics raise or return None
            out[d.id] = None
    return out


def _planned(preset: str, dtype: str, extra: Sequence[str]):
    from rlpipe.app.defaults import DEFAULT_CONFIG
    from rlpipe.core.plugins import load_registry
    from rlpipe.runtime.planning import plan_run
    from rlpipe.runtime.run_config import load_config

    registry = load_registry(warn=lambda message: None)
    config = load_config(registry, defaults=DEFAULT_CONFIG, overrides=run_config_overrides(preset, dtype, 1, extra))
    return registry, plan_run(config, registry)


def part_memory(args: argparse.Namespace, emit: Sink, state: dict[str, Any]) -> None:
    """Estimates against what can be measured: resident bytes (everywhere), peaks (GPU/TPU)."""
    from rlpipe.core.memory import MemoryBudget
    from rlpipe.core.specs import BuildContext
    from rlpipe.runtime.planning import build_stages

    preset, dtype = args.preset, state["dtype"]
    registry, planned = _planned(preset, dtype, args.run_set)
    common = {"preset": preset, "model_dtype": dtype}
    for r in planned.plan.roles:
        est = planned.memory.get(r.name)
        emit(record("memory_estimate", None if est is None else est.total, "bytes", role=r.name, **common,
                    device_ids=list(r.devices), mesh=list(r.mesh.shape), offload=r.offload,
                    breakdown=None if est is None else {"parameters": est.parameters, "optimizer_state": est.optimizer_state,
                                                        "gradients": est.gradients, "kv_cache": est.kv_cache,
                                                        "activations": est.activations}))

    # Peak device memory of the real run, against the plan's per-device peak.
    peak = state.get("peak") or _memory_stats()
    run_done = preset in state["runs"]
    usage = MemoryBudget(capacity=planned.capacity).usage(planned.plan.roles)
    for u in usage:
        stats = [peak.get(d) for d in u.devices]
        measured = [s.get("peak_bytes_in_use") for s in stats if s] if run_done else []
        limit = [s.get("bytes_limit") for s in stats if s and s.get("bytes_limit")]
        value = max(measured) if measured else None
        note = None
        if value is None:
            note = ("the device reports no memory statistics (JAX's CPU backend); measuring the peak needs a GPU"
                    if not any(stats) else "no real run of this preset in this process (the run part was skipped or failed)")
        emit(record("memory_peak", value, "bytes", ceiling=min(limit) if limit else None, **common,
                    device_ids=list(u.devices), roles=list(u.roles), estimate_bytes=u.peak_bytes,
                    over_estimate=value / u.peak_bytes if value is not None and u.peak_bytes else None, note=note,
                    measured="peak_bytes_in_use after the real run (process-wide, includes XLA temporaries)"))

    # Resident bytes of each device role's arrays right after it is built.
    context = BuildContext(run_config=planned.config, registry=registry, seed=0)
    stages = build_stages(planned, context=context)
    state["stages"] = stages
    for name, stage in stages.items():
        est = planned.memory.get(name)
        if est is None:
            continue  # a host role
        per_device, host = _device_bytes(stage_arrays(stage))
        value = max(per_device.values(), default=0)
        resident_est = est.parameters + est.optimizer_state
        emit(record("memory_resident", value, "bytes", role=name, **common, estimate_bytes=resident_est,
                    over_estimate=value / resident_est if resident_est else None, host_bytes=host,
                    estimate_parts="parameters + optimizer_state",
                    measured="bytes of the stage's arrays on its most loaded device, after it is built"))


def pinned_host_bandwidth(mib: int, repeats: int) -> tuple[float, float]:
    """(host -> device, device -> host) bytes/s for one ``mib`` MiB float32
    array moved between the ``device`` and ``pinned_host`` memory kinds with
    ``jax.device_put``; best of ``repeats`` (at least 5)."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    on_device = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    on_host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    n = mib * MIB // 4
    x = jax.block_until_ready(jax.device_put(jnp.ones((n,), jnp.float32), on_device))
    h = jax.block_until_ready(jax.device_put(x, on_host))
    down, up = [], []
    for _ in range(max(repeats, 5)):
        t = time.perf_counter()
        h = jax.block_until_ready(jax.device_put(x, on_host))
        down.append(time.perf_counter() - t)
        t = time.perf_counter()
        y = jax.block_until_ready(jax.device_put(h, on_device))
        up.append(time.perf_counter() - t)
        del y
    return n * 4 / min(up), n * 4 / min(down)


class CompileCounter:
    """Counts XLA backend compilations while installed (JAX's monitoring events)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def _on(self, event: str, duration: float, **_: Any) -> None:
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration

    @contextlib.contextmanager
    def installed(self):
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._on)
        try:
            yield self
        finally:
            jax.monitoring.unregister_event_duration_listener(self._on)


def part_transfer(args: argparse.Namespace, emit: Sink, state: dict[str, Any]) -> None:
    import jax
    import jax.numpy as jnp
    import rollout
    from flax import nnx

    from rlpipe.models import PRESETS
    from rlpipe.models.loading import init_sharded
    from rlpipe.runtime import weights

    dev = jax.devices()[0]
    repeats = args.repeats or (10 if dev.platform == "cpu" else 5)
    common = {"preset": args.preset}
    mib = PROBE_MIB["cpu" if dev.platform == "cpu" else "accelerator"]

    log(f"copy bandwidth ({mib['copy']} MiB) ...")
    bw = rollout.copy_bandwidth(mib["copy"], repeats)
    state["bandwidth"] = bw
    emit(record("copy_bandwidth", bw / GB, "GB/s", bytes=2 * mib["copy"] * MIB, host_load_1m=os.getloadavg()[0]))

    log(f"pinned_host bandwidth ({mib['host']} MiB) ...")
    h2d, d2h = pinned_host_bandwidth(mib["host"], repeats)
    emit(record("host_to_device_bandwidth", h2d / GB, "GB/s", bytes=mib["host"] * MIB, memory_kind="pinned_host"))
    emit(record("device_to_host_bandwidth", d2h / GB, "GB/s", bytes=mib["host"] * MIB, memory_kind="pinned_host"))

    # Offload and onload of the trainer's state, as the trainer stage holds it.
    trainer = (state.get("stages") or {}).get("trainer")
    if trainer is None:
        emit(record("offload_bandwidth", None, "GB/s", ceiling=d2h / GB, **common,
                    note="no trainer stage (the memory part did not run)"))
    else:
        tree = (trainer.params, trainer.opt_state)
        nbytes = weights.device_bytes(tree)
        jax.block_until_ready(weights.onload(weights.offload(tree)))  # first use of each transfer
        off, on = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            host_tree = jax.block_until_ready(weights.offload(tree))
            off.append(time.perf_counter() - t)
            t = time.perf_counter()
            back = jax.block_until_ready(weights.onload(host_tree))
            on.append(time.perf_counter() - t)
            del back, host_tree
        leaves = len(jax.tree_util.tree_leaves(tree))
        for name, times, ceiling in (("offload_bandwidth", off, d2h), ("onload_bandwidth", on, h2d)):
            t = statistics.median(times)
            emit(record(name, nbytes / t / GB, "GB/s", ceiling=ceiling / GB, **common, bytes=nbytes, arrays=leaves,
                        time_s=t, times_s=[round(x, 6) for x in times],
                        what="trainer parameters + optimizer state, rlpipe.runtime.weights." + name.split("_")[0]))

    # Weight sync with a cast, on one device: float32 parameters -> bfloat16.
    from rlpipe.core.placement import MeshSpec, RolePlacement, make_mesh
    from rlpipe.models.sharding import shardings_for

    mesh = make_mesh(RolePlacement(name="sync", devices=(dev.id,), mesh=MeshSpec((1, 1), ("fsdp", "tp"))))
    _, params = nnx.split(init_sharded(PRESETS[args.preset], mesh, seed=0, dtype=jnp.float32))
    params = jax.block_until_ready(params)
    target = shardings_for(params, mesh)
    src_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    moved = src_bytes + src_bytes // 2  # read float32, write bfloat16
    t = time.perf_counter()
    jax.block_until_ready(weights.sync(params, target, jnp.bfloat16))
    first = time.perf_counter() - t
    with CompileCounter().installed() as compiles:
        times = timed(lambda: jax.block_until_ready(weights.sync(params, target, jnp.bfloat16)), repeats)
    cast = jax.jit(lambda tree: jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), tree), out_shardings=target)
    jax.block_until_ready(cast(params))
    cached = statistics.median(timed(lambda: jax.block_until_ready(cast(params)), repeats))
    t_sync = statistics.median(times)
    emit(record("weight_sync_bandwidth", moved / t_sync / GB, "GB/s", ceiling=bw / GB, **common, bytes=moved,
                arrays=len(jax.tree_util.tree_leaves(params)), time_s=t_sync, first_call_s=first,
                compiles_per_call=compiles.count / len(times), compile_s_per_call=compiles.seconds / len(times),
                cached_cast_s=cached, cached_cast_bandwidth_GBps=moved / cached / GB,
                what="rlpipe.runtime.weights.sync float32 -> bfloat16, same device and sharding"))


def part_rollout(args: argparse.Namespace, emit: Sink, state: dict[str, Any]) -> None:
    import rollout

    s = state["settings"]
    rollout.measure(preset=args.preset, dtype=state["dtype"], batches=args.rollout_batch or s["rollout_batch"],
                    prompt_len=s["prompt_len"], new_tokens=args.new_tokens or s["new_tokens"], repeats=args.repeats,
                    nominal_bandwidth=s["nominal_bandwidth"], inspect_hlo=True,
                    bandwidth=state.get("bandwidth"), emit=emit)


def part_train_memory(args: argparse.Namespace, emit: Sink, state: dict[str, Any]) -> None:
    """XLA's own memory_analysis() of the train step (remat on and off), the
    reference's log-probs and the rollout's prefill at 8 x 2048 tokens, with
    abstract inputs (nothing is allocated), next to the estimator's figure."""
    import train_memory

    for remat in (True, False):
        train_memory.measure(preset=args.preset, rows=8, prompt=512, completion=1536, remat=remat,
                             programs=("train",) if not remat else ("train", "reference", "prefill"),
                             dtype=state["dtype"], emit=emit)


def part_rollout_dp(args: argparse.Namespace, emit: Sink, state: dict[str, Any]) -> None:
    """Data-parallel generation: mesh (1, 1) against (n, 1) over every device,
    rows and KV cache split over fsdp (per-device cache bytes read from the arrays)."""
    import jax
    import rollout

    n = len(jax.devices())
    if n < 2:
        emit(record("rollout_dp_tokens_per_s", None, "tokens/s", note=f"needs 2 or more devices, this process has {n}"))
        return
    s = state["settings"]
    rollout.measure_data_parallel(devices=n, preset=args.preset, dtype=state["dtype"],
                                  batches=args.rollout_batch or s["rollout_batch"], prompt_len=s["prompt_len"],
                                  new_tokens=args.new_tokens or s["new_tokens"], repeats=args.repeats, emit=emit)


def part_train_step(args: argparse.Namespace, emit: Sink, state: dict[str, Any]) -> None:
    import train_step

    s = state["settings"]
    train_step.measure(preset=args.preset, dtype=state["dtype"], batch=args.train_batch or s["train_batch"], seq=args.seq or s["seq"],
                       repeats=args.repeats or 5, emit=emit)


def part_agentic(args: argparse.Namespace, emit: Sink, state: dict[str, Any]) -> None:
    import agentic

    agentic.measure(preset=args.preset, dtype=state["dtype"], repeats=args.repeats or 3, emit=emit,
                    **state["settings"]["agentic"])


def part_startup(args: argparse.Namespace, emit: Sink, state: dict[str, Any]) -> None:
    import startup

    startup.measure(repeats=args.repeats or 5, emit=emit)


def part_pipeline(args: argparse.Namespace, emit: Sink, state: dict[str, Any]) -> None:
    import jax
    import pipeline

    if len(jax.devices()) < 8:
        emit(record("pipeline_step_time", None, "s", note=f"needs 8 devices, this process has {len(jax.devices())}"))
        return
    pipeline.measure(steps=args.pipeline_steps, emit=emit)


# -- the command ---------------------------------------------------------------------------------


class _Tagged(Sink):
    """Adds the part's name and the platform to each record before writing it."""

    def __init__(self, sink: Sink, fields: dict[str, Any]):
        super().__init__()
        self.sink, self.fields = sink, fields

    def __call__(self, rec: dict[str, Any]) -> dict[str, Any]:
        out = {**{k: rec[k] for k in results.KEYS}, **self.fields, **{k: v for k, v in rec.items() if k not in results.KEYS}}
        self.records.append(out)
        return self.sink(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pipeline:
        fake_devices.request(8)  # only adds CPU devices; an accelerator's are unaffected
    import jax

    settings = dict(SETTINGS[args.preset])
    state: dict[str, Any] = {"settings": settings, "dtype": args.dtype or settings["dtype"], "runs": {}}
    streams = [sys.stdout] if args.json else []
    out_file = open(args.out, "w") if args.out else None  # noqa: SIM115 - closed below
    if out_file:
        streams.append(out_file)
    sink = Sink(streams)
    devices = jax.devices()
    base = {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "devices": len(devices),
            "jax": jax.__version__, "python": platform.python_version()}
    log(f"{base['platform']} ({base['device_kind']}) x {base['devices']}, jax {base['jax']}, preset {args.preset}")
    parts = {"run": part_run, "memory": part_memory, "train_memory": part_train_memory, "transfer": part_transfer,
             "rollout": part_rollout, "rollout_dp": part_rollout_dp,
             "train_step": part_train_step, "agentic": part_agentic, "startup": part_startup, "pipeline": part_pipeline}
    wanted = args.only or [p for p in PARTS if p != "pipeline" or args.pipeline]
    failed = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlpipe-bench-") as tmp:
        state["tmp"] = tmp
        for name in PARTS:
            if name not in wanted:
                continue
            log(f"== {name}")
            t = time.perf_counter()
            emit = _Tagged(sink, {"suite": name, **base})
            try:
                parts[name](args, emit, state)
            except Exception as exc:  # noqa: BLE001 - one broken part must not cost the others (one GPU shot)
                traceback.print_exc(file=sys.stderr)
                failed.append(name)
                emit(record(f"{name}_error", None, None, error=f"{type(exc).__name__}: {exc}"))
            log(f"== {name}: {time.perf_counter() - t:.1f} s")
    if out_file:
        out_file.close()
    log(f"suite finished in {time.perf_counter() - started:.1f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    results.table(sink.records, labels=("suite", "role", "batch", "placement", "mode"),
                  out=sys.stderr if args.json else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
