"""Agentic rollouts: what keeping each episode's KV cache between its turns
saves, against prefilling the whole context every turn.

    python benchmarks/agentic.py                                   # CPU: tiny, 64 episodes of 4 turns
    python benchmarks/agentic.py --preset qwen2.5-0.5b --dtype bfloat16 --episodes 256 --turns 8   # H200

Each run is one :class:`rlpipe.plugins.agentic.EpisodeRunner` call on the real
``jax`` engine: ``--episodes`` episodes of exactly ``--turns`` turns, every
turn ``--turn-tokens`` sampled tokens (no stop token) and an observation of
``--observation-tokens`` tokens, the prompts ``--prompt-tokens`` long.  The
two ways differ only in ``environment.reuse_cache``.  One JSON line per
measurement on stdout, a table on stderr:

* ``agentic_prefill_tokens``: tokens written to the KV cache before sampling,
  summed over the run's generation calls, per way; ``ceiling`` on the reuse
  line is the least possible (every prompt and observation once);
* ``agentic_run_s``: median wall time of a run (after a compiling one);
* ``agentic_reuse_speedup``: prefill-every-turn time over reuse time (a
  ratio; above 1: reuse is faster), with the prefill-token ratio beside it.

The character tokenizer supplies the token ids whatever the preset (they are
valid in every vocabulary); the model is randomly initialised.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from results import Sink, record, stdout_sink, table

from rlpipe.core.specs import EnvironmentSpec
from rlpipe.models import PRESETS
from rlpipe.models.generation import Engine, SamplingParams
from rlpipe.models.loading import init_sharded
from rlpipe.models.tokenizer import CharTokenizer
from rlpipe.plugins.agentic import EnvironmentSection, EpisodeRunner


class FixedTurns:
    """``turns`` turns, each answered with the same observation."""

    def __init__(self, options: Any, *, context: Any):
        self.max_turns, self.observation = options

    def reset(self, example: Any) -> str:
        return ""

    def step(self, action: str) -> tuple[str, float, bool]:
        return self.observation, 0.0, False


def measure(*, preset: str = "tiny", dtype: str = "float32", episodes: int = 64, turns: int = 4, prompt_tokens: int = 16,
            turn_tokens: int = 16, observation_tokens: int = 8, concurrency: int | None = None, repeats: int = 3,
            emit: Sink | None = None) -> list[dict[str, Any]]:
    """Both ways on the same episodes; returns the records."""
    emit = emit or stdout_sink()
    tok = CharTokenizer()
    jdtype = jnp.dtype(dtype)
    model = init_sharded(PRESETS[preset], None, seed=0, dtype=jdtype)
    graphdef, state = nnx.split(model)
    spec = EnvironmentSpec(name="fixed", description="fixed turns", factory=FixedTurns)
    observation = "o" * observation_tokens
    prompts = [tok.encode(("%d*" % i * prompt_tokens)[:prompt_tokens]) for i in range(episodes)]
    max_tokens = turns * (turn_tokens + observation_tokens)
    params = SamplingParams(max_new_tokens=turn_tokens, temperature=1.0, pad_id=tok.pad_id)
    common = {"preset": preset, "dtype": dtype, "platform": jax.devices()[0].platform,
              "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "episodes": episodes,
              "turns": turns, "prompt_tokens": prompt_tokens, "turn_tokens": turn_tokens,
              "observation_tokens": observation_tokens, "concurrency": concurrency or episodes}
    least = episodes * (prompt_tokens + (turns - 1) * observation_tokens)
    records, seconds, prefilled = [], {}, {}
    for reuse in (True, False):
        section = EnvironmentSection(name="fixed", max_turns=turns, reuse_cache=reuse)
        runner = EpisodeRunner(spec=spec, options=(turns, observation), section=section, run_config=None, registry=None,
                               tokenizer=tok, engine=Engine(graphdef, cache_dtype=jdtype), params=params,
                               max_tokens=max_tokens, max_concurrency=concurrency)

        def run() -> Any:
            out = runner.run(state, prompts, [{}] * episodes, jax.random.key(0))
            if not all(ep.turns == turns for ep in out.episodes):
                raise RuntimeError("an episode ended early; the comparison needs every episode to run all its turns")
            return out

        run()  # compiles
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        way = "reuse" if reuse else "prefill"
        seconds[way], prefilled[way] = statistics.median(times), runner.prefill_tokens
        records.append(emit(record("agentic_prefill_tokens", runner.prefill_tokens, "tokens",
                                   ceiling=least if reuse else None, way=way, **common)))
        records.append(emit(record("agentic_run_s", seconds[way], "s", way=way, repeats=repeats, **common)))
    records.append(emit(record("agentic_reuse_speedup", seconds["prefill"] / seconds["reuse"], "x",
                               prefill_token_ratio=prefilled["prefill"] / max(prefilled["reuse"], 1), **common)))
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--turn-tokens", type=int, default=16)
    ap.add_argument("--observation-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=None, help="episodes in flight (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    records = measure(preset=args.preset, dtype=args.dtype, episodes=args.episodes, turns=args.turns,
                      prompt_tokens=args.prompt_tokens, turn_tokens=args.turn_tokens,
                      observation_tokens=args.observation_tokens, concurrency=args.concurrency, repeats=args.repeats)
    table(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
