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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_origin

import attrs
import cattrs
import yaml
from cattrs.errors import BaseValidationError, ForbiddenExtraKeysError, IterableValidationError, IterableValidationNote
from cattrs.gen import make_dict_structure_fn

from rlpipe.core.errors import ConfigError, Problem, suggest

if TYPE_CHECKING:
    from rlpipe.core.plugins import Registry


class ConfigValueError(ValueError):
    """A bad value; ``subpath`` locates it below the value being structured."""

    def __init__(self, message: str, subpath: Sequence[str | int] = ()):
        super().__init__(message)
        self.message = message
        self.subpath = tuple(subpath)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(predicate, reason: str):
    """An attrs validator raising :class:`ConfigValueError` located at the field.

    ``reason`` may use ``{value}``.  (attrs' own validators do not say which
    field failed in a form cattrs keeps, so config classes use this.)
    """

    def validator(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not predicate(value):
            raise ConfigValueError(reason.format(value=_show(value)), (attribute.name,))

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


@attrs.frozen(kw_only=True)
class TrainConfig:
    """``train``: how long to run, how big a global batch is, and how far rollout
    may run ahead.  A global batch is ``items_per_step`` items of
    ``prompts_per_item`` prompts, each with ``roles.rollout.num_generations``
    completions."""

    steps: int = attrs.field(default=20, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    seed: int = 0
    max_staleness: int = attrs.field(default=0, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))
    prompts_per_item: int = attrs.field(default=4, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    items_per_step: int = attrs.field(default=2, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))


@attrs.frozen(kw_only=True)
class CheckpointSection:
    """``checkpoint``: when run state is saved under ``<run-dir>/checkpoints``.

    A checkpoint is also written after the last step and when a run is
    stopped by SIGTERM or SIGINT, whatever ``every`` says.
    """

    every: int = attrs.field(default=10, validator=check(lambda v: v >= 0, "must be at least 0 (0 = only at the end), got {value}"))
    keep: int = attrs.field(default=3, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    asynchronous: bool = True
    grace_period_s: float = attrs.field(default=120.0, validator=check(lambda v: v > 0, "must be positive, got {value}"))


@attrs.frozen(kw_only=True)
class TelemetrySection:
    """``telemetry``: outputs beyond ``metrics.jsonl`` and ``trace.json``."""

    tensorboard: bool = False


@attrs.frozen(kw_only=True)
class ModelConfig:
    """``model``: which policy to train, in which dtype, with which tokenizer.

    Attributes:
        preset: a built-in shape (``tiny``, ``qwen2.5-0.5b``, ``llama-3.2-1b``),
            randomly initialised from ``train.seed``; ignored when ``path`` is set.
        path: a local Hugging Face checkpoint directory (Llama or Qwen2).
        dtype: parameter and compute dtype, ``float32`` or ``bfloat16``.
        tokenizer: ``char`` (the built-in character tokenizer), a directory
            holding ``tokenizer.json``, or ``null``: the checkpoint's own with
            ``path``, else ``char``.
    """

    preset: str = "tiny"
    path: str | None = None
    dtype: str = attrs.field(default="float32", validator=check(lambda v: v in ("float32", "bfloat16"), "must be 'float32' or 'bfloat16', got {value}"))
    tokenizer: str | None = None


@attrs.frozen(kw_only=True)
class AlgorithmSection:
    """``algorithm``: the RL algorithm plugin and its options.

    ``options`` is typed by the selected algorithm, whose defaults are its
    own (docs/algorithms.md).
    """

    name: str = "grpo"
    options: Any = None


@attrs.frozen(kw_only=True)
class TaskSection:
    """``task``: where prompts come from (a task plugin), its options, and the
    prompt-length limit (:mod:`rlpipe.data`).

    Attributes:
        max_prompt_tokens: the longest prompt in tokens, chat template
            included; ``null``: no limit.
        overlong_prompts: what happens to a longer prompt: ``truncate`` keeps
            its last ``max_prompt_tokens`` tokens (the question and the
            generation prompt are at the end); ``reject`` skips the example.
    """

    name: str = "reverse"
    options: Any = None
    max_prompt_tokens: int | None = attrs.field(default=None, validator=check(lambda v: v >= 1, "must be at least 1 (or null: no limit), got {value}"))
    overlong_prompts: str = attrs.field(default="truncate", validator=check(lambda v: v in ("truncate", "reject"), "must be 'truncate' or 'reject', got {value}"))


@attrs.frozen(kw_only=True)
class RunConfig:
    """The whole resolved configuration of a run.

    ``roles`` maps each role in the graph to its section, in config order.
    """

    model: ModelConfig = attrs.field(factory=ModelConfig)
    task: TaskSection = attrs.field(factory=lambda: TaskSection())
    algorithm: AlgorithmSection = attrs.field(factory=lambda: AlgorithmSection())
    roles: dict[str, RoleConfig] = attrs.field(factory=dict)
    placement: PlacementConfig = attrs.field(factory=PlacementConfig)
    train: TrainConfig = attrs.field(factory=TrainConfig)
    checkpoint: CheckpointSection = attrs.field(factory=CheckpointSection)
    telemetry: TelemetrySection = attrs.field(factory=TelemetrySection)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, scalars) that :func:`load_config` reads back."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if attrs.has(type(value)):
        return {f.name: _plain(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- the converter -------------------------------------------------------------------


_SCALARS = {bool: "a boolean", int: "an int", float: "a number", str: "a string"}


def _scalar_hook(t: type):
    def hook(value: Any, _: Any) -> Any:
        ok = isinstance(value, t) and (t is bool or not isinstance(value, bool))
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise ConfigValueError(f"expected {_SCALARS[t]}, got {_show(value)}")
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
                raise ConfigValueError(f"expected a list of {word}, got {_show(value)}")
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
                raise ConfigValueError(f"expected a mapping of {', '.join(f.name for f in attrs.fields(cl))}, got {_show(value)}")
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise ConfigValueError(f"keys must be strings, got {_show(bad[0])}")
            return base(value, cl)

        return hook

    conv.register_structure_hook_factory(attrs.has, attrs_factory)
    return conv


_CONVERTER = make_converter()


def _key(key: Any) -> str:
    """A mapping key as it appears in a path: the key itself, or its repr when it
    is empty or would not print on one line (every problem is one line)."""
    text = str(key)
    return text if text and text.isprintable() else repr(text)


def _join(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{_key(p)}" if out else _key(p))
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
        raise ConfigError(Problem(_key(key), f"--set value {raw!r} is not valid YAML: {reason}")) from None
    out: Any = value
    for p in reversed(parts):
        out = {p: out}
    return out


#: Sections whose ``options`` belong to the plugin that the named key selects.
SELECTING_KEYS = {"task": "name", "algorithm": "name", "placement": "policy"}


def merge_source(data: Mapping[str, Any], source: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`merge`, except that a source selecting another plugin (a new
    ``task.name``, ``algorithm.name`` or ``placement.policy``) replaces that
    section's ``options`` instead of merging into them: the earlier options
    were the earlier plugin's (the defaults' digit-task options would be
    unknown keys to ``task.name: jsonl``)."""
    out = merge(dict(data), source)
    for section, key in SELECTING_KEYS.items():
        old, new = data.get(section), source.get(section)
        if not (isinstance(old, Mapping) and isinstance(new, Mapping) and key in old and key in new):
            continue
        if old[key] != new[key] and isinstance(out.get(section), dict):
            out[section].pop("options", None)
            if new.get("options") is not None:
                out[section]["options"] = copy.deepcopy(new["options"])
    return out


def resolve_sources(defaults: Mapping[str, Any], files: Iterable[str | Path] = (), overrides: Iterable[str] = ()) -> dict[str, Any]:
    data = copy.deepcopy(dict(defaults))
    for f in files:
        data = merge_source(data, read_yaml_file(f))
    for o in overrides:
        data = merge_source(data, parse_override(o))
    return data


# -- structuring the whole config -------------------------------------------------------


def _top_level_keys() -> list[str]:
    return [f.name for f in attrs.fields(RunConfig)]


def build_config(data: Mapping[str, Any], registry: Registry) -> RunConfig:
    """Structures merged config data into a :class:`RunConfig`, typing role and
    policy sections by their plugins.  Collects every problem before raising."""
    problems: list[Problem] = []

    def attempt(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            problems.extend(exc.problems)
            return None

    known = _top_level_keys()
    for key in data:
        if key not in known:
            problems.append(Problem(_key(key), f"unknown section{suggest(str(key), known)} (valid sections: {', '.join(known)})"))

    train = attempt(structure, data.get("train", {}), TrainConfig, ("train",))
    model = attempt(structure, data.get("model", {}), ModelConfig, ("model",))
    checkpoint = attempt(structure, data.get("checkpoint", {}), CheckpointSection, ("checkpoint",))
    telemetry = attempt(structure, data.get("telemetry", {}), TelemetrySection, ("telemetry",))

    def selected(section: str, shell_type: type, hook: str, key: str, what: str):
        """A section that names a plugin (``key``) and holds ``options`` typed by it."""
        raw = data.get(section, {})
        if not isinstance(raw, Mapping):
            problems.append(Problem(section, f"expected a mapping, got {_show(raw)}"))
            return None
        shell = attempt(structure, {k: v for k, v in raw.items() if k != "options"}, shell_type, (section,))
        if shell is None:
            return None
        spec = attempt(registry.get, hook, getattr(shell, key), path=f"{section}.{key}")
        if spec is None:
            return None
        raw_opts = raw.get("options")
        if spec.config_type is None:
            if raw_opts is not None and raw_opts != {}:
                problems.append(Problem(f"{section}.options", f"{what} {getattr(shell, key)!r} takes no options"))
            return shell
        opts = attempt(structure, {} if raw_opts is None else raw_opts, spec.config_type, (section, "options"))
        return None if opts is None else attrs.evolve(shell, options=opts)

    placement = selected("placement", PlacementConfig, "rlpipe_placement_policies", "policy", "policy")
    algorithm = selected("algorithm", AlgorithmSection, "rlpipe_algorithms", "name", "algorithm")
    task = selected("task", TaskSection, "rlpipe_tasks", "name", "task")

    roles_raw = data.get("roles", {})
    roles: dict[str, RoleConfig] = {}
    if not isinstance(roles_raw, Mapping):
        problems.append(Problem("roles", f"expected a mapping of role name to section, got {_show(roles_raw)}"))
    else:
        for name, section in roles_raw.items():
            path = f"roles.{_key(name)}"
            spec = attempt(registry.get, "rlpipe_roles", str(name), path=path)
            if spec is None:
                continue
            cfg = attempt(structure, section if section is not None else {}, spec.config_type, ("roles", str(name)))
            if cfg is not None:
                roles[str(name)] = cfg

    if problems:
        raise ConfigError(problems)
    return RunConfig(model=model, task=task, algorithm=algorithm, roles=roles, placement=placement, train=train,
                     checkpoint=checkpoint, telemetry=telemetry)


def load_config(registry: Registry, *, defaults: Mapping[str, Any], files: Iterable[str | Path] = (), overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults, then files in order, then ``--set`` overrides, structured and checked."""
    return build_config(resolve_sources(defaults, files, overrides), registry)


def dump_yaml(config: RunConfig | Mapping[str, Any]) -> str:
    """YAML that :func:`read_yaml_file` reads back to the same values."""
    data = config.to_dict() if isinstance(config, RunConfig) else config
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
