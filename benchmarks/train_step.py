"""Train-step throughput and model-FLOPs utilisation against the matmul rate
measured in the same run.

    python benchmarks/train_step.py                                   # CPU: tiny, 8 x 128 tokens
    python benchmarks/train_step.py --preset qwen2.5-0.5b --dtype bfloat16 --batch 8 --seq 1024   # H200

One JSON line per measurement on stdout (``name``, ``value``, ``unit``, and
``ceiling`` / ``ratio`` where a physical ceiling applies), a table on stderr.

The step is forward, backward and an AdamW update of the decoder (next-token
cross-entropy on random tokens), jitted, with parameters and optimizer state
donated.  Model FLOPs per step follow the PaLM convention:
``6 * params * tokens + 12 * layers * seq * heads * head_dim * tokens``.
The ceiling is a square matmul of the same dtype timed in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from results import Sink, record, stdout_sink, table

from rlpipe.models import PRESETS
from rlpipe.models.loading import init_sharded


def _time(fn, repeats: int) -> float:
    fn()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(dtype, n: int, repeats: int) -> float:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    seconds = _time(lambda: f(a).block_until_ready(), repeats)
    return 2 * n**3 / seconds


def measure(*, preset: str = "tiny", dtype: str = "float32", batch: int = 8, seq: int = 128, repeats: int = 5,
            matmul_size: int | None = None, emit: Sink | None = None) -> list[dict[str, Any]]:
    """The matmul rate, the first (compiling) step, and the steady train step's
    tokens/s and model FLOP/s against the matmul rate; returns the records."""
    emit = emit or stdout_sink()
    platform = jax.devices()[0].platform
    jdtype = jnp.dtype(dtype)
    cfg = PRESETS[preset]
    common = {"preset": preset, "dtype": dtype, "platform": platform,
              "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}

    n = matmul_size or (2048 if platform == "cpu" else 8192)
    peak = matmul_rate(jdtype, n, repeats)
    records = [emit(record("matmul_rate", peak / 1e12, "TFLOP/s", matmul_size=n, **common))]

    model = init_sharded(cfg, None, seed=0, dtype=jdtype)
    graphdef, params = nnx.split(model)
    opt = optax.adamw(1e-5)
    opt_state = opt.init(params)

    def loss_fn(p, tokens):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    def train_step(p, s, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)), jnp.int32)
    state = {"p": params, "s": opt_state}

    def run():
        state["p"], state["s"], loss = step(state["p"], state["s"], tokens)
        loss.block_until_ready()

    start = time.perf_counter()
    run()
    records.append(emit(record("first_call", time.perf_counter() - start, "s", **common)))
    seconds = _time(run, repeats)
    n_tokens = batch * seq
    flops = 6 * cfg.num_params() * n_tokens + 12 * cfg.num_layers * seq * cfg.num_heads * cfg.dim_per_head * n_tokens
    shape = {"batch": batch, "seq": seq, "params": cfg.num_params(), **common}
    records.append(emit(record("train_tokens_per_s", n_tokens / seconds, "tokens/s", step_s=seconds, **shape)))
    records.append(emit(record("train_model_flops", flops / seconds / 1e12, "TFLOP/s", ceiling=peak / 1e12, **shape)))
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--matmul-size", type=int, default=None, help="default: 2048 on CPU, 8192 on accelerators")
    args = ap.parse_args(argv)
    records = measure(preset=args.preset, dtype=args.dtype, batch=args.batch, seq=args.seq, repeats=args.repeats,
                      matmul_size=args.matmul_size)
    table(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
