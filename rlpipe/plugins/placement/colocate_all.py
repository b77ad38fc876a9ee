"""The ``colocate-all`` policy: every role on every device."""

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
class ColocateAllPolicy:
    """Every role spans all devices, under its own mesh if it has one, else
    under the mesh of the role it colocates with, else ``[n, 1]``.  With
    ``placement.offload`` on, roles take turns (edges block)."""

    name: str = "colocate-all"

    def plan(self, requests: Sequence[RoleRequest], devices: Sequence[DeviceInfo], *, context: PlanContext) -> PlacementPlan:
        n = len(devices)
        ids = [d.id for d in devices]
        reqs = {r.name: r for r in requests}
        problems = [Problem(f"roles.{r.name}.mesh.shape", f"{list(r.mesh.shape)} spans {r.mesh.size} devices; colocate-all gives every role all {n}")
                    for r in requests if r.mesh is not None and r.mesh.size != n]
        if problems:
            raise PlacementError(problems)

        def mesh_of(r: RoleRequest) -> MeshSpec:
            if r.mesh is not None:
                return r.mesh
            return mesh_of(reqs[r.colocate_with]) if r.colocate_with else MeshSpec.default(n)

        placed = [RolePlacement(name=r.name, devices=ids, mesh=mesh_of(r), offload=r.offload,
                                memory_estimate_bytes=r.memory_estimate_bytes) for r in requests]
        return finish_plan(self.name, placed, devices, context)
