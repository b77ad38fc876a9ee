"""Fake CPU devices for the benchmarks that need several (the example placements use 8).

Import this and call :func:`request` before anything imports JAX: XLA reads
``--xla_force_host_platform_device_count`` once, when the CPU backend starts.
It only adds CPU devices; an accelerator's devices are unaffected.
"""

from __future__ import annotations

import os
import re
import sys

FLAG = "--xla_force_host_platform_device_count"


def request(n: int) -> None:
    """Asks for ``n`` CPU devices (replacing any count already in ``XLA_FLAGS``).

    Raises:
        RuntimeError: JAX was imported already, so the request could not take effect.
    """
    if "jax" in sys.modules:
        raise RuntimeError(f"{FLAG} must be set before JAX is imported")
    flags = re.sub(rf"{FLAG}=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={n}".strip()
