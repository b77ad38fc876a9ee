"""``rlpipe export RUN_DIR``: a run's trained policy as files other tools read.

``--adapters OUT`` writes a LoRA run's adapters in PEFT's layout
(``adapter_model.safetensors`` + ``adapter_config.json``, which
``peft.PeftModel.from_pretrained(base, OUT)`` loads over the base model);
``--merged OUT`` writes a Hugging Face checkpoint of the policy, with a LoRA
run's adapters folded into the base weights.  Both read the run's latest
checkpoint (or ``--step``); a LoRA checkpoint holds the adapters only, so the
base is loaded as the run's config says (and checked against the identity
the checkpoint recorded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from rlpipe.cli.context import registry_of


def trained_policy(run_dir: Path, config: Any, step: int | None, *, role: str) -> tuple[Any, int]:
    """The policy of checkpoint ``step`` (the latest when ``None``) of
    ``run_dir``, as a decoder on the default device: with ``model.lora``, the
    base the config loads plus the checkpoint's adapters; else the
    checkpoint's parameters.

    Raises:
        CheckpointError: no such checkpoint, one that does not fit the model,
            or a LoRA checkpoint whose base model has changed since.
    """
    from flax import nnx

    from rlpipe.cli.eval import run_checkpoint
    from rlpipe.models.loading import load_policy
    from rlpipe.models.lora import LoRAParam

    checkpointer, step = run_checkpoint(run_dir, config, step)
    lora = config.model.lora
    if lora is not None:
        model = load_policy(config.model, seed=config.train.seed)  # the base, and adapters to overwrite
        template = nnx.state(model, LoRAParam)
    else:
        # Shapes only: nothing is initialised, the restored arrays are the only copy.
        model = nnx.eval_shape(lambda: load_policy(config.model, seed=config.train.seed, master=True))
        template = nnx.state(model)
    nnx.update(model, checkpointer.restore_subtree(step, role, ("params",), template))
    return model, step


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--adapters", "adapters_out", type=click.Path(), default=None,
              help="Write a LoRA run's adapters here, in PEFT's layout (adapter_model.safetensors, adapter_config.json).")
@click.option("--merged", "merged_out", type=click.Path(), default=None,
              help="Write the policy here as a Hugging Face checkpoint (LoRA adapters folded into the base).")
@click.option("--step", type=click.IntRange(min=0), default=None, help="Export this checkpoint (default: the latest).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Store the tensors in this dtype (default: as trained).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
@click.pass_context
def export_cmd(ctx: click.Context, run_dir: str, adapters_out: str | None, merged_out: str | None, step: int | None,
               dtype: str | None, as_json: bool) -> None:
    """Export RUN_DIR's latest (or --step) policy: --adapters OUT (PEFT
    layout, LoRA runs) and/or --merged OUT (a Hugging Face checkpoint)."""
    from rlpipe.cli.eval import policy_role
    from rlpipe.core.errors import UsageError

    if adapters_out is None and merged_out is None:
        raise UsageError("nothing to export: give --adapters OUT and/or --merged OUT")
    path = Path(run_dir)
    reg = registry_of(ctx)
    from rlpipe.cli.eval import run_config_of

    config = run_config_of(path, reg)
    lora = config.model.lora
    if adapters_out is not None and lora is None:
        raise UsageError(f"{path}: --adapters: the run trained the whole model (model.lora is not set); "
                         "export it with --merged")
    model, used = trained_policy(path, config, step, role=policy_role(config, reg))

    from flax import nnx

    from rlpipe.models import hf
    from rlpipe.models.lora import save_merged, save_peft

    state = nnx.state(model)
    written: dict[str, Any] = {"run_dir": str(path), "checkpoint_step": used}
    if adapters_out is not None:
        base_name = config.model.path or (None if config.model.architecture is not None else config.model.preset)
        save_peft(adapters_out, state, lora, model.config, base_model_name_or_path=base_name, dtype=dtype)
        written["adapters"] = str(adapters_out)
    if merged_out is not None:
        if lora is not None:
            save_merged(merged_out, state, lora, model.config, dtype=dtype)
        else:
            hf.save_pretrained(model, merged_out, dtype=dtype)
        written["merged"] = str(merged_out)
    if as_json:
        click.echo(json.dumps(written, indent=2))
        return
    for kind in ("adapters", "merged"):
        if kind in written:
            click.echo(f"{path}: checkpoint of step {used}: {kind} written to {written[kind]}")
