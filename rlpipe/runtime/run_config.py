"""The schema of a run's configuration: its sections, structured from YAML.

The machinery — merging defaults, files and ``--set`` overrides, strict
cattrs structuring, one-line problems with their paths — is the core's
(:mod:`rlpipe.core.config`); this module says what a *run* is made of: a
model, a task, an algorithm, roles, placement, the training loop,
checkpoints and telemetry.  The ``roles.<name>`` sections are typed by the
plugin that provides each role, ``placement.options``, ``algorithm.options``
and ``task.options`` by the selected plugin.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from rlpipe.core.config import (
    ConfigValueError,
    PlacementConfig,
    RoleConfig,
    check,
    path_key,
    plain_data,
    resolve_sources,
    show_value,
    structure,
)
from rlpipe.core.errors import ConfigError, Problem, suggest
from rlpipe.core.lora_config import LoRAConfig
from rlpipe.core.plugins import Registry
from rlpipe.runtime.pretrained import PRETRAINED, missing_problem


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


def _positive(what: str = "must be at least 1, got {value}"):
    return check(lambda v: v >= 1, what)


@attrs.frozen(kw_only=True)
class ArchitectureConfig:
    """``model.architecture``: an explicit decoder shape, randomly initialised
    from ``train.seed`` like a built-in preset.  Names follow the config's
    short style; :func:`rlpipe.models.config.from_architecture` maps them to a
    :class:`~rlpipe.models.config.DecoderConfig`.

    The keys left ``null`` are derived (and written back, so ``rlpipe config
    show`` prints what is built): ``kv_heads`` = ``heads`` (no grouped-query
    attention), ``head_dim`` = ``hidden / heads``, ``ffn`` = ``4 * hidden``,
    ``qkv_bias`` = whether ``family`` is ``qwen2``.

    Attributes:
        family: ``llama`` or ``qwen2`` (what HF export writes).
        layers: decoder layers.
        hidden: the residual width.
        heads: query heads.
        kv_heads: key/value heads; divides ``heads``.
        head_dim: per-head width (may differ from ``hidden / heads``).
        ffn: the MLP's inner width (SwiGLU).
        vocab: embedding rows; at least the tokenizer's vocabulary.
        qkv_bias: a bias on the q, k and v projections.
        tied: the output projection reuses the token embedding.
        rope_theta: RoPE base frequency.
        norm_eps: RMSNorm epsilon.
        max_positions: the longest sequence (prompt plus completion).
    """

    family: str = attrs.field(default="llama", validator=check(lambda v: v in ("llama", "qwen2"), "must be 'llama' or 'qwen2', got {value}"))
    layers: int = attrs.field(validator=_positive())
    hidden: int = attrs.field(validator=_positive())
    heads: int = attrs.field(validator=_positive())
    kv_heads: int | None = attrs.field(default=None, validator=_positive("must be at least 1 (or null: heads), got {value}"))
    head_dim: int | None = attrs.field(default=None, validator=_positive("must be at least 1 (or null: hidden / heads), got {value}"))
    ffn: int | None = attrs.field(default=None, validator=_positive("must be at least 1 (or null: 4 * hidden), got {value}"))
    vocab: int = attrs.field(validator=_positive())
    qkv_bias: bool | None = None
    tied: bool = False
    rope_theta: float = attrs.field(default=10000.0, validator=check(lambda v: v > 0, "must be positive, got {value}"))
    norm_eps: float = attrs.field(default=1e-6, validator=check(lambda v: v > 0, "must be positive, got {value}"))
    max_positions: int = attrs.field(default=2048, validator=_positive())

    def __attrs_post_init__(self) -> None:
        kv_heads = self.heads if self.kv_heads is None else self.kv_heads
        if self.heads % kv_heads:
            raise ConfigValueError(f"{self.heads} heads are not a multiple of {kv_heads} kv_heads; "
                                   "choose kv_heads dividing heads", ("kv_heads",))
        head_dim = self.head_dim
        if head_dim is None:
            if self.hidden % self.heads:
                raise ConfigValueError(f"hidden {self.hidden} is not a multiple of {self.heads} heads, so head_dim "
                                       "cannot be derived; set head_dim or make hidden a multiple of heads", ("head_dim",))
            head_dim = self.hidden // self.heads
        # Written back so that the resolved config says what is built.
        object.__setattr__(self, "kv_heads", kv_heads)
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "ffn", 4 * self.hidden if self.ffn is None else self.ffn)
        object.__setattr__(self, "qkv_bias", self.family == "qwen2" if self.qkv_bias is None else self.qkv_bias)


@attrs.frozen(kw_only=True)
class ModelConfig:
    """``model``: which policy to train, in which dtype, with which tokenizer.

    Attributes:
        preset: a built-in shape (``tiny``, ``qwen2.5-0.5b``, ``llama-3.2-1b``),
            randomly initialised from ``train.seed``, or a pretrained preset
            (``smollm2-135m-instruct``, :data:`rlpipe.runtime.pretrained.PRETRAINED`):
            its file in the model cache, put there by ``rlpipe models fetch
            NAME``; ignored when ``path`` or ``architecture`` is set.
        path: a local Hugging Face checkpoint directory (Llama or Qwen2), or
            a ``.gguf`` file.
        architecture: an explicit shape (:class:`ArchitectureConfig`),
            randomly initialised from ``train.seed``; replaces ``preset``,
            and cannot be combined with ``path``.
        dtype: ``float32`` or ``bfloat16``; kept for older configs.  The
            dtype the memory estimates of the inference roles assume, and
            ``bfloat16`` makes ``compute_dtype: null`` mean bfloat16 on every
            platform.  It no longer sets the trainer's or the critic's
            parameters: those are always float32 masters.
        compute_dtype: the dtype every role computes in, and the parameter
            dtype of the inference copies (rollout, reference, evaluation),
            which weight sync casts the float32 master to: ``float32``,
            ``bfloat16``, or ``null``: ``bfloat16`` when ``dtype`` is
            ``bfloat16``, else bfloat16 on GPU/TPU and float32 on CPU
            (:meth:`resolved_compute_dtype`, resolved where the devices are known).
        tokenizer: ``char`` (the built-in character tokenizer), a directory
            holding ``tokenizer.json``, or ``null``: the checkpoint's own with
            ``path`` or a pretrained preset, else ``char``.
        lora: low-rank adapters (:class:`rlpipe.core.lora_config.LoRAConfig`:
            ``rank``, ``alpha``, ``targets``, ``dropout``): the policy roles
            train, sync and checkpoint only the adapters, the base weights stay
            frozen in the compute dtype, and the reference is the base model
            with the adapters off (docs/lora.md).  ``null``: full fine-tuning.
    """

    preset: str = "tiny"
    path: str | None = None
    dtype: str = attrs.field(default="float32", validator=check(lambda v: v in ("float32", "bfloat16"), "must be 'float32' or 'bfloat16', got {value}"))
    compute_dtype: str | None = attrs.field(default=None, validator=check(
        lambda v: v is None or v in ("float32", "bfloat16"), "must be 'float32', 'bfloat16' or null, got {value}"))
    tokenizer: str | None = None
    architecture: ArchitectureConfig | None = None
    lora: LoRAConfig | None = None

    def resolved_compute_dtype(self, platform: str | None) -> str:
        """``compute_dtype`` with ``null`` resolved for devices of ``platform``
        (``cpu``, ``gpu``, ``cuda``, ``rocm``, ``tpu``; ``None``: unknown, taken as CPU)."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        if self.dtype == "bfloat16":
            return "bfloat16"
        return "float32" if platform in (None, "cpu") else "bfloat16"

    def run_problems(self, run_config: Any = None, *, path: str = "model") -> list[Problem]:
        """Checked by ``rlpipe config validate``, ``plan`` and ``train`` before
        anything is built: a pretrained ``preset`` (without ``path`` or
        ``architecture``) must be in the model cache; the problem names the
        command that fetches it.  ``architecture`` and ``path`` exclude each
        other (a checkpoint has its own shape)."""
        if self.architecture is not None:
            if self.path:
                return [Problem(f"{path}.architecture", f"a random-init shape, but {path}.path {self.path!r} names a "
                                                        "checkpoint with its own; set one of them")]
            return []
        if self.path or self.preset not in PRETRAINED:
            return []
        problem = missing_problem(self.preset, path=f"{path}.preset")
        return [] if problem is None else [problem]


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
    prompt-length limit (:mod:`rlpipe.models.prompts`).

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
        return plain_data(self)



