"""The training loss as a sum of small pure terms, chained the way optax
chains gradient transformations.

A *loss term* is a pure function of one :class:`LossInputs` record that
returns its scalar contribution to the loss (already weighted) and a dict of
scalar metrics::

    def term(inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]: ...

The factories here build the terms of the built-in algorithms, each with its
formula in its docstring; :func:`chain` sums terms into one loss::

    loss_fn = chain(policy_gradient(losses.ppo_clip, aggregation="token-mean", eps_low=0.2, eps_high=0.28),
                    kl_penalty(0.04, kind="k3", aggregation="token-mean", in_reward=False),
                    my_term)
    loss, metrics = loss_fn(LossInputs.create(logp, batch, entropy=entropy))

:class:`~rlpipe.plugins.algorithms.algorithm.Algorithm` builds its chain from
its config; a plugin adds or swaps a term by name without copying the rest
(``docs/algorithms.md``, "Losses are composed of terms").

Terms take one argument so that new inputs can be added to
:class:`LossInputs` without breaking existing terms.

Under gradient accumulation each micro-batch is one call, and the trainer
*sums* the calls' contributions and metrics over a mini-batch (metrics named
``*_max`` take the maximum).  ``inputs.normalisers`` then holds the
mini-batch's counts: a term aggregates with
``losses.aggregate(..., normalisers=inputs.normalisers)`` so its micro-batch
values sum to the mini-batch's exactly, or weights a value normalised by its
own call by ``inputs.share``.  Called once on a whole batch (no
normalisers), every term gives what it always did.  Array conventions are
those of :mod:`.losses`: per-token arrays ``[P, G, N]``, masked positions
may hold anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from rlpipe.plugins.algorithms import losses

if TYPE_CHECKING:
    import jax

# jax is imported inside the functions, so that building an algorithm's terms
# (the plugin's specs do) does not load it.

__all__ = ["LossInputs", "LossTerm", "chain", "entropy_bonus", "kl_penalty", "policy_gradient"]

Metrics = dict[str, "jax.Array"]


class LossInputs(NamedTuple):
    """What every loss term receives.

    Attributes:
        logp: ``[P, G, N]`` the current policy's log-probs of the completion
            tokens (the loss is differentiated with respect to these).
        mask: ``[P, G, N]`` bool, the completion mask (``batch["completion_mask"]``).
        batch: the batch fields by name: ``old_logprobs``, ``advantages``, and
            when present ``ref_logprobs``, ``rollout_logprobs``, ``values``, ...
        entropy: ``[P, G, N]`` the current policy's per-token entropy
            (differentiable), or ``None`` when the caller did not compute it.
        normalisers: when this call is one micro-batch of a mini-batch, the
            mini-batch's counts (:class:`~.losses.Normalisers`: valid tokens,
            valid completions, this call's share of the rows); ``None``: the
            call is the whole batch.
    """

    logp: jax.Array
    mask: jax.Array
    batch: Mapping[str, jax.Array]
    entropy: jax.Array | None = None
    normalisers: losses.Normalisers | None = None

    @classmethod
    def create(cls, logp: jax.Array, batch: Mapping[str, jax.Array], *, entropy: jax.Array | None = None,
               normalisers: losses.Normalisers | None = None) -> LossInputs:
        """The inputs for ``logp`` and ``batch``; the mask is ``batch["completion_mask"]`` as bool."""
        import jax.numpy as jnp

        return cls(logp=logp, mask=jnp.asarray(batch["completion_mask"]).astype(bool), batch=batch, entropy=entropy,
                   normalisers=normalisers)

    @property
    def share(self) -> Any:
        """This call's share of the mini-batch's rows (1 without normalisers):
        the weight of a value a term normalises by this call's own counts."""
        return 1.0 if self.normalisers is None else self.normalisers.share


class LossTerm(Protocol):
    """A pure function ``term(inputs) -> (contribution, metrics)``.

    ``contribution`` is the term's scalar share of the loss, already weighted
    (the loss is the sum of the contributions); ``metrics`` are scalars to
    report (:func:`chain` stops their gradient).
    """

    def __call__(self, inputs: LossInputs, /) -> tuple[jax.Array, Metrics]: ...


