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
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--matmul-size", type=int, default=None, help="default: 2048 on CPU, 8192 on accelerators")
    args = ap.parse_args(argv)

    platform = jax.devices()[0].platform
    dtype = jnp.dtype(args.dtype)
    cfg = PRESETS[args.preset]
    common = {"preset": args.preset, "dtype": args.dtype, "platform": platform,
              "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}

    n = args.matmul_size or (2048 if platform == "cpu" else 8192)
    peak = matmul_rate(dtype, n, args.repeats)
    records = [{"name": "matmul_rate", "value": peak / 1e12, "unit": "TFLOP/s", "matmul_size": n, **common}]

    model = init_sharded(cfg, None, seed=0, dtype=dtype)
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
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1)), jnp.int32)
    state = {"p": params, "s": opt_state}

    def run():
        state["p"], state["s"], loss = step(state["p"], state["s"], tokens)
        loss.block_until_ready()

    start = time.perf_counter()
    run()
    records.append({"name": "first_call", "value": time.perf_counter() - start, "unit": "s", **common})
    seconds = _time(run, args.repeats)
    n_tokens = args.batch * args.seq
    flops = 6 * cfg.num_params() * n_tokens + 12 * cfg.num_layers * args.seq * cfg.num_heads * cfg.dim_per_head * n_tokens
    shape = {"batch": args.batch, "seq": args.seq, "params": cfg.num_params(), **common}
    records.append({"name": "train_tokens_per_s", "value": n_tokens / seconds, "unit": "tokens/s", **shape})
    records.append({"name": "train_model_flops", "value": flops / seconds / 1e12, "unit": "TFLOP/s",
                    "ceiling": peak / 1e12, "ratio": flops / seconds / peak, **shape})
    for r in records:
        print(json.dumps(r))
    print(f"{'name':22s} {'value':>12s} {'unit':10s} {'ceiling':>10s} {'ratio':>7s}", file=sys.stderr)
    for r in records:
        ceiling = f"{r['ceiling']:.4g}" if "ceiling" in r else "-"
        ratio = f"{100 * r['ratio']:.1f}%" if "ratio" in r else "-"
        print(f"{r['name']:22s} {r['value']:12.4g} {r['unit']:10s} {ceiling:>10s} {ratio:>7s}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
