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

Then the trainer's whole update of one global batch (``TrainerStage.on_barrier``:
advantages, the old-log-prob pass when it runs, forward and backward with the
entropy, the AdamW update) on ``batch`` rows of ``seq / 2`` prompt and
``seq / 2`` completion tokens, one micro-batch and one update per global
batch, timed twice on the same rows: ``old_logprobs: pass`` (the extra forward
forced, as before the skip existed) and ``fused`` (the trainer's default for
one update per batch: the pass skipped, docs/algorithms.md).  Records
``trainer_update_s`` per mode and ``trainer_update_speedup`` (pass / fused).
``--no-trainer-update`` leaves it out.
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


def _trainer(preset: str, dtype: str, rows: int):
    """A trainer stage of ``preset`` on the first device: one micro-batch of
    ``rows`` rows, one update per global batch."""
    from rlpipe.app.defaults import DEFAULT_CONFIG
    from rlpipe.core.config import merge
    from rlpipe.core.placement import MeshSpec, RolePlacement
    from rlpipe.core.plugins import load_registry
    from rlpipe.core.specs import BuildContext
    from rlpipe.runtime.run_config import build_config

    registry = load_registry(warn=lambda message: None)
    config = build_config(merge(DEFAULT_CONFIG, {
        "model": {"preset": preset, "dtype": dtype},
        "algorithm": {"name": "grpo", "options": {"kl_beta": 0.0}},
        "roles": {"trainer": {"micro_batch_size": rows, "mini_batch_size": None, "num_iterations": 1}}}), registry)
    placement = RolePlacement(name="trainer", devices=[0], mesh=MeshSpec((1, 1), ("fsdp", "tp")))
    return registry.roles["trainer"].factory(config.roles["trainer"], placement,
                                             context=BuildContext(run_config=config, registry=registry, seed=0))


def measure_trainer_update(*, preset: str = "tiny", dtype: str = "float32", batch: int = 8, seq: int = 128,
                           repeats: int = 5, emit: Sink | None = None) -> list[dict[str, Any]]:
    """The trainer's update of one global batch with the old-log-prob pass
    forced and skipped (module docstring); returns the records."""
    from rlpipe import Batch, StageContext

    emit = emit or stdout_sink()
    cfg = PRESETS[preset]
    g = 2
    prompts = max(batch // g, 1)
    plen, clen = max(seq // 2, 1), max(seq - seq // 2, 1)
    rng = np.random.default_rng(0)
    item = Batch(prompt_tokens=rng.integers(5, cfg.vocab_size, (prompts, plen)).astype(np.int32),
                 prompt_mask=np.ones((prompts, plen), np.int32),
                 completion_tokens=rng.integers(5, cfg.vocab_size, (prompts, g, clen)).astype(np.int32),
                 completion_mask=np.ones((prompts, g, clen), np.int32),
                 rollout_logprobs=np.zeros((prompts, g, clen), np.float32),
                 rewards=rng.random((prompts, g)).astype(np.float32), policy_version=np.zeros((prompts,), np.int32))
    trainer = _trainer(preset, dtype, prompts * g)
    common = {"preset": preset, "dtype": dtype, "platform": jax.devices()[0].platform,
              "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
              "rows": prompts * g, "prompt_tokens": plen, "completion_tokens": clen}

    def update():
        # Each update's rows come from the policy version the trainer holds: on-policy.
        trainer.process(Batch({**dict(item), "policy_version": np.full((prompts,), trainer.version, np.int32)}),
                        context=StageContext(role="trainer", step=trainer.version, index=0))
        trainer.on_barrier(context=StageContext(role="trainer", step=trainer.version))

    modes = {"pass": False, "fused": True}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(repeats + 1):  # the first round compiles both programs
        for mode, fuse in modes.items():  # interleaved, so a change in the machine's load hits both alike
            trainer.fuse_old_logprobs = fuse
            start = time.perf_counter()
            update()  # on_barrier fetches its metrics: the device work is done when it returns
            if r:
                times[mode].append(time.perf_counter() - start)
            assert trainer.last_metrics["old_logprobs_skipped"] == float(fuse)
    seconds = {m: statistics.median(t) for m, t in times.items()}
    records = [emit(record("trainer_update_s", seconds[m], "s", old_logprobs=m, **common)) for m in seconds]
    records.append(emit(record("trainer_update_speedup", seconds["pass"] / seconds["fused"], "x",
                               pass_s=seconds["pass"], fused_s=seconds["fused"], **common)))
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--matmul-size", type=int, default=None, help="default: 2048 on CPU, 8192 on accelerators")
    ap.add_argument("--no-trainer-update", action="store_true", help="skip the trainer-update measurement")
    args = ap.parse_args(argv)
    records = measure(preset=args.preset, dtype=args.dtype, batch=args.batch, seq=args.seq, repeats=args.repeats,
                      matmul_size=args.matmul_size)
    if not args.no_trainer_update:
        records += measure_trainer_update(preset=args.preset, dtype=args.dtype, batch=args.batch, seq=args.seq,
                                          repeats=args.repeats)
    table(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
