#!/usr/bin/env python
"""Rollout decode throughput of rlpipe's built-in JAX engine, against the memory roofline.

Usage::

    python benchmarks/rollout.py                                   # CPU defaults: tiny, batches 8 and 32
    python benchmarks/rollout.py --preset qwen2.5-0.5b --dtype bfloat16 \\
        --batch 64 256 --prompt-len 64 --new-tokens 960            # the H200 run (cache 1024)
    python benchmarks/rollout.py --devices 8 --batch 32            # + data-parallel: mesh (1,1) vs (8,1)

Every measurement is one JSON line on stdout with ``name``, ``value`` and
``unit``; where a physical ceiling applies also ``ceiling`` and ``ratio``
(value / ceiling); plus descriptive fields (preset, batch, prompt_len,
new_tokens, dtype, platform, device_kind, ...).  A human-readable table goes to
stderr at the end.

The ceiling is the memory roofline of DESIGN §9: one decode step reads every
parameter once plus the *whole* KV cache (``2 * layers * batch * cache_len *
kv_heads * head_dim * dtype bytes``, ``cache_len = prompt bucket +
new_tokens``), at the copy bandwidth measured in the same run (a jitted
read-and-write of a large array).  Roofline tokens/s = batch / (bytes per step
/ bandwidth).  It ignores the logits and sampling traffic, so a real engine
stays below it; it also counts the whole cache although on average only about
half of it is filled, so an engine that reads only the filled part could beat it.

Measurements:

* ``copy_bandwidth``: bytes read + written / time (best of at least 10), GB/s;
  ``host_load_1m`` says how busy the host was.
* per batch size, ``first_call``: the first :meth:`Engine.generate` call
  (trace + compile + one run), seconds, no ceiling.
* ``generate_throughput``: ``batch * new_tokens`` / time of one full
  ``generate`` call (prefill included; median over repeats), tokens/s, with
  the roofline as ceiling.  Sampling is at temperature 1.0 with no stop
  tokens, so every row generates every token (checked).
* ``prefill_throughput``: prompt tokens / time of a prefill alone, tokens/s
  (mirrors the first lines of the engine's program: a fresh cache of the same
  length and one forward over the prompt).
* ``decode_step_time`` and ``decode_throughput``: (generate − prefill) /
  new_tokens, i.e. the steady-state cost of one sample + one decode step
  (with the roofline's step time as ``roofline_ms``), and batch / that, with
  the roofline tokens/s as ceiling.
* with ``--devices N`` (N > 1; on CPU, N fake devices): the data-parallel
  case, per batch size and per mesh ``(1, 1)`` and ``(N, 1)`` (axes
  ``fsdp``, ``tp``; rows split over ``fsdp`` as the rollout role does):
  ``dp_generate_throughput`` (tokens/s of one ``generate`` call, median) and
  ``dp_cache_bytes_per_device`` (the KV cache's bytes on one device, read
  from the prefill's arrays), with ``same_tokens``: whether the completions
  equal the single-device ones (same key).  Fake CPU devices share the host's
  cores, so no speed-up is expected there; the cache bytes show the split.
* with ``--variable-length``: a workload whose rows end at random lengths:
  ``--stop-tokens K`` token ids (1..K) end a row, so with the near-uniform
  next-token distribution of random weights a row stops with probability
  about K / vocab per step (lengths roughly geometric, capped at
  ``--new-tokens``).  Per batch size (the prompts of the workload),
  ``variable_generate_throughput``: tokens actually generated / time of one
  call (median), with ``engine_method`` ``generate`` (every prompt in one
  batch) and, with ``--refill-rows R``, ``generate_refill`` (continuous
  batching on R rows; ``same_tokens`` says whether it equals ``generate``).
* with ``--inspect-hlo``: ``cache_relayouts_per_step``, the whole-cache
  copies or transposes inside the compiled decode loop (0 is ideal: the cache
  is updated in place and read once), plus whether the prefill materialises
  logits for every prompt position.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import fake_devices

if __name__ == "__main__" and "jax" not in sys.modules:
    # --devices N: fake CPU devices must be requested before JAX is imported.
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--devices", type=int, default=None)
    if (_pre.parse_known_args()[0].devices or 1) > 1:
        fake_devices.request(_pre.parse_known_args()[0].devices)

import attrs
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from results import Sink, log, record, stdout_sink, timed

from rlpipe.core.placement import MeshSpec, RolePlacement, make_mesh
from rlpipe.models.config import PRESETS, DecoderConfig
from rlpipe.models.decoder import init_cache
from rlpipe.models.generation import (
    Engine,
    SamplingParams,
    bucket_length,
    decode_segments,
    row_sharding,
)
from rlpipe.models.loading import init_sharded

GB = 1e9
MIB = 1 << 20

#: Shapes for benchmarks only, besides :data:`rlpipe.models.config.PRESETS`:
#: ``qwen2-2l-d128`` is the small Qwen2 of the engine comparisons (2 layers,
#: hidden 128, vocab 512, 4 heads, 2 key-value heads, QKV bias).
BENCH_PRESETS = {
    "qwen2-2l-d128": DecoderConfig(architecture="qwen2", vocab_size=512, hidden_size=128, intermediate_size=512,
                                   num_layers=2, num_heads=4, num_kv_heads=2, qkv_bias=True, rope_theta=1000000.0,
                                   max_position_embeddings=4096),
}


def preset_config(preset: str, layers: int | None = None) -> DecoderConfig:
    """The shape named ``preset`` (a model preset or a :data:`BENCH_PRESETS` one),
    with ``layers`` layers when given."""
    config = BENCH_PRESETS.get(preset) or PRESETS[preset]
    return attrs.evolve(config, num_layers=layers) if layers else config


def _rec(rec: dict[str, Any]) -> dict[str, Any]:
    """A record with the schema's keys (:func:`results.record`) and, where
    a nominal ceiling is given, ``ratio_nominal``."""
    rec = dict(rec)
    out = record(rec.pop("name"), rec.pop("value"), rec.pop("unit"), ceiling=rec.pop("ceiling", None), **rec)
    if out.get("ceiling_nominal") and out["value"] is not None:
        out["ratio_nominal"] = out["value"] / out["ceiling_nominal"]
    return out


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def kv_cache_bytes(config: DecoderConfig, batch: int, cache_len: int, dtype: Any) -> int:
    return 2 * config.num_layers * batch * cache_len * config.num_kv_heads * config.dim_per_head * jnp.dtype(dtype).itemsize


def copy_bandwidth(mib: int, repeats: int) -> float:
    """Device memory bandwidth in bytes/s: a jitted elementwise read-and-write of ``mib`` MiB.

    The array is donated, so the result reuses its buffer: on the CPU a fresh
    output buffer per call would measure page faults, not memory (about 6 GB/s
    instead of about 50 on this workstation).  ``a + 1`` rather than an
    identity leaves XLA nothing to elide.  The best of several runs, not the
    median: a ceiling should not drop because a neighbour was busy.
    """
    n = mib * MIB // 4
    f = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = jax.block_until_ready(f(jnp.zeros((n,), jnp.float32)))
    times = []
    for _ in range(max(repeats, 10)):
        t = time.perf_counter()
        x = jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t)
    del x
    return 2 * n * 4 / min(times)


def _prefill(graphdef, state, tokens, mask, cache_len: int, cache_dtype):
    # Mirrors the start of rlpipe.models.generation._generate: a fresh cache of the
    # first decode segment's length, then one forward over the left-padded prompt.
    model = nnx.merge(graphdef, state)
    rows, p = tokens.shape
    cache = init_cache(model.config, rows, cache_len, cache_dtype)
    valid = jnp.concatenate([mask, jnp.zeros((rows, cache_len - p), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.forward(tokens, positions, valid, cache, 0)
    return logits[:, -1], cache


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+ = \w+\[([\d,]*)\](\{[^}]*\})? ([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) \(")
_REF = re.compile(r"(?:body|condition|to_apply|calls)=%([\w.\-]+)")


def _computations(text: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and line.rstrip().endswith("{"):
            current = comps.setdefault(m.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return comps


def cache_relayouts(text: str, cache_shape: tuple[int, ...],
                    other_shapes: tuple[tuple[int, ...], ...] = ()) -> tuple[int | None, int]:
    """Counts, in the compiled HLO ``text``, the instructions that rewrite a whole
    per-layer cache array (a copy, or a transpose into another dimension order)
    inside the decode loop (per step) and outside it (once per call).

    ``cache_shape`` is the keys' shape (it finds the loop), ``other_shapes``
    the other cache arrays' when their dimensions are the keys' in another
    order (the values: ``LayerCache`` keeps keys slots-minor, values
    head-dim-minor), so that those arrays themselves are not counted.

    Fused computations are not walked: a fusion that transposes the cache shows
    up as one top-level instruction whose result has the cache's dimensions in
    another order.  Bitcasts (free) and dynamic-update-slices (in place) do not count.
    The per-step count is ``None`` when no while loop carries the cache (the
    program changed shape: look at it by hand rather than trust a zero).
    """
    comps = _computations(text)
    fusion_bodies = {m for lines in comps.values() for line in lines if " fusion(" in line
                     for m in _REF.findall(line)}
    dims = list(cache_shape)
    others = [list(o) for o in other_shapes]

    tag = "[" + ",".join(map(str, dims)) + "]"
    # The decode loop: the while whose carried state holds the cache.
    loop_lines = [line for lines in comps.values() for line in lines if " while(" in line and tag in line.split(" while(")[0]]
    # The cache's own layout is the one the loop carries (XLA may pick a non-row-major one).
    carried = re.search(re.escape(tag) + r"(\{[^}]*\})", loop_lines[0]) if loop_lines else None
    cache_layout = carried.group(1) if carried else None

    def relayouts(lines: list[str]) -> int:
        n = 0
        for line in lines:
            if " copy-start(" in line and tag in line:  # async copy: its result is a tuple
                n += 1
                continue
            m = _INSTR.match(line)
            if not m or not m.group(1):
                continue
            shape, layout, op = [int(x) for x in m.group(1).split(",")], m.group(2), m.group(3)
            if sorted(shape) != sorted(dims) or op in ("bitcast", "parameter", "get-tuple-element", "dynamic-update-slice",
                                                       "tuple", "copy-done"):
                continue
            if (shape != dims and shape not in others) or op in ("copy", "transpose") or (
                    shape == dims and layout and cache_layout and layout != cache_layout):
                n += 1
        return n

    loop_bodies = [re.search(r"body=%([\w.\-]+)", line).group(1) for line in loop_lines]
    in_loop: set[str] = set()
    todo = list(loop_bodies)
    while todo:
        name = todo.pop()
        if name in in_loop or name in fusion_bodies or name not in comps:
            continue
        in_loop.add(name)
        todo.extend(r for line in comps[name] for r in _REF.findall(line))
    per_step = sum(relayouts(comps[c]) for c in in_loop)
    total = sum(relayouts(lines) for name, lines in comps.items() if name not in fusion_bodies)
    return (per_step if in_loop else None), total - per_step


def inspect_generate_hlo(engine: Engine, state, tokens, mask, key, params: SamplingParams, *,
                         cache_shape: tuple[int, ...], logits_shape: tuple[int, ...],
                         value_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Structural facts about the compiled generate program (reaches into the engine's private jit)."""
    fn = getattr(engine, "_fn", None)
    if fn is None:
        raise RuntimeError("Engine has no _fn any more; update inspect_generate_hlo")
    done = np.zeros((tokens.shape[0],), bool)
    compiled = fn.lower(state, tokens, mask, done, key, params=params, cache_dtype=engine.cache_dtype,
                        rows_sharding=None).compile()
    text = compiled.as_text()
    others = (value_shape,) if value_shape and tuple(value_shape) != tuple(cache_shape) else ()
    per_step, once = cache_relayouts(text, cache_shape, others)
    out: dict[str, Any] = {
        "cache_relayouts_per_step": per_step,
        "cache_relayouts_outside_loop": once,
        "prefill_full_logits_materialised": f"f32[{','.join(map(str, logits_shape))}]" in text,
    }
    try:
        out["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        pass
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted({*PRESETS, *BENCH_PRESETS}))
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    p.add_argument("--ignore-eos", action="store_true",
                   help="sample with SamplingParams.ignore_eos (no stop token ends a row; there are none by default)")
    p.add_argument("--variable-length", action="store_true", help="measure the variable-length workload instead")
    p.add_argument("--stop-tokens", type=int, default=5, help="--variable-length: how many token ids end a row")
    p.add_argument("--refill-rows", type=int, default=None,
                   help="--variable-length: also measure generate_refill (continuous batching) on this many rows")
    p.add_argument("--refill-every", type=int, default=16, help="--variable-length: generate_refill's refill_every")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="rows per generate call (several allowed)")
    p.add_argument("--prompt-len", type=int, default=32, help="real prompt tokens per row (padded to a power-of-two bucket)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (cache = prompt bucket + this)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter, activation and KV-cache dtype")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement, median reported (default 10 on CPU, 3 on accelerators)")
    p.add_argument("--copy-mib", type=int, default=None, help="array size for the bandwidth probe (default 256 MiB on CPU, 4096 on accelerators)")
    p.add_argument("--nominal-bandwidth", type=float, default=None, metavar="GB/S",
                   help="also report ceilings at this bandwidth (e.g. 4300 for the DESIGN §9 H200 figure)")
    p.add_argument("--inspect-hlo", action="store_true", help="compile generate once more and report cache copies / logits shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=None,
                   help="also measure data-parallel generation on a (N, 1) fsdp mesh against (1, 1) (fake CPU devices on CPU)")
    args = p.parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens", "repeats", "copy_mib", "devices", "layers", "refill_rows"):
        value = getattr(args, name)
        if value is not None and min(value if isinstance(value, list) else [value]) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def measure(*, preset: str = "tiny", dtype: str = "float32", batches: Sequence[int] = (8, 32), prompt_len: int = 32,
            new_tokens: int = 64, repeats: int | None = None, copy_mib: int | None = None,
            nominal_bandwidth: float | None = None, inspect_hlo: bool = False, seed: int = 0,
            bandwidth: float | None = None, emit: Sink | None = None, layers: int | None = None,
            ignore_eos: bool = False) -> list[dict[str, Any]]:
    """Runs the rollout measurements (see the module docstring) and returns their records.

    Args:
        bandwidth: the copy bandwidth in bytes/s if already measured in this
            process (``benchmarks/run_all.py``); otherwise it is measured and
            reported as ``copy_bandwidth``.
        emit: receives each record as it is made (default: JSON lines on stdout).
    """
    emit = emit or stdout_sink()
    config = preset_config(preset, layers)
    jdtype = jnp.dtype(dtype)
    dev = jax.devices()[0]
    if repeats is None:
        repeats = 10 if dev.platform == "cpu" else 3
    base = {"preset": preset, "dtype": dtype, "platform": dev.platform, "device_kind": dev.device_kind,
            "jax": jax.__version__, "layers": config.num_layers}
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        log("note: a persistent compilation cache is configured; first_call may not include compilation")

    records = []
    if bandwidth is None:
        copy_mib = copy_mib or (256 if dev.platform == "cpu" else 4096)
        log(f"measuring copy bandwidth ({copy_mib} MiB) on {dev.platform} ({dev.device_kind}) ...")
        bandwidth = copy_bandwidth(copy_mib, repeats)
        records.append(emit(_rec({"name": "copy_bandwidth", "value": bandwidth / GB, "unit": "GB/s", **base,
                                  "bytes": 2 * copy_mib * MIB, "host_load_1m": os.getloadavg()[0]})))
    bw = bandwidth

    log(f"building {preset} ({dtype}, random weights) ...")
    model = init_sharded(config, None, seed=seed, dtype=jdtype)
    graphdef, state = nnx.split(model)
    state = jax.block_until_ready(state)
    param_bytes = tree_bytes(state)
    engine = Engine(graphdef, cache_dtype=jdtype)
    prefill = jax.jit(_prefill, static_argnums=(0, 4, 5))

    bucket = bucket_length(prompt_len, engine.min_bucket)
    cache_len = bucket + new_tokens
    # No stop tokens: never stops early.
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=ignore_eos)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)

    for batch in batches:
        shape = {**base, "batch": batch, "prompt_len": prompt_len, "prompt_bucket": bucket,
                 "new_tokens": new_tokens, "cache_len": cache_len}
        kv_bytes = kv_cache_bytes(config, batch, cache_len, jdtype)
        step_bytes = param_bytes + kv_bytes
        roof_step = step_bytes / bw
        roof_tps = batch / roof_step
        roof = {"param_bytes": param_bytes, "kv_cache_bytes": kv_bytes, "bandwidth_GBps": bw / GB}
        nominal = nominal_bandwidth * GB if nominal_bandwidth else None

        prompts = rng.integers(1, config.vocab_size, size=(batch, prompt_len), dtype=np.int32)
        mask = np.ones_like(prompts, dtype=bool)

        log(f"batch {batch}: first generate call (compile) ...")
        t = time.perf_counter()
        out = engine.generate(state, prompts, mask, key, params)
        first = time.perf_counter() - t
        if not out.mask.all():
            raise RuntimeError(f"{int((~out.mask).sum())} tokens were not generated; the run would be too fast")
        records.append(emit(_rec({"name": "first_call", "value": first, "unit": "s", **shape})))

        times = []
        for r in range(repeats):
            k = jax.random.fold_in(key, r + 1)
            t = time.perf_counter()
            out = engine.generate(state, prompts, mask, k, params)  # returns host numpy: fully synchronised
            times.append(time.perf_counter() - t)
            assert out.mask.all()
        t_gen = statistics.median(times)
        extra = {"times_s": [round(x, 6) for x in times], "repeats": repeats}
        rec = {"name": "generate_throughput", "value": batch * new_tokens / t_gen, "unit": "tokens/s",
               "ceiling": roof_tps, **shape, **roof, **extra}
        if nominal:
            rec["ceiling_nominal"] = batch / (step_bytes / nominal)
        records.append(emit(_rec(rec)))

        # Prefill alone, with the same padding and cache length as inside generate.
        tok_p = np.zeros((batch, bucket), np.int32)
        tok_p[:, bucket - prompt_len:] = prompts
        mask_p = np.zeros((batch, bucket), bool)
        mask_p[:, bucket - prompt_len:] = True
        tok_p, mask_p = jax.device_put((tok_p, mask_p))
        first_slots = decode_segments(bucket, new_tokens)[0][1]
        jax.block_until_ready(prefill(graphdef, state, tok_p, mask_p, first_slots, jdtype))
        t_pre = statistics.median(timed(lambda: jax.block_until_ready(prefill(graphdef, state, tok_p, mask_p, first_slots,
                                                                              jdtype)), repeats))
        records.append(emit(_rec({"name": "prefill_throughput", "value": batch * prompt_len / t_pre, "unit": "tokens/s",
                                  **shape, "time_s": t_pre})))

        step = (t_gen - t_pre) / new_tokens
        if step <= 0:
            log(f"batch {batch}: prefill alone took longer than the whole generate call (noise?); no decode figures")
            step = None
        # A time has a floor, not a ceiling: the roofline step time is a field, the ratio lives on decode_throughput.
        records.append(emit(_rec({"name": "decode_step_time", "value": step and step * 1e3, "unit": "ms",
                                  "roofline_ms": roof_step * 1e3, **shape, **roof})))
        rec = {"name": "decode_throughput", "value": step and batch / step, "unit": "tokens/s", "ceiling": roof_tps,
               **shape, **roof}
        if nominal:
            rec["ceiling_nominal"] = batch / (step_bytes / nominal)
        records.append(emit(_rec(rec)))

        if inspect_hlo:
            log(f"batch {batch}: inspecting the compiled program ...")
            layer = jax.eval_shape(lambda: init_cache(config, batch, cache_len))[0]
            facts = inspect_generate_hlo(engine, state, tok_p, mask_p, key, params, cache_shape=layer.k.shape,
                                         value_shape=layer.v.shape, logits_shape=(batch, bucket, config.vocab_size))
            layer_bytes = kv_bytes // (2 * config.num_layers)
            per_step = facts.pop("cache_relayouts_per_step")
            records.append(emit(_rec({"name": "cache_relayouts_per_step", "value": per_step, "unit": "count", **shape, **facts,
                                      "relayout_bytes_per_step": None if per_step is None else 2 * per_step * layer_bytes,
                                      "note": "whole-cache copies/transposes per decode step (K and V of each layer count one each); 0 is ideal"})))
    return records


