"""The built-in algorithms' defaults, one :class:`AlgorithmConfig` subclass each.

Each class types ``algorithm.options`` for its ``algorithm.name``, so
``algorithm: {name: dapo}`` gets DAPO's clip-higher and dynamic sampling
without spelling them out, and any key can still be overridden.  Calling a
class with no arguments gives the preset (:func:`preset` does it by name).
"""

from __future__ import annotations

from typing import Any

import attrs

from rlpipe.plugins.algorithms.algorithm import AlgorithmConfig, OverlongConfig

__all__ = ["DAPOConfig", "DrGRPOConfig", "GRPOConfig", "GSPOConfig", "PPOConfig", "PRESETS", "RLOOConfig",
           "ReinforcePPConfig", "preset"]

_FIELDS = attrs.fields(AlgorithmConfig)


def _default(name: str, value: Any) -> Any:
    """The base field ``name`` (its validator) with another default."""
    return attrs.field(default=value, validator=getattr(_FIELDS, name).validator)


@attrs.frozen(kw_only=True)
class GRPOConfig(AlgorithmConfig):
    """GRPO (Shao et al. 2024, DeepSeekMath): group-normalised advantages, PPO
    clip, a k3 KL loss with beta 0.04, per-sequence mean of token means."""

    advantage: str = _default("advantage", "grpo")
    kl_beta: float = _default("kl_beta", 0.04)
    kl_kind: str = _default("kl_kind", "k3")
    aggregation: str = _default("aggregation", "seq-mean-token-mean")


@attrs.frozen(kw_only=True)
class DrGRPOConfig(AlgorithmConfig):
    """Dr. GRPO (Liu et al. 2025): no std normalisation, no length
    normalisation (token sums over the constant N), no KL."""

    advantage: str = _default("advantage", "drgrpo")
    aggregation: str = _default("aggregation", "seq-mean-token-sum-norm")


@attrs.frozen(kw_only=True)
class DAPOConfig(AlgorithmConfig):
    """DAPO (Yu et al. 2025): clip-higher (0.2 / 0.28), token-level mean, no KL,
    soft overlong punishment, dynamic sampling."""

    advantage: str = _default("advantage", "grpo")
    eps_high: float = _default("eps_high", 0.28)
    aggregation: str = _default("aggregation", "token-mean")
    overlong: OverlongConfig | None = attrs.field(factory=OverlongConfig)
    dynamic_sampling: bool = True


@attrs.frozen(kw_only=True)
class RLOOConfig(AlgorithmConfig):
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline, PPO clip, no KL."""

    advantage: str = _default("advantage", "rloo")


@attrs.frozen(kw_only=True)
class ReinforcePPConfig(AlgorithmConfig):
    """REINFORCE++-baseline (Hu et al. 2025): group-mean baseline, batch std
    normalisation, PPO clip, a k2 KL loss with beta 0.01 (OpenRLHF's recipe)."""

    advantage: str = _default("advantage", "reinforce-pp")
    kl_beta: float = _default("kl_beta", 0.01)
    kl_kind: str = _default("kl_kind", "k2")


@attrs.frozen(kw_only=True)
class PPOConfig(AlgorithmConfig):
    """PPO with a critic: GAE (gamma 1.0, lambda 0.95), PPO clip, no KL."""

    advantage: str = _default("advantage", "gae")
    lam: float = _default("lam", 0.95)


@attrs.frozen(kw_only=True)
class GSPOConfig(AlgorithmConfig):
    """GSPO (Zheng et al. 2025): sequence-level ratio with the paper's clip range
    (3e-4 / 4e-4), group-normalised advantages, sequence mean, no KL."""

    advantage: str = _default("advantage", "grpo")
    loss: str = _default("loss", "gspo")
    eps_low: float = _default("eps_low", 3e-4)
    eps_high: float = _default("eps_high", 4e-4)
    aggregation: str = _default("aggregation", "seq-mean-token-mean")


#: ``algorithm.name`` -> the class typing its ``algorithm.options``.
PRESETS: dict[str, type[AlgorithmConfig]] = {
    "grpo": GRPOConfig,
    "drgrpo": DrGRPOConfig,
    "dapo": DAPOConfig,
    "rloo": RLOOConfig,
    "reinforce-pp": ReinforcePPConfig,
    "ppo": PPOConfig,
    "gspo": GSPOConfig,
}


def preset(name: str) -> AlgorithmConfig:
    """The built-in algorithm ``name``'s default options."""
    return PRESETS[name]()
