"""Plugin discovery and the registry of everything plugins provide.

Plugins are found through the ``rlpipe`` entry-point group; rlpipe's own roles
and policies are registered exactly that way.  The registry has good manners:
a plugin that fails to import, implements an unknown hook, implements a hook
twice (two ``def rlpipe_roles`` in one module, where pluggy would only see the
last; or two hookimpls of one hook), binds a hook's name to something other
than a function, has a hookimpl with arguments its hookspec lacks, raises from a hook, yields the wrong record, or
claims a name another plugin owns is reported (entry point, distribution and
version) and set aside, and everything else keeps working.  rlpipe fails only
when the config selects something that the broken plugin would have provided.

Environment:
    ``RLPIPE_DISABLE_PLUGINS=a,b``: do not load these entry points (or
    distributions).  ``RLPIPE_STRICT_PLUGINS=1``: any plugin problem is an
    error.  The CLI's ``--no-plugins`` loads rlpipe's built-ins only.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import attrs
import pluggy

from rlpipe.core import hookspecs, specs
from rlpipe.core.errors import ConfigError, PluginError, Problem, choices_text, suggest

ENTRY_POINT_GROUP = "rlpipe"
BUILTIN_DISTRIBUTION = "rlpipe"
HOOK_PREFIX = "rlpipe_"

_SPEC_TYPES: dict[str, type] = {hook: getattr(specs, cls) for hook, (_, cls) in hookspecs.REGISTRATION_HOOKS.items()}

# Plugins registered in-process (``rlpipe.testing.register_plugin``), loaded
# after entry points as if installed.
_IN_PROCESS: list[PluginSource] = []


@attrs.frozen(kw_only=True)
class PluginSource:
    """Where a plugin comes from: an entry point, or an in-process registration."""

    name: str
    value: str
    distribution: str | None = None
    version: str | None = None
    load: Callable[[], Any] = attrs.field(eq=False, repr=False)

    @property
    def builtin(self) -> bool:
        return _canonical(self.distribution or "") == BUILTIN_DISTRIBUTION

    def describe(self) -> str:
        dist = f"{self.distribution} {self.version}" if self.distribution else "no distribution"
        return f"plugin {self.name!r} ({self.value}; {dist})"


@attrs.define(kw_only=True)
class PluginInfo:
    """A plugin's state, as ``rlpipe plugins list`` shows it.

    ``status`` is ``active``, ``disabled``, ``failed`` (nothing it provides is
    used) or ``conflict`` (active, but some names it claims are not its).
    """

    source: PluginSource
    status: str = "active"
    errors: list[str] = attrs.field(factory=list)
    provides: list[tuple[str, str]] = attrs.field(factory=list)

    def to_json(self) -> dict[str, Any]:
        s = self.source
        return {
            "name": s.name,
            "value": s.value,
            "distribution": s.distribution,
            "version": s.version,
            "builtin": s.builtin,
            "status": self.status,
            "errors": list(self.errors),
            "provides": [{"kind": hookspecs.REGISTRATION_HOOKS[h][0], "name": n} for h, n in self.provides],
        }


@attrs.frozen(kw_only=True)
class Provided:
    """One record together with the plugin that provided it."""

    hook: str
    spec: Any
    plugin: PluginInfo = attrs.field(eq=False)

    @property
    def name(self) -> str:
        return self.spec.name


def _redefined_hooks(obj: Any) -> list[str]:
    """``rlpipe_*`` functions defined twice at the top level of a plugin module:
    the second ``def`` replaces the first as the module's attribute, so pluggy
    never sees the first.  Found in the module's source (none: nothing found)."""
    if not inspect.ismodule(obj):
        return []
    try:
        tree = ast.parse(inspect.getsource(obj))
    except (OSError, TypeError, SyntaxError, ValueError):
        return []
    lines: dict[str, list[int]] = defaultdict(list)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith(HOOK_PREFIX):
            lines[node.name].append(node.lineno)
    where = getattr(obj, "__file__", None) or obj.__name__
    return [f"defines {name!r} {len(at)} times (lines {', '.join(map(str, at))} of {where}); each def replaces the one "
            f"before, so only the last is a hook: merge them into one" for name, at in lines.items() if len(at) > 1]


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _spec_argnames() -> dict[str, tuple[str, ...]]:
    names = {}
    for hook in (*hookspecs.REGISTRATION_HOOKS, *hookspecs.LIFECYCLE_HOOKS):
        names[hook] = tuple(inspect.signature(getattr(hookspecs, hook)).parameters)
    return names


