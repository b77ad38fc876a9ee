"""GRPO's groups: each prompt prefilled once for its ``num_generations``
completions (``Engine.generate(..., repeat=g)``, what the rollout role does)
against every completion prefilling its own copy of the prompt (the prompts
repeated on the host), in one process, calls alternating.

    python benchmarks/group_prefill.py                                    # tiny preset, 8 prompts x 4, ~1 min
    RLPIPE_CACHE_DIR=... python benchmarks/group_prefill.py --preset smollm2-135m-instruct \\
        --prompts 4 --group 8 --prompt-len 230 --new-tokens 16 --pairs 3   # examples/smollm2_arithmetic.yaml's shape

The model comes from ``model.preset`` as a run would load it (a pretrained
preset must be fetched first: ``rlpipe models fetch NAME``), on one device, in
its compute dtype; prompts are random token ids of ``--prompt-len`` tokens
(padded to the engine's power-of-two bucket), sampling at temperature 0.7.
Both forms must give the same tokens (checked).  Records (benchmarks/results.py
schema): ``group_generate_time`` per form (s, median) and
``group_generate_speedup`` (median over pairs of repeated / grouped time).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import numpy as np
from results import compare_forms, stdout_sink, table

from rlpipe.app.defaults import DEFAULT_CONFIG
from rlpipe.core.plugins import load_registry
from rlpipe.models.generation import Engine, SamplingParams
from rlpipe.models.loading import load_model
from rlpipe.runtime.run_config import load_config


def measure(*, preset: str, prompts: int, group: int, prompt_len: int, new_tokens: int, pairs: int) -> list[dict]:
    from flax import nnx

    registry = load_registry(warn=lambda m: None)
    config = load_config(registry, defaults=DEFAULT_CONFIG, overrides=[f"model.preset={preset}"])
    model = load_model(config.model, seed=0)
    graphdef, state = nnx.split(model)
    engine = Engine(graphdef, cache_dtype=model.dtype)
    vocab = int(model.config.vocab_size)
    tokens = np.random.default_rng(0).integers(3, vocab, (prompts, prompt_len)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.7, ignore_eos=True)
    key = jax.random.key(0)
    forms = {
        "repeated": lambda: engine.generate(state, np.repeat(tokens, group, axis=0), np.repeat(mask, group, axis=0), key, params),
        "grouped": lambda: engine.generate(state, tokens, mask, key, params, repeat=group),
    }
    first = {form: fn() for form, fn in forms.items()}  # compiles; and the two must agree
    if not np.array_equal(first["repeated"].tokens, first["grouped"].tokens):
        raise AssertionError("grouped generation differs from generating the repeated prompts")
    fields = {"preset": preset, "prompts": prompts, "group": group, "prompt_len": prompt_len, "new_tokens": new_tokens,
              "platform": jax.default_backend()}
    # generate returns host numpy: each call is synchronised
    return compare_forms("group_generate", forms, pairs, before="repeated", after="grouped", **fields)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model.preset (default tiny)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="completions per prompt (num_generations)")
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--pairs", type=int, default=10, help="alternating calls timed per form")
    args = p.parse_args(argv)
    sink = stdout_sink()
    records = [sink(r) for r in measure(preset=args.preset, prompts=args.prompts, group=args.group,
                                        prompt_len=args.prompt_len, new_tokens=args.new_tokens, pairs=args.pairs)]
    table(records, labels=("preset", "form"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
