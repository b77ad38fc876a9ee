"""The README's two commands stay true: CI runs the README's test command, and
the run command's rlpipe part works."""

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT


def readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_command():
    run_cmd, test_cmd = readme_commands()
    assert run_cmd.startswith("pip install -e . && rlpipe ")
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.slow
def test_the_run_command_succeeds_and_writes_a_run_directory(tmp_path):
    run_cmd, _ = readme_commands()
    rlpipe_args = run_cmd.split("&& rlpipe ", 1)[1].split()
    # As on a fresh machine: the CPU's one device, not the tests' 8 fake ones.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "rlpipe", *rlpipe_args], capture_output=True, text=True, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0, r.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and rows[-1]["policy_version"] == 20


def test_the_sample_plan_output_is_what_rlpipe_prints():
    """The README's "A first look" block is the real output of its command."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## A first look", 1)[1].split("```console\n", 1)[1].split("\n```", 1)[0]
    lines = block.splitlines()
    assert lines[0].startswith("$ export XLA_FLAGS=--xla_force_host_platform_device_count=8")
    command = lines[1].removeprefix("$ ").split()
    assert command[:2] == ["rlpipe", "plan"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "COLUMNS": "120"}
    r = subprocess.run([sys.executable, "-m", "rlpipe", *command[1:]], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n").splitlines() == lines[2:]


def test_the_readme_names_a_fast_test_subset_that_exists():
    text = (ROOT / "README.md").read_text()
    assert 'python -m pytest -q -m "not slow"' in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"slow:' in pyproject
