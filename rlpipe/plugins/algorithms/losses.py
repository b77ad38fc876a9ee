"""Policy losses, KL penalties, loss aggregation and off-policy weights: pure JAX.

Per-token arrays are ``[P, G, N]`` (any leading shape works; the last axis is
the token axis, the one before it the completion axis) and ``mask`` is 1 on
real completion tokens.  Losses return a *per-token* loss, 0 where masked,
and a dict of per-token statistics; :func:`aggregate` reduces them.

Masked positions may hold anything (``-inf`` log-probs included): every
function selects with ``jnp.where`` *before* exponentiating, so neither the
value nor the gradient picks up a NaN from padding.

Under gradient accumulation a mini-batch is split into micro-batches, each
a separate call.  :class:`Normalisers` carries the mini-batch's counts
(:func:`normalisers`) into each call, so that :func:`aggregate` divides by the
whole mini-batch's token or completion count and the micro-batch values *sum*
to the mini-batch's value exactly — the update does not depend on the
micro-batch size.

How the algorithm calls a policy loss (and a third-party one, see
``docs/algorithms.md``): by keyword, ``fn(logp=, old_logp=, advantages=,
mask=, eps_low=, eps_high=)``, plus ``dual_clip=`` when configured; it
returns ``(per_token_loss, stats)`` where ``stats`` may hold per-token
``ratio``, ``clipped_low``, ``clipped_high`` and ``dual_clipped``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import jax

# jax is imported inside the functions, so that registering them (the plugin's
# specs) does not load it.

__all__ = [
    "AGGREGATIONS",
    "KL_KINDS",
    "Normalisers",
    "aggregate",
    "entropy_from_logits",
    "gspo",
    "kl",
    "normalisers",
    "ppo_clip",
    "truncated_importance_weights",
]

#: Log-ratios are clamped to this magnitude before ``exp`` (as verl does): a
#: ratio of e^20 is clipped anyway, and an ``inf`` ratio times a zero
#: advantage would be NaN.
LOG_RATIO_LIMIT = 20.0

KL_KINDS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class Normalisers(NamedTuple):
    """The counts a loss over several calls (micro-batches) divides by: those
    of the whole batch the calls make up (the mini-batch), not each call's own.

    Attributes:
        tokens: valid tokens in the whole batch, at least 1 (``token-mean``).
        sequences: completions with at least one valid token in the whole
            batch, at least 1 (the ``seq-mean-*`` aggregations).
        share: this call's share of the batch's rows (``micro / mini``): the
            weight of a value a term normalises by its own call's counts.
    """

    tokens: jax.Array
    sequences: jax.Array
    share: jax.Array


def normalisers(mask: jax.Array, share: float = 1.0) -> Normalisers:
    """The :class:`Normalisers` of a whole batch with completion mask ``mask``
    (``[..., N]``; numpy or JAX), for calls that each cover ``share`` of its rows."""
    import jax.numpy as jnp

    m = jnp.asarray(mask).astype(bool)
    return Normalisers(tokens=jnp.maximum(m.sum(), 1).astype(jnp.float32),
                       sequences=jnp.maximum((m.sum(axis=-1) > 0).sum(), 1).astype(jnp.float32),
                       share=jnp.float32(share))


def _bool(mask: jax.Array) -> jax.Array:
    import jax.numpy as jnp

    return jnp.asarray(mask).astype(bool)


def _log_ratio(logp: jax.Array, base: jax.Array, mask: jax.Array) -> jax.Array:
    import jax.numpy as jnp

    diff = jnp.asarray(logp) - jnp.asarray(base)
    return jnp.clip(jnp.where(_bool(mask), diff, 0.0), -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def _clipped_objective(ratio, advantages, mask, eps_low, eps_high, dual_clip):
    import jax.numpy as jnp

    m = _bool(mask)
    adv = jnp.where(m, advantages, 0.0)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    stats = {
        "ratio": jnp.where(m, ratio, 0.0),
        # The clipped term is the one in use (its gradient is 0).
        "clipped_low": m & (adv < 0) & (ratio < 1.0 - eps_low),
        "clipped_high": m & (adv > 0) & (ratio > 1.0 + eps_high),
    }
    if dual_clip is not None:
        bound = -adv * dual_clip  # = dual_clip * |A| where A < 0
        stats["dual_clipped"] = m & (adv < 0) & (loss > bound)
        loss = jnp.where(adv < 0, jnp.minimum(loss, bound), loss)
    return jnp.where(m, loss, 0.0), stats


def ppo_clip(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
             eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate per token, with asymmetric ("clip-higher") bounds.

    ``r = exp(logp - old_logp)``;
    ``loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``.  With
    ``dual_clip = c > 1`` (Ye et al. 2020), tokens with ``A < 0`` have their
    loss capped at ``c |A|``: ``loss = min(loss, -c A)``, so a huge ratio on a
    bad token cannot blow up the update.

    Returns:
        ``(loss, stats)``: the per-token loss (0 where masked) and per-token
        ``ratio`` (float), ``clipped_low``, ``clipped_high`` and, with dual
        clip, ``dual_clipped`` (bool).
    """
    import jax.numpy as jnp

    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    ratio = jnp.exp(_log_ratio(logp, old_logp, mask))
    return _clipped_objective(ratio, advantages, mask, eps_low, eps_high, dual_clip)


