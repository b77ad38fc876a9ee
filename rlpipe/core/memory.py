"""Per-device memory estimates of roles, and device capacity.

A role plugin may give its :class:`rlpipe.core.specs.RoleSpec` a
``memory_estimate(role_config, run_config, mesh) -> MemoryEstimate | None``;
planning calls it for the mesh each role is placed on, fills
``RolePlacement.memory_estimate_bytes`` with the total, and compares the
roles that share a device with that device's capacity.  The ``auto`` policy
uses the same numbers to choose between colocated, disaggregated and
colocated+offload.

This module knows records and arithmetic only; how much a decoder needs is
:mod:`rlpipe.models.memory`'s business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from rlpipe.core.placement import DeviceInfo, MeshSpec, RolePlacement

GIB = 1 << 30


def _nonnegative_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"MemoryEstimate.{attribute.name} must be a non-negative int of bytes, got {value!r}")


@attrs.frozen(kw_only=True)
class MemoryEstimate:
    """A role's estimated memory on *each* of its devices, in bytes, by kind.

    Attributes:
        parameters: the model's parameters (this device's shards).
        optimizer_state: optimizer moments (AdamW: two per parameter).
        gradients: one set of gradients, in the parameter dtype.
        kv_cache: the generation KV cache.
        activations: what one forward (and backward) pass keeps alive.
    """

    parameters: int = attrs.field(default=0, validator=_nonnegative_int)
    optimizer_state: int = attrs.field(default=0, validator=_nonnegative_int)
    gradients: int = attrs.field(default=0, validator=_nonnegative_int)
    kv_cache: int = attrs.field(default=0, validator=_nonnegative_int)
    activations: int = attrs.field(default=0, validator=_nonnegative_int)

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer_state + self.gradients + self.kv_cache + self.activations


def format_bytes(n: int | None) -> str:
    """``3.1 GiB``; ``-`` for unknown."""
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(n)


def describe_devices(ids: Sequence[int]) -> str:
    """``devices 0-7``, ``device 3``, ``devices 0,2,5``."""
    ids = list(ids)
    if len(ids) == 1:
        return f"device {ids[0]}"
    if len(ids) > 2 and ids == list(range(ids[0], ids[0] + len(ids))):
        return f"devices {ids[0]}-{ids[-1]}"
    return f"devices {','.join(map(str, ids))}"


# -- capacity and what shares it ----------------------------------------------------------


@attrs.frozen(kw_only=True)
class DeviceCapacity:
    """How much memory each device has, and where that number comes from.

    ``bytes`` is ``None`` when nothing says (JAX's CPU backend reports no
    limit, and hypothetical devices have none); ``source`` then says why.
    """

    bytes: int | None = None
    source: str = "unknown"

    def describe(self) -> str:
        if self.bytes is None:
            return f"unknown ({self.source}; set placement.device_memory_gib)"
        return f"{format_bytes(self.bytes)} per device ({self.source})"


def device_capacity(devices: Sequence[DeviceInfo], configured_gib: float | None = None) -> DeviceCapacity:
    """``placement.device_memory_gib`` if set, else the smallest ``bytes_limit``
    the devices report, else unknown."""
    if configured_gib is not None:
        return DeviceCapacity(bytes=int(configured_gib * GIB), source="placement.device_memory_gib")
    reported = [d.memory_bytes for d in devices if d.memory_bytes]
    if reported:
        platform = devices[0].platform
        return DeviceCapacity(bytes=int(min(reported)), source=f"{platform} bytes_limit reported by JAX")
    platforms = sorted({d.platform for d in devices}) or ["no"]
    return DeviceCapacity(source=f"{'/'.join(platforms)} devices report no memory limit")


@attrs.frozen(kw_only=True)
class DeviceUsage:
    """Peak estimated use of the devices that hold the same roles.

    ``resident`` roles stay on the devices; ``turns`` are offloaded roles
    that take turns, so only the largest of them counts.
    """

    devices: tuple[int, ...] = attrs.field(converter=tuple)
    resident: tuple[str, ...] = attrs.field(converter=tuple)
    turns: tuple[str, ...] = attrs.field(converter=tuple)
    peak_bytes: int

    @property
    def roles(self) -> tuple[str, ...]:
        return (*self.resident, *self.turns)

    def describe_roles(self) -> str:
        """``trainer + reference``, ``rollout, trainer taking turns``, or both."""
        turns = f"{', '.join(self.turns)} taking turns" if self.turns else ""
        if not self.resident:
            return turns
        return " + ".join(self.resident) + (f", with {turns}" if turns else "")


@attrs.frozen(kw_only=True)
class MemoryBudget:
    """What a colocation policy may know about memory (``PlanContext.memory``).

    Attributes:
        capacity: each device's memory.
        estimator: ``estimator(role, mesh)``: the role's per-device estimate
            on that mesh, or ``None`` (a host role, or a role whose plugin
            gives none).
    """

    capacity: DeviceCapacity = attrs.field(factory=DeviceCapacity)
    estimator: Callable[[str, MeshSpec], MemoryEstimate | None] = attrs.field(default=lambda role, mesh: None, eq=False)

    def estimate(self, role: str, mesh: MeshSpec) -> MemoryEstimate | None:
        return self.estimator(role, mesh)

    def usage(self, roles: Sequence[RolePlacement]) -> list[DeviceUsage]:
        """Peak use per group of devices holding the same roles, in device
        order: resident roles all at once, plus the largest offloaded one.
        Roles without an estimate count 0."""
        totals = {}
        for r in roles:
            est = r.memory_estimate_bytes
            if est is None:
                e = self.estimate(r.name, r.mesh)
                est = None if e is None else e.total
            totals[r.name] = est
        by_device: dict[int, list[RolePlacement]] = {}
        for r in roles:
            if totals[r.name] is None:
                continue
            for d in r.devices:
                by_device.setdefault(d, []).append(r)
        groups: dict[tuple, list[int]] = {}
        for d in sorted(by_device):
            here = by_device[d]
            resident = tuple(r.name for r in here if not r.offload)
            turns = tuple(r.name for r in here if r.offload)
            groups.setdefault((resident, turns), []).append(d)
        out = []
        for (resident, turns), devs in groups.items():
            peak = sum(totals[n] for n in resident) + max((totals[n] for n in turns), default=0)
            out.append(DeviceUsage(devices=devs, resident=resident, turns=turns, peak_bytes=peak))
        return out

    def fits(self, roles: Sequence[RolePlacement]) -> bool:
        """Every device's peak is within capacity (always, when capacity is unknown)."""
        cap = self.capacity.bytes
        return cap is None or all(u.peak_bytes <= cap for u in self.usage(roles))