def _zero() -> jax.Array:
    import jax.numpy as jnp

    # Weakly typed, so adding it keeps the other contributions' dtype (and value: x + 0.0 == x).
    return jnp.asarray(0.0)


def _stop(metrics: Mapping[str, Any]) -> Metrics:
    import jax

    return {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}


def _token_mean(x: jax.Array, inputs: LossInputs) -> jax.Array:
    return losses.aggregate(x, inputs.mask, "token-mean", normalisers=inputs.normalisers)


#: Policy-loss statistics that become metrics (token means over valid tokens).
_FRACTIONS = (("clipped_low", "clip_frac_low"), ("clipped_high", "clip_frac_high"), ("dual_clipped", "dual_clip_frac"))


def policy_gradient(policy_loss: Callable[..., Any], *, aggregation: str, eps_low: float, eps_high: float,
                    dual_clip: float | None = None, tis_cap: float | None = None) -> LossTerm:
    """The policy-gradient term.

    With ``ell_t, stats = policy_loss(logp=, old_logp=batch["old_logprobs"],
    advantages=batch["advantages"], mask=, eps_low=, eps_high=[, dual_clip=])``
    (per token, see :mod:`.losses`) and, when ``tis_cap = C`` is set, the
    truncated importance weights ``w_t = min(exp(old_t - rollout_t), C)``
    (no gradient; ``batch["rollout_logprobs"]``), the contribution is::

        pg_loss = agg(w * ell)        # agg: the ``aggregation``; w = 1 without tis_cap

    Metrics: ``pg_loss``; ``ratio_mean`` (token mean) and ``ratio_max`` when
    ``stats`` has ``ratio``; ``clip_frac_low``, ``clip_frac_high``,
    ``dual_clip_frac`` (token means of ``clipped_low``, ``clipped_high``,
    ``dual_clipped``) for those it has; ``tis_weight_mean`` and
    ``tis_clip_frac`` (token means of ``w`` and ``w >= C``) with ``tis_cap``;
    with ``ratio`` (every built-in loss) also ``ppo_kl``, the approximate KL
    from the behaviour (old) policy to the current one: the token mean over
    valid tokens of the k3 estimator on the old policy's samples
    (non-negative, 0 exactly when ``logp == old``; ``d`` clamped to +-20
    before ``exp`` as in :func:`.losses.kl`)::

        ppo_kl = token-mean(exp(d) - d - 1),   d = logp - old_logprobs

    Raises (when called):
        KeyError: ``tis_cap`` is set and the batch has no ``rollout_logprobs``.
    """
    extra = {} if dual_clip is None else {"dual_clip": dual_clip}

    def term(inputs: LossInputs) -> tuple[jax.Array, Metrics]:
        import jax.numpy as jnp

        mask, batch = inputs.mask, inputs.batch
        old = batch["old_logprobs"]
        per_token, stats = policy_loss(logp=inputs.logp, old_logp=old, advantages=batch["advantages"], mask=mask,
                                       eps_low=eps_low, eps_high=eps_high, **extra)
        metrics: Metrics = {}
        if tis_cap is not None:
            if "rollout_logprobs" not in batch:
                raise KeyError("tis_cap is set: the batch needs rollout_logprobs (the sampler's log-probs)")
            w = losses.truncated_importance_weights(old, batch["rollout_logprobs"], mask, tis_cap)
            per_token = per_token * w
            metrics["tis_weight_mean"] = _token_mean(w, inputs)
            metrics["tis_clip_frac"] = _token_mean(w >= tis_cap, inputs)
        pg_loss = losses.aggregate(per_token, mask, aggregation, normalisers=inputs.normalisers)
        if "ratio" in stats:
            ratio = stats["ratio"]
            metrics["ratio_mean"] = _token_mean(ratio, inputs)
            metrics["ratio_max"] = jnp.where(mask, ratio, 0.0).max(initial=0.0)
            # k3 of KL(old || current) on the old policy's samples: losses.kl with the roles swapped.
            metrics["ppo_kl"] = _token_mean(losses.kl(old, inputs.logp, "k3", mask), inputs)
        for key, name in _FRACTIONS:
            if key in stats:
                metrics[name] = _token_mean(stats[key], inputs)
        metrics["pg_loss"] = pg_loss
        return pg_loss, _stop(metrics)

    return term


