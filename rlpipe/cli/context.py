"""What every command shares through click's context: the plugin registry
(loaded once per invocation, honouring ``--no-plugins``) and config loading."""

from __future__ import annotations

from collections.abc import Sequence

import click


def registry_of(ctx: click.Context):
    obj = ctx.find_root().ensure_object(dict)
    if "registry" not in obj:
        from rlpipe.core.plugins import load_registry

        obj["registry"] = load_registry(no_plugins=obj.get("no_plugins", False),
                                        warn=lambda m: click.echo(f"rlpipe: warning: {m}", err=True))
    return obj["registry"]


def load_run_config(ctx: click.Context, files: Sequence[str], overrides: Sequence[str]):
    from rlpipe.app.defaults import DEFAULT_CONFIG
    from rlpipe.runtime.run_config import load_config

    return load_config(registry_of(ctx), defaults=DEFAULT_CONFIG, files=files, overrides=overrides)