def measure_variable_length(*, preset: str = "tiny", dtype: str = "float32", batches: Sequence[int] = (64,),
                            prompt_len: int = 32, new_tokens: int = 256, stop_tokens: int = 5,
                            refill_rows: int | None = None, refill_every: int = 16, repeats: int | None = None,
                            seed: int = 0, layers: int | None = None, emit: Sink | None = None) -> list[dict[str, Any]]:
    """The variable-length workload (see the module docstring): ``generate``
    over every prompt at once, and ``generate_refill`` on ``refill_rows`` rows."""
    emit = emit or stdout_sink()
    config = preset_config(preset, layers)
    jdtype = jnp.dtype(dtype)
    dev = jax.devices()[0]
    repeats = repeats or (5 if dev.platform == "cpu" else 3)
    base = {"preset": preset, "dtype": dtype, "platform": dev.platform, "device_kind": dev.device_kind,
            "jax": jax.__version__, "layers": config.num_layers, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "stop_tokens": stop_tokens}
    graphdef, state = nnx.split(init_sharded(config, None, seed=seed, dtype=jdtype))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, stop_tokens=tuple(range(1, stop_tokens + 1)))
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    records = []
    for batch in batches:
        prompts = rng.integers(stop_tokens + 1, config.vocab_size, size=(batch, prompt_len), dtype=np.int32)
        mask = np.ones_like(prompts, dtype=bool)
        methods = [("generate", {}, lambda e, k, prompts=prompts, mask=mask: e.generate(state, prompts, mask, k, params))]
        if refill_rows:
            methods.append(("generate_refill", {"rows": refill_rows, "refill_every": refill_every},
                            lambda e, k, prompts=prompts, mask=mask: e.generate_refill(
                                state, prompts, mask, k, params, rows=refill_rows, refill_every=refill_every)))
        engines = {name: Engine(graphdef, cache_dtype=jdtype) for name, _, _ in methods}
        for name, _, run in methods:
            log(f"variable length: batch {batch}, {name}: compiling ...")
            t = time.perf_counter()
            run(engines[name], key)
            records.append(emit(_rec({"name": "first_call", "value": time.perf_counter() - t, "unit": "s", **base,
                                      "batch": batch, "engine_method": name, "workload": "variable_length"})))
        times: dict[str, list[float]] = {name: [] for name, _, _ in methods}
        generated: dict[str, list[int]] = {name: [] for name, _, _ in methods}
        same = {name: True for name, _, _ in methods}
        for r in range(repeats):  # interleaved, so that a busy neighbour slows both alike
            k = jax.random.fold_in(key, r + 1)
            outs = {}
            for name, _, run in methods:
                t = time.perf_counter()
                outs[name] = run(engines[name], k)
                times[name].append(time.perf_counter() - t)
                generated[name].append(int(outs[name].mask.sum()))
            for name, out in outs.items():
                same[name] &= bool(np.array_equal(out.tokens, outs["generate"].tokens))
        for name, options, _ in methods:
            t_med = statistics.median(times[name])
            records.append(emit(_rec({
                "name": "variable_generate_throughput", "value": statistics.median(generated[name]) / t_med,
                "unit": "tokens/s", **base, "batch": batch, "engine_method": name, **options,
                "same_tokens": same[name], "mean_length": statistics.mean(generated[name]) / batch,
                "times_s": [round(x, 6) for x in times[name]], "host_load_1m": os.getloadavg()[0]})))
    return records