def kl_penalty(beta: float, *, kind: str, aggregation: str, in_reward: bool) -> LossTerm:
    """The KL penalty to the reference policy.

    With ``d = logp - batch["ref_logprobs"]`` and ``KL_t`` the ``kind``
    estimator (``k1``: ``d``; ``k2``: ``d^2 / 2``; ``k3``:
    ``exp(-d) + d - 1``), the contribution is::

        beta * agg(KL)        # 0 when in_reward (the KL is in the reward) or beta == 0

    Metrics: ``kl`` (``agg(KL)``) whenever the batch has ``ref_logprobs``,
    whatever ``beta``, so the drift from the reference can be watched
    without penalising it.

    Raises (when called):
        KeyError: ``beta > 0``, not ``in_reward``, and the batch has no
            ``ref_logprobs``.
    """
    applied = beta > 0 and not in_reward

    def term(inputs: LossInputs) -> tuple[jax.Array, Metrics]:
        batch, mask = inputs.batch, inputs.mask
        if "ref_logprobs" not in batch:
            if applied:
                raise KeyError("kl_beta > 0: the batch needs ref_logprobs (the reference role's)")
            return _zero(), {}
        value = losses.aggregate(losses.kl(inputs.logp, batch["ref_logprobs"], kind, mask), mask, aggregation,
                                 normalisers=inputs.normalisers)
        return (beta * value if applied else _zero()), _stop({"kl": value})

    return term


def entropy_bonus(coef: float, *, aggregation: str) -> LossTerm:
    """The entropy bonus: with ``H_t`` the policy's per-token entropy
    (``inputs.entropy``), the contribution is::

        -coef * agg(H)

    so minimising the loss raises the entropy.  Metric: ``entropy_bonus``
    (``agg(H)``, without ``coef``).

    Raises (when called):
        KeyError: ``inputs.entropy`` is ``None``.
    """

    def term(inputs: LossInputs) -> tuple[jax.Array, Metrics]:
        import jax.numpy as jnp

        if inputs.entropy is None:
            raise KeyError("entropy_coef > 0: pass the policy's per-token entropy")
        mask = inputs.mask
        bonus = losses.aggregate(jnp.where(mask, inputs.entropy, 0.0), mask, aggregation, normalisers=inputs.normalisers)
        return -(coef * bonus), _stop({"entropy_bonus": bonus})

    return term


def chain(*terms: LossTerm) -> Callable[[LossInputs], tuple[jax.Array, Metrics]]:
    """One loss from several terms, like ``optax.chain``::

        loss = sum of the terms' contributions, in order

    The metrics are the terms' metrics merged (with their gradient stopped)
    plus ``loss`` (the total, without gradient).  A chain is itself a term,
    so chains nest (an inner chain's ``loss`` metric gives way to the outer one's).

    Raises (when called):
        ValueError: two terms report a metric of the same name.
    """
    terms = tuple(terms)
    for t in terms:
        if not callable(t):
            raise TypeError(f"a loss term must be callable as term(inputs) -> (loss, metrics), got {t!r}")

    def loss(inputs: LossInputs) -> tuple[jax.Array, Metrics]:
        import jax

        total: jax.Array | None = None
        metrics: Metrics = {}
        for t in terms:
            value, m = t(inputs)
            total = value if total is None else total + value
            for k, v in m.items():
                if k == "loss":
                    continue
                if k in metrics:
                    raise ValueError(f"two loss terms report the metric {k!r}; rename one")
                metrics[k] = v
        total = _zero() if total is None else total
        metrics = _stop(metrics)
        metrics["loss"] = jax.lax.stop_gradient(total)
        return total, metrics

    return loss