class _PluginManager(pluggy.PluginManager):
    """Accepts ``rlpipe_``-prefixed functions as hookimpls even without the
    decorator (as pytest does), so a forgotten ``@hookimpl`` is not a silent no-op."""

    def parse_hookimpl_opts(self, plugin: Any, name: str):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith(HOOK_PREFIX):
            method = getattr(plugin, name, None)
            if inspect.isroutine(method):
                opts = {}
        return opts


class Registry:
    """Everything the loaded plugins provide, by hook and name.

    Use :func:`load_registry` to build one.
    """

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.plugins: list[PluginInfo] = []
        self.warnings: list[str] = []
        self._items: dict[str, dict[str, Provided]] = {h: {} for h in hookspecs.REGISTRATION_HOOKS}
        self._ambiguous: dict[str, dict[str, list[PluginInfo]]] = {h: {} for h in hookspecs.REGISTRATION_HOOKS}

    # -- queries ------------------------------------------------------------

    @property
    def hook(self):
        """The pluggy hook relay, for lifecycle hooks."""
        return self.pm.hook

    def provided(self, hook: str) -> dict[str, Provided]:
        return dict(self._items[hook])

    def ambiguous(self, hook: str) -> dict[str, list[PluginInfo]]:
        """Names claimed by several third-party plugins (used by none of them)."""
        return {n: list(ps) for n, ps in self._ambiguous[hook].items()}

    def specs(self, hook: str) -> dict[str, Any]:
        return {n: p.spec for n, p in self._items[hook].items()}

    @property
    def roles(self) -> dict[str, specs.RoleSpec]:
        return self.specs("rlpipe_roles")

    @property
    def policies(self) -> dict[str, specs.PolicySpec]:
        return self.specs("rlpipe_placement_policies")

    def get(self, hook: str, name: str, *, path: str) -> Any:
        """The record called ``name``, or a :class:`ConfigError` at ``path`` saying
        why not: unknown (with close matches and valid choices), claimed by two
        plugins, or possibly provided by a plugin that is broken or disabled."""
        item = self._items[hook].get(name)
        if item is not None:
            return item.spec
        raise ConfigError(Problem(path, self.why_missing(hook, name)))

    def why_missing(self, hook: str, name: str) -> str:
        kind = hookspecs.REGISTRATION_HOOKS[hook][0]
        claimants = self._ambiguous[hook].get(name)
        if claimants:
            who = " and ".join(p.source.describe() for p in claimants)
            return (f"{kind} {name!r} is claimed by {who}; neither is used. "
                    f"Uninstall one, or set RLPIPE_DISABLE_PLUGINS={claimants[-1].source.name}")
        msg = f"unknown {kind} {name!r}{suggest(name, self._items[hook])} (available: {choices_text(self._items[hook])})"
        broken = [p for p in self.plugins if p.status in ("failed", "disabled")]
        if broken:
            parts = []
            for p in broken:
                why = "disabled" if p.status == "disabled" else "failed to load: " + "; ".join(p.errors)
                parts.append(f"{p.source.describe()} {why}")
            msg += "; it may be provided by " + "; ".join(parts)
        return msg

    # -- loading -------------------------------------------------------------

    def _add_plugin(self, source: PluginSource, *, disabled: bool) -> None:
        info = PluginInfo(source=source)
        self.plugins.append(info)
        if disabled:
            info.status = "disabled"
            return
        try:
            obj = source.load()
        except BaseException as exc:  # noqa: BLE001 - a plugin may raise anything at import, SystemExit included
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._fail(info, f"failed to import: {type(exc).__name__}: {exc}")
            return
        problems = self._check_hookimpls(obj)
        if problems:
            for p in problems:
                self._fail(info, p)
            return
        try:
            self.pm.register(obj, name=f"{source.distribution or '-'}:{source.name}")
        except Exception as exc:  # noqa: BLE001
            self._fail(info, f"could not be registered: {exc}")
            return
        self._collect(info, obj)

    def _check_hookimpls(self, obj: Any) -> list[str]:
        known = _spec_argnames()
        problems = _redefined_hooks(obj)
        implemented: dict[str, list[str]] = defaultdict(list)
        for attr in dir(obj):
            opts = self.pm.parse_hookimpl_opts(obj, attr)
            if opts is None:
                if attr in known:
                    # ``rlpipe_roles = [...]``: pluggy takes only functions, so this would be silently ignored.
                    problems.append(f"has {attr!r}, which is not a function ({type(getattr(obj, attr, None)).__name__}), "
                                    "so it implements no hook")
                continue
            hook = opts.get("specname") or attr
            implemented[hook].append(attr)
            if len(implemented[hook]) == 2:
                # rlpipe calls one implementation per plugin; the other would be dropped silently.
                problems.append(f"implements hook {hook!r} twice ({', '.join(implemented[hook])}); merge them into one")
            if hook not in known:
                problems.append(f"implements unknown hook {hook!r}{suggest(hook, known)}")
                continue
            try:
                # pluggy passes only arguments without defaults, by name.
                params = [name for name, p in inspect.signature(getattr(obj, attr)).parameters.items()
                          if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            except (TypeError, ValueError):
                continue
            extra = [p for p in params if p not in known[hook]]
            if extra:
                allowed = ", ".join(known[hook]) or "no arguments"
                problems.append(f"hook {hook!r} asks for argument(s) {', '.join(map(repr, extra))} that the hookspec does not pass (it passes: {allowed})")
        return problems

    def _collect(self, info: PluginInfo, obj: Any) -> None:
        """Calls each registration hook of one plugin and files its records.  A
        plugin whose hook raises or yields a wrong record provides nothing."""
        records: list[tuple[str, Any]] = []
        for hook, spec_type in _SPEC_TYPES.items():
            impl = next((i for i in getattr(self.pm.hook, hook).get_hookimpls() if i.plugin is obj), None)
            if impl is None:
                continue
            try:
                result = impl.function()
                items = list(result) if result is not None else []
            except Exception as exc:  # noqa: BLE001
                self._fail(info, f"hook {hook!r} raised {type(exc).__name__}: {exc}", obj)
                return
            for rec in items:
                if not isinstance(rec, spec_type):
                    self._fail(info, f"hook {hook!r} yielded {type(rec).__name__}, expected {spec_type.__name__}", obj)
                    return
                if hook == "rlpipe_roles":
                    from rlpipe.core.config import RoleConfig

                    if not (isinstance(rec.config_type, type) and issubclass(rec.config_type, RoleConfig) and attrs.has(rec.config_type)):
                        self._fail(info, f"role {rec.name!r}: config_type must be an attrs class deriving from rlpipe.RoleConfig", obj)
                        return
                records.append((hook, rec))
        for hook, rec in records:
            self._claim(info, hook, rec)

    def _claim(self, info: PluginInfo, hook: str, rec: Any) -> None:
        kind = hookspecs.REGISTRATION_HOOKS[hook][0]
        name = rec.name
        info.provides.append((hook, name))
        if name in self._ambiguous[hook]:
            self._ambiguous[hook][name].append(info)
            self._conflict(info, f"claims {kind} {name!r}, already claimed by several plugins; not used")
            return
        owner = self._items[hook].get(name)
        if owner is None:
            self._items[hook][name] = Provided(hook=hook, spec=rec, plugin=info)
            return
        if owner.plugin is info:
            self._conflict(info, f"provides {kind} {name!r} twice; the first is used")
            return
        if owner.plugin.source.builtin and not info.source.builtin:
            self._conflict(info, f"claims {kind} {name!r}, which rlpipe's built-in {owner.plugin.source.name!r} owns; ignored")
            return
        # Two third-party plugins: picking one by load order would be a silent
        # surprise, so the name is used by neither until the user decides.
        del self._items[hook][name]
        self._ambiguous[hook][name] = [owner.plugin, info]
        self._conflict(owner.plugin, f"claims {kind} {name!r}, also claimed by {info.source.describe()}; not used")
        self._conflict(info, f"claims {kind} {name!r}, also claimed by {owner.plugin.source.describe()}; not used")

    def _fail(self, info: PluginInfo, message: str, obj: Any = None) -> None:
        info.status = "failed"
        info.errors.append(message)
        # Nothing of a failed plugin is used, lifecycle hooks included.  (By
        # object, not name: a plugin refused for a name already taken must not
        # unregister the plugin that has it.)
        if obj is not None and self.pm.is_registered(obj):
            self.pm.unregister(obj)
        for hook, names in self._items.items():
            for n in [n for n, p in names.items() if p.plugin is info]:
                del names[n]
        self.warnings.append(f"{info.source.describe()} {message}")

    def _conflict(self, info: PluginInfo, message: str) -> None:
        if info.status == "active":
            info.status = "conflict"
        info.errors.append(message)
        self.warnings.append(f"{info.source.describe()} {message}")


def _entry_point_sources() -> list[PluginSource]:
    out = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        out.append(PluginSource(
            name=ep.name,
            value=ep.value,
            distribution=dist.metadata["Name"] if dist is not None else None,
            version=dist.version if dist is not None else None,
            load=ep.load,
        ))
    # Built-ins first, so that they own their names; then a stable order.
    out.sort(key=lambda s: (not s.builtin, _canonical(s.distribution or ""), s.name))
    return out


def _env_list(name: str) -> set[str]:
    return {x.strip() for x in os.environ.get(name, "").split(",") if x.strip()}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def load_registry(*, no_plugins: bool = False, disable: set[str] | None = None, strict: bool | None = None,
                  warn: Callable[[str], None] | None = None) -> Registry:
    """Discovers and loads plugins; returns the :class:`Registry`.

    Args:
        no_plugins: load rlpipe's built-ins only.
        disable: entry-point or distribution names not to load; defaults to
            ``RLPIPE_DISABLE_PLUGINS``.
        strict: raise :class:`PluginError` on any plugin problem; defaults to
            ``RLPIPE_STRICT_PLUGINS``.
        warn: called with each warning; defaults to printing
            ``rlpipe: warning: ...`` on stderr.
    """
    disable = _env_list("RLPIPE_DISABLE_PLUGINS") if disable is None else set(disable)
    strict = _env_flag("RLPIPE_STRICT_PLUGINS") if strict is None else strict
    disabled_canon = {_canonical(d) for d in disable}

    pm = _PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm)
    sources = _entry_point_sources() + list(_IN_PROCESS)
    if not any(s.builtin for s in sources):
        registry.warnings.append("rlpipe's built-in plugins were not found through entry points; "
                                 "is rlpipe installed? (pip install -e .)")
    for source in sources:
        off = not source.builtin and (
            no_plugins or _canonical(source.name) in disabled_canon or _canonical(source.distribution or "") in disabled_canon)
        registry._add_plugin(source, disabled=off)

    if strict and registry.warnings:
        raise PluginError("plugin problems (RLPIPE_STRICT_PLUGINS is set):\n" + "\n".join(registry.warnings))
    emit = warn or (lambda m: print(f"rlpipe: warning: {m}", file=sys.stderr))
    for w in registry.warnings:
        emit(" ".join(w.split()))  # one line per warning, whatever the plugin's error text holds
    return registry


@contextmanager
def in_process_plugin(plugin: Any, *, name: str, distribution: str | None = None, version: str | None = None) -> Iterator[None]:
    """Makes ``plugin`` visible to every :func:`load_registry` in this process
    while the context is open (see ``rlpipe.testing.register_plugin``)."""
    source = PluginSource(name=name, value=getattr(plugin, "__name__", repr(plugin)),
                          distribution=distribution, version=version, load=lambda: plugin)
    _IN_PROCESS.append(source)
    try:
        yield
    finally:
        _IN_PROCESS.remove(source)
