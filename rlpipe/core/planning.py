"""From a resolved config to a stage graph and a placement plan.

This is the path ``rlpipe plan`` (and later ``rlpipe train``) takes:
config -> role specs (from plugins) -> :func:`build_graph` -> role requests
-> the selected colocation policy -> :class:`PlacementPlan`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from rlpipe.core.config import RunConfig
from rlpipe.core.errors import GraphError, PluginError, Problem, RoleNotRunnableError
from rlpipe.core.graph import StageGraph, build_graph
from rlpipe.core.placement import DeviceInfo, MeshSpec, PlacementPlan, PlanContext, RoleRequest, check_requests, device_pool
from rlpipe.core.plugins import Registry
from rlpipe.core.specs import BuildContext, RoleSpec
from rlpipe.core.stage import Stage

#: ``colocate_with`` aliases.
ROLE_ALIASES = {"actor": "trainer"}


@attrs.frozen(kw_only=True)
class Planned:
    """A config resolved into role specs, a stage graph and a placement plan."""

    config: RunConfig
    roles: Mapping[str, RoleSpec]
    graph: StageGraph
    plan: PlacementPlan
    notes: tuple[str, ...] = ()


#: Roles an algorithm may add or leave out; other roles are the user's to choose.
ALGORITHM_ROLES = ("reference", "critic")


def make_algorithm(config: RunConfig, registry: Registry) -> tuple[Any, Any]:
    """The configured algorithm's spec and object, with every advantage estimator
    and policy loss that plugins provide available to it by name."""
    spec = registry.get("rlpipe_algorithms", config.algorithm.name, path="algorithm.name")
    tables = {"estimators": {n: s.fn for n, s in registry.specs("rlpipe_advantage_estimators").items()},
              "losses": {n: s.fn for n, s in registry.specs("rlpipe_policy_losses").items()}}
    try:
        params = inspect.signature(spec.factory).parameters
    except (TypeError, ValueError):
        params = {}
    # A third-party algorithm's factory may take only its options.
    accepted = {k: v for k, v in tables.items() if k in params or any(p.kind is p.VAR_KEYWORD for p in params.values())}
    return spec, spec.factory(config.algorithm.options, **accepted)


def apply_algorithm(config: RunConfig, registry: Registry) -> tuple[RunConfig, list[str]]:
    """The config with the graph the algorithm needs: ``reference`` only when it
    uses a KL term, ``critic`` only when its advantages need values (added with
    default settings when missing).  Returns the config and a note per change."""
    spec, algorithm = make_algorithm(config, registry)
    needed = tuple(getattr(algorithm, "roles", None) or spec.roles)
    if not needed:
        return config, []
    roles, notes = dict(config.roles), []
    name = config.algorithm.name
    for role in ALGORITHM_ROLES:
        if role in roles and role not in needed:
            del roles[role]
            notes.append(f"{role} is left out: algorithm {name!r} does not use it")
        elif role in needed and role not in roles:
            roles[role] = registry.get("rlpipe_roles", role, path=f"roles.{role}").config_type()
            notes.append(f"{role} is added with default settings: algorithm {name!r} needs it")
    return attrs.evolve(config, roles=roles), notes


def role_specs(config: RunConfig, registry: Registry) -> dict[str, RoleSpec]:
    """The spec of every role in the config, in config order."""
    if not config.roles:
        raise GraphError(Problem("roles", "no roles configured; a run needs at least one (see rlpipe roles list)"))
    return {name: registry.get("rlpipe_roles", name, path=f"roles.{name}") for name in config.roles}


def role_requests(config: RunConfig) -> list[RoleRequest]:
    """What each role asks of the policy: its mesh, ``colocate_with`` (aliases
    resolved) and effective offload (the role's own, else ``placement.offload``)."""
    out = []
    for name, rc in config.roles.items():
        colocate = ROLE_ALIASES.get(rc.colocate_with, rc.colocate_with) if rc.colocate_with else None
        out.append(RoleRequest(
            name=name,
            mesh=MeshSpec(rc.mesh.shape, rc.mesh.axes) if rc.mesh is not None else None,
            colocate_with=colocate,
            offload=config.placement.offload if rc.offload is None else rc.offload,
        ))
    return out


def plan_run(config: RunConfig, registry: Registry, devices: Sequence[DeviceInfo] | None = None) -> Planned:
    """Resolves roles, derives the graph and asks the configured policy for a plan.

    Args:
        devices: the device pool; by default the devices JAX sees.

    Raises:
        ConfigError: (or its subclasses GraphError / PlacementError) for
            anything wrong with the config, each problem at its path.
        PluginError: the policy returned a plan that breaks the Placement contract.
    """
    config, algorithm_notes = apply_algorithm(config, registry)
    specs = role_specs(config, registry)
    graph = build_graph(specs)
    requests = role_requests(config)
    check_requests(requests)
    devices = list(device_pool() if devices is None else devices)
    if not devices:
        raise GraphError(Problem("devices", "no devices to place roles on"))
    policy_spec = registry.get("rlpipe_placement_policies", config.placement.policy, path="placement.policy")
    policy = policy_spec.factory(config.placement.options)
    context = PlanContext(edges=graph.edge_pairs(), sink=graph.sink, options=config.placement.options,
                          host_roles={n for n, s in specs.items() if not s.uses_devices})
    plan = policy.plan(requests, devices, context=context)
    _check_plan(plan, config.placement.policy, graph, devices)
    return Planned(config=config, roles=specs, graph=graph, plan=plan, notes=tuple(algorithm_notes))


def _check_plan(plan: PlacementPlan, policy: str, graph: StageGraph, devices: Sequence[DeviceInfo]) -> None:
    """A third-party policy's mistakes are reported as the policy's, not the user's."""
    problems = []
    placed = {r.name for r in plan.roles}
    for role in graph.order:
        if role not in placed:
            problems.append(f"places no role {role!r}")
    ids = {d.id for d in devices}
    for r in plan.roles:
        bad = sorted(set(r.devices) - ids)
        if bad:
            problems.append(f"puts role {r.name!r} on devices {bad} that do not exist")
    edges = {(b.upstream, b.downstream) for b in plan.boundaries}
    for e in graph.edge_pairs():
        if e not in edges:
            problems.append(f"gives no boundary for edge {e[0]} -> {e[1]}")
    if problems:
        raise PluginError(f"placement policy {policy!r} returned an invalid plan: " + "; ".join(problems))


def build_stages(planned: Planned, *, context: BuildContext) -> dict[str, Stage]:
    """Builds every role's stage on its placement.

    Raises:
        RoleNotRunnableError: some roles can be planned but have no stage yet;
            the message names each and says why.
    """
    missing = [(n, s) for n, s in planned.roles.items() if s.factory is None]
    if missing:
        raise RoleNotRunnableError("\n".join(f"roles.{n}: {s.unavailable or 'this role has no stage to run'}" for n, s in missing))
    return {name: spec.factory(planned.config.roles[name], planned.plan.role(name), context=context)
            for name, spec in planned.roles.items()}
