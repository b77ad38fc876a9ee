"""Per-device memory estimates of roles, and device capacity.

A role plugin may give its :class:`rlpipe.core.specs.RoleSpec` a
``memory_estimate(role_config, run_config, mesh) -> MemoryEstimate | None``;
planning calls it for the mesh each role is placed on, fills
``RolePlacement.memory_estimate_bytes`` with the total, and compares the
roles that share a device with that device's capacity.  The ``auto`` policy
uses the same numbers to choose between colocated, disaggregated and
colocated+offload.

These are **estimates**, computed from shapes alone, before anything is
compiled.  They count

* parameters, laid out the way :mod:`rlpipe.models.sharding` lays them out
  (matrices split over the ``fsdp`` and ``tp`` mesh axes where those divide
  them; norms, biases of unsplit dimensions and anything the rules do not
  name replicated);
* optimizer state, gradients and the KV cache in the dtypes rlpipe creates
  them in;
* activations by the formulas below.

They leave out: XLA's temporary buffers and workspace (which can be large for
attention), fragmentation, compiled programs, the arrays of the batch
itself, communication buffers of collectives, a second copy of gradients
while micro-batches accumulate, copies made by weight sync, and any
rematerialisation XLA chooses.  Treat a total close to capacity as not
fitting.

Activations (``b`` = bytes of the compute dtype, ``h`` hidden size, ``I``
intermediate size, ``H``/``K`` query/key-value heads of width ``d``, ``V``
vocabulary, ``rows`` × ``seq`` the tokens of one forward pass, ``keys`` the
key slots attended to)::

    layer  = rows × seq × (2h + 2(H + K)d + 3I) × b      # norm inputs, q/k/v/attention out, MLP
           + rows × H × seq × keys × (4 + b)             # attention scores (fp32) and probabilities
    logits = 2 × rows × positions × V × 4                # fp32 logits and their log-softmax / gradient

A forward pass without gradients (rollout prefill, reference) keeps one
layer's working set at a time: ``layer + logits``.  A training step keeps
every layer's for the backward pass: ``layers × layer + logits``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from rlpipe.core.placement import DeviceInfo, MeshSpec, RolePlacement
    from rlpipe.models.config import DecoderConfig

#: Bytes per element of the dtypes rlpipe creates parameters, caches and activations in.
DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

GIB = 1 << 30


def _nonnegative_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"MemoryEstimate.{attribute.name} must be a non-negative int of bytes, got {value!r}")


@attrs.frozen(kw_only=True)
class MemoryEstimate:
    """A role's estimated memory on *each* of its devices, in bytes, by kind.

    Attributes:
        parameters: the model's parameters (this device's shards).
        optimizer_state: optimizer moments (AdamW: two per parameter).
        gradients: one set of gradients, in the parameter dtype.
        kv_cache: the generation KV cache.
        activations: what one forward (and backward) pass keeps alive.
    """

    parameters: int = attrs.field(default=0, validator=_nonnegative_int)
    optimizer_state: int = attrs.field(default=0, validator=_nonnegative_int)
    gradients: int = attrs.field(default=0, validator=_nonnegative_int)
    kv_cache: int = attrs.field(default=0, validator=_nonnegative_int)
    activations: int = attrs.field(default=0, validator=_nonnegative_int)

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer_state + self.gradients + self.kv_cache + self.activations


def format_bytes(n: int | None) -> str:
    """``3.1 GiB``; ``-`` for unknown."""
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(n)


def describe_devices(ids: Sequence[int]) -> str:
    """``devices 0-7``, ``device 3``, ``devices 0,2,5``."""
    ids = list(ids)
    if len(ids) == 1:
        return f"device {ids[0]}"
    if len(ids) > 2 and ids == list(range(ids[0], ids[0] + len(ids))):
        return f"devices {ids[0]}-{ids[-1]}"
    return f"devices {','.join(map(str, ids))}"


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[str(name)]
    except KeyError:
        raise ValueError(f"no byte size known for dtype {name!r} (known: {', '.join(DTYPE_BYTES)})") from None


def prompt_bucket(tokens: int, minimum: int = 16) -> int:
    """The prompt length after padding to its bucket: the smallest power of two
    that is at least ``max(tokens, minimum)`` (as :func:`rlpipe.models.sampling.bucket_length`,
    restated here so that planning does not import flax)."""
    n = max(int(tokens), minimum, 1)
    return 1 << (n - 1).bit_length()


# -- parameters ----------------------------------------------------------------------


def decoder_parameters(config: DecoderConfig) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """``(path, shape)`` of every parameter of :class:`rlpipe.models.decoder.Decoder`,
    with the names :mod:`rlpipe.models.sharding` recognises."""
    h, d, i, v = config.hidden_size, config.dim_per_head, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    out: list[tuple[tuple[str, ...], tuple[int, ...]]] = [(("embed_tokens",), (v, h))]
    for n in range(config.num_layers):
        layer = ("layers", str(n))
        out += [
            ((*layer, "input_layernorm", "scale"), (h,)),
            ((*layer, "self_attn", "q_proj", "kernel"), (h, q)),
            ((*layer, "self_attn", "k_proj", "kernel"), (h, kv)),
            ((*layer, "self_attn", "v_proj", "kernel"), (h, kv)),
            ((*layer, "self_attn", "o_proj", "kernel"), (q, h)),
            ((*layer, "post_attention_layernorm", "scale"), (h,)),
            ((*layer, "mlp", "gate_proj", "kernel"), (h, i)),
            ((*layer, "mlp", "up_proj", "kernel"), (h, i)),
            ((*layer, "mlp", "down_proj", "kernel"), (i, h)),
        ]
        if config.qkv_bias:
            out += [((*layer, "self_attn", "q_proj", "bias"), (q,)),
                    ((*layer, "self_attn", "k_proj", "bias"), (kv,)),
                    ((*layer, "self_attn", "v_proj", "bias"), (kv,))]
    out.append((("norm", "scale"), (h,)))
    if not config.tie_embeddings:
        out.append((("lm_head", "kernel"), (h, v)))
    return out


def mesh_axis_sizes(mesh: MeshSpec) -> dict[str, int]:
    return dict(zip(mesh.axes, mesh.shape))


def shard_elements(path: Sequence[str], shape: Sequence[int], mesh: MeshSpec, rules: Mapping[str, str] | None = None) -> int:
    """Elements of one parameter held by each device of ``mesh``, under the
    logical-axis rules of :mod:`rlpipe.models.sharding`.  A dimension the mesh
    axis does not divide is counted whole (building the role reports it)."""
    from rlpipe.models.sharding import DEFAULT_RULES, logical_axes

    rules = DEFAULT_RULES if rules is None else rules
    sizes = mesh_axis_sizes(mesh)
    count = 1
    for dim, logical in zip(shape, logical_axes(tuple(path), len(shape))):
        split = sizes.get(rules.get(logical, ""), 1) if logical else 1
        count *= dim // split if split > 1 and dim % split == 0 else dim
    return count


def parameter_bytes(params: Iterable[tuple[Sequence[str], Sequence[int]]], mesh: MeshSpec, itemsize: int) -> int:
    """Bytes of ``params`` (``(path, shape)`` pairs) on each device of ``mesh``."""
    return sum(shard_elements(path, shape, mesh) for path, shape in params) * itemsize


def decoder_parameter_bytes(config: DecoderConfig, mesh: MeshSpec, itemsize: int) -> int:
    """Bytes of a decoder's parameters on each device of ``mesh``."""
    return parameter_bytes(decoder_parameters(config), mesh, itemsize)


