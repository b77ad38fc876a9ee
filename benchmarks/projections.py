"""The trainer's forward + backward with each projection as one 2-D product
(``rlpipe.models.decoder.dense``, what rlpipe runs) against the same
projection written as ``einsum("...i,io->...o")`` (what it ran before), in one
process, calls alternating.

    python benchmarks/projections.py                      # the peer's model and a SmolLM2-wide one
    python benchmarks/projections.py --pairs 30 > projections.jsonl

The step timed is ``jax.value_and_grad`` of ``sequence_logprobs`` (with the
entropy, as the trainer calls it) over random tokens, on:

* ``peer``: the model of ``benchmarks/peers/tunix.py`` (Qwen2, 2 layers,
  d 128, vocabulary 512), 32 rows x (16 prompt + 16 completion) tokens;
* ``smollm2-wide``: Llama, 8 layers, d 576, 9 heads / 3 KV heads, FFN 1536,
  vocabulary 49,152 (SmolLM2-135M's widths, fewer layers), 8 rows x
  (112 + 16), rematerialised as the SmolLM2 preset trains.

Records (benchmarks/results.py schema): ``projection_grad_time`` per shape and
form (s, median), and ``projection_grad_speedup`` per shape: the median over
pairs of einsum time / dense time.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from results import compare_forms, stdout_sink, table

from rlpipe.models import decoder
from rlpipe.models.config import from_architecture
from rlpipe.runtime.run_config import ArchitectureConfig

SHAPES = {
    "peer": ({"family": "qwen2", "layers": 2, "hidden": 128, "heads": 4, "kv_heads": 2, "head_dim": 32, "ffn": 512,
              "vocab": 512, "qkv_bias": True, "tied": False}, 32, 16, 16, False),
    "smollm2-wide": ({"family": "llama", "layers": 8, "hidden": 576, "heads": 9, "kv_heads": 3, "ffn": 1536,
                      "vocab": 49152, "tied": True}, 8, 112, 16, True),
}


def einsum_call(self, x):
    """``Linear.__call__`` as it was: the batch and sequence axes kept apart."""
    y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if self.bias is not None:
        y = y + self.bias[...].astype(x.dtype)
    return y


def measure(shape: str, pairs: int) -> list[dict]:
    arch, rows, prompt_len, completion_len, remat = SHAPES[shape]
    config = from_architecture(ArchitectureConfig(**arch))
    graphdef, state = nnx.split(decoder.build(config, seed=0))
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(1, config.vocab_size - 1, (rows, prompt_len)), jnp.int32)
    completion = jnp.asarray(rng.integers(1, config.vocab_size - 1, (rows, completion_len)), jnp.int32)
    prompt_mask, completion_mask = jnp.ones(prompt.shape, bool), jnp.ones(completion.shape, bool)

    def loss(state):
        lp, entropy = decoder.sequence_logprobs(nnx.merge(graphdef, state), prompt, prompt_mask, completion,
                                                completion_mask, with_entropy=True, remat=remat)
        return lp.sum() + 0.01 * entropy.sum()

    dense_call = decoder.Linear.__call__
    steps = {}
    try:
        for form, call in (("einsum", einsum_call), ("dense", dense_call)):
            decoder.Linear.__call__ = call  # read while tracing: each jit below keeps its form
            steps[form] = jax.jit(jax.value_and_grad(loss))
            jax.block_until_ready(steps[form](state))
    finally:
        decoder.Linear.__call__ = dense_call
    fields = {"shape": shape, "rows": rows, "tokens": prompt_len + completion_len, "remat": remat,
              "platform": jax.default_backend()}
    forms = {form: (lambda step=step: jax.block_until_ready(step(state))) for form, step in steps.items()}
    return compare_forms("projection_grad", forms, pairs, before="einsum", after="dense", **fields)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--pairs", type=int, default=15, help="alternating einsum/dense calls timed (default 15)")
    args = p.parse_args(argv)
    sink, records = stdout_sink(), []
    for shape in args.shapes:
        for rec in measure(shape, args.pairs):
            records.append(sink(rec))
    table(records, labels=("shape", "form"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
