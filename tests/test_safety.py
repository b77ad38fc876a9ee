"""Safety nets of a run: a prompt token the model has no embedding for is an
error naming the example (not NaN log-probs), and the metrics' step time
leaves the end-of-run checkpoint out."""

import json
import re
import time

import numpy as np
import pytest
from click.testing import CliRunner

from rlpipe import Batch
from rlpipe.cli.main import cli
from rlpipe.core.errors import PromptTokenError, UsageError
from rlpipe.roles.rollout_stage import check_prompt_tokens

SMALL = ["--set", "train.prompts_per_item=2", "--set", "train.items_per_step=2",
         "--set", "roles.rollout.max_new_tokens=4", "--set", "roles.rollout.num_generations=2",
         "--set", "roles.trainer.micro_batch_size=4"]


def item(tokens, mask, **fields):
    return Batch(prompt_tokens=np.asarray(tokens, np.int32), prompt_mask=np.asarray(mask, np.int32), **fields)


def test_prompt_ids_inside_the_vocabulary_pass_and_padding_is_not_checked():
    # 999 sits under the mask (padding): the model never embeds it as a token of the prompt.
    check_prompt_tokens(item([[5, 127, 999], [0, 1, 2]], [[1, 1, 0], [1, 1, 1]]), 128)


def test_a_prompt_id_outside_the_vocabulary_names_the_example_the_id_and_the_vocabulary():
    batch = item([[5, 6, 7, 0], [8, 128, 9, 300]], [[1, 1, 1, 0], [1, 1, 1, 1]],
                 example_id=np.array([40, 41]), example=np.array([{"prompt": "abc"}, {"prompt": "d?e!"}], dtype=object))
    with pytest.raises(PromptTokenError) as info:
        check_prompt_tokens(batch, 128, tokenizer_vocab=400)
    assert isinstance(info.value, UsageError)
    assert str(info.value) == ("example 41 (prompt 'd?e!'): token id 128 at prompt position 1 is outside the model's "
                               "vocabulary of 128 ids (0..127); the tokenizer has 400 ids; 1 more such token(s) in this "
                               "item: the tokenizer does not match the model (model.tokenizer)")


def test_a_negative_prompt_id_is_an_error_too_and_a_left_padded_position_counts_the_prompts_tokens():
    with pytest.raises(PromptTokenError, match=r"^prompt 0 of the item: token id -1 at prompt position 1 "):
        check_prompt_tokens(item([[0, 0, 5, -1]], [[0, 0, 1, 1]]), 128)


@pytest.mark.slow
def test_train_stops_with_one_line_naming_the_example_when_the_tokenizer_overflows_the_model(tmp_path, monkeypatch):
    from rlpipe.models.tokenizer import CharTokenizer

    encode = CharTokenizer.encode
    # A tokenizer that does not match the tiny model (128 embedding rows): every prompt ends in id 130.
    monkeypatch.setattr(CharTokenizer, "encode", lambda self, text: [*encode(self, text), 130])
    r = CliRunner().invoke(cli, ["train", "--steps", "1", "--run-dir", str(tmp_path / "run"), "-q", *SMALL])
    assert r.exit_code == 1
    last = r.stderr.splitlines()[-1]
    assert re.fullmatch(r"error: stage 'rollout' failed at step 0, micro-batch 0: PromptTokenError: example 0 "
                        r"\(prompt '.+'\): token id 130 at prompt position \d+ is outside the model's vocabulary of 128 "
                        r"ids \(0\.\.127\); the tokenizer has 100 ids; 1 more such token\(s\) in this item: the "
                        r"tokenizer does not match the model \(model\.tokenizer\)", last), last
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_the_last_rows_step_time_leaves_the_end_of_run_checkpoint_out(tmp_path, monkeypatch):
    from rlpipe.roles.trainer_stage import TrainerStage

    pause = 3.0
    state = TrainerStage.state

    def slow_state(self):  # the host copy the executor takes for the final checkpoint, after the last barrier
        time.sleep(pause)
        return state(self)

    monkeypatch.setattr(TrainerStage, "state", slow_state)
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--steps", "2", "--run-dir", str(run_dir), "-q", *SMALL])
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    assert "time/checkpoint_s" not in rows[0]  # no checkpoint after step 0 (checkpoint.every)
    # The final checkpoint is reported on its own row, as checkpoint time; the step's own time is
    # the update's (a fraction of a second here), not the pause.
    assert rows[-1]["time/checkpoint_s"] >= pause
    assert 0 < rows[-1]["time/step_s"] < pause
