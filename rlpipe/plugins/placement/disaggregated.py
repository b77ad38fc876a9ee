"""The ``disaggregated`` policy: devices split between groups of roles by fraction."""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from rlpipe.core.config import check
from rlpipe.core.errors import PlacementError, Problem, suggest
from rlpipe.core.placement import (
    DeviceInfo,
    MeshSpec,
    PlacementPlan,
    PlanContext,
    RolePlacement,
    RoleRequest,
    finish_plan,
)


@attrs.frozen(kw_only=True)
class DeviceGroup:
    """One group: the roles that share its devices and its fraction of all devices."""

    roles: tuple[str, ...] = attrs.field(validator=check(lambda v: len(v) > 0, "must name at least one role"))
    fraction: float = attrs.field(validator=check(lambda v: 0 < v <= 1, "must be in (0, 1], got {value}"))


def _default_groups() -> tuple[DeviceGroup, ...]:
    return (DeviceGroup(roles=("rollout",), fraction=0.5), DeviceGroup(roles=("trainer",), fraction=0.5))


@attrs.frozen(kw_only=True)
class DisaggregatedOptions:
    """``placement.options`` of the ``disaggregated`` policy.

    Attributes:
        groups: device groups in device order; fractions sum to 1.  Roles named
            in no group join the trainer's group.
    """

    groups: tuple[DeviceGroup, ...] = attrs.field(factory=_default_groups, validator=check(lambda v: len(v) > 0, "must list at least one group"))


def split_counts(fractions: Sequence[float], n: int) -> list[int]:
    """Largest-remainder split of ``n`` devices by ``fractions`` (which sum to 1)."""
    exact = [f * n for f in fractions]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[: n - sum(counts)]:
        counts[i] += 1
    return counts


@attrs.frozen
class DisaggregatedPolicy:
    """Each group owns a disjoint slice; roles in a group share its devices."""

    options: DisaggregatedOptions = attrs.field(factory=DisaggregatedOptions)
    name: str = "disaggregated"

    def plan(self, requests: Sequence[RoleRequest], devices: Sequence[DeviceInfo], *, context: PlanContext) -> PlacementPlan:
        groups = self.options.groups
        reqs = {r.name: r for r in requests}
        problems: list[Problem] = []
        member: dict[str, int] = {}
        for gi, g in enumerate(groups):
            for role in g.roles:
                path = f"placement.options.groups[{gi}].roles"
                if role not in reqs:
                    problems.append(Problem(path, f"{role!r} is not a role in this run{suggest(role, reqs)} (roles: {', '.join(reqs)})"))
                elif role in member:
                    problems.append(Problem(path, f"{role!r} is already in group {member[role]}"))
                else:
                    member[role] = gi
        total = sum(g.fraction for g in groups)
        if abs(total - 1.0) > 1e-6:
            problems.append(Problem("placement.options.groups", f"fractions sum to {total:g}; they must sum to 1"))
        if problems:
            raise PlacementError(problems)

        home = member.get(context.sink, len(groups) - 1) if context.sink else len(groups) - 1
        for r in requests:
            member.setdefault(r.name, home)
        for r in requests:
            if r.colocate_with and member[r.colocate_with] != member[r.name]:
                problems.append(Problem(f"roles.{r.name}.colocate_with",
                                        f"{r.name} is in device group {member[r.name]} but {r.colocate_with} is in group {member[r.colocate_with]}"))

        n = len(devices)
        counts = split_counts([g.fraction for g in groups], n)
        for gi, c in enumerate(counts):
            if c == 0:
                problems.append(Problem(f"placement.options.groups[{gi}].fraction", f"{groups[gi].fraction:g} of {n} devices is no device; raise it"))
        if problems:
            raise PlacementError(problems)

        ids = [d.id for d in devices]
        slices, start = [], 0
        for c in counts:
            slices.append(ids[start:start + c])
            start += c

        def mesh_of(r: RoleRequest, size: int) -> MeshSpec:
            if r.mesh is not None:
                if r.mesh.size != size:
                    raise PlacementError(Problem(f"roles.{r.name}.mesh.shape",
                                                 f"{list(r.mesh.shape)} spans {r.mesh.size} devices but its device group has {size}"))
                return r.mesh
            return mesh_of(reqs[r.colocate_with], size) if r.colocate_with else MeshSpec.default(size)

        placed = []
        for r in requests:
            devs = slices[member[r.name]]
            placed.append(RolePlacement(name=r.name, devices=devs, mesh=mesh_of(r, len(devs)), offload=r.offload,
                                        memory_estimate_bytes=r.memory_estimate_bytes))
        return finish_plan(self.name, placed, devices, context)
