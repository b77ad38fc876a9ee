"""The ``rlpipe`` command line.

Data (tables, YAML, JSON) goes to stdout; warnings and errors to stderr.
Exit status: 0 success, 1 run failure, 2 usage or config error, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import click

from rlpipe.cli.context import load_run_config, registry_of
from rlpipe.core.errors import RlpipeError, RunError, UsageError


class _Group(click.Group):
    """Turns rlpipe's own errors into one ``error: ...`` line per problem on
    stderr and the documented exit status, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RlpipeError as exc:
            for line in exc.lines():
                click.echo(f"error: {line}", err=True)
            ctx.exit(exc.exit_code)


def config_options(fn: Callable) -> Callable:
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override one config key (dotted path; VALUE is YAML). Repeatable; applied after files.")(fn)
    fn = click.option("-c", "--config", "files", multiple=True, type=click.Path(dir_okay=False),
                      help="YAML config file. Repeatable; later files override earlier ones.")(fn)
    return fn


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of a table (every field, unabridged).")


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, wrap: Sequence[int] = (),
           width: int | None = None) -> str:
    """A plain-text table that fits ``width`` columns (the terminal's, else
    120): when it would not, the columns listed in ``wrap`` (indices) are
    narrowed, widest first, and their cells wrapped onto further lines.  The
    ``--json`` form of every listing keeps everything on one line."""
    import shutil
    import textwrap

    width = width or shutil.get_terminal_size((120, 24)).columns
    cols = [list(map(str, headers)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    gap = 2
    floor = {i: max(len(str(headers[i])), 12) for i in wrap}
    while sum(widths) + gap * (len(widths) - 1) > width:
        shrinkable = [i for i in wrap if widths[i] > floor[i]]
        if not shrinkable:
            break  # nothing left to narrow: the table overflows rather than becoming unreadable
        widths[max(shrinkable, key=lambda j: widths[j])] -= 1  # the widest first, so they end up balanced
    lines = []
    for n, row in enumerate(cols):
        cells = [textwrap.wrap(c, widths[i], break_on_hyphens=False, break_long_words=False) or [""] if i in wrap else [c]
                 for i, c in enumerate(row)]
        for k in range(max(len(c) for c in cells)):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths)]
            lines.append((" " * gap).join(parts).rstrip())
        if n == 0:
            lines.append((" " * gap).join("-" * w for w in widths))
    return "\n".join(lines)


def _version() -> str:
    from rlpipe import __version__

    return __version__


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=None, package_name="rlpipe", prog_name="rlpipe", message="%(prog)s %(version)s")
@click.option("--no-plugins", is_flag=True, help="Load rlpipe's built-in plugins only.")
@click.pass_context
def cli(ctx: click.Context, no_plugins: bool) -> None:
    """RL post-training of language models as an explicit, pluggable stage graph."""
    ctx.ensure_object(dict)["no_plugins"] = no_plugins


# -- listings --------------------------------------------------------------------------


def _provider(plugin) -> str:
    s = plugin.source
    return f"{s.distribution} {s.version}" if s.distribution else f"{s.name} (in-process)"


@cli.group(cls=_Group)
def roles() -> None:
    """Roles: the stages of the graph."""


@roles.command("list")
@json_option
@click.pass_context
def roles_list(ctx: click.Context, as_json: bool) -> None:
    """List roles with their provider, status and the fields they consume and produce."""
    reg = registry_of(ctx)
    entries = []
    for name, item in sorted(reg.provided("rlpipe_roles").items()):
        spec = item.spec
        entries.append({
            "name": name, "description": spec.description,
            "distribution": item.plugin.source.distribution, "version": item.plugin.source.version,
            "plugin": item.plugin.source.name,
            "status": "active" if spec.factory is not None else "plan-only",
            "note": "" if spec.factory is not None else spec.unavailable,
            "consumes": sorted(spec.consumes), "optional_consumes": sorted(spec.optional_consumes),
            "produces": sorted(spec.produces), "sink": spec.sink,
        })
    for name, plugins in sorted(reg.ambiguous("rlpipe_roles").items()):
        for p in plugins:
            entries.append({"name": name, "description": "", "distribution": p.source.distribution,
                            "version": p.source.version, "plugin": p.source.name, "status": "conflict",
                            "note": "claimed by several plugins; not used", "consumes": [],
                            "optional_consumes": [], "produces": [], "sink": False})
    if as_json:
        _echo_json(entries)
        return
    rows = []
    for e in entries:
        consumes = ", ".join(e["consumes"] + [f"[{f}]" for f in e["optional_consumes"]])
        provider = f"{e['distribution']} {e['version']}" if e["distribution"] else f"{e['plugin']} (in-process)"
        rows.append([e["name"], e["status"], provider, consumes or "-", ", ".join(e["produces"]) or "-"])
    click.echo(_table(["ROLE", "STATUS", "PROVIDED BY", "CONSUMES ([optional])", "PRODUCES"], rows, wrap=(2, 3, 4)))
    notes = [e for e in entries if e["note"]]
    if notes:
        click.echo("")
        for e in notes:
            click.echo(f"{e['name']}: {e['note']}")


