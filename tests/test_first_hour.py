"""What a new user meets in the first hour: one-line option errors, tables that
fit the terminal, per-step progress lines when stderr is not a terminal,
messages that say where a run starts, no run directory left by a failed
start, and an evaluation that says what it did."""

import io
import json
import re
import shutil

import pytest
from click.testing import CliRunner

from rlpipe.cli.main import cli, main
from rlpipe.cli.progress import ProgressDisplay, display_mode, progress_display

SMALL = ["--set", "train.prompts_per_item=2", "--set", "train.items_per_step=2",
         "--set", "roles.rollout.max_new_tokens=4", "--set", "roles.rollout.num_generations=2",
         "--set", "roles.trainer.micro_batch_size=4"]


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


# -- option errors ---------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--steps", "-1"], "'--steps': -1 is not in the range x>=1"),
    (["train", "--steps", "0"], "'--steps': 0 is not in the range x>=1"),
    (["plan", "--devices", "0"], "'--devices': 0 is not in the range x>=1"),
    (["train", "--no-such-option"], "No such option '--no-such-option'"),
    (["eval"], "Missing argument 'RUN_DIR'"),
])
def test_an_option_error_is_one_line_and_exits_2(capsys, argv, fragment):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    (line,) = err.splitlines()
    assert line.startswith(f"error: rlpipe {argv[0]}: ") and fragment in line
    assert line.endswith(f"(see 'rlpipe {argv[0]} --help')")


def test_a_run_dir_that_is_a_file_is_one_line(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    code, _, err = run_main(capsys, "train", "--run-dir", str(afile))
    assert code == 2 and len(err.splitlines()) == 1 and "is a file" in err


# -- tables ------------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["roles", "plugins", "placements"])
@pytest.mark.parametrize("columns", [80, 120])
def test_listings_fit_the_terminal_and_json_keeps_everything(group, columns):
    r = CliRunner(env={"COLUMNS": str(columns)}).invoke(cli, [group, "list"])
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.stdout.splitlines()) <= columns
    data = json.loads(CliRunner(env={"COLUMNS": "40"}).invoke(cli, [group, "list", "--json"]).stdout)
    if group == "roles":
        trainer = next(e for e in data if e["name"] == "trainer")
        assert "rollout_logprobs" in trainer["consumes"]  # nothing elided from --json
        assert "rollout_logprobs" in r.stdout  # and wrapped, not cut, in the table


def test_plugins_list_groups_what_each_plugin_provides_by_kind():
    r = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["plugins", "list"])
    line = next(line for line in r.stdout.splitlines() if line.startswith("tasks "))
    assert "task: reverse, sort, add" in line


# -- progress ------------------------------------------------------------------------------


def test_display_mode_follows_the_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert display_mode(quiet=False, primary=True, stream=Tty()) == "bar"
    assert display_mode(quiet=False, primary=True, stream=io.StringIO()) == "lines"
    assert display_mode(quiet=True, primary=True, stream=Tty()) == "off"
    assert display_mode(quiet=False, primary=False, stream=Tty()) == "off"


def test_lines_mode_prints_one_plain_line_per_step_with_eta():
    stream = io.StringIO()
    with progress_display(4, mode="lines", stream=stream) as display:
        for step, seconds in enumerate([20.0, 2.0, 4.0]):
            display.report({"step": step, "reward/mean": 0.5 + step, "loss": 0.25, "kl": 0.01,
                            "time/step_s": seconds})
        display.log("checkpoint of step 2 started")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "rlpipe: step 0 (1/4)  reward 0.500  loss 0.25  kl 0.0100  20.00 s/step  ETA 0:01:00"
    # The first step (compilation) is left out of the ETA once others ran: median(2, 4) = 3 s.
    assert lines[2] == "rlpipe: step 2 (3/4)  reward 2.500  loss 0.25  kl 0.0100  4.00 s/step  ETA 0:00:03"
    assert lines[3] == "rlpipe: checkpoint of step 2 started"
    assert display.stopped("SIGINT", "resume with: x") == "stopped by SIGINT after step 2 (3 of 4 steps done); resume with: x"


