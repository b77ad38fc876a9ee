"""Device memory of the trainer's step, the reference's scoring and the
rollout's prefill, by XLA's own count (``compiled.memory_analysis()``),
against the estimates of :mod:`rlpipe.models.memory`.

    python benchmarks/train_memory.py                                  # qwen2.5-0.5b, 8 x (512 + 1536), remat on
    python benchmarks/train_memory.py --remat off --json
    python benchmarks/train_memory.py --preset tiny --rows 4 --prompt 64 --completion 192

Nothing is run and no weights are materialised: the parameters are abstract
(``nnx.eval_shape``), the programs are lowered from ``jax.ShapeDtypeStruct``s
and compiled for the local backend (the CPU here), and XLA reports the
buffers it planned.  The parameters are float32 and the compute dtype
bfloat16, as the trainer holds them.

Programs (``--programs``, default all three):

* ``train``: what ``TrainerStage._accumulate`` does — ``value_and_grad`` of a
  token-mean policy-gradient loss over ``sequence_logprobs(...,
  with_entropy=True)`` (a ratio ``exp(logp - stop_gradient(logp))`` times a
  per-row advantage, minus 0.01 × the mean entropy) with respect to the
  parameters;
* ``reference``: ``sequence_logprobs`` without gradients (the reference's
  scoring);
* ``prefill``: the rollout's prefill — a KV cache of ``prompt + completion``
  slots created in the program, ``Decoder.hidden`` over the prompt, logits
  of the last position.

Per program one record: ``value`` = ``temp_size_in_bytes`` (XLA's
temporaries, where activations live), plus argument / output / alias /
generated-code sizes, the estimate of :mod:`rlpipe.models.memory` for the
same shape (``estimate_bytes``) and ``estimate / temp``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import Sink, record, stdout_sink

from rlpipe.models import (
    PRESETS,
    memory,
)
from rlpipe.models.decoder import Decoder, init_cache, sequence_logprobs

GIB = 1 << 30


def _supports_remat() -> bool:
    return "remat" in inspect.signature(sequence_logprobs).parameters


def abstract_params(preset: str, dtype, param_dtype):
    """The decoder's graph definition and its parameters as ``ShapeDtypeStruct``s."""
    cfg = PRESETS[preset]
    model = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, state


def abstract_rows(rows: int, prompt: int, completion: int) -> dict[str, jax.ShapeDtypeStruct]:
    s = jax.ShapeDtypeStruct
    return {"prompt": s((rows, prompt), jnp.int32), "prompt_mask": s((rows, prompt), jnp.int32),
            "completion": s((rows, completion), jnp.int32), "completion_mask": s((rows, completion), jnp.int32),
            "advantages": s((rows,), jnp.float32)}


def train_program(graphdef, remat: bool):
    kw = {"remat": True} if remat else {}

    def grad(params, rows):
        def loss_fn(p):
            model = nnx.merge(graphdef, p)
            logp, entropy = sequence_logprobs(model, rows["prompt"], rows["prompt_mask"], rows["completion"],
                                              rows["completion_mask"], 1.0, with_entropy=True, **kw)
            mask = rows["completion_mask"].astype(jnp.float32)
            n = jnp.maximum(mask.sum(), 1.0)
            ratio = jnp.exp(logp - jax.lax.stop_gradient(logp))
            pg = -(ratio * rows["advantages"][:, None] * mask).sum() / n
            return pg - 0.01 * (entropy * mask).sum() / n

        return jax.value_and_grad(loss_fn)(params)

    return grad


def reference_program(graphdef):
    def score(params, rows):
        return sequence_logprobs(nnx.merge(graphdef, params), rows["prompt"], rows["prompt_mask"], rows["completion"],
                                 rows["completion_mask"], 1.0)

    return score


def prefill_program(graphdef, cfg, slots: int, cache_dtype):
    def prefill(params, rows):
        model = nnx.merge(graphdef, params)
        tokens, mask = rows["prompt"], rows["prompt_mask"].astype(bool)
        b, p = tokens.shape
        cache = init_cache(cfg, b, slots, cache_dtype)
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        valid = jnp.concatenate([mask, jnp.zeros((b, slots - p), bool)], axis=1)
        hidden, cache = model.hidden(tokens, positions, valid, cache, 0)
        return model.logits(hidden[:, -1:]), cache

    return prefill


def analyse(fn, *args) -> tuple[dict[str, int], float]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    return {f: int(getattr(m, f)) for f in fields}, seconds


