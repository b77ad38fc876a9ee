"""rlpipe: RL post-training of language models as an explicit, pluggable stage graph.

The public API lives here; everything else may move between releases.

Every public name is imported on first use (``rlpipe.Executor`` loads
``rlpipe.core.executor``), so that ``import rlpipe`` and the CLI's listings
start without loading jax, flax or optax.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import TYPE_CHECKING

from rlpipe.core.lazy import lazy_exports

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ resolves these
    from rlpipe.core.config import MeshConfig, PlacementConfig, RoleConfig, check
    from rlpipe.core.errors import (
        ConfigError,
        GraphError,
        PlacementError,
        PluginError,
        Problem,
        RlpipeError,
        RoleNotRunnableError,
        StageError,
    )
    from rlpipe.core.executor import Executor
    from rlpipe.core.graph import StageGraph, build_graph
    from rlpipe.core.hookspecs import hookimpl
    from rlpipe.core.memory import MemoryEstimate
    from rlpipe.core.placement import (
        Boundary,
        DeviceInfo,
        MeshSpec,
        Placement,
        PlacementPlan,
        PlanContext,
        RolePlacement,
        RoleRequest,
        finish_plan,
        make_mesh,
    )
    from rlpipe.core.plugins import Registry, load_registry
    from rlpipe.core.specs import (
        AdvantageEstimatorSpec,
        AlgorithmSpec,
        BuildContext,
        EnvironmentSpec,
        PolicyLossSpec,
        PolicySpec,
        RewardFunctionSpec,
        RoleSpec,
        RolloutEngineSpec,
        TaskSpec,
        ToolParserSpec,
        ToolSpec,
    )
    from rlpipe.core.stage import (
        BarrierStage,
        Batch,
        OffloadableStage,
        Stage,
        StageContext,
        StatefulStage,
        Tracer,
        WeightPublisher,
        WeightReceiver,
    )
    from rlpipe.models.generation import Generation, SamplingParams
    from rlpipe.runtime.devices import on_devices
    from rlpipe.runtime.planning import Planned, build_stages, plan_run
    from rlpipe.runtime.run_config import RunConfig, TrainConfig, load_config
    from rlpipe.runtime.trace import Trace

#: Each public name and the module that defines it, imported on first use.
_LAZY = {
    # core: protocols, records, config machinery, the stage graph and its executor.
    **dict.fromkeys(["MeshConfig", "PlacementConfig", "RoleConfig", "check"], "rlpipe.core.config"),
    **dict.fromkeys(["ConfigError", "GraphError", "PlacementError", "PluginError", "Problem", "RlpipeError",
                     "RoleNotRunnableError", "StageError"], "rlpipe.core.errors"),
    "Executor": "rlpipe.core.executor",
    **dict.fromkeys(["StageGraph", "build_graph"], "rlpipe.core.graph"),
    "hookimpl": "rlpipe.core.hookspecs",
    "MemoryEstimate": "rlpipe.core.memory",
    **dict.fromkeys(["Boundary", "DeviceInfo", "MeshSpec", "Placement", "PlacementPlan", "PlanContext",
                     "RolePlacement", "RoleRequest", "finish_plan", "make_mesh"], "rlpipe.core.placement"),
    **dict.fromkeys(["Registry", "load_registry"], "rlpipe.core.plugins"),
    **dict.fromkeys(["AdvantageEstimatorSpec", "AlgorithmSpec", "BuildContext", "EnvironmentSpec", "PolicyLossSpec",
                     "PolicySpec", "RewardFunctionSpec", "RoleSpec", "RolloutEngineSpec", "TaskSpec",
                     "ToolParserSpec", "ToolSpec"], "rlpipe.core.specs"),
    **dict.fromkeys(["BarrierStage", "Batch", "OffloadableStage", "Stage", "StageContext", "StatefulStage", "Tracer",
                     "WeightPublisher", "WeightReceiver"], "rlpipe.core.stage"),
    # runtime: a run's config schema and plan, devices, and the trace it writes.
    **dict.fromkeys(["Planned", "build_stages", "plan_run"], "rlpipe.runtime.planning"),
    **dict.fromkeys(["RunConfig", "TrainConfig", "load_config"], "rlpipe.runtime.run_config"),
    "Trace": "rlpipe.runtime.trace",
    "on_devices": "rlpipe.runtime.devices",
    # models: the generation engine's public records.
    **dict.fromkeys(["SamplingParams", "Generation"], "rlpipe.models.generation"),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


try:
    __version__ = _metadata.version("rlpipe")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AdvantageEstimatorSpec", "AlgorithmSpec", "BarrierStage", "Batch", "Boundary", "BuildContext", "ConfigError",
    "DeviceInfo", "EnvironmentSpec", "Executor", "Generation", "GraphError", "MemoryEstimate", "MeshConfig", "MeshSpec", "OffloadableStage", "Placement",
    "PlacementConfig", "PlacementError", "PlacementPlan", "PlanContext", "Planned", "PluginError", "PolicyLossSpec",
    "PolicySpec", "Problem", "Registry", "RewardFunctionSpec", "RlpipeError", "RoleConfig", "RoleNotRunnableError",
    "RolePlacement", "RoleRequest", "RoleSpec", "RolloutEngineSpec", "RunConfig", "SamplingParams", "Stage", "StageContext",
    "StageError", "StageGraph", "StatefulStage", "TaskSpec", "ToolParserSpec", "ToolSpec", "Trace", "Tracer", "TrainConfig", "WeightPublisher",
    "WeightReceiver", "__version__", "build_graph",
    "build_stages", "check", "finish_plan", "hookimpl", "load_config", "load_registry", "make_mesh", "on_devices", "plan_run",
]