def test_bar_mode_prints_messages_on_their_own_lines():
    from rich.console import Console

    stream = io.StringIO()
    display = ProgressDisplay(3, mode="bar", prefix="rlpipe",
                              console=Console(file=stream, force_terminal=True, width=100))
    with display._bar():
        display.report({"step": 0, "reward/mean": 1.0, "time/step_s": 1.0})
        display.log("checkpoint of step 0 started")
    # What the terminal shows, line by line: rich clears the bar's line (ESC[2K),
    # prints the message and draws the bar again below it.
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())
    lines = [part for line in shown.split("\n") for part in line.split("\r")]
    assert "rlpipe: checkpoint of step 0 started" in lines
    assert not any("ETA" in line and "rlpipe:" in line for line in lines)


# -- a run from start to finish, seen from the shell ----------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("first-hour") / "run"
    r = CliRunner().invoke(cli, ["train", "--steps", "2", "--run-dir", str(run_dir), *SMALL])
    return run_dir, r


@pytest.mark.slow
def test_a_run_with_stderr_not_a_terminal_shows_every_step(short_run):
    run_dir, r = short_run
    assert r.exit_code == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == f"rlpipe: training 2 steps in a new run directory {run_dir}"
    steps = [line for line in lines if line.startswith("rlpipe: step ")]
    assert [line.split()[2:4] for line in steps] == [["0", "(1/2)"], ["1", "(2/2)"]]
    assert all("reward " in line and "loss " in line and " s/step" in line and "ETA " in line for line in steps)


@pytest.mark.slow
def test_a_finished_run_is_recognised_before_any_model_is_built(short_run, monkeypatch):
    run_dir, _ = short_run

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr("rlpipe.app.driver.build_stages", no_models)
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(run_dir), "--steps", "2"])
    assert r.exit_code == 0, r.stderr
    assert f"{run_dir}: the run already completed step 1 (2 of 2 steps); raise --steps to continue it" in r.stderr
    assert "finished" not in r.stderr  # nothing ran: no second, contradicting line


@pytest.mark.slow
def test_resuming_a_run_without_a_checkpoint_says_it_starts_from_step_0(short_run, tmp_path, monkeypatch):
    run_dir, _ = short_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints")

    class Built(Exception):
        pass

    def stop_here(*args, **kwargs):
        raise Built

    monkeypatch.setattr("rlpipe.app.driver.build_stages", stop_here)
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(copy), "--steps", "2"])
    assert isinstance(r.exception, Built)
    assert f"rlpipe: training 2 steps in {copy}: it has no checkpoint yet, so the run starts from step 0" in r.stderr
    assert copy.is_dir()  # a directory that was there before is never removed


@pytest.mark.parametrize("overrides", [
    ["--set", "task.name=jsonl", "--set", "task.options.path=no-such-file.jsonl"],
    ["--set", "placement.policy=no-such-policy"],
])
def test_a_start_that_fails_leaves_no_run_directory(tmp_path, overrides):
    run_dir = tmp_path / "runs" / "new"
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(run_dir), *overrides])
    assert r.exit_code == 2 and r.stderr.startswith("error: ")
    assert not (tmp_path / "runs").exists()


def test_a_start_that_fails_after_the_run_directory_exists_removes_what_it_created(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "new"

    def broken(*args, **kwargs):
        from rlpipe.core.errors import UsageError

        raise UsageError("broken model")

    monkeypatch.setattr("rlpipe.app.driver.build_stages", broken)
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(run_dir), *SMALL])
    assert r.exit_code == 2 and "broken model" in r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_eval_says_when_the_split_has_fewer_examples_and_what_counts_as_correct(short_run):
    run_dir, _ = short_run
    r = CliRunner().invoke(cli, ["eval", str(run_dir), "-n", "500", "-k", "0"])
    assert r.exit_code == 0, r.stderr
    assert "has 9 distinct examples; evaluated all 9 of the 500 asked for" in r.stderr
    assert "correct: reward 'partial-match' >= 1" in r.stdout
