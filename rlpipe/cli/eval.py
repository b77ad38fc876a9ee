"""``rlpipe eval RUN_DIR``: evaluate a run's policy on its task's held-out split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from rlpipe.cli.context import registry_of


def policy_role(config: Any, registry: Any) -> str:
    """The role that trains the policy: the graph's sink (the role whose spec
    says ``sink``), whatever it is called.

    Raises:
        CheckpointError: the run's config has no sink role.
    """
    from rlpipe.runtime.checkpoint import CheckpointError
    from rlpipe.runtime.planning import role_specs

    sinks = [name for name, spec in role_specs(config, registry).items() if spec.sink]
    if not sinks:
        raise CheckpointError("the run's config has no role that trains the policy (no sink role): nothing to evaluate")
    return sinks[0]


def run_checkpoint(run_dir: Path, config: Any, step: int | None) -> tuple[Any, int]:
    """The checkpointer of ``run_dir`` and the step to read (the latest when
    ``step`` is ``None``).  For a LoRA run, the base model the config loads
    must be the one the checkpoint's adapters were trained on.

    Raises:
        CheckpointError: no checkpoint, no checkpoint of ``step``, or a LoRA
            checkpoint whose base model has changed since.
    """
    from rlpipe.runtime.checkpoint import (
        CheckpointError,
        RunCheckpointer,
        base_changes,
        base_identity,
    )

    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: the run has no checkpoints (was it stopped before its first one?)")
    checkpointer = RunCheckpointer(directory, primary=False)
    steps = checkpointer.steps()
    if not steps:
        raise CheckpointError(f"{directory}: no complete checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{directory}: no checkpoint of step {step} (there are: {', '.join(map(str, steps))})")
    if config.model.lora is not None:
        changed = base_changes(checkpointer.meta(step).get("base"), base_identity(config.model))
        if changed:
            raise CheckpointError(f"{directory / str(step)}: the adapters were trained on another base model: {changed[0]}")
    return checkpointer, step


def load_policy(run_dir: Path, config: Any, step: int | None, *, role: str) -> tuple[Any, int]:
    """The parameters of ``role`` (the one that trains the policy, see
    :func:`policy_role`) from checkpoint ``step`` (the latest when ``None``)
    of ``run_dir``, as host-placed arrays shaped like the policy — for a LoRA
    run, the adapters alone (``rlpipe.app.evaluation.evaluate`` installs them
    over the base).

    Raises:
        CheckpointError: see :func:`run_checkpoint`, or a checkpoint that does not fit the model.
    """
    from flax import nnx

    from rlpipe.models.loading import load_model
    from rlpipe.models.loading import load_policy as build_policy

    checkpointer, step = run_checkpoint(run_dir, config, step)
    # Shapes only: nothing is initialised, the restored arrays are the only copy.
    if config.model.lora is not None:
        from rlpipe.models.lora import LoRAParam

        template = nnx.state(nnx.eval_shape(lambda: build_policy(config.model, seed=config.train.seed)), LoRAParam)
    else:
        template = nnx.state(nnx.eval_shape(lambda: load_model(config.model, seed=config.train.seed)))
    return checkpointer.restore_subtree(step, role, ("params",), template), step


def run_config_of(run_dir: Path, registry: Any) -> Any:
    """The resolved config a run directory was trained with (its ``config.yaml``).

    Raises:
        RunDirError: not a run directory, or an unreadable config.
    """
    import yaml

    from rlpipe.core.errors import RunDirError
    from rlpipe.runtime.run_config import load_config

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no config.yaml)")
    try:
        data = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RunDirError(f"{saved}: cannot read the run's config: {str(exc).splitlines()[0]}") from exc
    return load_config(registry, defaults=data if isinstance(data, dict) else {})


@click.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--step", type=click.IntRange(min=0), default=None, help="Evaluate this checkpoint (default: the latest).")
@click.option("--initial", is_flag=True, help="Evaluate the initial policy instead of a checkpoint (a baseline).")
@click.option("--split", default="eval", show_default=True, help="The task split: eval (held out) or train.")
@click.option("-n", "--num-examples", type=click.IntRange(min=1), default=128, show_default=True,
              help="Evaluate the first N distinct examples of the split (all of them if it has fewer; the output says so).")
@click.option("-k", type=click.IntRange(min=0), default=4, show_default=True, help="pass@k's k (0: greedy only).")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Samples per example (≥ k; default k).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.pass_context
def eval_cmd(ctx: click.Context, run_dir: str, step: int | None, initial: bool, split: str, num_examples: int,
             k: int, num_samples: int | None, as_json: bool) -> None:
    """Evaluate RUN_DIR's latest (or --step) policy on its task's held-out
    split: greedy accuracy, sampled pass@k and mean reward."""
    from rlpipe.app.evaluation import evaluate

    path = Path(run_dir)
    reg = registry_of(ctx)
    config = run_config_of(path, reg)
    state, used = (None, None) if initial else load_policy(path, config, step, role=policy_role(config, reg))
    result = evaluate(config, reg, model_state=state, split=split, num_examples=num_examples, k=k,
                      num_samples=num_samples)
    result = {"run_dir": str(path), "checkpoint_step": used, "examples_requested": num_examples, **result}
    if result.get("examples", num_examples) < num_examples:
        click.echo(f"note: split {split!r} of task {config.task.name!r} has {result['examples']} distinct examples; "
                   f"evaluated all {result['examples']} of the {num_examples} asked for", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    which = "initial policy" if used is None else f"checkpoint of step {used}"
    click.echo(f"{path}: {which}, task {config.task.name!r}, split {split!r}, {result.get('examples')} examples")
    if result.get("correct_reward"):
        click.echo(f"correct: reward {result['correct_reward']!r} >= {result.get('correct_threshold', 1.0):g} "
                   "(the task's first reward function)")
    elif "correct_threshold" in result:
        click.echo(f"correct: the episode succeeded (its environment's success metric), else its reward "
                   f">= {result['correct_threshold']:g}")
    if result.get("format_reward"):
        click.echo(f"format: the mean of reward {result['format_reward']!r}, right answer or not "
                   "(greedy/format, sampled/format)")
    skip = {"checkpoint_step", "examples_requested"}
    rows = [(key, value) for key, value in result.items() if isinstance(value, (int, float)) and key not in skip]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        shown = "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        click.echo(f"{key.ljust(width)}  {shown}")
