"""Serialises multi-device programs on devices that several roles share.

Two jitted programs with collectives (all-gathers of FSDP parameters, say)
running at the same time on the same devices, launched from two stage
threads, can deadlock: each device may start them in a different order, or
(XLA:CPU) the participants of both fill the execution threads and wait for
each other forever.  Colocated roles therefore run their device programs one
at a time per device: a stage wraps each stretch of device work (dispatch up
to the host fetch of its results) in :func:`on_devices`.  Host work (reward
functions, batching, tokenising) still overlaps, and roles on disjoint
devices are not affected at all.

Locks are re-entrant and taken in device-id order, so nesting (the trainer
publishing weights to a rollout on the same devices) cannot deadlock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Any

_LOCKS: dict[tuple[str, int], threading.RLock] = {}
_REGISTRY = threading.Lock()
_ORDER: Any = None  # rlpipe.runtime.distributed.RegionOrder in a multi-process run


def set_region_order(order: Any) -> None:
    """Installs the order in which regions over several processes' devices are
    entered (``order.region(devices, acquire)``); ``None`` removes it."""
    global _ORDER
    _ORDER = order


def _lock(device: Any) -> threading.RLock:
    key = (getattr(device, "platform", "?"), int(getattr(device, "id", device)))
    with _REGISTRY:
        if key not in _LOCKS:
            _LOCKS[key] = threading.RLock()
        return _LOCKS[key]


def _devices(where: Any) -> list[Any]:
    if hasattr(where, "devices") and hasattr(where, "axis_names"):  # a Mesh
        return list(where.devices.flat)
    return list(where)


@contextlib.contextmanager
def on_devices(where: Any, context: Any = None) -> Iterator[None]:
    """Holds the execution lock of every device of ``where`` (a mesh or an
    iterable of devices) for the block.

    With a stage's ``context``, time spent waiting for the locks is recorded
    as a ``device_wait`` span on the role's track (not busy time in reports).

    Example:
        >>> with on_devices(mesh):                       # doctest: +SKIP
        ...     out = jax.device_get(step(params, batch))
    """
    devices = sorted(_devices(where), key=lambda d: (getattr(d, "platform", "?"), int(getattr(d, "id", d))))
    if len(devices) <= 1:
        yield  # a single-device program has no collective to deadlock on
        return
    with contextlib.ExitStack() as stack:
        def acquire() -> None:
            for d in devices:
                stack.enter_context(_lock(d))

        trace = getattr(context, "trace", None)
        start = trace.now_us() if trace is not None else 0.0
        if _ORDER is not None and not held_devices(devices):
            # A multi-process run: devices of several processes are entered in
            # one order on every process (rlpipe.runtime.distributed.RegionOrder).
            stack.enter_context(_ORDER.region(devices, acquire))
        else:
            acquire()
        if trace is not None and trace.now_us() - start > 100.0:  # ignore uncontended acquisitions
            trace.complete(context.role, "device_wait", start, trace.now_us(), step=context.step, index=context.index)
        yield


def held_devices(devices: Iterable[Any]) -> bool:
    """Whether this thread holds the lock of every device (for assertions)."""
    return all(_lock(d)._is_owned() for d in devices)  # noqa: SLF001 - RLock exposes no public check
