"""Public names imported on first use, for a package's ``__init__``.

``import rlpipe`` and the CLI's listings must start without loading jax, flax
or optax, so the packages that re-export computing modules resolve their
public names lazily (PEP 562)::

    _LAZY = {"Decoder": "rlpipe.models.decoder", ...}
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)

with the same names imported under ``if TYPE_CHECKING:`` for type checkers.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: ``names`` maps each
    public name to the module defining it; a name is imported on its first
    use and then cached in the package's namespace."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *names})

    return __getattr__, __dir__
