"""From a resolved config to a stage graph and a placement plan.

This is the path ``rlpipe plan`` and ``rlpipe train`` take:
config -> role specs (from plugins) -> :func:`build_graph` -> role requests
-> what the config's sections check of the run (datasets, batch arithmetic;
:func:`run_problems`) -> the selected colocation policy -> :class:`PlacementPlan`.
:func:`validate_run` is the same path up to the policy (``rlpipe config
validate``): everything that can be checked without devices or models.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from rlpipe.core.config import path_key
from rlpipe.core.errors import (
    ConfigError,
    GraphError,
    PlacementError,
    PluginError,
    Problem,
    RlpipeError,
    RoleNotRunnableError,
    suggest,
)
from rlpipe.core.graph import SOURCE_FIELDS, StageGraph, build_graph
from rlpipe.core.memory import (
    DeviceCapacity,
    MemoryBudget,
    MemoryEstimate,
    describe_devices,
    device_capacity,
    format_bytes,
)
from rlpipe.core.placement import (
    DeviceInfo,
    MeshSpec,
    PlacementPlan,
    PlanContext,
    RoleRequest,
    check_requests,
    device_pool,
)
from rlpipe.core.plugins import Registry
from rlpipe.core.specs import BuildContext, RoleSpec
from rlpipe.core.stage import Stage
from rlpipe.runtime.run_config import RunConfig

#: ``colocate_with`` aliases.
ROLE_ALIASES = {"actor": "trainer"}


@attrs.frozen(kw_only=True)
class Planned:
    """A config resolved into role specs, a stage graph and a placement plan.

    ``memory`` holds each role's estimate on the mesh it was placed on
    (``None``: a host role, or no estimate); ``capacity`` each device's memory.
    """

    config: RunConfig
    roles: Mapping[str, RoleSpec]
    graph: StageGraph
    plan: PlacementPlan
    notes: tuple[str, ...] = ()
    memory: Mapping[str, MemoryEstimate | None] = attrs.field(factory=dict)
    capacity: DeviceCapacity = attrs.field(factory=DeviceCapacity)


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
    """The spec of every role in the config, in config order, as each role's
    ``configure`` (if it has one) adapts it to the role's section."""
    if not config.roles:
        raise GraphError(Problem("roles", "no roles configured; a run needs at least one (see rlpipe roles list)"))
    specs = {}
    for name in config.roles:
        spec = registry.get("rlpipe_roles", name, path=f"roles.{name}")
        # A role whose fields depend on its options (the rollout with an environment).
        specs[name] = spec if spec.configure is None else spec.configure(config.roles[name], run_config=config, registry=registry)
    check_reward_terms(config, specs)
    return specs


def check_reward_terms(config: RunConfig, specs: Mapping[str, RoleSpec]) -> None:
    """Every field in ``roles.reward.terms`` is produced by some other role (or the
    data source): checked here, before :func:`build_graph`, so that the problem
    is reported at ``roles.reward.terms.<field>`` with the fields there are.

    Raises:
        GraphError: one problem per unknown field, listing the produced fields.
    """
    terms = getattr(config.roles.get("reward"), "terms", None) or {}
    own = specs["reward"].produces if "reward" in specs else frozenset()
    produced = set(SOURCE_FIELDS).union(*(s.produces for n, s in specs.items() if n != "reward"))
    problems = []
    for field in terms:
        if field in own:
            problems.append(Problem(f"roles.reward.terms.{path_key(field)}",
                                    f"{field!r} is produced by the reward role itself; a term adds another role's field"))
        elif field not in produced:
            problems.append(Problem(f"roles.reward.terms.{path_key(field)}",
                                    f"no role produces field {field!r}{suggest(field, produced)}; "
                                    f"produced fields: {', '.join(sorted(produced))}"))
    if problems:
        raise GraphError(problems)


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


def run_problems(config: RunConfig) -> list[Problem]:
    """What the config's sections check of the whole run, before anything is
    built: each of ``model``, ``task.options``, ``algorithm.options``,
    ``placement.options`` and ``roles.<name>`` that has a method
    ``run_problems(run_config, *, path) -> list[Problem]`` is asked (``path``
    is the section's own key).  The built-ins check that a pretrained
    ``model.preset`` is in the model cache, the JSONL task's dataset
    (files exist, every line is an example, streamed), the trainer's batch
    arithmetic and the rollout's generations per prompt and sequence length.

    Raises:
        PluginError: a section's check raised something other than a
            :class:`ConfigError` (whose problems are taken as found).
    """
    sections = [("model", config.model), ("task.options", config.task.options),
                ("algorithm.options", config.algorithm.options), ("placement.options", config.placement.options),
                *((f"roles.{path_key(name)}", section) for name, section in config.roles.items())]
    problems: list[Problem] = []
    for path, section in sections:
        check = getattr(section, "run_problems", None)
        if not callable(check):
            continue
        try:
            problems.extend(check(config, path=path) or ())
        except ConfigError as exc:
            problems.extend(exc.problems)
        except RlpipeError:
            raise
        except Exception as exc:  # a plugin's check may raise anything
            raise PluginError(f"{path}: its run_problems check raised {type(exc).__name__}: {exc}") from exc
    return problems


