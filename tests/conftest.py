"""Test set-up: 8 fake CPU devices, configured before JAX initialises."""

import os

# The 8 fake devices' collectives meet in one process: on a loaded 2-core CI
# machine a participant can be starved past XLA:CPU's 40 s rendezvous timeout,
# which aborts the process (seen with several test processes sharing the
# cores); a longer timeout turns that into a slow step instead of a crash.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=900"
                           " --xla_cpu_collective_timeout_seconds=900").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A plugin problem in the developer's environment must not leak into tests.
os.environ.pop("RLPIPE_DISABLE_PLUGINS", None)
os.environ.pop("RLPIPE_STRICT_PLUGINS", None)

import pytest

from rlpipe.core.plugins import load_registry

#: The engine tests' shared ``model`` and ``engine`` fixtures (a module's own fixture of the same name wins).
pytest_plugins = ("engine_fixtures",)


@pytest.fixture
def registry():
    """The registry of the installed plugins (rlpipe's built-ins)."""
    return load_registry(warn=lambda m: None)