# -- caches and activations ----------------------------------------------------------


def kv_cache_bytes(config: DecoderConfig, rows: int, slots: int, itemsize: int) -> int:
    """``rows × layers × 2 (k, v) × kv_heads × head_dim × slots × itemsize``."""
    return rows * config.num_layers * 2 * config.num_kv_heads * config.dim_per_head * slots * itemsize


def layer_activation_bytes(config: DecoderConfig, rows: int, seq: int, keys: int, itemsize: int) -> int:
    """One decoder layer's activations for ``rows × seq`` tokens attending to
    ``keys`` slots (the ``layer`` formula of the module docstring)."""
    h, d, i = config.hidden_size, config.dim_per_head, config.intermediate_size
    per_token = 2 * h + 2 * (config.num_heads + config.num_kv_heads) * d + 3 * i
    return rows * seq * per_token * itemsize + rows * config.num_heads * seq * keys * (4 + itemsize)


def logits_bytes(config: DecoderConfig, rows: int, positions: int) -> int:
    """fp32 logits over the vocabulary and their log-softmax (or gradient)."""
    return 2 * rows * positions * config.vocab_size * 4


def forward_activation_bytes(config: DecoderConfig, rows: int, seq: int, itemsize: int, *,
                             keys: int | None = None, logit_positions: int | None = None) -> int:
    """A forward pass without gradients: one layer at a time, plus logits at
    ``logit_positions`` positions per row (default: every position)."""
    keys = seq if keys is None else keys
    positions = seq if logit_positions is None else logit_positions
    return layer_activation_bytes(config, rows, seq, keys, itemsize) + logits_bytes(config, rows, positions)