def measure_data_parallel(*, devices: int, preset: str = "tiny", dtype: str = "float32", batches: Sequence[int] = (32,),
                          prompt_len: int = 32, new_tokens: int = 64, repeats: int | None = None, seed: int = 0,
                          emit: Sink | None = None) -> list[dict[str, Any]]:
    """Data-parallel generation (see the module docstring): meshes (1, 1) and
    (``devices``, 1), rows split over ``fsdp`` as the rollout role splits them."""
    emit = emit or stdout_sink()
    if len(jax.devices()) < devices:
        raise RuntimeError(f"{devices} devices asked for, JAX sees {len(jax.devices())} (run as a script for fake CPU devices)")
    config = preset_config(preset)
    jdtype = jnp.dtype(dtype)
    dev = jax.devices()[0]
    repeats = repeats or (5 if dev.platform == "cpu" else 3)
    base = {"preset": preset, "dtype": dtype, "platform": dev.platform, "device_kind": dev.device_kind,
            "jax": jax.__version__, "prompt_len": prompt_len, "new_tokens": new_tokens}
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    records = []
    for batch in batches:
        prompts = rng.integers(1, config.vocab_size, size=(batch, prompt_len), dtype=np.int32)
        mask = np.ones_like(prompts, dtype=bool)
        reference = None
        for shape in ((1, 1), (devices, 1)):
            mesh = make_mesh(RolePlacement(name="rollout", devices=range(shape[0] * shape[1]),
                                           mesh=MeshSpec(shape, ("fsdp", "tp"))))
            graphdef, state = nnx.split(init_sharded(config, mesh, seed=seed, dtype=jdtype))
            engine, sharding = Engine(graphdef, cache_dtype=jdtype), row_sharding(mesh)
            log(f"data-parallel: batch {batch}, mesh {shape}: compiling ...")
            out = engine.generate(state, prompts, mask, key, params, sharding=sharding)
            reference = out.tokens if reference is None else reference
            times = timed(lambda: engine.generate(state, prompts, mask, key, params, sharding=sharding), repeats)
            cache, _ = engine.prefill_cache(state, prompts, mask, params, sharding=sharding)
            leaves = jax.tree_util.tree_leaves(cache)
            on_first = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == mesh.devices.flat[0])
            fields = {**base, "batch": batch, "mesh": list(shape), "rows_per_device": leaves[0].addressable_shards[0].data.shape[0]}
            records.append(emit(_rec({"name": "dp_generate_throughput", "value": batch * new_tokens / statistics.median(times),
                                      "unit": "tokens/s", **fields, "same_tokens": bool(np.array_equal(out.tokens, reference)),
                                      "times_s": [round(x, 6) for x in times]})))
            records.append(emit(_rec({"name": "dp_cache_bytes_per_device", "value": on_first, "unit": "bytes", **fields,
                                      "cache_bytes_total": sum(x.nbytes for x in leaves)})))
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variable_length:
        records = measure_variable_length(preset=args.preset, dtype=args.dtype, batches=args.batch,
                                          prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                          stop_tokens=args.stop_tokens, refill_rows=args.refill_rows,
                                          refill_every=args.refill_every, repeats=args.repeats, seed=args.seed,
                                          layers=args.layers)
        table(records)
        return 0
    records = measure(preset=args.preset, dtype=args.dtype, batches=args.batch, prompt_len=args.prompt_len,
                      new_tokens=args.new_tokens, repeats=args.repeats, copy_mib=args.copy_mib,
                      nominal_bandwidth=args.nominal_bandwidth, inspect_hlo=args.inspect_hlo, seed=args.seed,
                      layers=args.layers, ignore_eos=args.ignore_eos)
    if (args.devices or 1) > 1:
        records += measure_data_parallel(devices=args.devices, preset=args.preset, dtype=args.dtype, batches=args.batch,
                                         prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                                         seed=args.seed)
    table(records)
    return 0


def table(records: list[dict[str, Any]]) -> None:
    nominal = any("ratio_nominal" in r for r in records)
    rows = [("measurement", "batch", "value", "unit", "ceiling", "ratio") + (("ratio@nominal",) if nominal else ())]
    for r in records:
        ceiling = f"{r['ceiling']:.4g}" if r.get("ceiling") else "-"
        ratio = f"{100 * r['ratio']:.1f}%" if r.get("ratio") is not None else "-"
        value = "?" if r["value"] is None else f"{r['value']:.4g}"
        name = r["name"] + (f" {tuple(r['mesh'])}" if "mesh" in r else "") + (f" {r['engine_method']}" if "engine_method" in r else "")
        row = (name, str(r.get("batch", "-")), value, r["unit"], ceiling, ratio)
        if nominal:
            row += (f"{100 * r['ratio_nominal']:.1f}%" if r.get("ratio_nominal") is not None else "-",)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    first = records[0]
    log(f"\n{first['platform']} ({first['device_kind']}), jax {first['jax']}, preset {first['preset']}, {first['dtype']}")
    for i, row in enumerate(rows):
        log("  ".join(c.ljust(w) if j in (0, 3) else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            log("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    sys.exit(main())
