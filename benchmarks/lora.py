"""LoRA on the rollout: the adapters merged into a compute copy after each
sync, or applied unmerged by the forward — which one the rollout should run.

    python benchmarks/lora.py                                   # the tiny preset
    python benchmarks/lora.py --preset qwen2.5-0.5b --layers 4  # a real width, fewer layers
    python benchmarks/lora.py --rank 16 --new-tokens 32 --rows 8 > lora.jsonl

Per way of applying the adapters (``merged``, ``unmerged``), on the default
device (the CPU here):

* ``lora_sync_time``: installing one version's adapters on the rollout —
  unmerged, the adapters are the rollout's state next to the base (nothing to
  compute); merged, a jitted ``merge`` (``W + (alpha/rank) A B`` per adapted
  kernel) into a compute copy of the whole model;
* ``lora_generate_time``: one ``Engine.generate`` of ``rows`` prompts for
  ``new_tokens`` tokens with that state;
* ``lora_rollout_bytes``: the parameter bytes the rollout holds for one
  version (merged: the base plus its merged copy while the adapters are also
  received; unmerged: the base plus the adapters);

and ``lora_sync_bytes`` (what an adapter-only sync moves) against
``full_sync_bytes`` (a full-weight sync).  Median of ``--repeats`` calls after
one warm-up (the compile).  Records follow benchmarks/results.py's schema:
JSON lines on stdout, the table on stderr.
"""

from __future__ import annotations

import argparse
import statistics

from results import record, stdout_sink, table, timed


def tree_bytes(tree) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="Override the preset's layer count (a shallower model).")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import attrs
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from rlpipe.models.generation import Engine, SamplingParams
    from rlpipe.models.loading import add_adapters, init_sharded, preset
    from rlpipe.models.lora import LoRAConfig, LoRAParam, base_graphdef, merge

    shape = preset(args.preset)
    if args.layers is not None:
        shape = attrs.evolve(shape, num_layers=args.layers)
    lora = LoRAConfig(rank=args.rank)
    model = add_adapters(init_sharded(shape, None, seed=0), lora, seed=0)
    graphdef, adapters, base = nnx.split(model, LoRAParam, ...)
    # Adapters as after some training (B = 0 would make the unmerged product trivially cheap to predict).
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)
    plain = base_graphdef(model)
    merge_fn = jax.jit(lambda b, a: merge(nnx.merge_state(b, a), lora))
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, min(shape.vocab_size, 128), size=(args.rows, args.prompt_tokens)).astype(np.int32)
    mask = np.ones_like(prompts)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    key = jax.random.key(0)
    common = {"preset": args.preset, "layers": shape.num_layers, "rank": args.rank, "rows": args.rows,
              "new_tokens": args.new_tokens, "platform": jax.default_backend()}

    def blocked(x):
        return jax.block_until_ready(x)

    ways = {
        "unmerged": (Engine(graphdef, cache_dtype=jnp.float32),
                     lambda: nnx.merge_state(base, adapters)),
        "merged": (Engine(plain, cache_dtype=jnp.float32), lambda: blocked(merge_fn(base, adapters))),
    }
    sink = stdout_sink()
    for way, (engine, install) in ways.items():
        state = install()  # warm-up: the merge compiles
        sync = timed(install, args.repeats)
        blocked(engine.generate(state, prompts, mask, key, params).tokens)  # warm-up: generation compiles
        gen = timed(lambda e=engine, s=state: blocked(e.generate(s, prompts, mask, key, params).tokens), args.repeats)
        held = tree_bytes(base) + tree_bytes(adapters) + (tree_bytes(state) if way == "merged" else 0)
        sink(record("lora_sync_time", statistics.median(sync), "s", way=way, **common))
        sink(record("lora_generate_time", statistics.median(gen), "s", way=way, **common))
        sink(record("lora_rollout_bytes", held, "bytes", way=way, **common))
    full = tree_bytes(base) + tree_bytes(adapters)
    sink(record("lora_sync_bytes", tree_bytes(adapters), "bytes", ceiling=full, **common))
    sink(record("full_sync_bytes", tree_bytes(base), "bytes", **common))
    table(sink.records, labels=("way",))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