def estimate(program: str, cfg, rows: int, prompt: int, completion: int, itemsize: int, remat: bool,
             param_itemsize: int) -> int | None:
    """The model's own estimate of the program's activations (what XLA counts as
    temporaries), from :mod:`rlpipe.models.memory`; ``None`` in a tree whose
    formulas do not take these arguments."""
    seq = prompt + completion
    try:
        if program == "train":
            return memory.training_activation_bytes(cfg, rows, seq, itemsize, remat=remat, logit_positions=completion,
                                                    param_itemsize=param_itemsize)
        if program == "reference":
            return memory.forward_activation_bytes(cfg, rows, seq, itemsize, logit_positions=completion,
                                                   param_itemsize=param_itemsize)
        if program == "prefill":
            return memory.forward_activation_bytes(cfg, rows, prompt, itemsize, keys=seq, logit_positions=1,
                                                   param_itemsize=param_itemsize)
    except TypeError:
        return None
    return None


def measure(*, preset: str = "qwen2.5-0.5b", rows: int = 8, prompt: int = 512, completion: int = 1536,
            remat: bool = True, programs=("train", "reference", "prefill"), dtype: str = "bfloat16",
            param_dtype: str = "float32", emit: Sink | None = None) -> list[dict[str, Any]]:
    emit = emit or stdout_sink()
    cfg = PRESETS[preset]
    if remat and not _supports_remat():
        raise SystemExit("this tree's sequence_logprobs has no remat argument: use --remat off")
    graphdef, params = abstract_params(preset, jnp.dtype(dtype), jnp.dtype(param_dtype))
    batch = abstract_rows(rows, prompt, completion)
    itemsize = jnp.dtype(dtype).itemsize
    common = {"preset": preset, "rows": rows, "prompt": prompt, "completion": completion, "dtype": dtype,
              "param_dtype": param_dtype, "platform": jax.devices()[0].platform}
    out = []
    for program in programs:
        if program == "train":
            fn, p_remat = train_program(graphdef, remat), remat
        elif program == "reference":
            fn, p_remat = reference_program(graphdef), False
        elif program == "prefill":
            fn, p_remat = prefill_program(graphdef, cfg, prompt + completion, jnp.dtype(dtype)), False
        else:
            raise SystemExit(f"unknown program {program!r} (train, reference, prefill)")
        sizes, seconds = analyse(fn, params, batch)
        est = estimate(program, cfg, rows, prompt, completion, itemsize, p_remat, jnp.dtype(param_dtype).itemsize)
        temp = sizes["temp_size_in_bytes"]
        rec = record(f"{program}_temp_bytes", temp, "bytes", **common, program=program, remat=p_remat, **sizes,
                     estimate_bytes=est, estimate_over_temp=(est / temp if est and temp else None),
                     compile_s=round(seconds, 1))
        emit(rec)
        out.append(rec)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen2.5-0.5b", choices=sorted(PRESETS))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--completion", type=int, default=1536)
    ap.add_argument("--remat", choices=("on", "off"), default="on")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--param-dtype", default="float32")
    ap.add_argument("--programs", nargs="+", default=["train", "reference", "prefill"])
    ap.add_argument("--json", action="store_true", help="JSON lines on stdout (default: a table)")
    args = ap.parse_args(argv)
    recs: list[dict[str, Any]] = []
    sink = (lambda r: print(json.dumps(r), flush=True)) if args.json else recs.append
    recs_out = measure(preset=args.preset, rows=args.rows, prompt=args.prompt, completion=args.completion,
                       remat=args.remat == "on", programs=args.programs, dtype=args.dtype,
                       param_dtype=args.param_dtype, emit=sink)
    if not args.json:
        for r in recs_out:
            est = r["estimate_bytes"]
            print(f"{r['program']:9s} remat={r['remat']!s:5s} temp {r['temp_size_in_bytes'] / GIB:7.3f} GiB  "
                  f"args {r['argument_size_in_bytes'] / GIB:6.3f} GiB  out {r['output_size_in_bytes'] / GIB:6.3f} GiB  "
                  f"code {r['generated_code_size_in_bytes'] / 2**20:6.2f} MiB  estimate "
                  f"{(est or 0) / GIB:7.3f} GiB ({r['estimate_over_temp'] or 0:.2f}x)  compile {r['compile_s']} s")


if __name__ == "__main__":
    main()
