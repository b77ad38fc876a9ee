"""The errors rlpipe reports to users, and how the CLI maps them to exit codes.

Every user-facing error is one line per problem that names *where* (a config
path, a role, a plugin) and *why*.  :class:`UsageError` subclasses exit with
status 2, :class:`RunError` subclasses with status 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import attrs


def suggest(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a close match of ``name`` in ``choices``, else ``''``."""
    matches = difflib.get_close_matches(str(name), sorted(map(str, choices)), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def choices_text(choices: Iterable[str]) -> str:
    names = sorted(choices)
    return ", ".join(names) if names else "none"


@attrs.frozen
class Problem:
    """One problem: a dotted config path (or another locator) and a reason."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class RlpipeError(Exception):
    """Base of all errors rlpipe reports without a traceback."""

    exit_code = 1

    def lines(self) -> list[str]:
        return str(self).splitlines()


class UsageError(RlpipeError):
    """Bad input from the user: config, command line, plugin selection.  Exit 2."""

    exit_code = 2


class ConfigError(UsageError):
    """One or more config problems, each with its path."""

    def __init__(self, problems: Sequence[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


class PlacementError(ConfigError):
    """The roles cannot be placed on the devices as configured."""


class GraphError(ConfigError):
    """The roles do not form a valid stage graph (missing producer, cycle, ...)."""


class PluginError(UsageError):
    """A plugin problem that blocks what the user asked for."""


class RoleNotRunnableError(UsageError):
    """A role is registered (so it can be planned) but has no stage to run."""


class DatasetError(UsageError):
    """A dataset that cannot be used: a missing file, or lines that are not
    examples.  One line per problem, each naming ``file:line`` and why."""


class PromptTokenError(UsageError):
    """A prompt holds a token id the model has no embedding for (the
    tokenizer and the model do not match).  Names the example, the id and
    the vocabulary size: such an id would otherwise turn into NaN log-probs."""


class RunDirError(UsageError):
    """A run directory that cannot be reported on: missing, without metrics, or
    holding a file rlpipe cannot read."""


class TraceError(RunDirError):
    """A trace file that is not Chrome trace-event JSON (names the file and why)."""


class RunError(RlpipeError):
    """A failure while running the pipeline.  Exit 1."""


class StageError(RunError):
    """A stage raised: names the role, the step and the micro-batch."""

    def __init__(self, role: str, step: int, index: int | None, cause: BaseException):
        self.role, self.step, self.index, self.cause = role, step, index, cause
        where = f"step {step}" + ("" if index is None else f", micro-batch {index}") if step >= 0 else "setup"
        super().__init__(f"stage {role!r} failed at {where}: {type(cause).__name__}: {cause}")
