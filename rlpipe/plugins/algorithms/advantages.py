"""Advantage estimators: pure, jit-able JAX functions of grouped rollouts.

Layout: rewards are ``[P, G]`` (P prompts, G generations each); per-token
arrays are ``[P, G, N]`` and ``mask`` is 1 on real completion tokens.  Every
estimator returns per-token advantages ``[P, G, N]``, zero wherever ``mask``
is 0; sequence-level estimators give every valid token of a completion the
same advantage.

Conventions shared by the group estimators (``grpo``, ``drgrpo``, ``rloo``,
``reinforce_pp``):

* A completion with no valid token (a fully masked row) is *absent*: it is
  left out of its group's statistics and gets advantage 0.  Groups may
  therefore hold fewer than G completions.
* A group whose valid completions all have the same reward (or that has fewer
  than two valid completions) carries no learning signal: its advantages are
  exactly 0, never NaN and never rounding noise blown up by a tiny std.

How the algorithm calls an estimator (and how a third-party one is called,
see ``docs/algorithms.md``): by keyword, with the arguments it names among
``rewards``, ``token_rewards``, ``mask``, ``values``, ``gamma`` and ``lam``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax

# jax is imported inside the functions, so that registering them (the plugin's
# specs) does not load it.

__all__ = ["drgrpo", "gae", "grpo", "reinforce_pp", "rloo", "sequence_rewards_to_tokens"]


def _float(x: jax.Array) -> jax.Array:
    import jax.numpy as jnp

    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class _Groups:
    """Per-group statistics over the valid completions of each group."""

    def __init__(self, rewards: jax.Array, mask: jax.Array):
        import jax.numpy as jnp

        self.rewards = r = _float(rewards)
        self.valid = jnp.asarray(mask).astype(bool).any(axis=-1)  # [P, G]
        v = self.valid.astype(r.dtype)
        self.count = v.sum(axis=-1, keepdims=True)  # [P, 1]
        self.sum = jnp.where(self.valid, r, 0).sum(axis=-1, keepdims=True)
        self.mean = self.sum / jnp.maximum(self.count, 1)
        hi = jnp.where(self.valid, r, -jnp.inf).max(axis=-1, keepdims=True)
        lo = jnp.where(self.valid, r, jnp.inf).min(axis=-1, keepdims=True)
        # Exact test: a float mean of equal values need not equal them.
        self.informative = (self.count >= 2) & (hi > lo)  # [P, 1]

    def sample_std(self) -> jax.Array:
        import jax.numpy as jnp

        dev = jnp.where(self.valid, self.rewards - self.mean, 0)
        return jnp.sqrt((dev * dev).sum(axis=-1, keepdims=True) / jnp.maximum(self.count - 1, 1))

    def finish(self, advantage: jax.Array) -> jax.Array:
        """Zeroes absent completions and uninformative groups."""
        import jax.numpy as jnp

        return jnp.where(self.valid & self.informative, advantage, 0)


def _to_tokens(seq_advantages: jax.Array, mask: jax.Array) -> jax.Array:
    import jax.numpy as jnp

    return jnp.where(jnp.asarray(mask).astype(bool), seq_advantages[..., None], 0).astype(seq_advantages.dtype)


def grpo(rewards: jax.Array, mask: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """GRPO: ``(r - mean_group) / (std_group + eps)``, broadcast to valid tokens.

    ``std_group`` is the *sample* standard deviation (Bessel-corrected,
    ``ddof=1``) over the group's valid completions, as in TRL and verl
    (``torch.std``); groups with fewer than two valid completions get 0.

    Args:
        rewards: ``[P, G]`` scalar reward per completion.
        mask: ``[P, G, N]`` completion mask.
        eps: added to the std.

    Returns:
        ``[P, G, N]`` advantages.
    """
    g = _Groups(rewards, mask)
    return _to_tokens(g.finish((g.rewards - g.mean) / (g.sample_std() + eps)), mask)


def drgrpo(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """Dr. GRPO: ``r - mean_group`` (no division by the std), broadcast to valid tokens."""
    g = _Groups(rewards, mask)
    return _to_tokens(g.finish(g.rewards - g.mean), mask)


def rloo(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """RLOO: ``r_i - mean_{j != i} r_j`` over the group's valid completions.

    With ``k`` valid completions this is ``k / (k - 1) * (r_i - mean_group)``;
    a group with one valid completion (``G = 1``) has no baseline and gets 0.
    """
    import jax.numpy as jnp

    g = _Groups(rewards, mask)
    others = (g.sum - g.rewards) / jnp.maximum(g.count - 1, 1)
    return _to_tokens(g.finish(g.rewards - others), mask)


def reinforce_pp(rewards: jax.Array, mask: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """REINFORCE++ with a group baseline ("REINFORCE++-baseline").

    ``A = r - mean_group`` is broadcast to the valid tokens, then divided by
    the std of those token advantages over the *whole batch* (population std
    of all valid tokens, ``ddof=0``) plus ``eps``.

    Unlike OpenRLHF's whitening, the batch mean is *not* subtracted: the group
    baseline already centres each group, and not re-centring keeps the
    advantage of an all-equal group exactly 0.  (With ``gamma = 1`` and the
    reward on the last token, REINFORCE++'s per-token return equals the
    sequence reward, so the sequence form here is the token form.)
    """
    import jax.numpy as jnp

    g = _Groups(rewards, mask)
    adv = _to_tokens(g.finish(g.rewards - g.mean), mask)
    m = jnp.asarray(mask).astype(bool)
    n = jnp.maximum(m.sum(), 1).astype(adv.dtype)
    mu = adv.sum() / n  # masked tokens are already 0
    var = jnp.where(m, (adv - mu) ** 2, 0).sum() / n
    return jnp.where(m, adv / (jnp.sqrt(var) + eps), 0)


def sequence_rewards_to_tokens(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """Puts each completion's reward on its last valid token (``[P, G]`` -> ``[P, G, N]``).

    A fully masked row gets all zeros.
    """
    import jax.numpy as jnp

    m = jnp.asarray(mask).astype(bool)
    r = _float(rewards)
    n = m.shape[-1]
    last = n - 1 - jnp.argmax(m[..., ::-1], axis=-1)  # index of the last True
    at_last = (jnp.arange(n) == last[..., None]) & m.any(axis=-1, keepdims=True)
    return jnp.where(at_last, r[..., None], 0).astype(r.dtype)


def gae(token_rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float = 1.0, lam: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the valid tokens of each completion.

    Masked tokens are skipped, not treated as steps: the "next" token of a
    valid token is the next *valid* one, and the value after the last valid
    token is 0 (the completion ended)::

        delta_t = r_t + gamma * V_next(t) - V_t
        A_t     = delta_t + gamma * lam * A_next(t)
        R_t     = A_t + V_t

    Args:
        token_rewards: ``[P, G, N]`` per-token rewards (e.g. from
            :func:`sequence_rewards_to_tokens`, minus a per-token KL penalty).
        values: ``[P, G, N]`` the critic's values.
        mask: ``[P, G, N]`` completion mask.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, each ``[P, G, N]`` and 0 where masked.
    """
    import jax
    import jax.numpy as jnp

    m = jnp.asarray(mask).astype(bool)
    r = jnp.where(m, _float(token_rewards), 0)
    v = jnp.where(m, _float(values), 0)
    dtype = jnp.result_type(r, v)
    r, v = r.astype(dtype), v.astype(dtype)

    def step(carry, x):
        next_value, next_adv = carry
        r_t, v_t, m_t = x
        adv = r_t + gamma * next_value - v_t + gamma * lam * next_adv
        carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, next_adv))
        return carry, jnp.where(m_t, adv, 0)

    xs = tuple(jnp.moveaxis(a, -1, 0) for a in (r, v, m))
    zeros = jnp.zeros(r.shape[:-1], dtype)
    _, adv = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
    adv = jnp.moveaxis(adv, 0, -1)
    return adv, jnp.where(m, adv + v, 0)