def training_activation_bytes(config: DecoderConfig, rows: int, seq: int, itemsize: int, *, logits: bool = True) -> int:
    """A forward and backward pass: every layer's activations kept for the
    backward pass, plus the logits of every position (``logits=False`` for a
    value model, whose head is a single number per token)."""
    out = config.num_layers * layer_activation_bytes(config, rows, seq, seq, itemsize)
    return out + (logits_bytes(config, rows, seq) if logits else 0)


def model_shape(model_config: Any, path: str | None = None) -> DecoderConfig | None:
    """The decoder shape of a ``model`` config section: its preset, or the
    ``config.json`` of ``path`` (default ``model.path``).  ``None`` when the
    checkpoint's ``config.json`` cannot be read here (planning for another
    machine); building the role then reports the problem.

    Raises:
        ConfigError: an unknown preset.
    """
    import json
    from pathlib import Path

    path = path or getattr(model_config, "path", None)
    if not path:
        from rlpipe.models.config import PRESETS
        from rlpipe.core.errors import ConfigError, Problem, choices_text, suggest

        name = model_config.preset
        if name not in PRESETS:
            raise ConfigError(Problem("model.preset", f"unknown preset {name!r}{suggest(name, PRESETS)} (available: {choices_text(PRESETS)})"))
        return PRESETS[name]
    try:
        hf = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    from rlpipe.models.hf import CheckpointError, config_from_hf

    try:
        return config_from_hf(hf, source=str(Path(path) / "config.json"))
    except CheckpointError:
        return None


# -- capacity and what shares it ----------------------------------------------------------


@attrs.frozen(kw_only=True)
class DeviceCapacity:
    """How much memory each device has, and where that number comes from.

    ``bytes`` is ``None`` when nothing says (JAX's CPU backend reports no
    limit, and hypothetical devices have none); ``source`` then says why.
    """

    bytes: int | None = None
    source: str = "unknown"

    def describe(self) -> str:
        if self.bytes is None:
            return f"unknown ({self.source}; set placement.device_memory_gib)"
        return f"{format_bytes(self.bytes)} per device ({self.source})"


def device_capacity(devices: Sequence[DeviceInfo], configured_gib: float | None = None) -> DeviceCapacity:
    """``placement.device_memory_gib`` if set, else the smallest ``bytes_limit``
    the devices report, else unknown."""
    if configured_gib is not None:
        return DeviceCapacity(bytes=int(configured_gib * GIB), source="placement.device_memory_gib")
    reported = [d.memory_bytes for d in devices if d.memory_bytes]
    if reported:
        platform = devices[0].platform
        return DeviceCapacity(bytes=int(min(reported)), source=f"{platform} bytes_limit reported by JAX")
    platforms = sorted({d.platform for d in devices}) or ["no"]
    return DeviceCapacity(source=f"{'/'.join(platforms)} devices report no memory limit")


@attrs.frozen(kw_only=True)
class DeviceUsage:
    """Peak estimated use of the devices that hold the same roles.

    ``resident`` roles stay on the devices; ``turns`` are offloaded roles
    that take turns, so only the largest of them counts.
    """

    devices: tuple[int, ...] = attrs.field(converter=tuple)
    resident: tuple[str, ...] = attrs.field(converter=tuple)
    turns: tuple[str, ...] = attrs.field(converter=tuple)
    peak_bytes: int

    @property
    def roles(self) -> tuple[str, ...]:
        return (*self.resident, *self.turns)

    def describe_roles(self) -> str:
        """``trainer + reference``, ``rollout, trainer taking turns``, or both."""
        turns = f"{', '.join(self.turns)} taking turns" if self.turns else ""
        if not self.resident:
            return turns
        return " + ".join(self.resident) + (f", with {turns}" if turns else "")


