"""LoRA on the rollout: the adapters merged into a compute copy after each
sync, or applied unmerged by the forward — which one the rollout should run.

    python benchmarks/lora.py                                   # the tiny preset
    python benchmarks/lora.py --preset qwen2.5-0.5b --layers 4  # a real width, fewer layers
    python benchmarks/lora.py --rank 16 --new-tokens 32 --rows 8 > lora.jsonl
    RLPIPE_CACHE_DIR=/tmp/rlp-cache python benchmarks/lora.py --trainer-memory \
        --preset smollm2-135m-instruct --rank 16 --alpha 32 --rows 8 --prompt-tokens 256 \
        --new-tokens 16 --set roles.trainer.remat=true          # the trainer's memory alone

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
one warm-up (the compile).

``--trainer-memory`` (part of the default run for the ``tiny`` preset
without ``--layers``; alone with the flag) measures the trainer instead,
full fine-tuning (``way=full``) against ``model.lora`` (``way=lora``): a
real :class:`rlpipe.roles.trainer_stage.TrainerStage` built through the
config machinery (``model.preset``, ``roles.trainer.micro_batch_size=rows``,
``task.max_prompt_tokens``, ``roles.rollout.max_new_tokens``, then each
``--set``), fed one global batch of ``rows`` completions as the stage
splits it (``_rows``, the old log-probs when its pass would run), and its
per-micro-batch program ``stage._accumulate`` lowered on that micro-batch
and compiled (never run).  By XLA's count (``memory_analysis()``):

* ``trainer_step_argument_bytes`` / ``_output_bytes`` / ``_temp_bytes`` /
  ``_alias_bytes``: the program's arguments (accumulator, trainable and
  frozen parameters, rows), outputs, scratch, and outputs that reuse a
  donated argument (the accumulator);
* ``trainer_step_total_bytes``: argument + output - alias + temp;

and what the stage holds (``jax.tree`` sizes of each leaf's shard): ``trainer_params_bytes``
(trainable: the whole model, or the adapters), ``trainer_frozen_bytes``
(the base under LoRA), ``trainer_opt_state_bytes`` and
``trainer_accumulator_bytes`` (gradients plus the loss, laid out like the
parameters); and ``trainer_estimate_bytes``, the planner's own formula
(``rlpipe plan``) for the role, with its breakdown.  LoRA's records carry
the full fine-tuning value as ``ceiling``, so ``ratio`` is LoRA / full.
All are per device of the trainer's mesh (``devices`` of them, as planned
on the devices JAX sees), as XLA counts them.

Records follow benchmarks/results.py's schema: JSON lines on stdout, the
table on stderr.
"""

from __future__ import annotations

import argparse
import statistics

from results import record, stdout_sink, table, timed


def tree_bytes(tree) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def device_bytes(tree) -> int:
    """Bytes one device holds of ``tree``'s arrays or ``jax.ShapeDtypeStruct``
    leaves (each leaf's shard shape under its sharding; nothing allocated),
    the unit XLA's ``memory_analysis()`` counts in."""
    import math

    import jax
    import numpy as np

    def shard(x):
        sharding = getattr(x, "sharding", None)
        shape = x.shape if sharding is None else sharding.shard_shape(x.shape)
        return math.prod(shape) * np.dtype(x.dtype).itemsize

    return sum(shard(x) for x in jax.tree_util.tree_leaves(tree))


