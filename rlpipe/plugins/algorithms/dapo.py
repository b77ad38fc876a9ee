"""DAPO's reward shaping and batch filtering (Yu et al. 2025).

* :func:`overlong_penalty` — soft overlong punishment, added to the reward.
* :func:`dynamic_sampling_keep` — which prompt groups carry a learning signal.
* :func:`top_up` — host-side: fills a batch of ``target`` informative groups
  from successive rollout batches.

The first two take numpy arrays (and then compute in numpy, on the host) or
JAX arrays (and are then jit-able).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import numpy as np

__all__ = ["TopUp", "dynamic_sampling_keep", "overlong_penalty", "top_up"]


def array_module(*arrays: Any):
    """numpy when every argument is a host array or number, else jax.numpy."""
    if all(isinstance(a, (np.ndarray, np.generic, int, float)) for a in arrays):
        return np
    import jax.numpy as jnp

    return jnp


def overlong_penalty(lengths, *, max_len: int, buffer: int, penalty_factor: float = 1.0):
    """DAPO's soft overlong punishment for completions of ``lengths`` tokens.

    ``0`` up to ``max_len - buffer`` tokens, then falling linearly to
    ``-penalty_factor`` at ``max_len``, and ``-penalty_factor`` beyond::

        0                                        if L <= max_len - buffer
        (max_len - buffer - L) / buffer * f      if max_len - buffer < L <= max_len
        -f                                       if L > max_len

    Args:
        lengths: completion lengths (any shape), e.g. ``mask.sum(-1)``.
        max_len: the length at which the full penalty applies.
        buffer: the width of the linear ramp (DAPO's ``L_cache``); 0 means a
            hard penalty beyond ``max_len`` only.
        penalty_factor: the penalty's magnitude.

    Returns:
        The penalty, float, of the shape of ``lengths`` (numpy in, numpy out).
    """
    if buffer < 0 or buffer > max_len:
        raise ValueError(f"overlong buffer must be in [0, max_len={max_len}], got {buffer}")
    xp = array_module(lengths)
    length = xp.asarray(lengths).astype(xp.float32)
    start = max_len - buffer
    ramp = (start - length) / max(buffer, 1) * penalty_factor
    return xp.where(length <= start, 0.0, xp.where(length <= max_len, ramp, -penalty_factor)).astype(xp.float32)


def dynamic_sampling_keep(rewards, mask=None):
    """``[P]`` booleans: True for groups whose valid completions' rewards are not all equal.

    DAPO drops groups where every completion is right (or every one wrong):
    their group-normalised advantages are all 0, so they only dilute the
    batch.  With ``mask`` (``[P, G, N]``), fully masked completions are
    ignored; a group with fewer than two valid completions is dropped.
    """
    xp = array_module(rewards) if mask is None else array_module(rewards, mask)
    r = xp.asarray(rewards)
    valid = xp.ones(r.shape, bool) if mask is None else xp.asarray(mask).astype(bool).any(axis=-1)
    hi = xp.where(valid, r, -xp.inf).max(axis=-1)
    lo = xp.where(valid, r, xp.inf).min(axis=-1)
    return (valid.sum(axis=-1) >= 2) & (hi > lo)


@attrs.frozen(kw_only=True)
class TopUp:
    """What :func:`top_up` assembled.

    Attributes:
        batch: field -> array with ``target`` groups along the first axis.
        batches_drawn: rollout batches consumed.
        groups_seen: groups in those batches.
        groups_kept: informative groups among them (those beyond ``target``
            are discarded, as in DAPO).
    """

    batch: dict[str, np.ndarray]
    batches_drawn: int
    groups_seen: int
    groups_kept: int


def top_up(batches: Iterable[Mapping[str, Any]], target: int, *, max_batches: int | None = None,
           keep: Callable[..., Any] = dynamic_sampling_keep) -> TopUp:
    """Draws rollout batches until ``target`` informative groups are collected.

    Each batch is a mapping of field -> array whose first axis is the prompt
    group (``rewards`` ``[P, G]`` must be present; ``completion_mask``
    ``[P, G, N]`` is used when present).  Groups that ``keep`` rejects are
    dropped; kept groups are concatenated in order and cut at ``target``.
    Pure numpy, on the host: call it between rollout and training.

    Args:
        batches: an iterable (typically a generator that runs rollout for
            fresh prompts on each ``next``); only as many as needed are drawn.
        target: groups wanted.
        max_batches: give up after this many batches (DAPO's
            ``max_num_gen_batches``); ``None``: until ``batches`` ends.
        keep: ``keep(rewards, mask) -> [P] bool``.

    Raises:
        RuntimeError: ``batches`` ended, or ``max_batches`` were drawn, before
            ``target`` groups were kept; the message gives the counts.
    """
    if target < 1:
        raise ValueError(f"target must be at least 1, got {target}")
    parts: list[dict[str, np.ndarray]] = []
    drawn = seen = kept = 0
    for batch in batches:
        drawn += 1
        fields = {k: np.asarray(v) for k, v in batch.items()}
        rewards = fields["rewards"]
        flags = np.asarray(keep(rewards, fields.get("completion_mask")), dtype=bool)
        seen += len(flags)
        kept += int(flags.sum())
        if flags.any():
            parts.append({k: v[flags] for k, v in fields.items()})
        if kept >= target or (max_batches is not None and drawn >= max_batches):
            break
    if kept < target:
        raise RuntimeError(f"dynamic sampling kept {kept} of {seen} groups from {drawn} rollout batch(es), "
                           f"needed {target}; most groups have equal rewards (raise max_batches, or make the task easier or harder)")
    out = {k: np.concatenate([p[k] for p in parts], axis=0)[:target] for k in parts[0]}
    return TopUp(batch=out, batches_drawn=drawn, groups_seen=seen, groups_kept=kept)
