"""Agentic rollouts: the generator the rollout stage is composed with when
``roles.rollout.environment`` is set.

The stage is the rollout stage in every respect — same model, engine, placement,
weight sync, offload and policy-version rule (step *s* uses exactly policy
version ``context.behavior_version``, for every turn of every episode) —
except that each completion is a multi-turn episode
(:class:`rlpipe.plugins.agentic.episodes.EpisodeRunner`).  Its output has the
rollout's fields, shaped ``[prompts, num_generations, max_new_tokens]``, plus
``completion_attention_mask`` and ``episode_rewards``.

Metrics (``rollout/...`` in ``metrics.jsonl``, the episodes of the step the
rollout generated last): ``episodes``, ``episodes_failed``,
``episodes_truncated``, ``episodes_failed_total`` (since the run started),
``prefill_tokens`` (tokens written to the KV cache before sampling, over the
step's turns: with ``environment.reuse_cache`` each turn prefills only what
is new)
and per-episode means ``episode/turns``, ``episode/reward``,
``episode/policy_tokens``, ``episode/env_tokens``, ``episode/seconds`` plus
the environment's own (``episode/tool_calls``, ``episode/tool_errors``,
``episode/success``).
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import Batch, StageContext
from rlpipe.plugins.agentic.environment import environment_options
from rlpipe.plugins.agentic.episodes import (
    Episode,
    EpisodeRunner,
    StageTracer,
    episode_metrics,
)
from rlpipe.runtime import distributed
from rlpipe.runtime.devices import on_devices


class EpisodeGenerator:
    """Runs ``num_generations`` episodes per prompt (see the module docstring).

    A :class:`rlpipe.roles.rollout_stage.Generator`: built with the rollout
    stage it serves (for its tokenizer, engine, sampling parameters and the
    mesh of the weights it holds) and the run's build context.
    """

    def __init__(self, stage: Any, *, context: BuildContext):
        config = stage.config
        section = config.environment
        spec, options = environment_options(section, context.registry)
        turn = attrs.evolve(stage.params, max_new_tokens=section.max_turn_tokens or config.max_new_tokens)
        self.stage = stage
        self.runner = EpisodeRunner(spec=spec, options=options, section=section, run_config=context.run_config,
                                    registry=context.registry, tokenizer=stage.tokenizer, engine=stage.engine, params=turn,
                                    max_tokens=config.max_new_tokens, max_concurrency=config.max_concurrency)
        self.seed = context.seed
        self.episodes: list[Episode] = []  # this step's, until its barrier
        self.failed_total = 0
        self.prefill_tokens = 0  # this step's, until its barrier
        # Rollout devices on several processes: the first runs the environments for all (lazily:
        # the multi-process session starts after the stages are built on some paths).
        self._host: Any = None
        self._host_checked = False

    def generate(self, batch: Batch, state: Any, version: int, *, context: StageContext) -> dict[str, np.ndarray]:
        mesh, config = self.stage.holder.mesh, self.stage.config
        prompts = np.asarray(batch["prompt_tokens"])
        mask = np.asarray(batch["prompt_mask"]).astype(bool)
        examples = batch["example"]
        p, g, n = prompts.shape[0], config.num_generations, config.max_new_tokens
        ids = [prompts[i][mask[i]].tolist() for i in range(p)]
        rows = [i for i in range(p) for _ in range(g)]  # prompt-major: reshapes to [P, G]
        seed = int(np.random.SeedSequence([abs(self.seed), context.step, context.index or 0]).generate_state(1)[0])

        if not self._host_checked:
            self._host, self._host_checked = distributed.host_leader(mesh, f"{context.role}/episodes"), True

        def run() -> dict[str, np.ndarray]:
            out = self.runner.run(state, [ids[i] for i in rows], [examples[i] for i in rows], context.key(),
                                  tracer=StageTracer(context), device=lambda: on_devices(mesh),
                                  sharding=self.stage.holder.rows, seed=seed, policy_version=version, host=self._host)
            self.episodes.extend(out.episodes)
            self.prefill_tokens += self.runner.prefill_tokens
            return {"tokens": out.tokens, "loss": out.loss_mask, "attention": out.attention_mask,
                    "logprobs": out.logprobs, "rewards": out.rewards}

        # Multi-process runs: processes without the rollout's devices receive its episodes' fields.
        out = distributed.share(mesh, run)
        return {"completion_tokens": out["tokens"].reshape(p, g, n),
                "completion_mask": out["loss"].reshape(p, g, n),
                "rollout_logprobs": out["logprobs"].reshape(p, g, n),
                "completion_attention_mask": out["attention"].reshape(p, g, n),
                "episode_rewards": out["rewards"].reshape(p, g)}

    def on_barrier(self, *, context: StageContext) -> dict[str, float]:
        metrics = episode_metrics(self.episodes)
        self.failed_total += int(metrics["episodes_failed"])
        metrics["episodes_failed_total"] = self.failed_total
        metrics["prefill_tokens"] = self.prefill_tokens
        self.episodes = []
        self.prefill_tokens = 0
        return metrics
