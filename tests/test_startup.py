"""The CLI's quick commands start without loading jax, flax or optax.

``rlpipe --version``, ``--help`` and the listings need only the plugins'
specs (names, descriptions, config types, fields consumed and produced), so
they must not pay for importing the numerical stack: the modules that build
stages, models and losses import it when they run.  What is asserted is the
behaviour (which modules a fresh interpreter imported), not a wall-clock
time; ``benchmarks/startup.py`` measures the time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("jax", "flax", "optax")

#: Runs ``rlpipe`` in-process on the arguments after ``-c``; at exit prints on
#: stderr, as the last line, which of HEAVY it imported (even after SystemExit).
PROBE = f"""\
import atexit, json, sys
atexit.register(lambda: print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr))
from rlpipe.cli.main import main
main(sys.argv[1:])
"""


def _imports(*args: str) -> tuple[list[str], subprocess.CompletedProcess]:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    heavy = json.loads(result.stderr.strip().splitlines()[-1])
    return heavy, result


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["roles", "--help"], ["roles", "list"],
                                  ["placements", "list"], ["plugins", "list"], ["plugins", "list", "--json"]],
                         ids=" ".join)
@pytest.mark.slow
def test_quick_commands_do_not_import_the_numerical_stack(args):
    heavy, result = _imports(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert heavy == [], f"rlpipe {' '.join(args)} imported {heavy}"


def test_checking_the_default_config_does_not_import_the_numerical_stack():
    heavy, result = _imports("config", "validate")
    assert result.returncode == 0, result.stderr
    assert "config is valid" in result.stdout
    assert heavy == []


@pytest.mark.slow
def test_the_probe_sees_an_import_of_jax():
    """The check is not vacuous: a command that needs jax is reported."""
    code = PROBE.replace("from rlpipe.cli.main import main\nmain(sys.argv[1:])", "import rlpipe\nrlpipe.Batch")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "jax" in json.loads(result.stderr.strip().splitlines()[-1])


@pytest.mark.slow
def test_import_rlpipe_is_light_and_every_public_name_resolves():
    code = ("import sys, rlpipe\n"
            "light = not any(m in sys.modules for m in ('jax', 'flax', 'optax'))\n"
            "missing = [n for n in rlpipe.__all__ if getattr(rlpipe, n, None) is None]\n"
            "print(light, missing, rlpipe.__version__ == __import__('importlib.metadata').metadata.version('rlpipe'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["True", "[]", "True"], result.stderr