def _options_doc(config_type: type | None) -> list[dict[str, Any]]:
    if config_type is None:
        return []
    out = []
    for f in attrs.fields(config_type):
        default = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default
        from rlpipe.core.config import plain_data

        out.append({"name": f.name, "default": plain_data(default)})
    return out


@cli.group(cls=_Group)
def placements() -> None:
    """Colocation policies (placement.policy)."""


@placements.command("list")
@json_option
@click.pass_context
def placements_list(ctx: click.Context, as_json: bool) -> None:
    """List colocation policies with their provider and options."""
    reg = registry_of(ctx)
    entries = []
    for name, item in sorted(reg.provided("rlpipe_placement_policies").items()):
        entries.append({"name": name, "description": item.spec.description,
                        "distribution": item.plugin.source.distribution, "version": item.plugin.source.version,
                        "plugin": item.plugin.source.name, "status": "active",
                        "options": _options_doc(item.spec.config_type)})
    for name, plugins in sorted(reg.ambiguous("rlpipe_placement_policies").items()):
        for p in plugins:
            entries.append({"name": name, "description": "claimed by several plugins; not used",
                            "distribution": p.source.distribution, "version": p.source.version,
                            "plugin": p.source.name, "status": "conflict", "options": []})
    if as_json:
        _echo_json(entries)
        return
    rows = []
    for e in entries:
        provider = f"{e['distribution']} {e['version']}" if e["distribution"] else f"{e['plugin']} (in-process)"
        opts = ", ".join(o["name"] for o in e["options"]) or "-"
        rows.append([e["name"], e["status"], provider, opts, e["description"]])
    click.echo(_table(["POLICY", "STATUS", "PROVIDED BY", "OPTIONS", "DESCRIPTION"], rows, wrap=(2, 3, 4)))


@cli.group(cls=_Group)
def plugins() -> None:
    """Installed plugins."""


@plugins.command("list")
@json_option
@click.pass_context
def plugins_list(ctx: click.Context, as_json: bool) -> None:
    """List plugins (entry points in the 'rlpipe' group): status active, disabled,
    failed or conflict, with the error and what each provides."""
    reg = registry_of(ctx)
    entries = [p.to_json() for p in reg.plugins]
    if as_json:
        _echo_json(entries)
        return
    rows = []
    for e in entries:
        kinds: dict[str, list[str]] = {}
        for p in e["provides"]:
            kinds.setdefault(p["kind"], []).append(p["name"])
        provides = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in kinds.items()) or "-"
        rows.append([e["name"], e["status"], e["distribution"] or "(in-process)", e["version"] or "-", provides])
    click.echo(_table(["PLUGIN", "STATUS", "DISTRIBUTION", "VERSION", "PROVIDES"], rows, wrap=(4,)))
    for e in entries:
        for err in e["errors"]:
            click.echo(f"{e['name']}: {err}")


# -- config -------------------------------------------------------------------------


@cli.group(cls=_Group)
def config() -> None:
    """Show or check the resolved configuration."""