@attrs.frozen(kw_only=True)
class Validated:
    """A config checked without devices: the config with the algorithm's roles
    (:func:`apply_algorithm`), each role's spec, the stage graph, and a note
    per change the algorithm made."""

    config: RunConfig
    roles: Mapping[str, RoleSpec]
    graph: StageGraph
    notes: tuple[str, ...] = ()


def validate_run(config: RunConfig, registry: Registry) -> Validated:
    """Everything ``rlpipe config validate`` checks, which is everything that
    needs neither devices nor models: the algorithm and the roles it needs,
    the role specs and reward terms, the stage graph, ``colocate_with``
    references, and :func:`run_problems` (datasets, batch arithmetic, ...).

    Raises:
        ConfigError: every problem found, one per line with its key; a
            :class:`GraphError` / :class:`PlacementError` when all of them are
            of that kind.
    """
    found: list[ConfigError] = []
    notes: list[str] = []
    specs: dict[str, RoleSpec] = {}
    graph = None
    try:
        config, notes = apply_algorithm(config, registry)
    except ConfigError as exc:
        found.append(exc)
    else:  # without the algorithm's roles the graph would report its absence as the roles'
        try:
            specs = role_specs(config, registry)
            graph = build_graph(specs)
        except ConfigError as exc:
            found.append(exc)
    try:
        check_requests(role_requests(config))
    except ConfigError as exc:
        found.append(exc)
    problems = run_problems(config)
    if problems:
        found.append(ConfigError(problems))
    if len(found) == 1:
        raise found[0]
    if found:
        kinds = {type(e) for e in found}
        kind = kinds.pop() if len(kinds) == 1 else ConfigError
        raise kind([p for e in found for p in e.problems])
    return Validated(config=config, roles=specs, graph=graph, notes=tuple(notes))


def plan_run(config: RunConfig, registry: Registry, devices: Sequence[DeviceInfo] | None = None) -> Planned:
    """Checks the config (:func:`validate_run`: graph, datasets, batch
    arithmetic, ..., all reported together), then asks the configured policy
    for a plan on ``devices``.

    Args:
        devices: the device pool; by default the devices JAX sees.

    Raises:
        ConfigError: (or its subclasses GraphError / PlacementError) for
            anything wrong with the config, each problem at its path.
        PluginError: the policy returned a plan that breaks the Placement contract.
    """
    validated = validate_run(config, registry)
    config, specs, graph, algorithm_notes = validated.config, dict(validated.roles), validated.graph, validated.notes
    requests = role_requests(config)
    devices = list(device_pool() if devices is None else devices)
    if not devices:
        raise GraphError(Problem("devices", "no devices to place roles on"))
    policy_spec = registry.get("rlpipe_placement_policies", config.placement.policy, path="placement.policy")
    policy = policy_spec.factory(config.placement.options)
    budget = memory_budget(config, specs, devices)
    context = PlanContext(edges=graph.edge_pairs(), sink=graph.sink, options=config.placement.options,
                          host_roles={n for n, s in specs.items() if not s.uses_devices}, memory=budget)
    plan = policy.plan(requests, devices, context=context)
    _check_plan(plan, config.placement.policy, graph, devices)
    estimates = {r.name: budget.estimate(r.name, r.mesh) for r in plan.roles}
    plan = attrs.evolve(plan, roles=[r if r.memory_estimate_bytes is not None or estimates[r.name] is None
                                     else attrs.evolve(r, memory_estimate_bytes=estimates[r.name].total)
                                     for r in plan.roles])
    plan = attrs.evolve(plan, notes=(*plan.notes, *check_memory(plan, budget, estimates)))
    return Planned(config=config, roles=specs, graph=graph, plan=plan, notes=tuple(algorithm_notes),
                   memory=estimates, capacity=budget.capacity)


