"""rlpipe: RL post-training of language models as an explicit, pluggable stage graph.

The public API lives here; everything else may move between releases.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from rlpipe.core.config import MeshConfig, PlacementConfig, RoleConfig, RunConfig, TrainConfig, check, load_config
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
from rlpipe.core.graph import Executor, StageGraph, build_graph
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
from rlpipe.core.planning import Planned, build_stages, plan_run
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
from rlpipe.core.stage import Batch, BarrierStage, OffloadableStage, Stage, StageContext, StatefulStage
from rlpipe.core.telemetry import Trace

try:
    __version__ = _metadata.version("rlpipe")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AdvantageEstimatorSpec", "AlgorithmSpec", "BarrierStage", "Batch", "Boundary", "BuildContext", "ConfigError",
    "DeviceInfo", "EnvironmentSpec", "Executor", "GraphError", "MemoryEstimate", "MeshConfig", "MeshSpec", "OffloadableStage", "Placement",
    "PlacementConfig", "PlacementError", "PlacementPlan", "PlanContext", "Planned", "PluginError", "PolicyLossSpec",
    "PolicySpec", "Problem", "Registry", "RewardFunctionSpec", "RlpipeError", "RoleConfig", "RoleNotRunnableError",
    "RolePlacement", "RoleRequest", "RoleSpec", "RolloutEngineSpec", "RunConfig", "Stage", "StageContext",
    "StageError", "StageGraph", "StatefulStage", "TaskSpec", "ToolParserSpec", "ToolSpec", "Trace", "TrainConfig", "__version__", "build_graph",
    "build_stages", "check", "finish_plan", "hookimpl", "load_config", "load_registry", "make_mesh", "plan_run",
]
