"""Memory formulas of the decoder: what a role holding one needs on each device.

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

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlpipe.core.errors import ConfigError, Problem, choices_text, suggest
from rlpipe.core.placement import MeshSpec
from rlpipe.models.config import PRESETS, DecoderConfig
from rlpipe.models.hf import CheckpointError, config_from_hf
from rlpipe.models.sharding import DEFAULT_RULES, logical_axes

#: Bytes per element of the dtypes rlpipe creates parameters, caches and activations in.
DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}



def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[str(name)]
    except KeyError:
        raise ValueError(f"no byte size known for dtype {name!r} (known: {', '.join(DTYPE_BYTES)})") from None


def prompt_bucket(tokens: int, minimum: int = 16) -> int:
    """The prompt length after padding to its bucket: the smallest power of two
    that is at least ``max(tokens, minimum)`` (as :func:`rlpipe.models.generation.bucket_length`,
    restated here so that planning does not import jax)."""
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
    path = path or getattr(model_config, "path", None)
    if not path:
        name = model_config.preset
        if name not in PRESETS:
            raise ConfigError(Problem("model.preset", f"unknown preset {name!r}{suggest(name, PRESETS)} (available: {choices_text(PRESETS)})"))
        return PRESETS[name]
    try:
        hf = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        return config_from_hf(hf, source=str(Path(path) / "config.json"))
    except CheckpointError:
        return None


