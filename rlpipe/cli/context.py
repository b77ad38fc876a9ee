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
    """A new run's config: the layers of :mod:`rlpipe.app.defaults` (built-in
    defaults, the embedded default run, the model preset's defaults), then
    ``files``, then ``overrides``."""
    return load_run_config_with_sources(ctx, files, overrides)[0]


def load_run_config_with_sources(ctx: click.Context, files: Sequence[str], overrides: Sequence[str]):
    """:func:`load_run_config` and, per dotted key, the layer that set it
    (:func:`rlpipe.app.defaults.resolve`)."""
    from rlpipe.app.defaults import resolve
    from rlpipe.runtime.run_config import build_config

    data, sources = resolve(files, overrides)
    return build_config(data, registry_of(ctx)), sources