def gspo(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
         eps_low: float = 3e-4, eps_high: float = 4e-4) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GSPO (Zheng et al. 2025) in its GSPO-token form.

    The sequence ratio is ``s_i = exp(mean_t(logp_t - old_logp_t))`` over the
    valid tokens of completion ``i``.  Each token uses
    ``s_{i,t} = sg[s_i] * exp(logp_t - sg[logp_t])``: its value is ``s_i``
    and its gradient ``s_i * grad(logp_t)``.  The per-token loss is PPO's
    clipped surrogate on ``s_{i,t}``.  With a sequence-level advantage
    aggregated by ``seq-mean-token-mean`` this is exactly GSPO's sequence
    objective; token-level advantages give GSPO-token.

    Returns:
        ``(loss, stats)`` as :func:`ppo_clip` (``ratio`` is ``s_i`` on each
        valid token).
    """
    import jax
    import jax.numpy as jnp

    m = _bool(mask)
    n = m.sum(axis=-1, keepdims=True)
    logp = jnp.asarray(logp)
    seq_log_ratio = jnp.where(m, logp - jnp.asarray(old_logp), 0.0).sum(axis=-1, keepdims=True) / jnp.maximum(n, 1)
    seq_ratio = jnp.exp(jnp.clip(seq_log_ratio, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    lp = jnp.where(m, logp, 0.0)
    ratio = jax.lax.stop_gradient(seq_ratio) * jnp.exp(lp - jax.lax.stop_gradient(lp))
    return _clipped_objective(ratio, advantages, mask, eps_low, eps_high, None)


def kl(logp: jax.Array, ref_logp: jax.Array, kind: str = "k3", mask: jax.Array | None = None) -> jax.Array:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's k1/k2/k3).

    * ``k1``: ``logp - ref`` (unbiased, can be negative);
    * ``k2``: ``0.5 * (logp - ref)^2``;
    * ``k3``: ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, >= 0); the
      log-ratio is clamped to +-20 before ``exp``.

    Positions where ``mask`` is 0 give 0.
    """
    import jax.numpy as jnp

    d = jnp.asarray(logp) - jnp.asarray(ref_logp)
    if mask is not None:
        d = jnp.where(_bool(mask), d, 0.0)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        x = jnp.clip(-d, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        return jnp.exp(x) - x - 1.0
    raise ValueError(f"unknown KL kind {kind!r} (expected one of {', '.join(KL_KINDS)})")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str = "token-mean", *,
              normalisers: Normalisers | None = None) -> jax.Array:
    """Reduces a per-token quantity to a scalar.

    * ``token-mean``: sum over all valid tokens / number of valid tokens;
    * ``seq-mean-token-mean``: each completion's mean over its valid tokens,
      then the mean over completions that have any (GRPO paper);
    * ``seq-mean-token-sum``: each completion's sum, mean over completions;
    * ``seq-mean-token-sum-norm``: each completion's sum divided by ``N``, the
      padded completion length (the maximum number of new tokens), mean over
      completions (Dr. GRPO: a constant normaliser, so no length bias).

    Fully masked completions are left out; with no valid token at all the
    result is 0.

    With ``normalisers`` (a micro-batch of a larger batch), ``token-mean``
    divides by ``normalisers.tokens`` and the ``seq-mean-*`` modes by
    ``normalisers.sequences`` — the whole batch's counts — instead of this
    call's own, so the values of the micro-batches sum to the whole batch's.
    """
    import jax.numpy as jnp

    m = _bool(mask)
    x = jnp.where(m, per_token, 0.0)
    if mode == "token-mean":
        return x.sum() / (jnp.maximum(m.sum(), 1) if normalisers is None else normalisers.tokens)
    count = m.sum(axis=-1)
    valid_seq = count > 0
    seq_sum = x.sum(axis=-1)
    if mode == "seq-mean-token-mean":
        per_seq = seq_sum / jnp.maximum(count, 1)
    elif mode == "seq-mean-token-sum":
        per_seq = seq_sum
    elif mode == "seq-mean-token-sum-norm":
        per_seq = seq_sum / m.shape[-1]
    else:
        raise ValueError(f"unknown aggregation {mode!r} (expected one of {', '.join(AGGREGATIONS)})")
    denominator = jnp.maximum(valid_seq.sum(), 1) if normalisers is None else normalisers.sequences
    return jnp.where(valid_seq, per_seq, 0.0).sum() / denominator


def truncated_importance_weights(old_logp: jax.Array, rollout_logp: jax.Array, mask: jax.Array, cap: float) -> jax.Array:
    """Truncated importance sampling weights ``min(exp(old - rollout), cap)``.

    Corrects for the rollout engine's sampling distribution differing from the
    trainer's (other kernels, stale weights): multiply the per-token policy
    loss by these.  No gradient flows through them; 0 where masked.
    """
    import jax
    import jax.numpy as jnp

    w = jnp.minimum(jnp.exp(_log_ratio(old_logp, rollout_logp, mask)), cap)
    return jax.lax.stop_gradient(jnp.where(_bool(mask), w, 0.0))


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Per-position entropy of ``softmax(logits)`` over the last (vocabulary) axis."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return -(jnp.exp(logp) * logp).sum(axis=-1)
