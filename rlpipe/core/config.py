"""Typed configuration: YAML files and ``--set`` overrides into frozen attrs classes.

Loading goes: embedded defaults, then each YAML file in order, then each
``--set dotted.key=value`` (the value parsed as a YAML scalar or flow
collection) are merged into one mapping (a ``null`` value removes a key, so
``--set roles.reference=null`` drops that role); then cattrs structures it
once, with extra keys forbidden.  The ``roles.<name>`` sections are typed by
the plugin that provides each role, ``placement.options`` by the selected
policy.

Every problem becomes one :class:`Problem` with a dotted path and a reason,
``roles.rollout.mesh.shape: expected a list of ints, got 'four'``, and all of
them are raised together as a :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

import attrs
import cattrs
import yaml
from cattrs.errors import (
    BaseValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn

from rlpipe.core.errors import ConfigError, Problem, suggest


class ConfigValueError(ValueError):
    """A bad value; ``subpath`` locates it below the value being structured."""

    def __init__(self, message: str, subpath: Sequence[str | int] = ()):
        super().__init__(message)
        self.message = message
        self.subpath = tuple(subpath)


def show_value(value: Any) -> str:
    """``repr(value)``, cut to 60 characters: how a bad value appears in a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(predicate, reason: str):
    """An attrs validator raising :class:`ConfigValueError` located at the field.

    ``reason`` may use ``{value}``.  (attrs' own validators do not say which
    field failed in a form cattrs keeps, so config classes use this.)
    """

    def validator(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not predicate(value):
            raise ConfigValueError(reason.format(value=show_value(value)), (attribute.name,))

    return validator


# -- schema ----------------------------------------------------------------------


def _check_mesh(instance: MeshConfig, attribute: attrs.Attribute, value: Any) -> None:
    shape, axes = instance.shape, instance.axes
    if len(axes) != len(shape):
        raise ConfigValueError(f"{len(axes)} axis name(s) for a {len(shape)}-dimensional shape {list(shape)}; give one name per dimension", ("axes",))
    dup = sorted({a for a in axes if axes.count(a) > 1})
    if dup:
        raise ConfigValueError(f"duplicate axis name(s) {', '.join(map(repr, dup))}", ("axes",))


@attrs.frozen(kw_only=True)
class MeshConfig:
    """``roles.<name>.mesh``: a mesh shape and one axis name per dimension."""

    shape: tuple[int, ...] = attrs.field(validator=[
        check(lambda s: len(s) > 0, "must have at least one dimension"),
        check(lambda s: all(d >= 1 for d in s), "every dimension must be at least 1, got {value}"),
    ])
    axes: tuple[str, ...] = attrs.field(validator=[
        check(lambda a: all(a_ for a_ in a), "axis names must be non-empty"),
        _check_mesh,
    ])


@attrs.frozen(kw_only=True)
class RoleConfig:
    """Base of every ``roles.<name>`` section; role plugins derive their own.

    Attributes:
        mesh: the role's own mesh; without ``colocate_with`` it owns a disjoint
            device slice (disaggregated).
        colocate_with: a role whose device *set* this role shares, under its own
            mesh shape; ``actor`` means ``trainer``.
        offload: whether this role's state goes to host memory between uses;
            ``null`` follows ``placement.offload``.
    """

    mesh: MeshConfig | None = None
    colocate_with: str | None = attrs.field(default=None, validator=check(bool, "must be a role name"))
    offload: bool | None = None


@attrs.frozen(kw_only=True)
class PlacementConfig:
    """``placement``: the colocation policy and the offload switch.

    ``options`` is typed by the selected policy (see ``rlpipe placements list``).

    Attributes:
        device_memory_gib: each device's memory, overriding what JAX reports
            (GPU/TPU report it, the CPU does not); planning rejects a role
            whose estimate exceeds it, and ``auto`` chooses by it.
        assumed_prompt_tokens: the prompt length the memory estimates assume
            when ``task.max_prompt_tokens`` sets no limit (padded to its
            bucket, a power of two of at least 16).
    """

    policy: str = "default"
    offload: bool = False
    options: Any = None
    device_memory_gib: float | None = attrs.field(default=None, validator=check(lambda v: v > 0, "must be positive, got {value}"))
    assumed_prompt_tokens: int = attrs.field(default=256, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))


