"""Agentic rollouts: multi-turn episodes with environments and tools (docs/agentic.md).

The rollout role runs them when ``roles.rollout.environment`` is set; the
rest of the stage graph (reward, reference, trainer) is unchanged.  Plugins
provide environments (``rlpipe_environments``), tools (``rlpipe_tools``) and
tool-call formats (``rlpipe_tool_parsers``).
"""

from __future__ import annotations

from rlpipe.plugins.agentic.environment import (
           Environment,
           EnvironmentContext,
           EnvironmentSection,
           Step,
)
from rlpipe.plugins.agentic.episodes import (
           Episode,
           EpisodeBatch,
           EpisodeRunner,
           episode_metrics,
)
from rlpipe.plugins.agentic.scoring import TaskRewards
from rlpipe.plugins.agentic.tools import (
           ToolCall,
           ToolError,
           ToolParser,
           resolve_arguments,
           run_tool,
)

__all__ = ["Environment", "EnvironmentContext", "EnvironmentSection", "Episode", "EpisodeBatch", "EpisodeRunner",
           "Step", "TaskRewards", "ToolCall", "ToolError", "ToolParser", "episode_metrics", "resolve_arguments",
           "run_tool"]