@attrs.frozen(kw_only=True)
class MemoryBudget:
    """What a colocation policy may know about memory (``PlanContext.memory``).

    Attributes:
        capacity: each device's memory.
        estimator: ``estimator(role, mesh)``: the role's per-device estimate
            on that mesh, or ``None`` (a host role, or a role whose plugin
            gives none).
    """

    capacity: DeviceCapacity = attrs.field(factory=DeviceCapacity)
    estimator: Callable[[str, MeshSpec], MemoryEstimate | None] = attrs.field(default=lambda role, mesh: None, eq=False)

    def estimate(self, role: str, mesh: MeshSpec) -> MemoryEstimate | None:
        return self.estimator(role, mesh)

    def usage(self, roles: Sequence[RolePlacement]) -> list[DeviceUsage]:
        """Peak use per group of devices holding the same roles, in device
        order: resident roles all at once, plus the largest offloaded one.
        Roles without an estimate count 0."""
        totals = {}
        for r in roles:
            est = r.memory_estimate_bytes
            if est is None:
                e = self.estimate(r.name, r.mesh)
                est = None if e is None else e.total
            totals[r.name] = est
        by_device: dict[int, list[RolePlacement]] = {}
        for r in roles:
            if totals[r.name] is None:
                continue
            for d in r.devices:
                by_device.setdefault(d, []).append(r)
        groups: dict[tuple, list[int]] = {}
        for d in sorted(by_device):
            here = by_device[d]
            resident = tuple(r.name for r in here if not r.offload)
            turns = tuple(r.name for r in here if r.offload)
            groups.setdefault((resident, turns), []).append(d)
        out = []
        for (resident, turns), devs in groups.items():
            peak = sum(totals[n] for n in resident) + max((totals[n] for n in turns), default=0)
            out.append(DeviceUsage(devices=devs, resident=resident, turns=turns, peak_bytes=peak))
        return out

    def fits(self, roles: Sequence[RolePlacement]) -> bool:
        """Every device's peak is within capacity (always, when capacity is unknown)."""
        cap = self.capacity.bytes
        return cap is None or all(u.peak_bytes <= cap for u in self.usage(roles))


#: What to change when one role does not fit, by the kind of memory that dominates.
_REMEDIES = {
    "parameters": "more devices on its mesh's fsdp axis, or model.dtype=bfloat16",
    "optimizer_state": "more devices on its mesh's fsdp axis, model.dtype=bfloat16, or optimizer=sgd",
    "gradients": "more devices on its mesh's fsdp axis, or model.dtype=bfloat16",
    "kv_cache": "fewer rows in flight (train.prompts_per_item, roles.rollout.num_generations), shorter "
                "sequences (roles.rollout.max_new_tokens, task.max_prompt_tokens), or model.dtype=bfloat16",
    "activations": "a smaller roles.<role>.micro_batch_size, shorter sequences (roles.rollout.max_new_tokens, "
                   "task.max_prompt_tokens), or model.dtype=bfloat16",
}


def too_big(role: str, estimate: MemoryEstimate, mesh: MeshSpec, capacity: DeviceCapacity, *, why: str = "") -> str:
    """The one-line reason a role does not fit on its devices, with what to change
    (``why`` is appended to the reason, before the remedy)."""
    parts = {f.name: getattr(estimate, f.name) for f in attrs.fields(MemoryEstimate)}
    largest = max(parts, key=parts.get)
    shown = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in parts.items() if v)
    # A generating role's activations scale with its rows in flight, not a micro-batch.
    remedy = _REMEDIES["kv_cache" if largest == "activations" and estimate.kv_cache else largest].replace("<role>", role)
    n = math.prod(mesh.shape)
    return (f"needs an estimated {format_bytes(estimate.total)} per device ({shown}) on mesh {list(mesh.shape)} "
            f"({', '.join(mesh.axes)}) over {n} device{'s' if n != 1 else ''}, but a device holds "
            f"{format_bytes(capacity.bytes)} ({capacity.source}){why}; offloading other roles cannot help it: try "
            f"{remedy}; `rlpipe plan` shows the breakdown")
