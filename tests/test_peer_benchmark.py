"""benchmarks/peers/tunix.py without Tunix: its rlpipe half on tiny shapes
follows the record schema, the variable-length workload yields the planned
lengths, and a missing Tunix environment is a clean skip.  No timing is
asserted."""

import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import results  # noqa: E402 - after the sys.path change

# Loaded under another name: as `tunix` it would shadow the real package.
_spec = importlib.util.spec_from_file_location("peer_tunix", BENCHMARKS / "peers" / "tunix.py")
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)

TINY = {"gen_short": {"batch": 2, "prompt_len": 4, "new_tokens": 4},
        "variable": {"batch": 4, "prompt_len": 4, "new_tokens": 8, "min_len": 2, "max_len": 7},
        "grpo": {"prompts": 2, "generations": 2, "new_tokens": 2}}


def assert_schema(records):
    assert records
    for rec in records:
        results.check(rec)
        assert list(rec)[:5] == list(results.KEYS)
        assert json.loads(json.dumps(rec)) == rec
        assert rec["ceiling"] is None and rec["ratio"] is None


def by_name(records, name):
    return [r for r in records if r["name"] == name]


def test_the_rlpipe_half_of_the_generation_workloads_follows_the_schema():
    out = io.StringIO()
    records = peer.measure(only=("gen_short", "variable"), repeats=2, frameworks=("rlpipe",), shape_overrides=TINY,
                           emit=results.Sink([out]))
    assert_schema(records)
    assert [json.loads(line) for line in out.getvalue().splitlines()] == records
    assert [r["when"] for r in by_name(records, "host_load")] == ["start", "end"]
    (gen,) = by_name(records, "peer_generate_throughput")
    assert gen["framework"] == "rlpipe" and gen["unit"] == "tokens/s" and len(gen["times_s"]) == 2
    assert gen["useful_tokens"] == 2 * 4 and gen["value"] > 0
    var, refill = by_name(records, "peer_variable_throughput")  # all rows at once, then continuous batching
    assert (var["framework"], refill["framework"]) == ("rlpipe", "rlpipe_refill")
    assert refill["useful_tokens"] == var["useful_tokens"]
    # Every row stopped after exactly its planned number of tokens (the successor model).
    firsts = [r for r in by_name(records, "peer_first_call") if r["workload"] == "variable"]
    assert [r["rows_as_planned"] for r in firsts] == [4, 4]
    assert 4 * 2 <= var["useful_tokens"] <= 4 * 7
    assert not by_name(records, "peer_speedup")  # one framework: nothing to pair


def test_the_successor_model_counts_up_to_the_stop_token():
    import numpy as np

    graphdef, state = peer.rlpipe_model()
    counter = peer.RlpipeGenerator(graphdef, peer.successor_state(state))
    stop = peer.ARCHITECTURE["vocab"] - 1
    prompts = np.array([[5, 9, stop - 1 - 3], [7, 1, stop - 1 - 6]], np.int32)
    assert counter(prompts, 10, stop=stop, repeat=0) == [4, 7]  # 3 and 6 tokens, then the stop token
    # The original weights are untouched: without a stop token every row runs to the end.
    assert peer.RlpipeGenerator(graphdef, state)(prompts, 10, stop=None, repeat=0) == [10, 10]


@pytest.mark.slow
def test_the_rlpipe_half_of_the_grpo_step_follows_the_schema():
    records = peer.measure(only=("grpo",), repeats=1, frameworks=("rlpipe",), shape_overrides=TINY,
                           emit=results.Sink())
    assert_schema(records)
    (step,) = by_name(records, "peer_grpo_step_time")
    assert step["unit"] == "s" and step["value"] > 0 and step["framework"] == "rlpipe"
    assert step["steps_done"] == step["warmup_steps"] + 1


def test_paired_speedup_is_the_median_of_the_per_repeat_ratios():
    assert results.paired_speedup([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0


def test_a_missing_tunix_environment_is_a_clean_skip(tmp_path, capsys):
    assert peer.main(["--venv", str(tmp_path / "none"), "--no-install", "--quick"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("peer benchmark skipped: Tunix is not available: ")
