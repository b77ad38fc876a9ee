"""Test set-up: 8 fake CPU devices, configured before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A plugin problem in the developer's environment must not leak into tests.
os.environ.pop("RLPIPE_DISABLE_PLUGINS", None)
os.environ.pop("RLPIPE_STRICT_PLUGINS", None)

import pytest  # noqa: E402

from rlpipe.core.plugins import load_registry  # noqa: E402


@pytest.fixture
def registry():
    """The registry of the installed plugins (rlpipe's built-ins)."""
    return load_registry(warn=lambda m: None)
