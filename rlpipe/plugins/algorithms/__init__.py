"""rlpipe's built-in RL algorithms, advantage estimators and policy losses,
registered through the ``rlpipe`` entry point ``algorithms`` exactly as a
third-party package registers its own.

* :mod:`.advantages` — ``grpo``, ``drgrpo``, ``rloo``, ``reinforce_pp``, ``gae``.
* :mod:`.losses` — ``ppo_clip``, ``gspo``, ``kl``, ``aggregate``,
  ``truncated_importance_weights``.
* :mod:`.dapo` — overlong penalty, dynamic sampling, ``top_up``.
* :mod:`.terms` — the loss as a chain of terms: ``LossInputs``, ``LossTerm``,
  ``policy_gradient``, ``kl_penalty``, ``entropy_bonus``, ``chain``.
* :mod:`.algorithm` — :class:`AlgorithmConfig` and :class:`Algorithm`.
* :mod:`.presets` — each built-in algorithm's defaults.

Equations and options: ``docs/algorithms.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rlpipe.core.hookspecs import hookimpl
from rlpipe.core.specs import AdvantageEstimatorSpec, AlgorithmSpec, PolicyLossSpec
from rlpipe.plugins.algorithms import advantages, losses
from rlpipe.plugins.algorithms.algorithm import (
    Algorithm,
    AlgorithmConfig,
    Estimate,
    OverlongConfig,
)
from rlpipe.plugins.algorithms.presets import PRESETS, preset
from rlpipe.plugins.algorithms.terms import (
    LossInputs,
    LossTerm,
    chain,
    entropy_bonus,
    kl_penalty,
    policy_gradient,
)

__all__ = [
    "PRESETS",
    "Algorithm",
    "AlgorithmConfig",
    "Estimate",
    "LossInputs",
    "LossTerm",
    "OverlongConfig",
    "chain",
    "entropy_bonus",
    "kl_penalty",
    "make_factory",
    "policy_gradient",
    "preset",
]

_DESCRIPTIONS = {
    "grpo": "GRPO: group-normalised advantages, PPO clip, k3 KL loss (beta 0.04)",
    "drgrpo": "Dr. GRPO: group-mean baseline without std or length normalisation",
    "dapo": "DAPO: clip-higher, token-level loss, overlong penalty, dynamic sampling",
    "rloo": "RLOO: leave-one-out baseline, PPO clip",
    "reinforce-pp": "REINFORCE++-baseline: group-mean baseline, batch std normalisation, k2 KL loss",
    "ppo": "PPO: GAE advantages from a critic, PPO clip",
    "gspo": "GSPO: sequence-level importance ratio and clipping",
}


def make_factory(name: str, config_type: type[AlgorithmConfig] | None = None, *,
                 terms: Callable[[dict[str, LossTerm]], Mapping[str, LossTerm]] | None = None) -> Callable[..., Algorithm]:
    """``factory(options=None, *, estimators=None, losses=None) -> Algorithm``: an
    :class:`AlgorithmSpec` factory for the algorithm ``name``.

    Args:
        name: the algorithm's name.
        config_type: the :class:`AlgorithmConfig` subclass holding its defaults;
            ``None``: the built-in preset of ``name``.  ``options=None`` builds
            with ``config_type()``.
        terms: edits the algorithm's loss terms (``Algorithm``'s ``terms``
            argument), e.g. ``lambda t: {**t, "mine": my_term}``.
    """
    preset_type = PRESETS[name] if config_type is None else config_type

    def factory(options: AlgorithmConfig | None = None, *, estimators: Mapping[str, Callable[..., Any]] | None = None,
                losses: Mapping[str, Callable[..., Any]] | None = None) -> Algorithm:
        return Algorithm(options if options is not None else preset_type(), estimators=estimators, losses=losses, name=name,
                         terms=terms)

    factory.__name__ = f"make_{name.replace('-', '_')}"
    factory.__doc__ = f"Builds the {name!r} algorithm from its options (``None``: the preset)."
    return factory


@hookimpl
def rlpipe_algorithms():
    out = []
    for name, cls in PRESETS.items():
        roles = Algorithm(cls()).roles
        out.append(AlgorithmSpec(name=name, description=_DESCRIPTIONS[name], factory=make_factory(name), roles=roles, config_type=cls))
    return out


@hookimpl
def rlpipe_advantage_estimators():
    return [
        AdvantageEstimatorSpec(name="grpo", description="(r - group mean) / (group sample std + eps)", fn=advantages.grpo),
        AdvantageEstimatorSpec(name="drgrpo", description="r - group mean", fn=advantages.drgrpo),
        AdvantageEstimatorSpec(name="rloo", description="r - mean of the other completions of the group", fn=advantages.rloo),
        AdvantageEstimatorSpec(name="reinforce-pp", description="r - group mean, over the batch token std", fn=advantages.reinforce_pp),
        AdvantageEstimatorSpec(name="gae", description="generalised advantage estimation from critic values", fn=advantages.gae),
    ]


@hookimpl
def rlpipe_policy_losses():
    return [
        PolicyLossSpec(name="ppo", description="PPO clipped surrogate (asymmetric clip, optional dual clip)", fn=losses.ppo_clip),
        PolicyLossSpec(name="gspo", description="GSPO: sequence-level ratio, GSPO-token gradient", fn=losses.gspo),
    ]
