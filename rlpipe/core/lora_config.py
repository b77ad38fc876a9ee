"""``model.lora``: the LoRA adapters' configuration (rank, alpha, targets).

It lives in the core layer, without a jax dependency, so that the run config
(:class:`rlpipe.runtime.run_config.ModelConfig`) and the models layer
(:mod:`rlpipe.models.lora`, which re-exports it) share one class.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import attrs

from rlpipe.core.config import ConfigValueError, check, show_value
from rlpipe.core.errors import suggest

__all__ = ["ATTENTION_TARGETS", "MLP_TARGETS", "TARGETS", "LoRAConfig"]

ATTENTION_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
#: Every projection that can carry an adapter, in a canonical order.
TARGETS: tuple[str, ...] = ATTENTION_TARGETS + MLP_TARGETS


def _targets(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    names = tuple(value)
    # Canonical order, so that two configs naming the same projections compare equal.
    return tuple(sorted(names, key=lambda n: TARGETS.index(n) if n in TARGETS else len(TARGETS)))


def _check_targets(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if not value:
        raise ConfigValueError(f"no projections named; choose among {', '.join(TARGETS)}", (attribute.name,))
    for n in value:
        if n not in TARGETS:
            raise ConfigValueError(f"unknown projection {show_value(n)}{suggest(n, TARGETS)}; choose among "
                                   f"{', '.join(TARGETS)}", (attribute.name,))
    dup = sorted({n for n in value if value.count(n) > 1})
    if dup:
        raise ConfigValueError(f"projection(s) named twice: {', '.join(dup)}", (attribute.name,))


def _is_int(v: Any) -> bool:
    # numpy's integers register as numbers.Integral: no numpy import needed.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@attrs.frozen(kw_only=True)
class LoRAConfig:
    """``model.lora``: low-rank adapters on the decoder's projections.

    Attributes:
        rank: ``r``, the inner dimension of each adapter (``A`` ``[in, r]``,
            ``B`` ``[r, out]``); at least 1.
        alpha: the adapter's output is scaled by ``alpha / rank`` (PEFT's
            ``lora_alpha``).  With ``B`` starting at zero, that scaling keeps
            the good learning rate roughly independent of ``rank``, so a
            fixed ``alpha`` (the default, 32) lets a rank sweep keep one
            learning rate.
        targets: the projections that get adapters, among ``q_proj k_proj
            v_proj o_proj`` (attention) and ``gate_proj up_proj down_proj``
            (MLP), in every layer.  Default: all seven.  Adapting the MLP
            too is what lets LoRA match full fine-tuning (QLoRA, Dettmers et
            al. 2023; "LoRA Without Regret", Schulman et al. 2025);
            attention-only LoRA trains fewer parameters but learns less,
            and the MLP adapters cost little (a rank-``r`` pair has ``r (in
            + out)`` parameters).
        dropout: must be 0.  LoRA dropout would make the trainer's forward a
            random perturbation of the policy that sampled the rollouts,
            so on-policy importance ratios would not be 1; RL recipes run
            LoRA without it.
    """

    rank: int = attrs.field(validator=check(lambda v: _is_int(v) and v >= 1, "must be an integer >= 1, got {value}"))
    alpha: float = attrs.field(default=32.0, converter=lambda v: float(v) if _is_int(v) else v,
                               validator=check(lambda v: isinstance(v, float) and math.isfinite(v) and v > 0,
                                               "must be a positive number, got {value}"))
    targets: tuple[str, ...] = attrs.field(default=TARGETS, converter=_targets, validator=_check_targets)
    dropout: float = attrs.field(default=0.0, validator=check(
        lambda v: v == 0, "LoRA dropout is not supported (got {value}): in RL the trainer must score the very policy "
                          "that sampled, and dropout would perturb it at random; use 0"))

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on ``(x A) B``."""
        return self.alpha / self.rank