@config.command("show")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of YAML.")
@click.pass_context
def config_show(ctx: click.Context, files: tuple[str, ...], overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the resolved config as YAML, each value with the layer it came
    from: built-in default, embedded default, preset NAME (the model preset's
    tuned values), file PATH or --set KEY=VALUE."""
    from rlpipe.app.defaults import DEFAULT_CONFIG, source_of
    from rlpipe.cli.context import load_run_config_with_sources
    from rlpipe.core.config import dump_yaml_annotated

    cfg, sources = load_run_config_with_sources(ctx, files, overrides)
    data = cfg.to_dict()
    # Files merge over the defaults, so a default role this config removed must
    # be shown as removed (null) for the output to load back to the same config.
    for name in DEFAULT_CONFIG["roles"]:
        data["roles"].setdefault(name, None)
    if as_json:
        _echo_json(data)
    else:
        click.echo(dump_yaml_annotated(data, lambda key: source_of(key, sources)), nl=False)


@config.command("validate")
@config_options
@click.pass_context
def config_validate(ctx: click.Context, files: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Check the config without building any model: keys and values, the
    stage graph, colocation references, datasets and batch arithmetic.

    Device-dependent checks (mesh sizes against the devices present) are made
    by 'rlpipe plan'.
    """
    from rlpipe.runtime.planning import validate_run

    checked = validate_run(load_run_config(ctx, files, overrides), registry_of(ctx))
    click.echo(f"config is valid: roles {', '.join(checked.graph.order)}; "
               f"placement policy {checked.config.placement.policy}")
    for note in checked.notes:
        click.echo(f"note: {note}")


# -- train ---------------------------------------------------------------------------


@cli.command("train")
@config_options
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Shortcut for --set train.steps=N.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Where config.yaml, metrics.jsonl, checkpoints/ and trace.json go (default: runs/<date-time>).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue the run in --run-dir from its latest checkpoint (its config.yaml is the base config).")
@click.option("--force", is_flag=True, help="With --no-resume: delete the existing run in --run-dir and start over.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.option("--coordinator", metavar="HOST:PORT", envvar="RLPIPE_COORDINATOR", show_envvar=True,
              help="Multi-process run: process 0's address and a free port; the same on every process (docs/scaling.md).")
@click.option("--num-processes", type=click.IntRange(min=1), envvar="RLPIPE_NUM_PROCESSES", show_envvar=True,
              help="Multi-process run: how many processes run this command.")
@click.option("--process-id", type=click.IntRange(min=0), envvar="RLPIPE_PROCESS_ID", show_envvar=True,
              help="Multi-process run: this process, 0 .. N-1.")
@click.option("--distributed", "distributed_mode", type=click.Choice(["auto", "off"]), default="off",
              envvar="RLPIPE_DISTRIBUTED", show_envvar=True, show_default=True,
              help="auto: detect the processes from SLURM, Open MPI or a TPU pod slice (explicit options win).")
@click.option("--heartbeat-timeout", type=click.IntRange(min=2), default=60, show_default=True, metavar="SECONDS",
              help="Multi-process run: a process silent this long is lost and every other process stops.")
@click.option("--init-timeout", type=click.IntRange(min=1), default=300, show_default=True, metavar="SECONDS",
              help="Multi-process run: how long processes wait for each other (and the coordinator) at start-up.")
@click.pass_context
def train_cmd(ctx: click.Context, files: tuple[str, ...], overrides: tuple[str, ...], steps: int | None,
              run_dir: str | None, resume: bool, force: bool, quiet: bool, coordinator: str | None,
              num_processes: int | None, process_id: int | None, distributed_mode: str, heartbeat_timeout: int,
              init_timeout: int) -> None:
    """Train: with no arguments, the embedded default (a tiny model learning a
    built-in task on the CPU).

    On an existing --run-dir the run resumes from its latest checkpoint;
    SIGTERM or Ctrl-C finish the current step, write a checkpoint and exit
    with status 143 or 130.

    With --coordinator, --num-processes and --process-id (or --distributed
    auto) every process of a multi-process run executes this same command;
    the placement spans all their devices (docs/scaling.md).
    """
    from rlpipe.runtime import distributed

    # Before anything touches JAX: the distributed runtime must start first.
    session = distributed.initialize(distributed.DistributedOptions(
        coordinator=coordinator, num_processes=num_processes, process_id=process_id,
        auto=distributed_mode == "auto", heartbeat_timeout_s=heartbeat_timeout, init_timeout_s=init_timeout))
    if session is not None:
        # gloo reports its connections on the C-level stdout; `rlpipe train`
        # prints no data there, so this process's stdout goes to stderr.
        sys.stdout.flush()
        os.dup2(2, 1)
    stopped = None
    try:
        _train(ctx, files, overrides, steps, run_dir, resume, force, quiet, session)
    except click.exceptions.Exit as exc:
        stopped = exc  # by a signal: every process stopped after the same step
    except RlpipeError as exc:
        if session is not None:
            session.fail(exc.exit_code, exc.lines()[0])
        raise
    except BaseException as exc:
        if session is not None:
            session.fail(130 if isinstance(exc, KeyboardInterrupt) else 1, f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise
    if session is not None:
        try:
            session.close()  # process 0 hosts the coordination service: everybody leaves together
        except Exception as exc:  # noqa: BLE001 - a process failed at the very end
            session.fail(1, f"could not finish together with the other processes: {exc}".splitlines()[0])
            raise RunError(f"could not finish together with the other processes: {exc}".splitlines()[0]) from exc
    if stopped is not None:
        raise stopped


def _train(ctx: click.Context, files: tuple[str, ...], overrides: tuple[str, ...], steps: int | None,
           run_dir: str | None, resume: bool, force: bool, quiet: bool, session: Any) -> None:
    import time as _time
    from pathlib import Path

    from rlpipe.app.driver import RunControl, train
    from rlpipe.cli.progress import display_mode, progress_display
    from rlpipe.cli.signals import graceful_stop

    primary = session is None or session.is_primary
    if steps is not None:
        overrides = (*overrides, f"train.steps={steps}")
    reg = registry_of(ctx)
    if run_dir is None and session is not None:
        raise UsageError("a multi-process run needs --run-dir: every process must name the same directory")
    path = Path(run_dir or f"runs/{_time.strftime('%Y%m%d-%H%M%S')}")
    if primary:
        _prepare_run_dir(path, resume=resume, force=force)
    if session is not None:
        session.barrier("prepare-run-dir")  # process 0 may have deleted an old run (--force)
    cfg = _load_run_config(ctx, path, files, overrides) if resume else load_run_config(ctx, files, overrides)
    who = "rlpipe" if session is None else f"rlpipe[{session.process_index}]"
    control = RunControl()
    mode = display_mode(quiet=quiet, primary=primary)
    with progress_display(cfg.train.steps, mode=mode, prefix=who) as display, \
            graceful_stop(control, grace_s=cfg.checkpoint.grace_period_s, log=display.log) as stop:
        summary = train(cfg, reg, run_dir=path, report=display.report, resume=resume, control=control,
                        log=display.log)
    log = display.log
    if stop.signal is not None:
        log(display.stopped(stop.name, f"resume with: rlpipe train --run-dir {path}"))
        ctx.exit(stop.exit_code)
    if not summary.items:
        return  # nothing ran: the run had completed its steps already, and the driver said so
    done = f"{summary.steps} step" if summary.steps == 1 else f"{summary.steps} steps"
    log(f"finished {done} (policy version {summary.policy_version}); see {path}")


def _prepare_run_dir(path, *, resume: bool, force: bool) -> None:
    """Checks --resume/--no-resume/--force against what ``path`` holds."""
    import shutil

    from rlpipe.core.errors import UsageError

    if not path.exists() or resume or not any(path.iterdir()):
        if force and resume:
            raise UsageError("--force only makes sense with --no-resume")
        return
    if not force:
        raise UsageError(f"{path}: run directory exists and is not empty; resume it (drop --no-resume), "
                         "add --force to delete it and start over, or choose another --run-dir")
    if not any((path / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints")):
        raise UsageError(f"{path}: does not look like an rlpipe run directory (no config.yaml, metrics.jsonl or "
                         "checkpoints/); refusing to delete it")
    shutil.rmtree(path)


def _load_run_config(ctx: click.Context, path, files: Sequence[str], overrides: Sequence[str]):
    """A resumed run's config: its own ``config.yaml``, then files and --set."""
    import yaml

    from rlpipe.runtime.checkpoint import CheckpointError
    from rlpipe.runtime.run_config import load_config

    saved = path / "config.yaml"
    if not saved.exists():
        return load_run_config(ctx, files, overrides)
    try:
        base = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{saved}: cannot read the run's config: {str(exc).splitlines()[0]}") from exc
    if not isinstance(base, dict):
        raise CheckpointError(f"{saved}: not a config mapping")
    return load_config(registry_of(ctx), defaults=base, files=files, overrides=overrides)


# -- plan ----------------------------------------------------------------------------


def _ranges(ids: Sequence[int]) -> str:
    ids = list(ids)
    if not ids:
        return "-"
    if ids == list(range(ids[0], ids[0] + len(ids))) and len(ids) > 2:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def _bytes(n: int | None) -> str:
    from rlpipe.core.memory import format_bytes

    return format_bytes(n)


@cli.command("plan")
@config_options
@click.option("--devices", "n_devices", type=click.IntRange(min=1), default=None,
              help="Plan for N hypothetical devices instead of the devices JAX sees.")
@json_option
@click.pass_context
def plan_cmd(ctx: click.Context, files: tuple[str, ...], overrides: tuple[str, ...], n_devices: int | None, as_json: bool) -> None:
    """Show where each role runs: devices, mesh, colocation groups, offload and
    which graph edges block until the global-batch barrier."""
    from rlpipe.core.placement import DeviceInfo
    from rlpipe.runtime.planning import plan_run

    reg = registry_of(ctx)
    cfg = load_run_config(ctx, files, overrides)
    devices = [DeviceInfo(id=i, platform="hypothetical") for i in range(n_devices)] if n_devices else None
    planned = plan_run(cfg, reg, devices)
    plan = planned.plan
    if as_json:
        _echo_json(plan.to_json())
        return
    platform = devices[0].platform if devices else _platform()
    click.echo(f"policy: {plan.policy}    mode: {plan.mode}    devices: {len(plan.devices)} ({platform})")
    click.echo(f"stages: {', '.join(planned.graph.order)} (in topological order)")
    click.echo("")
    rows = []
    for r in plan.roles:
        mesh = f"{list(r.mesh.shape)} ({', '.join(r.mesh.axes)})"
        host = not planned.roles[r.name].uses_devices
        rows.append([r.name, _ranges(r.devices), mesh, ", ".join(r.colocated_with) or "-",
                     "host role" if host else ("yes" if r.offload else "no"), _bytes(r.memory_estimate_bytes)])
    click.echo(_table(["ROLE", "DEVICES", "MESH", "COLOCATED WITH", "OFFLOAD", "MEMORY/DEVICE"], rows, wrap=(3,)))
    click.echo("")
    _echo_memory(planned)
    click.echo("")
    click.echo("boundaries:")
    if not plan.boundaries:
        click.echo("  (none: a single stage)")
    for b in plan.boundaries:
        how = "blocks until the global-batch barrier" if b.blocking else "streams items as they arrive"
        click.echo(f"  {b.upstream} -> {b.downstream}: {how}")
    for note in (*planned.notes, *plan.notes):
        click.echo(f"note: {note}")


def _echo_memory(planned) -> None:
    """The estimate's breakdown per role, device capacity, and each device
    group's peak against it."""
    from rlpipe.core.memory import MemoryBudget, describe_devices

    click.echo("memory per device (estimates from shapes; docs/architecture.md §4):")
    rows = []
    for r in planned.plan.roles:
        est = planned.memory.get(r.name)
        if est is None:
            why = "host role" if not planned.roles[r.name].uses_devices else "no estimate from its plugin"
            rows.append([r.name, *(["-"] * 5), _bytes(r.memory_estimate_bytes) if r.memory_estimate_bytes is not None else why])
            continue
        rows.append([r.name, _bytes(est.parameters), _bytes(est.optimizer_state), _bytes(est.gradients),
                     _bytes(est.kv_cache), _bytes(est.activations), _bytes(r.memory_estimate_bytes)])
    click.echo(_table(["ROLE", "PARAMETERS", "OPTIMIZER", "GRADIENTS", "KV CACHE", "ACTIVATIONS", "TOTAL"], rows))
    click.echo(f"device memory: {planned.capacity.describe()}")
    cap = planned.capacity.bytes
    for u in MemoryBudget(capacity=planned.capacity).usage(planned.plan.roles):
        of = f" of {_bytes(cap)}" if cap is not None else ""
        click.echo(f"  {describe_devices(u.devices)}: {u.describe_roles()}: peak {_bytes(u.peak_bytes)}{of}")


def _platform() -> str:
    import jax

    return jax.devices()[0].platform


from rlpipe.cli.report import report_cmd  # noqa: E402 - commands in their own modules register here

cli.add_command(report_cmd)

from rlpipe.cli.eval import eval_cmd  # noqa: E402 - registered after the group exists

cli.add_command(eval_cmd)

from rlpipe.cli.models import models_group  # noqa: E402 - registered after the group exists

cli.add_command(models_group)

from rlpipe.cli.export import export_cmd  # noqa: E402 - registered after the group exists

cli.add_command(export_cmd)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    try:
        rv = cli.main(args=argv, prog_name="rlpipe", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # `rlpipe` or `rlpipe roles` alone: the help is the answer
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        sys.exit(_usage_error(exc))
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    # Without standalone mode, click returns ctx.exit()'s code instead of exiting.
    sys.exit(rv if isinstance(rv, int) else 0)


def _usage_error(exc: click.UsageError) -> int:
    """A bad option or argument as one line, like every other user error:
    ``error: rlpipe train: Invalid value for '--steps': ... (see 'rlpipe train --help')``."""
    path = exc.ctx.command_path if exc.ctx is not None else "rlpipe"
    message = " ".join(exc.format_message().split()).rstrip(".")
    click.echo(f"error: {path}: {message} (see '{path} --help')", err=True)
    return exc.exit_code