def plain_data(value: Any) -> Any:
    """``value`` (attrs records, mappings, sequences) as plain dicts, lists and scalars."""
    if attrs.has(type(value)):
        return {f.name: plain_data(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, Mapping):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return value


# -- the converter -------------------------------------------------------------------


_SCALARS = {bool: "a boolean", int: "an int", float: "a number", str: "a string"}


def _scalar_hook(t: type):
    def hook(value: Any, _: Any) -> Any:
        ok = isinstance(value, t) and (t is bool or not isinstance(value, bool))
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise ConfigValueError(f"expected {_SCALARS[t]}, got {show_value(value)}")
        return value

    return hook


def _is_homogeneous_tuple(t: Any) -> bool:
    args = get_args(t)
    return get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis


def make_converter() -> cattrs.Converter:
    """A converter that is strict about types (no ``"4"`` -> ``4``, no string as a
    list of characters) and forbids unknown keys."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    for t in _SCALARS:
        conv.register_structure_hook(t, _scalar_hook(t))

    def tuple_factory(t: Any):
        item = get_args(t)[0]
        word = {int: "ints", str: "strings", float: "numbers"}.get(item, getattr(item, "__name__", str(item)) + "s")

        def hook(value: Any, _: Any) -> tuple:
            if not isinstance(value, (list, tuple)):
                raise ConfigValueError(f"expected a list of {word}, got {show_value(value)}")
            out, problems = [], []
            for i, v in enumerate(value):
                try:
                    out.append(conv.structure(v, item))
                except ConfigValueError as exc:
                    problems.append(ConfigValueError(exc.message, (i, *exc.subpath)))
                except BaseValidationError as exc:  # an attrs item: keep its index in the path
                    exc.add_note(IterableValidationNote(f"Structuring item @ index {i}", i, item))
                    problems.append(exc)
            if problems:
                raise IterableValidationError(f"While structuring a list of {word}", problems, tuple)
            return tuple(out)

        return hook

    conv.register_structure_hook_factory(_is_homogeneous_tuple, tuple_factory)

    def attrs_factory(cl: type):
        base = make_dict_structure_fn(cl, conv, _cattrs_forbid_extra_keys=True, _cattrs_detailed_validation=True)

        def hook(value: Any, _: Any) -> Any:
            if not isinstance(value, Mapping):
                raise ConfigValueError(f"expected a mapping of {', '.join(f.name for f in attrs.fields(cl))}, got {show_value(value)}")
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise ConfigValueError(f"keys must be strings, got {show_value(bad[0])}")
            return base(value, cl)

        return hook

    conv.register_structure_hook_factory(attrs.has, attrs_factory)
    return conv


_CONVERTER = make_converter()


def path_key(key: Any) -> str:
    """A mapping key as it appears in a path: the key itself, or its repr when it
    is empty or would not print on one line (every problem is one line)."""
    text = str(key)
    return text if text and text.isprintable() else repr(text)


def _join(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{path_key(p)}" if out else path_key(p))
    return out


def _problems(exc: BaseException, path: tuple[str | int, ...]) -> list[Problem]:
    """Flattens a cattrs error tree into problems whose path ends at the field."""
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [f.name for f in attrs.fields(exc.cl)] if exc.cl is not None and attrs.has(exc.cl) else []
        return [Problem(_join((*path, k)), f"unknown key{suggest(k, known)} (valid keys: {', '.join(known)})") for k in sorted(map(str, exc.extra_fields))]
    if isinstance(exc, BaseValidationError):
        with_notes, without = exc.group_exceptions()
        out = []
        for sub, note in with_notes:
            step = getattr(note, "name", None)
            if step is None:
                step = getattr(note, "index", None)
            out += _problems(sub, path if step is None else (*path, step))
        for sub in without:
            out += _problems(sub, path)
        return out
    if isinstance(exc, ConfigValueError):
        return [Problem(_join((*path, *exc.subpath)), exc.message)]
    if isinstance(exc, KeyError):
        return [Problem(_join(path), "required key missing")]
    return [Problem(_join(path), str(exc) or type(exc).__name__)]


def structure(value: Any, cl: type, path: Sequence[str | int] = ()) -> Any:
    """Structures ``value`` as ``cl``; raises :class:`ConfigError` with every problem."""
    try:
        return _CONVERTER.structure(value, cl)
    except (BaseValidationError, ConfigValueError, ForbiddenExtraKeysError) as exc:
        raise ConfigError(_problems(exc, tuple(path))) from None


# -- sources: defaults, files, --set --------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``3e-4`` is a number (as in YAML 1.2 and
    JSON), not a string: learning rates are written that way."""


class _Dumper(yaml.SafeDumper):
    """Quotes strings that :class:`_Loader` would read as numbers."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+$"), list("-+.0123456789"))


def dump_yaml_annotated(data: Mapping[str, Any], comment: Callable[[str], str | None]) -> str:
    """Block YAML of mapping ``data`` with ``# comment(key)`` after every value
    (``key`` dotted); lists and empty mappings are written inline.  It reads
    back to the same data as :func:`dump_yaml`'s output."""
    lines: list[str] = []

    def inline(value: Any) -> str:
        text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=float("inf")).strip()
        return text[:-4].rstrip() if text.endswith("\n...") else text

    def walk(mapping: Mapping[str, Any], indent: int, prefix: str) -> None:
        for key, value in mapping.items():
            name = inline(key)
            path = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                lines.append(f"{' ' * indent}{name}:")
                walk(value, indent + 2, f"{path}.")
                continue
            note = comment(path)
            lines.append(f"{' ' * indent}{name}: {inline(value)}" + (f"  # {note}" if note else ""))

    walk(data, 0, "")
    return "\n".join(lines) + "\n"


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merges ``override`` into a copy of ``base``: mappings merge, anything
    else replaces, and ``None`` removes the key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(Problem(str(p), f"cannot read config file: {exc.strerror or exc}")) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(Problem(str(p), f"cannot read config file: not UTF-8 text (byte {exc.start})")) from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(Problem(where, f"invalid YAML: {reason}")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(Problem(str(p), f"expected a mapping at the top level, got {type(data).__name__}"))
    return data


def parse_override(text: str) -> dict[str, Any]:
    """``'a.b.c=value'`` -> ``{'a': {'b': {'c': value}}}``, value parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(Problem("--set", f"{text!r}: expected KEY=VALUE, e.g. train.steps=10"))
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(Problem("--set", f"{text!r}: {key!r} is not a dotted key"))
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(Problem(path_key(key), f"--set value {raw!r} is not valid YAML: {reason}")) from None
    out: Any = value
    for p in reversed(parts):
        out = {p: out}
    return out


def merge_source(data: Mapping[str, Any], source: Mapping[str, Any], selecting: Mapping[str, str] = {}) -> dict[str, Any]:  # noqa: B006 - read only
    """:func:`merge`, except that a source selecting another plugin replaces
    that section's ``options`` instead of merging into them: the earlier
    options were the earlier plugin's.

    Args:
        selecting: ``section -> key`` of the sections whose ``options`` belong
            to the plugin that ``section.key`` names (``{"placement": "policy"}``).
    """
    out = merge(dict(data), source)
    for section, key in selecting.items():
        old, new = data.get(section), source.get(section)
        if not (isinstance(old, Mapping) and isinstance(new, Mapping) and key in old and key in new):
            continue
        if old[key] != new[key] and isinstance(out.get(section), dict):
            out[section].pop("options", None)
            if new.get("options") is not None:
                out[section]["options"] = copy.deepcopy(new["options"])
    return out


def resolve_sources(defaults: Mapping[str, Any], files: Iterable[str | Path] = (), overrides: Iterable[str] = (), *,
                    selecting: Mapping[str, str] = {}) -> dict[str, Any]:  # noqa: B006 - read only
    """Defaults, then each YAML file in order, then each ``--set`` override,
    merged with :func:`merge_source`."""
    data = copy.deepcopy(dict(defaults))
    for f in files:
        data = merge_source(data, read_yaml_file(f), selecting)
    for o in overrides:
        data = merge_source(data, parse_override(o), selecting)
    return data


def dump_yaml(config: Any) -> str:
    """YAML that :func:`read_yaml_file` reads back to the same values (of a
    mapping, or of an attrs config record)."""
    data = plain_data(config) if attrs.has(type(config)) else config
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
