"""The embedded default learns: `rlpipe train` with no arguments raises the
reward of the random-init tiny model on the reverse task (seeded, so the
curve is the same on every run; about half a minute on a 2-core CPU)."""

import json

import pytest
from click.testing import CliRunner

from rlpipe.cli.main import cli

#: End to end: every test here trains, resumes or runs processes (`-m "not slow"` skips them).
pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_the_embedded_default_visibly_learns(tmp_path):
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "-q", "--run-dir", str(run_dir)])
    assert r.exit_code == 0, r.stderr
    rewards = [json.loads(line)["reward/mean"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    # Measured (seed 0): first 5 steps 0.38, last 5 steps 1.73 (reward at most 2:
    # partial-match + digits); a random policy scores ~0.07.
    assert first < 0.6, rewards
    assert last > 1.3 and last > 2 * first, rewards


def test_digits_reward_is_the_share_of_digit_characters():
    from rlpipe.plugins.rewards import digits

    assert digits("", "21", {"answer": "12"}) == 1.0
    assert digits("", " 2x ", {"answer": "12"}) == 0.5 and digits("", "", {"answer": "12"}) == 0.0