#: Sections whose ``options`` belong to the plugin that the named key selects.
SELECTING_KEYS = {"task": "name", "algorithm": "name", "placement": "policy"}


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
            problems.append(Problem(path_key(key), f"unknown section{suggest(str(key), known)} (valid sections: {', '.join(known)})"))

    train = attempt(structure, data.get("train", {}), TrainConfig, ("train",))
    model = attempt(structure, data.get("model", {}), ModelConfig, ("model",))
    checkpoint = attempt(structure, data.get("checkpoint", {}), CheckpointSection, ("checkpoint",))
    telemetry = attempt(structure, data.get("telemetry", {}), TelemetrySection, ("telemetry",))

    def selected(section: str, shell_type: type, hook: str, key: str, what: str):
        """A section that names a plugin (``key``) and holds ``options`` typed by it."""
        raw = data.get(section, {})
        if not isinstance(raw, Mapping):
            problems.append(Problem(section, f"expected a mapping, got {show_value(raw)}"))
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
        problems.append(Problem("roles", f"expected a mapping of role name to section, got {show_value(roles_raw)}"))
    else:
        for name, section in roles_raw.items():
            path = f"roles.{path_key(name)}"
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
    return build_config(resolve_sources(defaults, files, overrides, selecting=SELECTING_KEYS), registry)
