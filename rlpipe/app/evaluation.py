"""Evaluation: how well a policy solves a task's held-out examples.

:func:`evaluate` builds the policy the way the rollout role does (same model
config, seed, mesh and rollout engine), optionally installs trained
parameters, and generates for the first ``num_examples`` examples of a split
(the held-out ``eval`` split by default):

* one **greedy** completion per example (temperature 0), and
* ``num_samples`` **sampled** completions per example at the rollout's
  sampling settings (``roles.rollout.temperature``, ``top_k``, ``top_p``).

Both are scored with the run's reward functions (``roles.reward.functions``,
or the task's own).  Definitions of the returned metrics:

* **correct**: the *primary reward* — the task's first reward function
  (``partial-match`` for ``reverse``/``sort``, ``exact-match`` for ``add``,
  ``answer-exact`` for ``arithmetic``, ``math-answer`` for ``jsonl``), or
  the first configured one for a task that names none — is at least
  ``correct_threshold`` (default 1.0, the maximum of every built-in match
  reward: an exact answer).  Shaping terms such as ``digits`` never count
  towards correctness.
* ``greedy/accuracy``: the share of examples whose greedy completion is correct.
* ``greedy/format``, ``sampled/format``: for a task that names a
  ``format_reward`` (``answer-format`` for ``arithmetic``), its mean over the
  greedy (sampled) completions — for a 0/1 format reward, the share of
  completions in the asked-for format, right or wrong (``format_reward``
  names it); ``None`` for a task without one.  Reported apart from
  accuracy, so a policy that learnt the format but not the sums shows.
* ``sampled/accuracy``: the share of all sampled completions that are correct
  (the pass@1 estimate from ``num_samples`` samples).
* ``sampled/pass@k``: the unbiased pass@k estimator (Chen et al., 2021) averaged
  over examples: with ``n`` samples of which ``c`` are correct,
  ``1 - C(n - c, k) / C(n, k)``, the chance that at least one of ``k`` samples
  drawn without replacement from the ``n`` is correct (0/1 when ``n == k``).
* ``greedy/reward_mean``, ``sampled/reward_mean``: the mean total reward (the
  weighted sum the trainer optimises: ``roles.reward.functions``' weights, or
  the task's ``reward_weights``), and per reward function
  ``greedy/reward/<name>``, ``sampled/reward/<name>`` (unweighted means).

The examples are the same for every run and checkpoint: the first
``num_examples`` distinct examples (by prompt and answer) of
``task.examples(seed=data_seed, split=split)``; fewer when the split has
fewer (a finite task's ``size(split)``, or a generated task's small held-out
space: drawing stops once 1000 draws in a row, or ten times
``num_examples``, bring nothing new).  Prompts
get the run's length limit (``task.max_prompt_tokens``); with ``reject`` an
overlong example is left out and counted in ``prompts_rejected``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rlpipe.app.held_out import EvaluationError, evaluation_examples, pass_at_k
from rlpipe.core.plugins import Registry
from rlpipe.models.loading import policy_state
from rlpipe.models.prompts import pad_prompts
from rlpipe.runtime.run_config import RunConfig

#: The role whose default settings generate when the config has no generating
#: role (a config default value, not a lookup: a role is found by what it produces).
DEFAULT_GENERATOR = "rollout"
#: Likewise the scoring role named in messages when no role produces ``rewards``.
DEFAULT_SCORER = "reward"
#: The field whose producer scores completions.
REWARD_FIELD = "rewards"


def _reward_terms(config: RunConfig, registry: Registry) -> tuple[list[tuple[str, float, Any]], tuple[str, Any],
                                                                  tuple[str, Any] | None, str]:
    """The weighted reward terms, the primary (correctness) function, the
    task's format function (or None) and ``on_error``."""
    from rlpipe.runtime.planning import role_specs

    spec = registry.get("rlpipe_tasks", config.task.name, path="task.name")
    # The scoring role by what it does (it produces rewards), not by its name.
    role = next((n for n, s in role_specs(config, registry).items() if REWARD_FIELD in s.produces), DEFAULT_SCORER)
    reward = config.roles.get(role)
    configured = tuple((t.name, t.weight) for t in getattr(reward, "functions", ()) or ())
    names = configured or spec.reward_terms
    if not names:
        raise EvaluationError(f"task {config.task.name!r} names no reward functions and roles.{role}.functions is empty: "
                              "nothing to score with")

    def fn(name: str, where: str) -> Any:
        return registry.get("rlpipe_reward_functions", name, path=where).fn

    terms = [(n, w, fn(n, f"roles.{role}.functions[{i}].name" if configured else f"task {config.task.name!r}: reward function {i}"))
             for i, (n, w) in enumerate(names)]
    primary = spec.rewards[0] if spec.rewards else names[0][0]
    fmt = spec.format_reward
    return (terms, (primary, fn(primary, f"task {config.task.name!r}: reward function 0")),
            (fmt, fn(fmt, f"task {config.task.name!r}: format_reward")) if fmt else None,
            getattr(reward, "on_error", "fail"))


