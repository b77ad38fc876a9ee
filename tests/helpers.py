"""Shared helpers for the tests (not fixtures: plain functions)."""

from __future__ import annotations

from pathlib import Path

from rlpipe.app.defaults import DEFAULT_CONFIG
from rlpipe.core.config import merge
from rlpipe.runtime.planning import plan_run
from rlpipe.runtime.run_config import build_config
from rlpipe.testing import fake_devices

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def config(registry, data: dict | None = None):
    return build_config(merge(DEFAULT_CONFIG, data or {}), registry)


def plan(registry, data: dict | None = None, n: int = 8):
    return plan_run(config(registry, data), registry, fake_devices(n)).plan


def mesh(shape, axes=("fsdp", "tp")):
    return {"shape": list(shape), "axes": list(axes)}
