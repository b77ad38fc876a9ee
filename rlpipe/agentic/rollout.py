"""The agentic rollout stage: the rollout role with ``roles.rollout.environment``.

It is the rollout stage in every respect — same model, engine, placement,
weight sync, offload and policy-version rule (step *s* uses exactly policy
version ``context.behavior_version``, for every turn of every episode) —
except that each completion is a multi-turn episode
(:class:`rlpipe.agentic.episodes.EpisodeRunner`).  Its output has the
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

from rlpipe import distributed
from rlpipe.agentic.environment import environment_options
from rlpipe.agentic.episodes import Episode, EpisodeRunner, StageTracer, episode_metrics
from rlpipe.core.devices import on_devices
from rlpipe.core.placement import RolePlacement
from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import Batch, StageContext
from rlpipe.roles.inference import RolloutStage


class AgenticRolloutStage(RolloutStage):
    """Runs ``num_generations`` episodes per prompt (see the module docstring)."""

    def __init__(self, config: Any, placement: RolePlacement, *, context: BuildContext):
        super().__init__(config, placement, context=context)
        section = config.environment
        spec, options = environment_options(section, context.registry)
        turn = attrs.evolve(self.params, max_new_tokens=section.max_turn_tokens or config.max_new_tokens)
        self.runner = EpisodeRunner(spec=spec, options=options, section=section, run_config=context.run_config,
                                    registry=context.registry, tokenizer=self.tokenizer, engine=self.engine, params=turn,
                                    max_tokens=config.max_new_tokens, max_concurrency=config.max_concurrency)
        self.seed = context.seed
        self.episodes: list[Episode] = []  # this step's, until its barrier
        self.failed_total = 0
        self.prefill_tokens = 0  # this step's, until its barrier
        # Rollout devices on several processes: the first runs the environments for all (lazily:
        # the multi-process session starts after the stages are built on some paths).
        self._host: Any = None
        self._host_checked = False
        self.last_metrics: dict[str, float] = {}

    def process(self, batch: Batch, *, context: StageContext) -> Batch:
        state, version = self._weights_for(context.behavior_version)
        prompts = np.asarray(batch["prompt_tokens"])
        mask = np.asarray(batch["prompt_mask"]).astype(bool)
        examples = batch["example"]
        p, g, n = prompts.shape[0], self.config.num_generations, self.config.max_new_tokens
        ids = [prompts[i][mask[i]].tolist() for i in range(p)]
        rows = [i for i in range(p) for _ in range(g)]  # prompt-major: reshapes to [P, G]
        seed = int(np.random.SeedSequence([abs(self.seed), context.step, context.index or 0]).generate_state(1)[0])

        if not self._host_checked:
            self._host, self._host_checked = distributed.host_leader(self.holder.mesh, f"{context.role}/episodes"), True

        def run() -> dict[str, np.ndarray]:
            out = self.runner.run(state, [ids[i] for i in rows], [examples[i] for i in rows], context.key(),
                                  tracer=StageTracer(context), device=lambda: on_devices(self.holder.mesh),
                                  sharding=self.holder.replicated, seed=seed, policy_version=version, host=self._host)
            self.episodes.extend(out.episodes)
            self.prefill_tokens += self.runner.prefill_tokens
            return {"tokens": out.tokens, "loss": out.loss_mask, "attention": out.attention_mask,
                    "logprobs": out.logprobs, "rewards": out.rewards}

        # Multi-process runs: processes without the rollout's devices receive its episodes' fields.
        out = distributed.share(self.holder.mesh, run)
        return batch.add(
            completion_tokens=out["tokens"].reshape(p, g, n),
            completion_mask=out["loss"].reshape(p, g, n),
            rollout_logprobs=out["logprobs"].reshape(p, g, n),
            policy_version=np.full((p,), version, np.int32),
            completion_attention_mask=out["attention"].reshape(p, g, n),
            episode_rewards=out["rewards"].reshape(p, g),
        )

    def on_barrier(self, *, context: StageContext) -> None:
        metrics = episode_metrics(self.episodes)
        self.failed_total += int(metrics["episodes_failed"])
        metrics["episodes_failed_total"] = self.failed_total
        metrics["prefill_tokens"] = self.prefill_tokens
        self.last_metrics = metrics
        self.episodes = []
        self.prefill_tokens = 0
