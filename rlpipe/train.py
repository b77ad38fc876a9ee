"""A training run: prompts from a task, the planned stages, the executor, the run directory.

The path from ``rlpipe train`` down: resolve config and plugins
(:mod:`rlpipe.core.config`), plan placement (:func:`rlpipe.core.planning.plan_run`),
build each role's stage on its placement (:func:`~rlpipe.core.planning.build_stages`),
connect the trainer's weight publish to the rollout, and run the stage graph
(:class:`rlpipe.core.graph.Executor`) on items made from the task's examples.

The run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one
object per step, written as each step ends), and ``trace.json`` (Chrome
trace events, written at the end, also after a failure).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rlpipe.core.config import RunConfig, dump_yaml
from rlpipe.core.graph import Executor, RunSummary
from rlpipe.core.planning import build_stages, plan_run
from rlpipe.core.plugins import Registry
from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import Batch
from rlpipe.core.telemetry import Trace


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as the model sees it: through the tokenizer's chat template
    when it has one, as plain text otherwise."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a tokenizer without a chat template
        text = prompt
    return tokenizer.encode(text)


def prompt_items(task: Any, tokenizer: Any, *, seed: int, prompts_per_item: int, items_per_step: int,
                 split: str = "train") -> Iterator[list[Batch]]:
    """Global batches of items from ``task``: each item holds ``prompts_per_item``
    right-padded prompts with their ``example`` (answer and metadata)."""
    examples = task.examples(seed=seed, split=split)
    example_id = 0
    while True:
        items = []
        for _ in range(items_per_step):
            exs = [next(examples) for _ in range(prompts_per_item)]
            ids = [encode_prompt(tokenizer, ex["prompt"]) for ex in exs]
            width = max(len(i) for i in ids)
            tokens = np.full((len(ids), width), tokenizer.pad_id, np.int32)
            mask = np.zeros((len(ids), width), np.int32)
            for r, row in enumerate(ids):
                tokens[r, : len(row)] = row
                mask[r, : len(row)] = 1
            items.append(Batch(prompt_tokens=tokens, prompt_mask=mask,
                               group_id=np.arange(example_id, example_id + len(exs), dtype=np.int64),
                               example_id=np.arange(example_id, example_id + len(exs), dtype=np.int64),
                               example=np.array(exs, dtype=object)))
            example_id += len(exs)
        yield items


def train(config: RunConfig, registry: Registry, *, run_dir: str | Path,
          report: Callable[[dict[str, Any]], None] | None = None) -> RunSummary:
    """Runs ``config`` and writes the run directory; returns the executor's summary.

    Args:
        report: called with each step's metrics (for a progress display).
    """
    run_dir = Path(run_dir)
    planned = plan_run(config, registry)
    config = planned.config
    context = BuildContext(run_config=config, registry=registry, seed=config.train.seed)
    stages = build_stages(planned, context=context)
    trainer = stages.get(planned.graph.sink) if planned.graph.sink else None
    rollout = stages.get("rollout")
    if trainer is not None and rollout is not None and hasattr(trainer, "subscribe") and hasattr(rollout, "load_weights"):
        trainer.subscribe(rollout.load_weights)

    from rlpipe.models.loading import load_tokenizer

    task = registry.get("rlpipe_tasks", config.task.name, path="task.name").factory(config.task.options)
    source = prompt_items(task, load_tokenizer(config.model), seed=config.train.seed,
                          prompts_per_item=config.train.prompts_per_item, items_per_step=config.train.items_per_step)

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    (run_dir / "plan.json").write_text(json.dumps(planned.plan.to_json(), indent=2) + "\n")
    metrics_path = run_dir / "metrics.jsonl"
    trace = Trace()
    last = [time.perf_counter()]

    with metrics_path.open("a") as metrics_file:
        def on_step(step: int) -> None:
            now = time.perf_counter()
            row: dict[str, Any] = {"step": step, "time/step_s": now - last[0]}
            last[0] = now
            row.update(getattr(trainer, "last_metrics", {}) or {})
            for role, stage in stages.items():  # other training roles' metrics, by role (critic/value_loss)
                if stage is not trainer:
                    row.update({f"{role}/{k}": v for k, v in (getattr(stage, "last_metrics", None) or {}).items()})
            row.setdefault("reward/mean", float("nan"))
            reward_stage = stages.get("reward")
            if reward_stage is not None and hasattr(reward_stage, "failures"):
                row["reward/failures"] = reward_stage.failures
            row["policy_version"] = getattr(trainer, "version", step + 1)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()  # a crash never loses a finished step
            if report is not None:
                report(row)

        executor = Executor(planned.graph, stages, planned.plan, max_staleness=config.train.max_staleness,
                            seed=config.train.seed, hooks=registry.hook, trace=trace, on_step=on_step)
        try:
            return executor.run(source, steps=config.train.steps)
        finally:
            trace.write(run_dir / "trace.json")
