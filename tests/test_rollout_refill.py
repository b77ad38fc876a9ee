"""roles.rollout.refill_rows: continuous batching in the rollout role changes nothing learned."""

import json

import pytest

from rlpipe.app.defaults import DEFAULT_CONFIG
from rlpipe.core.errors import ConfigError
from rlpipe.core.plugins import load_registry
from rlpipe.runtime.run_config import load_config

SMALL = ["train.steps=2", "train.prompts_per_item=4", "train.items_per_step=1", "roles.rollout.num_generations=4",
         "roles.rollout.max_new_tokens=6", "roles.trainer.micro_batch_size=16", "checkpoint.every=0"]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_refilled_rollouts_train_exactly_as_all_rows_at_once(tmp_path):
    from rlpipe.app.driver import train

    registry = load_registry()
    runs = {}
    for name, extra in {"all": [], "refill": ["roles.rollout.refill_rows=3"]}.items():
        # The colocated seed placement: the rollout's mesh (1, 4) keeps its rows on one device group
        # (continuous batching does not split rows over devices).
        config = load_config(registry, defaults=DEFAULT_CONFIG, files=["examples/colocated.yaml"], overrides=[*SMALL, *extra])
        train(config, registry, run_dir=tmp_path / name)
        runs[name] = rows(tmp_path / name)
    for a, b in zip(runs["all"], runs["refill"], strict=True):
        assert a["reward/mean"] == b["reward/mean"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)


def test_refill_rows_is_refused_for_agentic_rollouts(tmp_path):
    from rlpipe.app.driver import train

    registry = load_registry()
    config = load_config(registry, defaults=DEFAULT_CONFIG, files=["examples/agentic_calculator.yaml"],
                         overrides=["train.steps=1", "roles.rollout.refill_rows=4"])
    with pytest.raises(Exception) as info:
        train(config, registry, run_dir=tmp_path / "run")
    chain = [info.value, info.value.__cause__, info.value.__context__]
    assert any(isinstance(e, ConfigError) and "roles.rollout.refill_rows: agentic episodes" in str(e) for e in chain), info.value


def test_refill_rows_must_be_positive():
    with pytest.raises(ConfigError, match="refill_rows"):
        load_config(load_registry(), defaults=DEFAULT_CONFIG, overrides=["roles.rollout.refill_rows=0"])
