"""``rlpipe report RUN_DIR``: plots and a summary page for a run directory."""

from __future__ import annotations

import json

import click


@click.command("report")
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out_dir", type=click.Path(), default=None,
              help="Where to write the report (default: RUN_DIR/report).")
@click.option("--last-steps", type=click.IntRange(min=0), default=5, show_default=True,
              help="Steps the timeline and the idle fractions cover, counted back from the last logged step "
                   "(0: all); the timeline's title says which it shows.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary numbers as JSON on stdout instead of the file list.")
def report_cmd(run_dir: str, out_dir: str | None, last_steps: int, as_json: bool) -> None:
    """Write reward, loss and timeline plots and report.md for RUN_DIR, with the
    idle fraction of each device group over the last steps."""
    from rlpipe.app.report import build_report

    report = build_report(run_dir, out_dir=out_dir, last_steps=last_steps or None)
    for note in report.notes:
        click.echo(f"rlpipe: note: {note}", err=True)
    if as_json:
        click.echo(json.dumps(report.summary, indent=2))
    else:
        for path in report.files:
            click.echo(str(path))
