"""Evaluating an agentic config: episodes on held-out examples.

:func:`rlpipe.app.evaluation.evaluate` comes here when ``roles.rollout.environment``
is set.  The policy, examples and seeds are chosen as for a plain task
(:mod:`rlpipe.app.evaluation`); each example is run as **episodes** with the run's
environment and limits: one greedy episode, and ``num_samples`` sampled ones
at the rollout's settings.  For ``greedy`` and ``sampled``:

* ``success_rate``: the share of episodes that succeeded — the environment's
  ``success`` metric when it reports one (the built-in environments: the
  task's first reward function gives at least 1.0 for the final answer),
  else an episode reward of at least ``correct_threshold``; ``accuracy`` is
  the same number, under the name plain tasks use;
* ``reward_mean``: the mean episode reward; ``turns_per_episode``;
* ``tool_calls_per_episode``, ``tool_errors_per_episode`` (and any other
  number the environment reports, as ``<name>_per_episode``),
  ``tool_use_rate`` (episodes with at least one call) and
  ``tool_error_rate`` (errors per call; ``None`` without calls);
* ``episodes_failed``, ``episodes_truncated``: counts;
* ``sampled/pass@k``: the unbiased pass@k of success.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rlpipe.app.held_out import evaluation_examples, pass_at_k
from rlpipe.models.loading import policy_state
from rlpipe.plugins.agentic.environment import environment_options
from rlpipe.plugins.agentic.episodes import Episode, EpisodeRunner

#: The field whose producer is the role that generates (the rollout, or whatever replaces it).
GENERATED_FIELD = "completion_tokens"


def generating_role(config: Any, registry: Any) -> str | None:
    """The role that generates completions — the one whose spec (as its
    ``configure`` adapts it) produces ``completion_tokens`` — whatever it is
    called; ``None`` when no configured role does."""
    from rlpipe.runtime.planning import role_specs

    for name, spec in role_specs(config, registry).items():
        if GENERATED_FIELD in spec.produces:
            return name
    return None


def _successful(ep: Episode, threshold: float) -> bool:
    if "success" in ep.metrics:
        return ep.metrics["success"] >= 1.0
    return ep.status != "failed" and ep.reward >= threshold


def summarise(episodes: Sequence[Episode], prefix: str, threshold: float) -> dict[str, Any]:
    """The metrics of the module docstring for ``episodes``, keys ``<prefix>/<name>``."""
    def mean(values: Sequence[float]) -> float | None:
        return float(np.mean(values)) if len(values) else None

    out: dict[str, Any] = {}
    success = mean([float(_successful(ep, threshold)) for ep in episodes])
    out[f"{prefix}/success_rate"] = success
    out[f"{prefix}/accuracy"] = success
    out[f"{prefix}/reward_mean"] = mean([ep.reward for ep in episodes])
    out[f"{prefix}/turns_per_episode"] = mean([float(ep.turns) for ep in episodes])
    for key in dict.fromkeys(k for ep in episodes for k in ep.metrics if k != "success"):
        out[f"{prefix}/{key}_per_episode"] = mean([ep.metrics[key] for ep in episodes if key in ep.metrics])
    if any("tool_calls" in ep.metrics for ep in episodes):
        calls = sum(ep.metrics.get("tool_calls", 0.0) for ep in episodes)
        errors = sum(ep.metrics.get("tool_errors", 0.0) for ep in episodes)
        out[f"{prefix}/tool_use_rate"] = mean([float(ep.metrics.get("tool_calls", 0.0) > 0) for ep in episodes])
        out[f"{prefix}/tool_error_rate"] = errors / calls if calls else None
    out[f"{prefix}/episodes_failed"] = sum(ep.status == "failed" for ep in episodes)
    out[f"{prefix}/episodes_truncated"] = sum(ep.status == "truncated" for ep in episodes)
    return out


def evaluate_agentic(config: Any, registry: Any, *, model_state: Any = None, split: str = "eval", num_examples: int = 128,
                     k: int = 4, num_samples: int | None = None, batch_size: int = 64, seed: int | None = None,
                     data_seed: int = 0, correct_threshold: float = 1.0, mesh: Any = None,
                     details: bool = False, role: str | None = None) -> dict[str, Any]:
    """Evaluates an agentic config's policy by episodes (see the module
    docstring); the arguments are :func:`rlpipe.app.evaluation.evaluate`'s, with
    ``batch_size`` the most episodes in flight at once, and ``role`` the role
    that generates (:func:`generating_role` when ``None``).

    Returns:
        Plain JSON-serialisable data; with ``details``, also ``samples``: per
        example its prompt, answer, greedy transcript (environment text
        included), status, reward, success and tool calls.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from rlpipe.core.placement import make_mesh
    from rlpipe.models.generation import SamplingParams
    from rlpipe.models.loading import load_tokenizer
    from rlpipe.runtime.planning import plan_run

    n = k if num_samples is None else num_samples
    if k < 0 or n < k or num_examples < 0 or batch_size < 1:
        raise ValueError(f"need k >= 0, num_samples >= k, num_examples >= 0 and batch_size >= 1; got k={k}, "
                         f"num_samples={num_samples}, num_examples={num_examples}, batch_size={batch_size}")
    seed = config.train.seed if seed is None else seed
    role = generating_role(config, registry) if role is None else role
    if role is None:
        raise ValueError("no configured role produces completion_tokens: nothing generates episodes")
    if mesh is None:
        planned = plan_run(config, registry)
        config = planned.config
        mesh = make_mesh(planned.plan.role(role))
    rollout = config.roles[role]
    section = rollout.environment
    spec, options = environment_options(section, registry)
    examples, prompts, rejected, truncated = evaluation_examples(config, registry, split=split, num_examples=num_examples,
                                                                 data_seed=data_seed)
    tokenizer = load_tokenizer(config.model)
    graphdef, state, dtype = policy_state(config.model, mesh, model_state, seed=config.train.seed)
    engine = registry.get("rlpipe_rollout_engines", rollout.engine, path=f"roles.{role}.engine").factory(graphdef, cache_dtype=dtype)
    stops = tuple(dict.fromkeys(t for t in (tokenizer.eos_id, *rollout.stop_tokens) if t is not None))
    turn = section.max_turn_tokens or rollout.max_new_tokens
    greedy = SamplingParams(max_new_tokens=turn, temperature=0.0, stop_tokens=stops, pad_id=tokenizer.pad_id)
    sampled = SamplingParams(max_new_tokens=turn, temperature=rollout.temperature, top_k=rollout.top_k, top_p=rollout.top_p,
                             stop_tokens=stops, pad_id=tokenizer.pad_id)
    key = jax.random.key(seed)
    sharding = NamedSharding(mesh, PartitionSpec())

    def run(params: SamplingParams, rows: list[int], salt: int) -> list[Episode]:
        runner = EpisodeRunner(spec=spec, options=options, section=section, run_config=config, registry=registry,
                               tokenizer=tokenizer, engine=engine, params=params, max_tokens=rollout.max_new_tokens,
                               max_concurrency=batch_size)
        if not rows:
            return []
        out = runner.run(state, [prompts[i] for i in rows], [examples[i] for i in rows], jax.random.fold_in(key, salt),
                         sharding=sharding, seed=seed * 1_000_003 + salt)
        return out.episodes

    m = len(examples)
    result: dict[str, Any] = {
        "task": config.task.name, "environment": section.name, "split": split, "examples": m,
        "prompts_rejected": rejected, "prompts_truncated": truncated, "correct_threshold": float(correct_threshold),
        "k": k, "samples_per_example": n if k else 0, "temperature": float(rollout.temperature),
        "max_new_tokens": rollout.max_new_tokens, "max_turns": section.max_turns, "seed": seed, "data_seed": data_seed,
    }
    g_eps = run(greedy, list(range(m)), 0)
    result.update(summarise(g_eps, "greedy", correct_threshold))
    correct = [0] * m
    if k and m:
        rows = [i for i in range(m) for _ in range(n)]
        s_eps = run(sampled, rows, 1)
        for i, ep in zip(rows, s_eps):
            correct[i] += _successful(ep, correct_threshold)
        result.update(summarise(s_eps, "sampled", correct_threshold))
        result["sampled/pass@k"] = float(np.mean([pass_at_k(n, c, k) for c in correct]))
    else:
        result.update({"sampled/success_rate": None, "sampled/accuracy": None, "sampled/pass@k": None})
    if details:
        result["samples"] = [{
            "prompt": str(ex["prompt"]), "answer": str(ex.get("answer")),
            "greedy": tokenizer.decode(ep.tokens), "greedy_status": ep.status, "greedy_reward": ep.reward,
            "greedy_success": _successful(ep, correct_threshold), "greedy_actions": list(ep.actions),
            "greedy_error": ep.error or None, "sampled_successes": correct[i] if k else None,
        } for i, (ex, ep) in enumerate(zip(examples, g_eps))]
    return result
