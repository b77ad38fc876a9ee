"""A decode step's attention scores ``q · k`` with the key cache laid out
slots-minor (``[batch, kv_heads, head_dim, slots]``, what rlpipe's
``LayerCache`` holds) against keys laid out as the values are
(``[batch, kv_heads, slots, head_dim]``, what it held before), in one process,
calls alternating.

    python benchmarks/kv_layout.py                  # the peer's shape and SmolLM2-135M's
    python benchmarks/kv_layout.py --pairs 50 > kv_layout.jsonl

The product timed is one layer's ``einsum`` of the decode step
(``rlpipe.models.decoder.Attention`` with ``s == 1``): one query token per
row, its query heads grouped per KV head, against every cache slot:

* ``peer``: the model of ``benchmarks/peers/tunix.py`` (2 KV heads x 2 query
  heads each, head_dim 32), 64 rows, at the 128- and 320-slot caches of its
  B 64 / P 64 / N 256 workload;
* ``smollm2``: SmolLM2-135M (3 KV heads x 3, head_dim 64), 32 rows, 256 and
  512 slots.

Records (benchmarks/results.py schema): ``kv_scores_time`` per shape, slots
and layout (s, median) and ``kv_scores_speedup``: the median over pairs of
the old layout's time / the new one's.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from results import compare_forms, stdout_sink, table

#: shape: (rows, kv heads, query heads per kv head, head_dim, cache slots to time)
SHAPES = {"peer": (64, 2, 2, 32, (128, 320)), "smollm2": (32, 3, 3, 64, (256, 512))}

#: Calls per timed sample: one product takes ~0.1-1.5 ms, below a timer's resolution for a steady median.
CALLS = 20


def measure(shape: str, pairs: int) -> list[dict]:
    rows, kv_heads, group, head_dim, all_slots = SHAPES[shape]
    rng = np.random.default_rng(0)
    out = []
    for slots in all_slots:
        q = jnp.asarray(rng.standard_normal((rows, kv_heads, group, head_dim)), jnp.float32)
        keys = rng.standard_normal((rows, kv_heads, slots, head_dim)).astype(np.float32)
        layouts = {
            "slots-major": (jnp.asarray(keys), "bkgd,bktd->bkgt"),
            "slots-minor": (jnp.asarray(keys.swapaxes(2, 3)), "bkgd,bkdt->bkgt"),
        }
        fns = {name: (jax.jit(lambda q, k, eq=eq: jnp.einsum(eq, q, k, preferred_element_type=jnp.float32)), k)
               for name, (k, eq) in layouts.items()}
        results = {name: np.asarray(fn(q, k)) for name, (fn, k) in fns.items()}
        np.testing.assert_allclose(results["slots-major"], results["slots-minor"], rtol=1e-4, atol=1e-4)

        def form(fn, k):
            def run():
                for _ in range(CALLS):
                    r = fn(q, k)
                jax.block_until_ready(r)
            return run

        fields = {"shape": shape, "rows": rows, "kv_heads": kv_heads, "group": group, "head_dim": head_dim,
                  "slots": slots, "calls_per_sample": CALLS, "platform": jax.default_backend()}
        out += compare_forms("kv_scores", {name: form(*f) for name, f in fns.items()}, pairs,
                             before="slots-major", after="slots-minor", **fields)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--pairs", type=int, default=15, help="alternating samples per layout (default 15)")
    args = p.parse_args(argv)
    sink, records = stdout_sink(), []
    for shape in args.shapes:
        for rec in measure(shape, args.pairs):
            records.append(sink(rec))
    table(records, labels=("shape", "slots", "form"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
