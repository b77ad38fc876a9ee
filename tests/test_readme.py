"""The README's two commands stay true: CI runs the README's test command, and
the run command's rlpipe part works."""

import json
import re
import subprocess
import sys

from helpers import ROOT


def readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_command():
    run_cmd, test_cmd = readme_commands()
    assert run_cmd.startswith("pip install -e . && rlpipe ")
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_run_command_succeeds_and_writes_a_run_directory(tmp_path):
    run_cmd, _ = readme_commands()
    rlpipe_args = run_cmd.split("&& rlpipe ", 1)[1].split()
    r = subprocess.run([sys.executable, "-m", "rlpipe", *rlpipe_args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and rows[-1]["policy_version"] == 20
