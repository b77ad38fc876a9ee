"""The ``default`` colocation policy: the ``colocate_with`` semantics of the design.

* The trainer (the graph's sink) owns a device slice: its own ``mesh`` if it
  has one, otherwise every device no other role claimed.
* A role with neither ``mesh`` nor ``colocate_with`` shares the trainer's
  devices *and* mesh.
* ``colocate_with: X`` shares X's device slice; with its own ``mesh`` the role
  lays those same devices out in its own shape (trainer ``[4, 1]``, rollout
  ``[1, 4]``), without one it uses X's mesh.
* A role with its own ``mesh`` and no ``colocate_with`` owns a disjoint slice:
  it is disaggregated.

Slices are handed out from device 0 in order: the trainer first, then the
other slice owners in config order; a trainer without a mesh takes the rest.
An edge between two roles that share devices while one of them is offloaded
blocks until the global-batch barrier (they take turns); every other edge
streams.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from rlpipe.core.errors import PlacementError, Problem
from rlpipe.core.placement import (
    DeviceInfo,
    MeshSpec,
    PlacementPlan,
    PlanContext,
    RolePlacement,
    RoleRequest,
    finish_plan,
)


@attrs.frozen
class DefaultPolicy:
    """Places roles by ``mesh`` and ``colocate_with`` (see the module docstring)."""

    name: str = "default"

    def plan(self, requests: Sequence[RoleRequest], devices: Sequence[DeviceInfo], *, context: PlanContext) -> PlacementPlan:
        reqs = {r.name: r for r in requests}
        anchor = context.sink if context.sink in reqs else requests[0].name

        def target(r: RoleRequest) -> str | None:
            if r.colocate_with is not None:
                return r.colocate_with
            if r.mesh is None and r.name != anchor:
                return anchor
            return None

        # An anchor that colocates with a role which itself follows the anchor
        # has no devices at all.
        problems: list[Problem] = []
        for r in (r for r in requests if r.colocate_with is not None):
            seen, cur = [r.name], target(r)
            while cur is not None and cur not in seen:
                seen.append(cur)
                cur = target(reqs[cur])
            if cur is not None:
                problems.append(Problem(f"roles.{r.name}.colocate_with",
                                        f"no role in {' -> '.join([*seen, cur])} owns devices; give one of them a mesh"))
                break
        if problems:
            raise PlacementError(problems)

        owners = [r for r in requests if target(r) is None]
        explicit = sorted((r for r in owners if r.mesh is not None), key=lambda r: r.name != anchor)
        wanted = sum(r.mesh.size for r in explicit)
        anchor_implicit = target(reqs[anchor]) is None and reqs[anchor].mesh is None
        n = len(devices)
        if wanted + (1 if anchor_implicit else 0) > n:
            parts = ", ".join(f"{r.name} {r.mesh.size}" for r in explicit)
            extra = f", plus at least 1 for {anchor} (no mesh)" if anchor_implicit else ""
            need = wanted + (1 if anchor_implicit else 0)
            raise PlacementError(Problem("roles", f"the roles' meshes need {wanted} devices ({parts}{extra}) but {n} exist; "
                                                  f"plan for them with `rlpipe plan --devices {need}`, or on the CPU fake "
                                                  f"them with XLA_FLAGS=--xla_force_host_platform_device_count={need}"))

        ids = [d.id for d in devices]
        slices: dict[str, list[int]] = {}
        meshes: dict[str, MeshSpec] = {}
        start = 0
        for r in explicit:
            slices[r.name] = ids[start:start + r.mesh.size]
            meshes[r.name] = r.mesh
            start += r.mesh.size
        if anchor_implicit:
            slices[anchor] = ids[start:]
            meshes[anchor] = MeshSpec.default(n - start)

        def resolve(name: str) -> tuple[list[int], MeshSpec]:
            if name in slices:
                return slices[name], meshes[name]
            r = reqs[name]
            devs, mesh = resolve(target(r))
            if r.mesh is not None:
                if r.mesh.size != len(devs):
                    owner = target(r)
                    raise PlacementError(Problem(f"roles.{name}.mesh.shape",
                                                 f"{list(r.mesh.shape)} spans {r.mesh.size} devices but {name} shares "
                                                 f"{owner}'s {len(devs)} devices; the sizes must match"))
                mesh = r.mesh
            slices[name], meshes[name] = devs, mesh
            return devs, mesh

        placed = []
        for r in requests:
            devs, mesh = resolve(r.name)
            placed.append(RolePlacement(name=r.name, devices=devs, mesh=mesh, offload=r.offload,
                                        memory_estimate_bytes=r.memory_estimate_bytes))
        notes = []
        if start < n and not anchor_implicit:
            notes.append(f"devices {ids[start:]} are not used by any role")
        return finish_plan(self.name, placed, devices, context, notes)
