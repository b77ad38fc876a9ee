"""Agentic rollouts: multi-turn episodes with environments and tools (docs/agentic.md).

The rollout role runs them when ``roles.rollout.environment`` is set; the
rest of the stage graph (reward, reference, trainer) is unchanged.  Plugins
provide environments (``rlpipe_environments``), tools (``rlpipe_tools``) and
tool-call formats (``rlpipe_tool_parsers``).

The names below are imported on first use: the environment and tool plugins
need only the light records, while the episode loop loads the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlpipe.core.lazy import lazy_exports

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ resolves these
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

#: Each public name and the module that defines it.
_LAZY = {
    **dict.fromkeys(["Environment", "EnvironmentContext", "EnvironmentSection", "Step"],
                    "rlpipe.plugins.agentic.environment"),
    **dict.fromkeys(["Episode", "EpisodeBatch", "EpisodeRunner", "episode_metrics"], "rlpipe.plugins.agentic.episodes"),
    "TaskRewards": "rlpipe.plugins.agentic.scoring",
    **dict.fromkeys(["ToolCall", "ToolError", "ToolParser", "resolve_arguments", "run_tool"],
                    "rlpipe.plugins.agentic.tools"),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = ["Environment", "EnvironmentContext", "EnvironmentSection", "Episode", "EpisodeBatch", "EpisodeRunner",
           "Step", "TaskRewards", "ToolCall", "ToolError", "ToolParser", "episode_metrics", "resolve_arguments",
           "run_tool"]
