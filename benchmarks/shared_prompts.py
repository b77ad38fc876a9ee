"""GRPO's groups share their prompt: the trainer's forward + backward and a
whole training run with each prompt given once per group (``sequence_logprobs``'s
shared prompts, what rlpipe runs) against the prompt repeated for every
completion (what it ran before).

    python benchmarks/shared_prompts.py                   # forward + backward, two shapes, alternating
    python benchmarks/shared_prompts.py --example examples/smollm2_arithmetic.yaml --steps 3

Forward + backward (``jax.value_and_grad`` of ``sequence_logprobs`` with the
entropy, as the trainer calls it), the two forms alternating in one process:

* ``peer``: the model of ``benchmarks/peers/tunix.py`` (Qwen2, 2 layers,
  d 128), 8 prompts x 4 completions, 16 + 16 tokens (its GRPO workload);
* ``smollm2``: SmolLM2-135M's shape (random weights), one prompt x 8
  completions (the example's micro-batch), 256 + 16 tokens, rematerialised.

``--example CONFIG``: ``rlpipe train`` on CONFIG for ``--steps`` steps,
once with the stages' ``share_prompts`` on and once off (one after the other
in this process, checkpoints off), and the step times of ``metrics.jsonl``
(the first step, which compiles, left out) with the per-step metrics of both
runs, which should agree to float rounding.

Records (benchmarks/results.py schema): ``shared_prompts_grad_time`` per shape
and form and ``shared_prompts_grad_speedup`` (median over pairs of repeated /
shared); with ``--example``: ``shared_prompts_step_time`` per form and
``shared_prompts_step_speedup``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from results import compare_forms, record, stdout_sink, table

from rlpipe.models import decoder
from rlpipe.models.config import from_architecture
from rlpipe.runtime.run_config import ArchitectureConfig

PEER = {"family": "qwen2", "layers": 2, "hidden": 128, "heads": 4, "kv_heads": 2, "head_dim": 32, "ffn": 512,
        "vocab": 512, "qkv_bias": True, "tied": False}
#: SmolLM2-135M's architecture (its preset loads the pretrained file; random weights do here).
SMOLLM2 = {"family": "llama", "layers": 30, "hidden": 576, "heads": 9, "kv_heads": 3, "ffn": 1536, "vocab": 49152,
           "tied": True}
#: shape: (model config, prompts, completions per prompt, prompt tokens, completion tokens, remat)
SHAPES = {
    "peer": (lambda: from_architecture(ArchitectureConfig(**PEER)), 8, 4, 16, 16, False),
    "smollm2": (lambda: from_architecture(ArchitectureConfig(**SMOLLM2)), 1, 8, 256, 16, True),
}


def measure(shape: str, pairs: int) -> list[dict]:
    make_config, prompts, group, prompt_len, completion_len, remat = SHAPES[shape]
    config = make_config()
    graphdef, state = nnx.split(decoder.build(config, seed=0))
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(1, config.vocab_size - 1, (prompts, prompt_len)), jnp.int32)
    completion = jnp.asarray(rng.integers(1, config.vocab_size - 1, (prompts * group, completion_len)), jnp.int32)
    prompt_mask, completion_mask = jnp.ones(prompt.shape, bool), jnp.ones(completion.shape, bool)

    def loss(state, prompt, prompt_mask):
        lp, entropy = decoder.sequence_logprobs(nnx.merge(graphdef, state), prompt, prompt_mask, completion,
                                                completion_mask, with_entropy=True, remat=remat)
        return lp.sum() + 0.01 * entropy.sum()

    step = jax.jit(jax.value_and_grad(loss))
    inputs = {"repeated": (jnp.repeat(prompt, group, 0), jnp.repeat(prompt_mask, group, 0)),
              "shared": (prompt, prompt_mask)}
    values = {form: float(jax.block_until_ready(step(state, *x))[0]) for form, x in inputs.items()}
    if not np.isclose(values["shared"], values["repeated"], rtol=1e-4):
        raise RuntimeError(f"the two forms disagree: {values}")
    fields = {"shape": shape, "prompts": prompts, "group": group, "tokens": prompt_len + completion_len,
              "remat": remat, "platform": jax.default_backend()}
    forms = {form: (lambda x=x: jax.block_until_ready(step(state, *x))) for form, x in inputs.items()}
    return compare_forms("shared_prompts_grad", forms, max(1, pairs), before="repeated", after="shared", **fields)


def train_example(config_path: str, steps: int) -> list[dict]:
    """``rlpipe train`` with and without shared prompts; step times and per-step metrics."""
    from rlpipe.cli.main import cli
    from rlpipe.roles.reference_stage import ReferenceStage
    from rlpipe.roles.trainer_stage import TrainerStage

    out, rows = [], {}
    with tempfile.TemporaryDirectory(prefix="rlpipe-shared-prompts-") as tmp:
        for form, share in (("shared", True), ("repeated", False)):
            TrainerStage.share_prompts = ReferenceStage.share_prompts = share
            run_dir = Path(tmp) / form
            try:
                rv = cli.main(["train", "-c", config_path, "--steps", str(steps), "--set", "checkpoint.every=0",
                               "--run-dir", str(run_dir), "-q"], prog_name="rlpipe", standalone_mode=False)
                if rv:
                    raise RuntimeError(f"rlpipe train ({form}) exited with {rv}")
            finally:
                TrainerStage.share_prompts = ReferenceStage.share_prompts = True
            rows[form] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for form, metrics in rows.items():
        times = [r["time/step_s"] for r in metrics[1:]] or [metrics[0]["time/step_s"]]
        out.append(record("shared_prompts_step_time", statistics.median(times), "s", form=form, config=config_path,
                          steps=steps, step_times=[round(t, 3) for t in times]))
    speedups = [a["time/step_s"] / b["time/step_s"] for a, b in zip(rows["repeated"][1:], rows["shared"][1:])]
    agree = {k: [[r.get(k) for r in rows[f]] for f in ("shared", "repeated")] for k in ("loss", "kl", "grad_norm")}
    out.append(record("shared_prompts_step_speedup", statistics.median(speedups) if speedups else None, "x",
                      before="repeated", after="shared", config=config_path, steps=steps, metrics=agree))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--pairs", type=int, default=7, help="alternating calls per form (default 7)")
    p.add_argument("--example", metavar="CONFIG", help="also train CONFIG both ways (rlpipe train)")
    p.add_argument("--steps", type=int, default=3, help="--example: steps per run (default 3)")
    args = p.parse_args(argv)
    sink, records = stdout_sink(), []
    for shape in args.shapes:
        for rec in measure(shape, args.pairs):
            records.append(sink(rec))
    if args.example:
        for rec in train_example(args.example, args.steps):
            records.append(sink(rec))
    table(records, labels=("shape", "form"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
