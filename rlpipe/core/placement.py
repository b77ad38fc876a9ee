"""Placement: which devices and which mesh each role gets, and how stages synchronise.

A colocation policy (a plugin, selected by ``placement.policy``) turns role
requests into a :class:`PlacementPlan`.  The plan is plain data: device ids,
mesh shapes and axis names, offload flags and, per edge of the stage graph,
whether the downstream stage blocks until the upstream's global-batch barrier.
The executor obeys the plan; policies never run stages themselves.

Colocation is a property of *device sets*, not of meshes: a trainer on a
``(4, 1)`` ``(fsdp, tp)`` mesh and a rollout on a ``(1, 4)`` mesh over the same
four devices are colocated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from rlpipe.core.memory import MemoryBudget

#: The axis names a role gets when it configures no mesh.
DEFAULT_AXES: tuple[str, str] = ("fsdp", "tp")


@attrs.frozen
class MeshSpec:
    """A mesh shape and its axis names, e.g. ``MeshSpec((4, 1), ("fsdp", "tp"))``."""

    shape: tuple[int, ...] = attrs.field(converter=tuple)
    axes: tuple[str, ...] = attrs.field(converter=tuple)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def default(cls, n: int) -> MeshSpec:
        """All ``n`` devices on the first (``fsdp``) axis."""
        return cls((n, 1), DEFAULT_AXES)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "axes": list(self.axes)}


@attrs.frozen
class DeviceInfo:
    """What a policy may know about a device, without touching JAX.

    ``memory_bytes`` is the device's capacity where the backend reports it.
    """

    id: int
    platform: str = "cpu"
    process_index: int = 0
    memory_bytes: int | None = None


@attrs.frozen(kw_only=True)
class RoleRequest:
    """What one role asks of the policy, resolved from its config section.

    Attributes:
        name: the role.
        mesh: the role's own mesh, or ``None`` to let the policy choose.
        colocate_with: the role whose device set this role shares (``actor``
            already resolved to ``trainer``), or ``None``.
        offload: whether this role's state goes to host memory between uses
            when it shares devices with another role.
        memory_estimate_bytes: per-device estimate, when the role can give one.
    """

    name: str
    mesh: MeshSpec | None = None
    colocate_with: str | None = None
    offload: bool = False
    memory_estimate_bytes: int | None = None


@attrs.frozen(kw_only=True)
class PlanContext:
    """Everything besides requests and devices that a policy may use; keyword-only
    so it can grow.

    Attributes:
        edges: the stage graph's edges as ``(upstream, downstream)`` role names.
        sink: the role at the end of the graph (the trainer), the anchor that
            roles without a placement of their own share.
        options: the policy's own options (an instance of its ``config_type``),
            or ``None``.
        host_roles: roles that use no accelerator (their specs say
            ``uses_devices=False``): never offloaded, never time-sharing.
        memory: device capacity and per-role memory estimates on any mesh
            (:class:`rlpipe.core.memory.MemoryBudget`), for policies that
            choose by memory.
        heads: the roles the data source feeds (no upstream role: the
            rollout, or whatever generates in its place), in graph order.
            Derived from ``edges`` when not given (roles that are upstream of
            some edge and downstream of none), so a policy can tell the
            generating end of the graph from the sink without naming roles.
    """

    edges: tuple[tuple[str, str], ...] = ()
    sink: str | None = None
    options: Any = None
    host_roles: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    memory: MemoryBudget = attrs.field(factory=MemoryBudget)
    heads: tuple[str, ...] = attrs.field(default=attrs.Factory(lambda self: _heads(self.edges), takes_self=True),
                                         converter=tuple)


def _heads(edges: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    downstream = {d for _, d in edges}
    return tuple(dict.fromkeys(u for u, _ in edges if u not in downstream))


@attrs.frozen(kw_only=True)
class RolePlacement:
    """Where one role runs.

    Attributes:
        name: the role.
        devices: device ids, in mesh order (row-major over ``mesh.shape``).
        mesh: the role's mesh over ``devices``.
        colocated_with: the other roles that share at least one device.
        offload: whether the executor moves this role's state to host memory
            between uses.
        memory_estimate_bytes: per-device estimate, or ``None`` if unknown.
    """

    name: str
    devices: tuple[int, ...] = attrs.field(converter=tuple)
    mesh: MeshSpec
    colocated_with: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    offload: bool = False
    memory_estimate_bytes: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.mesh.size != len(self.devices):
            raise ValueError(f"role {self.name!r}: mesh {list(self.mesh.shape)} needs {self.mesh.size} devices, placement gives {len(self.devices)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "devices": list(self.devices),
            "mesh": self.mesh.to_json(),
            "colocated_with": list(self.colocated_with),
            "offload": self.offload,
            "memory_estimate_bytes": self.memory_estimate_bytes,
        }


@attrs.frozen
class Boundary:
    """One edge of the stage graph and how the downstream stage consumes it.

    ``blocking``: the downstream stage takes no item of a global batch before
    the upstream stage has passed that batch's barrier.  Otherwise items are
    consumed as they arrive.
    """

    upstream: str
    downstream: str
    blocking: bool

    def to_json(self) -> dict[str, Any]:
        return {"from": self.upstream, "to": self.downstream, "blocking": self.blocking}


@attrs.frozen(kw_only=True)
class PlacementPlan:
    """A policy's answer: per-role placements and per-edge synchronisation.

    ``mode`` is ``colocated`` (one device set, nothing offloaded),
    ``colocated+offload`` (one device set, time-shared) or ``disaggregated``
    (several disjoint device sets); a policy may use other words for
    arrangements these do not describe.
    """

    policy: str
    mode: str
    devices: tuple[int, ...] = attrs.field(converter=tuple)
    roles: tuple[RolePlacement, ...] = attrs.field(converter=tuple)
    boundaries: tuple[Boundary, ...] = attrs.field(default=(), converter=tuple)
    notes: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def role(self, name: str) -> RolePlacement:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(f"plan has no role {name!r}")

    def is_blocking(self, upstream: str, downstream: str) -> bool:
        return any(b.blocking for b in self.boundaries if (b.upstream, b.downstream) == (upstream, downstream))

    def to_json(self) -> dict[str, Any]:
        """The ``rlpipe plan --json`` document (a user-facing contract: DESIGN §7)."""
        return {
            "devices": list(self.devices),
            "policy": self.policy,
            "mode": self.mode,
            "roles": [r.to_json() for r in self.roles],
            "boundaries": [b.to_json() for b in self.boundaries],
        }


@runtime_checkable
class Placement(Protocol):
    """A colocation policy.

    An implementation must guarantee that the returned plan

    * places every requested role, each on a mesh whose size equals its device count;
    * uses only ids from ``devices``;
    * lists a :class:`Boundary` for every edge in ``context.edges``;
    * is a pure function of its inputs (``rlpipe plan`` and ``rlpipe train``
      must agree);

    and that impossible requests raise :class:`rlpipe.core.errors.PlacementError`
    whose problems name the config path (``roles.<name>.mesh`` ...).

    Example:
        >>> class EverythingEverywhere:
        ...     def plan(self, requests, devices, *, context):
        ...         ids = [d.id for d in devices]
        ...         roles = [RolePlacement(name=r.name, devices=ids, mesh=MeshSpec.default(len(ids)))
        ...                  for r in requests]
        ...         return finish_plan("everywhere", roles, devices, context)
    """

    def plan(self, requests: Sequence[RoleRequest], devices: Sequence[DeviceInfo], *, context: PlanContext) -> PlacementPlan: ...


# -- building blocks shared by policies ----------------------------------------


def with_colocation(roles: Sequence[RolePlacement], host_roles: frozenset[str] = frozenset()) -> list[RolePlacement]:
    """Fills ``colocated_with`` from device-set overlap, and clears ``offload``
    for host roles and for roles that share no device with another device
    role (offloading buys nothing there)."""
    out = []
    for r in roles:
        mine = set(r.devices)
        peers = tuple(sorted(o.name for o in roles if o.name != r.name and mine & set(o.devices)))
        device_peers = [p for p in peers if p not in host_roles]
        offload = r.offload and r.name not in host_roles and bool(device_peers)
        out.append(attrs.evolve(r, colocated_with=peers, offload=offload))
    return out


def time_shared(a: RolePlacement, b: RolePlacement) -> bool:
    """Two roles take turns on their devices: they share devices and at least one
    of them is offloaded between uses."""
    return bool(set(a.devices) & set(b.devices)) and (a.offload or b.offload)


def boundaries_for(edges: Sequence[tuple[str, str]], roles: Sequence[RolePlacement],
                   host_roles: frozenset[str] = frozenset()) -> list[Boundary]:
    """The rule of DESIGN §3: an edge blocks until the global-batch barrier exactly
    when its two roles time-share devices; every other edge, and every edge of a
    host role, streams."""
    by_name = {r.name: r for r in roles}
    return [Boundary(u, d, u not in host_roles and d not in host_roles and time_shared(by_name[u], by_name[d]))
            for u, d in edges]


def plan_mode(roles: Sequence[RolePlacement]) -> str:
    groups = {frozenset(r.devices) for r in roles}
    if len(groups) > 1:
        return "disaggregated"
    return "colocated+offload" if any(r.offload for r in roles) else "colocated"


def finish_plan(policy: str, roles: Sequence[RolePlacement], devices: Sequence[DeviceInfo], context: PlanContext, notes: Sequence[str] = ()) -> PlacementPlan:
    """Completes a policy's per-role placements into a plan: colocation groups,
    offload only where devices are shared, boundaries and mode."""
    placed = with_colocation(roles, context.host_roles)
    return PlacementPlan(
        policy=policy,
        mode=plan_mode(placed),
        devices=[d.id for d in devices],
        roles=placed,
        boundaries=boundaries_for(context.edges, placed, context.host_roles),
        notes=notes,
    )


def check_requests(requests: Sequence[RoleRequest]) -> None:
    """Checks what every policy relies on: ``colocate_with`` names another
    requested role and the colocation chains have no cycle.

    Raises:
        PlacementError: one problem per bad ``roles.<name>.colocate_with``.
    """
    from rlpipe.core.errors import PlacementError, Problem, suggest

    by_name = {r.name: r for r in requests}
    problems = []
    for r in requests:
        target = r.colocate_with
        if target is None:
            continue
        path = f"roles.{r.name}.colocate_with"
        if target == r.name:
            problems.append(Problem(path, "a role cannot colocate with itself"))
        elif target not in by_name:
            problems.append(Problem(path, f"unknown role {target!r}{suggest(target, by_name)} (roles in this run: {', '.join(by_name)})"))
    if not problems:
        for r in requests:
            chain, cur = [r.name], by_name[r.name].colocate_with
            while cur is not None and cur not in chain:
                chain.append(cur)
                cur = by_name[cur].colocate_with
            if cur is not None and cur == r.name:
                problems.append(Problem(f"roles.{r.name}.colocate_with", f"colocate_with forms a cycle: {' -> '.join([*chain, cur])}"))
                break
    if problems:
        raise PlacementError(problems)


# -- JAX side ------------------------------------------------------------------


def device_pool() -> list[DeviceInfo]:
    """The devices JAX sees, as :class:`DeviceInfo` (all processes' devices)."""
    import jax

    out = []
    for d in jax.devices():
        mem = None
        try:
            stats = d.memory_stats() or {}
            mem = stats.get("bytes_limit")
        except Exception:  # noqa: BLE001 - not every backend reports memory
            mem = None
        out.append(DeviceInfo(id=d.id, platform=d.platform, process_index=d.process_index, memory_bytes=mem))
    return out


def make_mesh(placement: RolePlacement):
    """The ``jax.sharding.Mesh`` for a role's placement.

    Axis types are passed explicitly (``Auto``) because ``Mesh`` and
    ``jax.make_mesh`` differ in their defaults.
    """
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    by_id = {d.id: d for d in jax.devices()}
    missing = [i for i in placement.devices if i not in by_id]
    if missing:
        raise ValueError(f"role {placement.name!r}: device ids {missing} do not exist (JAX sees {sorted(by_id)})")
    grid = np.array([by_id[i] for i in placement.devices], dtype=object).reshape(placement.mesh.shape)
    return Mesh(grid, placement.mesh.axes, axis_types=(AxisType.Auto,) * len(placement.mesh.axes))