def memory_budget(config: RunConfig, specs: Mapping[str, RoleSpec], devices: Sequence[DeviceInfo]) -> MemoryBudget:
    """Device capacity and a memoised ``estimate(role, mesh)`` from the roles'
    ``memory_estimate`` functions; host roles and roles without one give ``None``.

    Raises (when an estimate is asked for):
        PluginError: a role's estimate function raised or returned something
            other than a :class:`MemoryEstimate`; the message names the role.
    """
    cache: dict[tuple[str, MeshSpec], MemoryEstimate | None] = {}

    def estimate(name: str, mesh: MeshSpec) -> MemoryEstimate | None:
        key = (name, mesh)
        if key not in cache:
            spec = specs.get(name)
            fn = None if spec is None or not spec.uses_devices else spec.memory_estimate
            try:
                est = None if fn is None else fn(config.roles[name], config, mesh)
            except RlpipeError:
                raise
            except Exception as exc:  # noqa: BLE001 - a plugin's estimate may raise anything
                raise PluginError(f"role {name!r}: its memory estimate raised {type(exc).__name__}: {exc}") from exc
            if est is not None and not isinstance(est, MemoryEstimate):
                raise PluginError(f"role {name!r}: its memory estimate returned {type(est).__name__}, not a MemoryEstimate or None")
            cache[key] = est
        return cache[key]

    return MemoryBudget(capacity=device_capacity(devices, config.placement.device_memory_gib), estimator=estimate)


def check_memory(plan: PlacementPlan, budget: MemoryBudget, estimates: Mapping[str, MemoryEstimate | None]) -> list[str]:
    """Compares the plan with device capacity (nothing to compare when it is unknown).

    Returns:
        a note per group of devices whose roles together exceed capacity
        (they may still run if their peaks do not coincide).

    Raises:
        PlacementError: a role that alone needs more than a device holds, one
            problem per role, each saying what to change.
    """
    cap = budget.capacity.bytes
    if cap is None:
        return []
    problems = [Problem(f"roles.{r.name}", too_big(r.name, estimates[r.name], r.mesh, budget.capacity))
                for r in plan.roles if estimates.get(r.name) is not None and estimates[r.name].total > cap]
    if problems:
        raise PlacementError(problems)
    notes = []
    for u in budget.usage(plan.roles):
        if u.peak_bytes > cap:
            notes.append(f"{describe_devices(u.devices)}: {u.describe_roles()} need an estimated "
                         f"{format_bytes(u.peak_bytes)} per device at once, more than the {format_bytes(cap)} a device "
                         f"holds; offload them so they take turns (placement.offload=true), or let placement.policy=auto choose")
    return notes


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


#: What to change when one role does not fit, by the kind of memory that dominates.
REMEDIES = {
    "parameters": "more devices on its mesh's fsdp axis, or model.compute_dtype=bfloat16 (the inference roles' "
                  "copies; trainer and critic keep float32 masters)",
    "optimizer_state": "more devices on its mesh's fsdp axis, or optimizer=sgd",
    "gradients": "more devices on its mesh's fsdp axis",
    "kv_cache": "more devices on its mesh's fsdp axis (rows are split over it), fewer rows in flight "
                "(train.prompts_per_item, roles.rollout.num_generations), shorter sequences "
                "(roles.rollout.max_new_tokens, task.max_prompt_tokens), or model.compute_dtype=bfloat16",
    "activations": "roles.trainer.remat=true, a smaller roles.<role>.micro_batch_size, shorter sequences "
                   "(roles.rollout.max_new_tokens, task.max_prompt_tokens), or model.compute_dtype=bfloat16",
}


def too_big(role: str, estimate: MemoryEstimate, mesh: MeshSpec, capacity: DeviceCapacity, *, why: str = "") -> str:
    """The one-line reason a role does not fit on its devices, with what to change
    (``why`` is appended to the reason, before the remedy)."""
    parts = {f.name: getattr(estimate, f.name) for f in attrs.fields(MemoryEstimate)}
    largest = max(parts, key=parts.get)
    shown = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in parts.items() if v)
    # A generating role's activations scale with its rows in flight, not a micro-batch.
    remedy = REMEDIES["kv_cache" if largest == "activations" and estimate.kv_cache else largest].replace("<role>", role)
    n = math.prod(mesh.shape)
    return (f"needs an estimated {format_bytes(estimate.total)} per device ({shown}) on mesh {list(mesh.shape)} "
            f"({', '.join(mesh.axes)}) over {n} device{'s' if n != 1 else ''}, but a device holds "
            f"{format_bytes(capacity.bytes)} ({capacity.source}){why}; offloading other roles cannot help it: try "
            f"{remedy}; `rlpipe plan` shows the breakdown")
