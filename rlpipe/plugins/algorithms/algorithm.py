"""An RL algorithm put together from its parts: an advantage estimator, a policy
loss, a KL penalty, an aggregation, and optional off-policy correction,
reward shaping and batch filtering.

:class:`AlgorithmConfig` types ``algorithm.options``; each built-in algorithm
has a subclass with its own defaults (:mod:`rlpipe.plugins.algorithms.presets`).
:class:`Algorithm` is what the trainer uses::

    algo = Algorithm(GRPOConfig(), estimators=..., losses=...)
    adv = algo.advantages(rewards, completion_mask)            # [P, G, N]
    loss, metrics = algo.loss(logp, {"completion_mask": mask, "old_logprobs": old,
                                     "advantages": adv, "ref_logprobs": ref})

The loss is a chain of terms (:mod:`rlpipe.plugins.algorithms.terms`) built
from the config; ``Algorithm(config, terms=lambda t: {**t, "mine": my_term})``
adds a term.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs

from rlpipe.core.config import ConfigValueError, check
from rlpipe.core.errors import ConfigError, Problem, choices_text, suggest
from rlpipe.plugins.algorithms import advantages as adv_lib
from rlpipe.plugins.algorithms import dapo, losses
from rlpipe.plugins.algorithms import terms as loss_terms
from rlpipe.plugins.algorithms.terms import LossInputs, LossTerm

if TYPE_CHECKING:
    import jax

# jax is imported inside the methods, so that building an Algorithm (the
# plugin's specs do, for its roles) does not load it.

__all__ = ["Algorithm", "AlgorithmConfig", "Estimate", "OverlongConfig", "BUILTIN_ESTIMATORS", "BUILTIN_LOSSES"]

#: Built-in advantage estimators by name (the plugin registers the same table).
BUILTIN_ESTIMATORS: dict[str, Callable[..., Any]] = {
    "grpo": adv_lib.grpo,
    "drgrpo": adv_lib.drgrpo,
    "rloo": adv_lib.rloo,
    "reinforce-pp": adv_lib.reinforce_pp,
    "gae": adv_lib.gae,
}

#: Built-in policy losses by name.
BUILTIN_LOSSES: dict[str, Callable[..., Any]] = {
    "ppo": losses.ppo_clip,
    "gspo": losses.gspo,
}

#: The keyword arguments an advantage estimator may name.
ESTIMATOR_ARGUMENTS = ("rewards", "token_rewards", "mask", "values", "gamma", "lam")


@attrs.frozen(kw_only=True)
class OverlongConfig:
    """``algorithm.options.overlong``: DAPO's soft overlong punishment.

    Attributes:
        max_len: length of full penalty; ``null``: the completion buffer
            length ``N`` (the rollout's maximum new tokens).
        buffer: width of the linear ramp before ``max_len``; ``null``: a fifth
            of ``max_len`` (DAPO: 4096 of 20480).
        penalty_factor: the penalty at and beyond ``max_len`` (negated).
    """

    max_len: int | None = attrs.field(default=None, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    buffer: int | None = attrs.field(default=None, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))
    penalty_factor: float = attrs.field(default=1.0, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))

    def __attrs_post_init__(self) -> None:
        if self.max_len is not None and self.buffer is not None and self.buffer > self.max_len:
            raise ConfigValueError(f"must not exceed max_len ({self.max_len}), got {self.buffer}", ("buffer",))

    def resolve(self, n: int) -> tuple[int, int]:
        """``(max_len, buffer)`` for completions padded to ``n`` tokens."""
        max_len = self.max_len if self.max_len is not None else n
        buffer = self.buffer if self.buffer is not None else max_len // 5
        return max_len, min(buffer, max_len)


def _name(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


@attrs.frozen(kw_only=True)
class AlgorithmConfig:
    """``algorithm.options``: the parts of an RL algorithm and their settings.

    Each built-in ``algorithm.name`` types its options with a subclass that
    changes the defaults (see ``docs/algorithms.md``); these are the generic
    defaults.

    Attributes:
        advantage: advantage estimator name (``grpo``, ``drgrpo``, ``rloo``,
            ``reinforce-pp``, ``gae`` or a plugin's).
        loss: policy loss name (``ppo``, ``gspo`` or a plugin's).
        eps_low: lower clip range: ratios below ``1 - eps_low`` are clipped.
        eps_high: upper clip range: ratios above ``1 + eps_high`` are clipped.
        dual_clip: cap the loss of negative-advantage tokens at
            ``dual_clip * |A|`` (> 1; ``null``: off).  ``ppo`` loss only.
        kl_beta: weight of the KL penalty to the reference policy; > 0 needs
            the ``reference`` role.
        kl_kind: KL estimator: ``k1``, ``k2`` or ``k3``.
        kl_in_reward: subtract ``kl_beta * KL`` from the reward before the
            advantages instead of adding it to the loss.
        entropy_coef: weight of an entropy bonus: the loss minus
            ``entropy_coef`` times the policy's per-token entropy (aggregated
            like the loss), which keeps a policy from collapsing onto one
            output before it has found the reward (0: off).
        aggregation: how per-token losses become one number:
            ``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum``,
            ``seq-mean-token-sum-norm``.
        tis_cap: truncated importance sampling cap for the rollout/trainer
            mismatch (``null``: no correction).
        gamma: discount (GAE).
        lam: GAE lambda.
        overlong: DAPO soft overlong punishment (``null``: off).
        dynamic_sampling: drop prompt groups whose rewards are all equal.
    """

    advantage: str = attrs.field(default="grpo", validator=check(_name, "must be an advantage estimator name, got {value}"))
    loss: str = attrs.field(default="ppo", validator=check(_name, "must be a policy loss name, got {value}"))
    eps_low: float = attrs.field(default=0.2, validator=check(lambda v: 0 < v < 1, "must be in (0, 1), got {value}"))
    eps_high: float = attrs.field(default=0.2, validator=check(lambda v: v > 0, "must be positive, got {value}"))
    dual_clip: float | None = attrs.field(default=None, validator=check(lambda v: v > 1, "must be greater than 1 (or null), got {value}"))
    kl_beta: float = attrs.field(default=0.0, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))
    kl_kind: str = attrs.field(default="k3", validator=check(lambda v: v in losses.KL_KINDS, "must be one of k1, k2, k3, got {value}"))
    kl_in_reward: bool = False
    entropy_coef: float = attrs.field(default=0.0, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))
    aggregation: str = attrs.field(default="token-mean", validator=check(
        lambda v: v in losses.AGGREGATIONS, "must be one of " + ", ".join(losses.AGGREGATIONS) + ", got {value}"))
    tis_cap: float | None = attrs.field(default=None, validator=check(lambda v: v > 0, "must be positive (or null), got {value}"))
    gamma: float = attrs.field(default=1.0, validator=check(lambda v: 0 <= v <= 1, "must be in [0, 1], got {value}"))
    lam: float = attrs.field(default=1.0, validator=check(lambda v: 0 <= v <= 1, "must be in [0, 1], got {value}"))
    overlong: OverlongConfig | None = None
    dynamic_sampling: bool = False

    def __attrs_post_init__(self) -> None:
        if self.dual_clip is not None and self.loss == "gspo":
            raise ConfigValueError("the gspo loss has no dual clip; set it to null", ("dual_clip",))


class Estimate(NamedTuple):
    """Advantages ``[P, G, N]``, and returns ``[P, G, N]`` when the estimator
    gives them (GAE; the critic's targets), else ``None``."""

    advantages: jax.Array
    returns: jax.Array | None


def _accepted(fn: Callable[..., Any], offered: tuple[str, ...]) -> tuple[str, ...] | None:
    """The offered keyword names ``fn`` takes; ``None`` when it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return tuple(n for n in offered if n in names)


def _requires_values(fn: Callable[..., Any]) -> bool:
    try:
        p = inspect.signature(fn).parameters.get("values")
    except (TypeError, ValueError):
        return False
    return p is not None and p.default is p.empty


def _lookup(table: Mapping[str, Callable[..., Any]], name: str, kind: str, path: str) -> Callable[..., Any]:
    fn = table.get(name)
    if fn is None:
        raise ConfigError(Problem(path, f"unknown {kind} {name!r}{suggest(name, table)} (available: {choices_text(table)})"))
    return fn


class Algorithm:
    """An RL algorithm built from an :class:`AlgorithmConfig`.

    Its methods are pure JAX functions of their arguments (the config is
    fixed at construction), so the trainer can ``jax.jit`` or
    ``jax.grad`` through them.

    Args:
        config: the options (``None``: :class:`AlgorithmConfig`'s defaults).
        estimators: advantage estimators by name (the trainer passes the
            registry's ``rlpipe_advantage_estimators``, so plugins' ones work);
            ``None``: the built-ins.
        losses: policy losses by name; ``None``: the built-ins.
        name: the algorithm's name, for messages.
        terms: edits the loss terms: called once with :meth:`default_terms`
            (a dict, name to term) and returns the terms to chain, by name, in
            order — e.g. ``lambda t: {**t, "my_term": my_term}`` adds one,
            ``lambda t: {**t, "policy_gradient": my_pg}`` swaps one;
            ``None``: the default terms.

    Attributes:
        terms: the loss terms by name (after ``terms``).
        loss_terms: ``chain(*terms.values())``, the loss :meth:`loss` applies.

    Raises:
        ConfigError: an unknown estimator or loss name (path
            ``algorithm.options.advantage`` / ``.loss``), or ``dual_clip`` set
            for a loss that does not take it.
        TypeError: ``terms`` returned something other than a mapping of
            names to callables.
    """

    def __init__(self, config: AlgorithmConfig | None = None, *, estimators: Mapping[str, Callable[..., Any]] | None = None,
                 losses: Mapping[str, Callable[..., Any]] | None = None, name: str = "custom",
                 terms: Callable[[dict[str, LossTerm]], Mapping[str, LossTerm]] | None = None):
        self.config = config if config is not None else AlgorithmConfig()
        self.name = name
        cfg = self.config
        self.estimator = _lookup(BUILTIN_ESTIMATORS if estimators is None else estimators, cfg.advantage,
                                 "advantage estimator", "algorithm.options.advantage")
        self.policy_loss = _lookup(BUILTIN_LOSSES if losses is None else losses, cfg.loss, "policy loss", "algorithm.options.loss")
        self._estimator_args = _accepted(self.estimator, ESTIMATOR_ARGUMENTS)
        self._needs_values = _requires_values(self.estimator)
        loss_args = _accepted(self.policy_loss, ("dual_clip",))
        if cfg.dual_clip is not None and loss_args == ():
            raise ConfigError(Problem("algorithm.options.dual_clip", f"the {cfg.loss!r} loss takes no dual_clip; set it to null"))
        chosen = self.default_terms() if terms is None else terms(self.default_terms())
        if not isinstance(chosen, Mapping) or not all(isinstance(k, str) and callable(v) for k, v in chosen.items()):
            raise TypeError(f"terms must return a mapping of names to loss terms (e.g. {{**default, 'mine': term}}), got {chosen!r}")
        self.terms: dict[str, LossTerm] = dict(chosen)
        self.loss_terms = loss_terms.chain(*self.terms.values())

    def __repr__(self) -> str:
        return f"Algorithm(name={self.name!r}, config={self.config!r})"

    # -- what the graph needs ---------------------------------------------------------

    @property
    def needs_reference(self) -> bool:
        """Whether the ``reference`` role must produce ``ref_logprobs``."""
        return self.config.kl_beta > 0

    @property
    def needs_critic(self) -> bool:
        """Whether the ``critic`` role must produce ``values``: the estimator
        has a ``values`` parameter without a default (``gae`` does)."""
        return self._needs_values

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles this configuration needs in the graph."""
        return ("rollout", "reward", *(("reference",) if self.needs_reference else ()),
                *(("critic",) if self.needs_critic else ()), "trainer")

    # -- before training: filtering, shaping, advantages ----------------------------------

    def keep_groups(self, rewards, mask=None):
        """``[P]`` booleans: the groups to train on (all, unless ``dynamic_sampling``).

        Call it on the *raw* task rewards; numpy in, numpy out.
        """
        if self.config.dynamic_sampling:
            return dapo.dynamic_sampling_keep(rewards, mask)
        xp = dapo.array_module(rewards)
        return xp.ones(xp.asarray(rewards).shape[0], bool)

    def shaped_rewards(self, rewards: jax.Array, mask: jax.Array, *, logprobs: jax.Array | None = None,
                       ref_logprobs: jax.Array | None = None) -> jax.Array:
        """Sequence rewards ``[P, G]`` plus the overlong penalty (when configured)
        and, with ``kl_in_reward``, minus ``kl_beta`` times the completion's summed KL."""
        import jax.numpy as jnp

        m = jnp.asarray(mask).astype(bool)
        r = self._with_overlong(rewards, m)
        if self._kl_in_reward:
            r = r - self.config.kl_beta * self._token_kl(logprobs, ref_logprobs, m).sum(axis=-1)
        return r

    def _with_overlong(self, rewards, m):
        import jax.numpy as jnp

        r = jnp.asarray(rewards).astype(jnp.float32)
        over = self.config.overlong
        if over is not None:
            max_len, buffer = over.resolve(m.shape[-1])
            r = r + dapo.overlong_penalty(m.sum(axis=-1), max_len=max_len, buffer=buffer, penalty_factor=over.penalty_factor)
        return r

    @property
    def _kl_in_reward(self) -> bool:
        return self.config.kl_in_reward and self.config.kl_beta > 0

    def _token_kl(self, logprobs, ref_logprobs, mask):
        import jax

        if logprobs is None or ref_logprobs is None:
            raise ValueError("kl_in_reward needs logprobs (the rollout's) and ref_logprobs (the reference role's) to compute advantages")
        return jax.lax.stop_gradient(losses.kl(logprobs, ref_logprobs, self.config.kl_kind, mask))

    def estimate(self, rewards: jax.Array, mask: jax.Array, values: jax.Array | None = None, *,
                 logprobs: jax.Array | None = None, ref_logprobs: jax.Array | None = None) -> Estimate:
        """Advantages (and returns, for GAE) from sequence rewards.

        The estimator receives, by keyword, the arguments it names among
        ``rewards`` (``[P, G]``, shaped: overlong penalty, and summed KL with
        ``kl_in_reward``), ``token_rewards`` (``[P, G, N]``: the shaped reward
        on the last valid token, minus each token's own KL with
        ``kl_in_reward``), ``mask``, ``values``, ``gamma`` and ``lam``.  It
        returns ``[P, G, N]`` advantages, ``[P, G]`` (one per completion,
        spread over its valid tokens here), or ``(advantages, returns)``.

        Args:
            rewards: ``[P, G]`` raw task rewards.
            mask: ``[P, G, N]`` completion mask.
            values: ``[P, G, N]`` critic values (estimators that need them).
            logprobs: ``[P, G, N]`` rollout log-probs, for ``kl_in_reward``.
            ref_logprobs: ``[P, G, N]`` reference log-probs, for ``kl_in_reward``.
        """
        import jax
        import jax.numpy as jnp

        cfg = self.config
        m = jnp.asarray(mask).astype(bool)
        wanted = ESTIMATOR_ARGUMENTS if self._estimator_args is None else self._estimator_args
        if values is None and self.needs_critic:
            raise ValueError(f"advantage estimator {cfg.advantage!r} needs values (the critic role's)")
        base = self._with_overlong(rewards, m)
        token_kl = self._token_kl(logprobs, ref_logprobs, m) if self._kl_in_reward else None
        offered: dict[str, Any] = {"mask": m, "values": values, "gamma": cfg.gamma, "lam": cfg.lam}
        if "rewards" in wanted:
            offered["rewards"] = base if token_kl is None else base - cfg.kl_beta * token_kl.sum(axis=-1)
        if "token_rewards" in wanted:
            tok = adv_lib.sequence_rewards_to_tokens(base, m)
            offered["token_rewards"] = tok if token_kl is None else tok - cfg.kl_beta * token_kl
        out = self.estimator(**{k: offered[k] for k in wanted})
        adv, ret = out if isinstance(out, tuple) else (out, None)
        adv = jnp.asarray(adv)
        if adv.ndim == m.ndim - 1:  # one advantage per completion: onto its valid tokens
            adv = jnp.where(m, adv[..., None], 0.0)
        return Estimate(jax.lax.stop_gradient(adv), None if ret is None else jax.lax.stop_gradient(ret))

    def advantages(self, rewards: jax.Array, mask: jax.Array, values: jax.Array | None = None, **kwargs: Any) -> jax.Array:
        """``[P, G, N]`` advantages; see :meth:`estimate` for the arguments."""
        return self.estimate(rewards, mask, values, **kwargs).advantages

    # -- the loss -----------------------------------------------------------------------

    def default_terms(self) -> dict[str, LossTerm]:
        """The loss terms this config asks for, by name, in the order they are summed:

        * ``policy_gradient`` — :func:`~.terms.policy_gradient` with the
          configured policy loss, clip range, dual clip, ``tis_cap`` and
          aggregation;
        * ``kl_penalty`` — :func:`~.terms.kl_penalty` (always present: it
          reports ``kl`` whenever the batch has ``ref_logprobs``, and adds
          ``kl_beta * KL`` unless ``kl_in_reward``);
        * ``entropy_bonus`` — :func:`~.terms.entropy_bonus`, when
          ``entropy_coef > 0``.

        A subclass may override this; the ``terms`` argument edits its result.
        """
        cfg = self.config
        out: dict[str, LossTerm] = {
            "policy_gradient": loss_terms.policy_gradient(self.policy_loss, aggregation=cfg.aggregation, eps_low=cfg.eps_low,
                                                          eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, tis_cap=cfg.tis_cap),
            "kl_penalty": loss_terms.kl_penalty(cfg.kl_beta, kind=cfg.kl_kind, aggregation=cfg.aggregation,
                                                in_reward=cfg.kl_in_reward),
        }
        if cfg.entropy_coef > 0:
            out["entropy_bonus"] = loss_terms.entropy_bonus(cfg.entropy_coef, aggregation=cfg.aggregation)
        return out

    def loss(self, logp: jax.Array, batch: Mapping[str, jax.Array], *,
             entropy: jax.Array | None = None,
             normalisers: losses.Normalisers | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The scalar training loss and its scalar metrics: :attr:`loss_terms`
        applied to ``LossInputs.create(logp, batch, entropy=entropy, normalisers=normalisers)``.

        Args:
            logp: ``[P, G, N]`` the current policy's log-probs of the completion
                tokens (differentiate with respect to these).
            batch: ``completion_mask``, ``old_logprobs`` (what the ratio is
                taken against: the rollout's log-probs, or the trainer's
                recomputation of them — with one update per global batch,
                ``stop_gradient(logp)`` itself, see
                :mod:`rlpipe.roles.trainer_stage`), ``advantages``; ``ref_logprobs`` when
                ``kl_beta > 0`` (and reported as ``kl`` whenever present);
                ``rollout_logprobs`` when ``tis_cap`` is set; whatever a
                plugin's term reads.
            entropy: ``[P, G, N]`` the current policy's entropy at each
                completion token (differentiable); needed when
                ``entropy_coef > 0``.  The trainer always passes it.
            normalisers: when ``batch`` is one micro-batch of a mini-batch,
                the mini-batch's counts (:func:`.losses.normalisers` of its
                completion mask, and this micro-batch's share of its rows):
                the aggregations divide by them, so the losses — and the
                additive metrics — of the micro-batches sum to the
                mini-batch's.  ``None``: ``batch`` is the whole batch.

        Returns:
            ``(loss, metrics)``: with the default terms ``loss = pg_loss +
            kl_beta * kl - entropy_coef * entropy`` (the KL term only when it
            is not in the reward); metrics ``loss``, ``pg_loss``, ``kl``,
            ``entropy_bonus`` (the aggregated entropy, without
            ``entropy_coef``), ``clip_frac_low``, ``clip_frac_high``,
            ``dual_clip_frac``, ``ratio_mean``, ``ratio_max``,
            ``tis_weight_mean``, ``tis_clip_frac`` (each when it applies;
            fractions and means over valid tokens), plus the metrics of any
            added term.
        """
        return self.loss_terms(LossInputs.create(logp, batch, entropy=entropy, normalisers=normalisers))