def trainer_memory(*, preset: str = "tiny", rank: int = 8, alpha: float | None = None, rows: int = 8,
                   prompt_tokens: int = 16, completion_tokens: int = 16, overrides: tuple[str, ...] = (),
                   seed: int = 0) -> list[dict]:
    """The trainer's per-micro-batch program and state, full fine-tuning then
    LoRA (``rank``, ``alpha``; ``None``: ``model.lora``'s default), by XLA's
    count and by ``jax.tree`` sizes (see the module docstring).  ``overrides``:
    ``--set``-style ``KEY=VALUE`` strings applied last."""
    import time

    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from rlpipe.app.defaults import resolve
    from rlpipe.core.plugins import load_registry
    from rlpipe.core.specs import BuildContext
    from rlpipe.core.stage import Batch
    from rlpipe.roles.trainer_stage import _normalisers
    from rlpipe.runtime import distributed
    from rlpipe.runtime.planning import plan_run
    from rlpipe.runtime.run_config import build_config

    registry = load_registry(warn=lambda m: None)
    # One global batch of exactly one micro-batch: one prompt with `rows` completions.
    shape = [f"model.preset={preset}", f"roles.trainer.micro_batch_size={rows}",
             f"task.max_prompt_tokens={prompt_tokens}", f"roles.rollout.max_new_tokens={completion_tokens}",
             "train.items_per_step=1", "train.prompts_per_item=1", f"roles.rollout.num_generations={rows}"]
    lora = [f"model.lora.rank={rank}"] + ([] if alpha is None else [f"model.lora.alpha={alpha}"])
    out: list[dict] = []
    full: dict[str, float] = {}
    for way, extra in (("full", []), ("lora", lora)):
        data, _ = resolve(overrides=[*shape, *extra, *overrides])
        planned = plan_run(build_config(data, registry), registry)
        config = planned.config
        name = next(n for n, s in planned.roles.items() if s.name == "trainer")
        t0 = time.perf_counter()
        stage = planned.roles[name].factory(config.roles[name], planned.plan.role(name),
                                            context=BuildContext(run_config=config, registry=registry, seed=seed))
        build_s = time.perf_counter() - t0
        # The fields the trainer receives in this graph (a KL reference adds ref_logprobs).
        produced = set().union(*(s.produces for s in planned.roles.values()))
        rng = np.random.default_rng(seed)
        n = completion_tokens
        batch = {"prompt_tokens": rng.integers(5, 90, size=(1, prompt_tokens)).astype(np.int32),
                 "prompt_mask": np.ones((1, prompt_tokens), np.int32),
                 "completion_tokens": rng.integers(5, 90, size=(1, rows, n)).astype(np.int32),
                 "completion_mask": np.ones((1, rows, n), np.int32),
                 "rollout_logprobs": np.full((1, rows, n), -4.0, np.float32),
                 "rewards": rng.random((1, rows)).astype(np.float32),
                 "policy_version": np.zeros((1,), np.int32)}
        if "ref_logprobs" in produced:
            batch["ref_logprobs"] = np.full((1, rows, n), -4.0, np.float32)
        # What on_barrier does with a global batch, up to the first micro-batch.
        stage.items = [Batch(**batch)]
        host = stage._rows()
        stage.items = []
        host.pop("policy_version")
        host.pop("values", None)
        tc = stage.config
        total = len(host["prompt"])
        mini = tc.mini_batch_size or total
        fused = stage.fuse_old_logprobs and tc.num_iterations == 1 and mini == total
        if not fused:
            host["old_logprobs"] = np.zeros(host["completion"].shape, np.float32)  # what the pass returns
        mb = tc.micro_batch_size
        micro = distributed.put({k: v[:mb] for k, v in host.items()}, stage.row_sharding)
        normalisers = distributed.put(_normalisers(host["completion_mask"][:mini], mb / mini),
                                      NamedSharding(stage.mesh, PartitionSpec()))
        acc = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                     jax.eval_shape(stage._zeros, stage.params), stage._acc_shardings)
        t0 = time.perf_counter()
        analysis = stage._accumulate.lower(acc, stage.params, stage.frozen, micro, normalisers).compile().memory_analysis()
        compile_s = time.perf_counter() - t0
        common = {"way": way, "preset": preset, "rank": rank if way == "lora" else None,
                  "alpha": config.model.lora.alpha if config.model.lora is not None else None,
                  "rows": mb, "prompt": int(host["prompt"].shape[1]), "completion": int(host["completion"].shape[1]),
                  "remat": bool(getattr(tc, "remat", False)), "old_logprobs": "fused" if fused else "pass",
                  "devices": stage.mesh.devices.size, "platform": jax.default_backend(), "build_s": round(build_s, 2), "compile_s": round(compile_s, 2)}
        figures: dict[str, tuple[float | None, dict]] = {}
        if analysis is None:
            for k in ("argument", "output", "temp", "alias", "total"):
                figures[f"trainer_step_{k}_bytes"] = (None, {"note": "this backend gives no memory_analysis()"})
        else:
            sizes = {k: int(getattr(analysis, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
            for k, v in sizes.items():
                figures[f"trainer_step_{k}_bytes"] = (v, {})
            figures["trainer_step_total_bytes"] = (sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"], {})
        figures["trainer_params_bytes"] = (device_bytes(stage.params), {})
        figures["trainer_frozen_bytes"] = (device_bytes(stage.frozen), {})
        figures["trainer_opt_state_bytes"] = (device_bytes(stage.opt_state), {})
        figures["trainer_accumulator_bytes"] = (device_bytes(acc), {})
        est = planned.memory.get(name)
        figures["trainer_estimate_bytes"] = (None if est is None else est.total,
                                             {} if est is None else {"breakdown": {
                                                 "parameters": est.parameters, "optimizer_state": est.optimizer_state,
                                                 "gradients": est.gradients, "activations": est.activations}})
        for key, (value, fields) in figures.items():
            if way == "full":
                full[key] = value
            ceiling = full.get(key) if way == "lora" and full.get(key) else None
            out.append(record(key, value, "bytes", ceiling=ceiling, **common, **fields))
        del stage, micro, acc
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="Override the preset's layer count (a shallower model).")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=None, help="model.lora.alpha for --trainer-memory (default: its default, 32).")
    ap.add_argument("--trainer-memory", action="store_true",
                    help="Measure only the trainer's memory, full vs LoRA (the default run includes it for the tiny preset).")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="A run-config override for --trainer-memory (repeatable), e.g. roles.trainer.remat=true.")
    args = ap.parse_args(argv)
    if args.trainer_memory and args.layers is not None:
        ap.error("--layers does not apply to --trainer-memory: the trainer is built from the preset's config")
    sink = stdout_sink()
    if not args.trainer_memory:
        rollout(args, sink)
    if args.trainer_memory or (args.preset == "tiny" and args.layers is None):
        sink.extend(trainer_memory(preset=args.preset, rank=args.rank, alpha=args.alpha, rows=args.rows,
                                   prompt_tokens=args.prompt_tokens, completion_tokens=args.new_tokens,
                                   overrides=tuple(args.overrides)))
    table(sink.records, labels=("way",))
    return 0


def rollout(args: argparse.Namespace, sink) -> None:
    """The adapters on the rollout, merged vs unmerged (the module docstring)."""

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


if __name__ == "__main__":
    raise SystemExit(main())
