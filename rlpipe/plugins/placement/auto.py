"""The ``auto`` policy: chooses an arrangement from memory estimates.

In order of preference, the first that fits each device's capacity:

1. **colocated** — every role on every device, nothing offloaded: no host
   transfers, nothing waits for a barrier, every role uses all devices.
2. **disaggregated** — rollout (with any role that colocates with it) on its
   own slice, the other roles on the rest, nothing offloaded: everything
   streams.  This fits where (1) does not because the parts of an estimate
   that sharding does not divide (KV cache, activations) no longer add up
   on one device.  Of the splits that fit, the most even one is taken.
3. **colocated+offload** — every role on every device, taking turns: the
   idle roles wait in host memory and the edges between them block until
   the global-batch barrier.  Needs the least device memory, and costs the
   transfers.

If capacity is unknown (JAX's CPU backend reports none; set
``placement.device_memory_gib``) it chooses colocated and says so.  If no
arrangement fits, some role does not fit alone even spread over every
device, and the error names it, its estimate, the capacity and what to change.

``auto`` decides offload itself: ``placement.offload`` and
``roles.<name>.offload`` do not apply.  A role's own ``mesh`` is kept when its
size matches the devices the arrangement gives the role.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from rlpipe.core.errors import PlacementError, Problem
from rlpipe.core.memory import DeviceUsage, MemoryBudget, describe_devices, format_bytes
from rlpipe.core.placement import DeviceInfo, PlacementPlan, PlanContext, RoleRequest
from rlpipe.plugins.placement.colocate_all import ColocateAllPolicy
from rlpipe.plugins.placement.disaggregated import (
    DeviceGroup,
    DisaggregatedOptions,
    DisaggregatedPolicy,
)
from rlpipe.runtime.planning import too_big


def generating_roles(context: PlanContext) -> list[str]:
    """The device roles at the head of the graph (fed by the data source: the
    rollout, or whatever generates in its place) — the part ``auto`` gives a
    slice of its own.  Found from the graph, never by role name."""
    return [r for r in context.heads if r not in context.host_roles and r != context.sink]


def _need(usage: Sequence[DeviceUsage]) -> str:
    """``trainer + rollout need 3.1 GiB`` for the fullest device group."""
    u = max(usage, key=lambda u: u.peak_bytes)
    verb = "needs" if len(u.roles) == 1 else "need"
    return f"{u.describe_roles()} {verb} {format_bytes(u.peak_bytes)}"


@attrs.frozen
class AutoPolicy:
    """Colocated if everything fits at once, else rollout disaggregated, else
    colocated with offload (see the module docstring)."""

    name: str = "auto"

    def plan(self, requests: Sequence[RoleRequest], devices: Sequence[DeviceInfo], *, context: PlanContext) -> PlacementPlan:
        budget = context.memory
        cap = budget.capacity.bytes
        n = len(devices)

        def colocated(offload: bool) -> PlacementPlan:
            reqs = [attrs.evolve(r, offload=offload and r.name not in context.host_roles) for r in requests]
            return ColocateAllPolicy().plan(reqs, devices, context=context)

        together = colocated(False)
        usage = budget.usage(together.roles)
        device_roles = [r.name for r in together.roles if r.name not in context.host_roles]
        if not usage:
            return self._finish(together, f"auto: colocated — no role gives a memory estimate ({', '.join(device_roles) or 'no device roles'})")
        if cap is None:
            return self._finish(together, f"auto: colocated — device memory is unknown ({budget.capacity.source}; set "
                                          f"placement.device_memory_gib to choose by memory); {_need(usage)} per device")
        of = f"of {format_bytes(cap)} per device"
        if budget.fits(together.roles):
            return self._finish(together, f"auto: colocated — {_need(usage)} {of}")
        reason = f"all at once {_need(usage)} {of}"

        split = self._disaggregated(requests, devices, context)
        if split is not None:
            parts = "; ".join(f"{u.describe_roles()} on {describe_devices(u.devices)} "
                              f"{'needs' if len(u.roles) == 1 else 'need'} {format_bytes(u.peak_bytes)}"
                              for u in budget.usage(split.roles))
            return self._finish(split, f"auto: disaggregated — {reason}; split: {parts} {of}")

        turns = colocated(True)
        if budget.fits(turns.roles):
            heads = [r for r in generating_roles(context) if r in device_roles]
            what = " + ".join(heads) if heads else "generating"
            why = f"no {what} slice fits either" if heads and n > 1 else f"there is no {what} slice to split off"
            return self._finish(turns, f"auto: colocated+offload — {reason}, {why}; taking turns, {_need(budget.usage(turns.roles))} {of}")

        problems = []
        for r in turns.roles:
            est = budget.estimate(r.name, r.mesh)
            if est is not None and est.total > cap:
                problems.append(Problem(f"roles.{r.name}", too_big(r.name, est, r.mesh, budget.capacity,
                                                                   why=", so placement.policy=auto finds no arrangement that fits")))
        raise PlacementError(problems or Problem("placement.policy", f"auto: nothing fits: {reason}"))

    def _finish(self, plan: PlacementPlan, note: str) -> PlacementPlan:
        return attrs.evolve(plan, policy=self.name, notes=(note, *plan.notes))

    def _disaggregated(self, requests: Sequence[RoleRequest], devices: Sequence[DeviceInfo],
                       context: PlanContext) -> PlacementPlan | None:
        """The most even rollout / rest split that fits without offload, or ``None``."""
        names = [r.name for r in requests]
        n = len(devices)
        heads = [r for r in generating_roles(context) if r in names]
        if not heads or n < 2:
            return None
        mine = [*heads, *(r.name for r in requests if r.colocate_with in heads and r.name not in heads)]
        rest = [name for name in names if name not in mine]
        if not any(name not in context.host_roles for name in rest):
            return None
        reqs = [attrs.evolve(r, offload=False) for r in requests]
        budget: MemoryBudget = context.memory
        for k in sorted(range(1, n), key=lambda k: (abs(2 * k - n), k)):
            options = DisaggregatedOptions(groups=(DeviceGroup(roles=tuple(mine), fraction=k / n),
                                                   DeviceGroup(roles=tuple(rest), fraction=(n - k) / n)))
            try:
                plan = DisaggregatedPolicy(options).plan(reqs, devices, context=context)
            except PlacementError:
                continue  # a role's own mesh or colocate_with does not suit this split
            if budget.fits(plan.roles):
                return plan
        return None