def evaluate(config: RunConfig, registry: Registry, *, model_state: Any = None, split: str = "eval",
             num_examples: int = 128, k: int = 4, num_samples: int | None = None, batch_size: int = 64,
             seed: int | None = None, data_seed: int = 0, correct_threshold: float = 1.0,
             mesh: Any = None, details: bool = False) -> dict[str, Any]:
    """Evaluates the policy of ``config`` on ``split`` of its task (see the module
    docstring for every metric's definition).

    Args:
        config: a resolved run config (its model, task, rollout and reward sections are used).
        model_state: the policy's parameters, an nnx state with the structure of
            ``nnx.split(model)[1]`` (as ``TrainerStage.params`` holds them); ``None``
            evaluates the initial policy (``model.path``, or the preset
            initialised from ``train.seed``).
        split: the task split, ``eval`` (held out) or ``train``.
        num_examples: evaluate the first this many examples of the split (fewer
            when a finite task has fewer).
        k: pass@k's k; 0 skips sampling.
        num_samples: samples per example, at least ``k``; ``None``: ``k``.
        batch_size: completions generated per call (the last call is padded to it,
            so one shape is compiled per prompt-length bucket).
        seed: sampling seed; ``None``: ``train.seed``.
        data_seed: the seed of the task's example stream: fixed, so every run and
            checkpoint is compared on the same examples.
        correct_threshold: a completion is correct when the primary reward is at least this.
        mesh: the mesh to build the policy on; ``None``: the rollout role's mesh
            from the run's placement plan.
        details: also return ``samples``, one record per example (prompt, answer,
            greedy completion, its reward and correctness, correct samples).

    Returns:
        Plain JSON-serialisable data: the metrics (``greedy/accuracy``,
        ``sampled/pass@k``, ...), counts and the settings they were measured with.
        A metric over no examples is ``None``.  A config whose rollout has an
        environment is evaluated by episodes instead
        (:func:`rlpipe.app.agentic_evaluation.evaluate_agentic`: success rate and
        tool-use statistics).
    """
    import jax
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

    from rlpipe.app.agentic_evaluation import evaluate_agentic, generating_role
    from rlpipe.core.placement import make_mesh
    from rlpipe.models.generation import SamplingParams
    from rlpipe.models.loading import load_tokenizer
    from rlpipe.runtime.planning import plan_run

    n = k if num_samples is None else num_samples
    if k < 0 or n < k or num_examples < 0 or batch_size < 1:
        raise ValueError(f"need k >= 0, num_samples >= k, num_examples >= 0 and batch_size >= 1; got k={k}, "
                         f"num_samples={num_samples}, num_examples={num_examples}, batch_size={batch_size}")
    seed = config.train.seed if seed is None else seed
    # The generating role by what it does (it produces completion_tokens), not by its name.
    role = generating_role(config, registry)
    rollout_config = config.roles.get(role) if role is not None else None
    if getattr(rollout_config, "environment", None) is not None:
        return evaluate_agentic(config, registry, model_state=model_state, split=split, num_examples=num_examples, k=k,
                                num_samples=n, batch_size=batch_size, seed=seed, data_seed=data_seed,
                                correct_threshold=correct_threshold, mesh=mesh, details=details, role=role)

    if mesh is None:
        planned = plan_run(config, registry)
        config = planned.config
        if role is not None and role in {r.name for r in planned.plan.roles}:
            mesh = make_mesh(planned.plan.role(role))
    rollout = config.roles.get(role) if role is not None else None
    if rollout is None:  # no generating role configured: the built-in rollout's default settings
        role = DEFAULT_GENERATOR
        rollout = registry.get("rlpipe_roles", role, path=f"roles.{role}").config_type()
    terms, (primary, primary_fn), format_term, on_error = _reward_terms(config, registry)

    examples, prompts, rejected, truncated = evaluation_examples(config, registry, split=split, num_examples=num_examples,
                                                                 data_seed=data_seed)
    tokenizer = load_tokenizer(config.model)

    # -- the policy, as the rollout role builds it ----------------------------------
    if mesh is None:
        mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    graphdef, state, dtype = policy_state(config.model, mesh, model_state, seed=config.train.seed)
    engine = registry.get("rlpipe_rollout_engines", rollout.engine, path=f"roles.{role}.engine").factory(
        graphdef, cache_dtype=dtype)
    placement = NamedSharding(mesh, PartitionSpec())
    stops = tuple(dict.fromkeys(t for t in (tokenizer.eos_id, *rollout.stop_tokens) if t is not None))
    greedy_params = SamplingParams(max_new_tokens=rollout.max_new_tokens, temperature=0.0, stop_tokens=stops,
                                   pad_id=tokenizer.pad_id)
    sampled_params = SamplingParams(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                    top_k=rollout.top_k, top_p=rollout.top_p, stop_tokens=stops, pad_id=tokenizer.pad_id)
    key = jax.random.key(seed)
    decoded_prompts = [tokenizer.decode(p) for p in prompts]
    failures = 0

    def generate(rows: list[int], params: SamplingParams, salt: int) -> list[tuple[str, int]]:
        """Completions (text, length) for ``rows`` (indices into ``prompts``)."""
        out: list[tuple[str, int]] = []
        for b, start in enumerate(range(0, len(rows), batch_size)):
            chunk = rows[start:start + batch_size]
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
            tokens, mask = pad_prompts([prompts[i] for i in padded], tokenizer.pad_id)
            gen = engine.generate(state, tokens, mask, jax.random.fold_in(key, salt * 1_000_003 + b), params,
                                  sharding=placement)
            for r in range(len(chunk)):
                real = gen.tokens[r][gen.mask[r].astype(bool)]
                out.append((tokenizer.decode(real.tolist()), int(real.size)))
        return out

    def score(i: int, completion: str) -> tuple[float, dict[str, float], bool, float | None]:
        """(total reward, each function's value, correct, format value or None)."""
        values = {}
        for name, _, fn in terms:
            values[name] = _call(fn, name, i, completion)
        total = sum(w * values[name] for name, w, _ in terms)
        p = values[primary] if primary in values else _call(primary_fn, primary, i, completion)
        f = None
        if format_term is not None:
            f = values[format_term[0]] if format_term[0] in values else _call(format_term[1], format_term[0], i, completion)
        return total, values, p >= correct_threshold, f

    def _call(fn: Any, name: str, i: int, completion: str) -> float:
        nonlocal failures
        try:
            return float(fn(decoded_prompts[i], completion, examples[i]))
        except Exception as exc:  # noqa: BLE001 - a user's function may raise anything
            if on_error == "fail":
                raise EvaluationError(f"reward function {name!r} raised on evaluation example {i} "
                                      f"({completion[:40]!r}): {type(exc).__name__}: {exc}") from exc
            failures += 1
            return 0.0

    def mean(values: Sequence[float]) -> float | None:
        return float(np.mean(values)) if len(values) else None

    m = len(examples)
    result: dict[str, Any] = {
        "task": config.task.name, "split": split, "examples": m, "prompts_rejected": rejected,
        "prompts_truncated": truncated, "correct_reward": primary, "correct_threshold": float(correct_threshold),
        "format_reward": format_term[0] if format_term else None,
        "k": k, "samples_per_example": n if k else 0, "temperature": float(rollout.temperature),
        "max_new_tokens": rollout.max_new_tokens, "seed": seed, "data_seed": data_seed,
    }

    greedy = generate(list(range(m)), greedy_params, 0) if m else []
    g_scores = [score(i, text) for i, (text, _) in enumerate(greedy)]
    result["greedy/correct"] = sum(c for _, _, c, _ in g_scores)
    result["greedy/accuracy"] = mean([float(c) for _, _, c, _ in g_scores])
    result["greedy/format"] = mean([f for _, _, _, f in g_scores]) if format_term else None
    result["greedy/reward_mean"] = mean([t for t, _, _, _ in g_scores])
    result["greedy/completion_tokens_mean"] = mean([float(length) for _, length in greedy])
    for name, _, _ in terms:
        result[f"greedy/reward/{name}"] = mean([v[name] for _, v, _, _ in g_scores])

    correct_per_example = [0] * m
    if k and m:
        rows = [i for i in range(m) for _ in range(n)]
        sampled = generate(rows, sampled_params, 1)
        s_scores = [score(i, text) for i, (text, _) in zip(rows, sampled)]
        for i, (_, _, c, _) in zip(rows, s_scores):
            correct_per_example[i] += c
        result["sampled/accuracy"] = mean([float(c) for _, _, c, _ in s_scores])
        result["sampled/format"] = mean([f for _, _, _, f in s_scores]) if format_term else None
        result["sampled/pass@k"] = mean([pass_at_k(n, c, k) for c in correct_per_example])
        result["sampled/reward_mean"] = mean([t for t, _, _, _ in s_scores])
        result["sampled/completion_tokens_mean"] = mean([float(length) for _, length in sampled])
        for name, _, _ in terms:
            result[f"sampled/reward/{name}"] = mean([v[name] for _, v, _, _ in s_scores])
    else:
        result.update({"sampled/accuracy": None, "sampled/format": None, "sampled/pass@k": None,
                       "sampled/reward_mean": None, "sampled/completion_tokens_mean": None})
    result["reward_failures"] = failures
    if details:
        result["samples"] = [{"prompt": str(ex["prompt"]), "answer": str(ex.get("answer")), "greedy": greedy[i][0],
                              "greedy_reward": g_scores[i][0], "greedy_correct": bool(g_scores[i][2]),
                              "greedy_format": g_scores[i][3],
                              "sampled_correct": correct_per_example[i] if k else None}
                             for i, ex in enumerate(examples)]
    return result
