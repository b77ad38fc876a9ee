"""Memory formulas of the decoder: what a role holding one needs on each device.

The built-in roles' ``memory_estimate`` functions (and a plugin role's, if
it holds a decoder) build their :class:`rlpipe.core.memory.MemoryEstimate`
from these; :mod:`rlpipe.core.memory` says how planning uses it.

These are **estimates**, computed from shapes alone, before anything is
compiled.  They count

* parameters, laid out the way :mod:`rlpipe.models.sharding` lays them out
  (matrices split over the ``fsdp`` and ``tp`` mesh axes where those divide
  them; norms, biases of unsplit dimensions and anything the rules do not
  name replicated);
* optimizer state, gradients and the KV cache in the dtypes rlpipe creates
  them in;
* activations by the formulas below.

They leave out: XLA's workspace beyond the arrays counted below,
fragmentation, compiled programs, the arrays of the batch itself,
communication buffers of collectives, a second copy of gradients while
micro-batches accumulate, and copies made by weight sync.  Treat a total
close to capacity as not fitting.

Activations are what XLA counts as the program's temporaries
(``compiled.memory_analysis().temp_size_in_bytes``), as the decoder of
:mod:`rlpipe.models.decoder` compiles them: the formulas' shapes follow the
program, their coefficients (how many arrays of each size XLA holds at once)
were fitted to compiles of the tiny and qwen2.5-0.5b presets and agree with
them within 20 % (docs/performance.md §10, tests/test_training_memory.py).
With ``b`` the bytes of the compute dtype, ``h`` hidden size, ``I``
intermediate size, ``H``/``K`` query/key-value heads of width ``d``, ``V``
vocabulary, ``rows × seq`` the tokens of one pass, ``keys`` the key slots
attended to, ``L`` layers and ``P`` one layer's parameters::

    tokens = rows × seq × ((h + (H + 2K)d) × b + 4I)     # hidden, q/k/v; one fp32 MLP product
    scores = rows × H × block × keys × 4                 # one fp32 score array
             block = attention_query_block(rows, H, seq) without a cache, seq with one
    layer  = 4 tokens + 2.5 scores                       # forward without a cache (blocked attention)
           | 2 tokens + 2 scores                         # prefill into a cache (keys > seq)
    logits = 2 × min(rows × positions, chunk) × V × 4    # one chunk of logit_chunk_tokens(V) positions

A forward pass without gradients (rollout prefill, reference) keeps one
layer's working set at a time: ``layer + logits`` (plus the weights' copies
in the compute dtype when parameters are kept in another: the head's,
``V × h × b``, for the log-prob forward; every layer's, ``L × P × b``, for
the prefill).  A training step without remat keeps ``4 tokens`` per layer
and ``3.5 scores`` once (blocked attention is rematerialised; unblocked, per
layer); with remat (the layers under a rematerialised scan) each layer's
input ``rows × seq × h × b``, the layers' weights stacked in the compute
dtype and their gradient ``2 × L × P × b``, and one layer's backward working
set ``5.5 tokens + 3.5 scores``.  Both add ``logits`` and the head's gradient
accumulated over the chunks, ``V × h`` in the parameter dtype.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlpipe.core.errors import ConfigError, Problem, choices_text, suggest
from rlpipe.core.placement import MeshSpec
from rlpipe.models.config import PRESETS, DecoderConfig, from_architecture
from rlpipe.models.sharding import DEFAULT_RULES, logical_axes
from rlpipe.runtime.pretrained import PRETRAINED

# rlpipe.models.decoder and rlpipe.models.hf load jax and flax: they are imported in the
# functions that use them, so that the role specs, which import this module, stay light.

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


def lora_parameters(config: DecoderConfig, lora: Any) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """``(path, shape)`` of the LoRA adapters ``lora`` (a
    :class:`~rlpipe.core.lora_config.LoRAConfig`) puts on ``config``'s
    decoder: ``lora_a`` ``[in, rank]`` and ``lora_b`` ``[rank, out]`` beside
    each targeted kernel, named as :mod:`rlpipe.models.sharding` lays them out."""
    out = []
    for path, (d_in, d_out) in ((p, s) for p, s in decoder_parameters(config) if p[-1] == "kernel"):
        if path[-2] in lora.targets:
            out += [((*path[:-1], "lora_a"), (d_in, lora.rank)), ((*path[:-1], "lora_b"), (lora.rank, d_out))]
    return out


def lora_parameter_bytes(config: DecoderConfig, lora: Any, mesh: MeshSpec, itemsize: int = 4) -> int:
    """Bytes of the LoRA adapters on each device of ``mesh`` (float32 by default,
    as :func:`rlpipe.models.lora.apply_lora` makes them for the roles)."""
    return parameter_bytes(lora_parameters(config, lora), mesh, itemsize)


# -- caches and activations ----------------------------------------------------------


def kv_cache_bytes(config: DecoderConfig, rows: int, slots: int, itemsize: int) -> int:
    """``rows × layers × 2 (k, v) × kv_heads × head_dim × slots × itemsize``."""
    return rows * config.num_layers * 2 * config.num_kv_heads * config.dim_per_head * slots * itemsize


def token_bytes(config: DecoderConfig, itemsize: int) -> int:
    """Bytes per token of one layer's main activations: the hidden state and the
    q/k/v projections in the compute dtype, and one MLP projection in float32 (the
    matrix products accumulate and are written in float32 before the cast)."""
    h, d = config.hidden_size, config.dim_per_head
    return (h + (config.num_heads + 2 * config.num_kv_heads) * d) * itemsize + 4 * config.intermediate_size


def attention_bytes(config: DecoderConfig, rows: int, seq: int, keys: int) -> int:
    """One float32 score array of one layer's attention: ``rows × heads × block ×
    keys × 4``.  Without a cache (``keys == seq``) queries run in blocks of
    :func:`rlpipe.models.decoder.attention_query_block`; with a cache (prefill:
    ``keys > seq``) all ``seq`` queries at once."""
    from rlpipe.models.decoder import attention_query_block

    block = seq if keys != seq else attention_query_block(rows, config.num_heads, seq)
    return rows * config.num_heads * block * keys * 4


def layer_params(config: DecoderConfig) -> int:
    """Parameters of one decoder layer."""
    h, d, i = config.hidden_size, config.dim_per_head, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    return 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h + ((q + 2 * kv) if config.qkv_bias else 0)


def layer_activation_bytes(config: DecoderConfig, rows: int, seq: int, keys: int, itemsize: int) -> int:
    """One layer's working set in a forward pass over ``rows × seq`` tokens
    attending to ``keys`` slots (the ``layer`` formula of the module docstring)."""
    tokens = rows * seq * token_bytes(config, itemsize)
    if keys != seq:  # with a cache: the scores of every query at once
        return 2 * tokens + 2 * attention_bytes(config, rows, seq, keys)
    # blocked attention also re-lays the queries and outputs of its blocks
    return 4 * tokens + 5 * attention_bytes(config, rows, seq, keys) // 2


def logits_bytes(config: DecoderConfig, rows: int, positions: int) -> int:
    """One chunk of float32 logits and their exponentials (or gradient): the head
    runs over :func:`rlpipe.models.decoder.logit_chunk_tokens` positions at a time,
    so ``2 × min(rows × positions, chunk) × vocab × 4``."""
    from rlpipe.models.decoder import logit_chunk_tokens

    chunk = min(rows * positions, logit_chunk_tokens(config.vocab_size))
    return 2 * chunk * config.vocab_size * 4


def _cast_bytes(config: DecoderConfig, itemsize: int, param_itemsize: int | None, *, head: bool) -> int:
    """Copies of the weights in the compute dtype, made when it differs from the
    parameter dtype: every layer's (a forward with a cache: XLA converts them all
    up front) or the head's (the log-prob programs)."""
    if param_itemsize is None or param_itemsize == itemsize:
        return 0
    if head:
        return config.vocab_size * config.hidden_size * itemsize
    return config.num_layers * layer_params(config) * itemsize


def forward_activation_bytes(config: DecoderConfig, rows: int, seq: int, itemsize: int, *,
                             keys: int | None = None, logit_positions: int | None = None,
                             param_itemsize: int | None = None) -> int:
    """A forward pass without gradients: one layer at a time, plus one chunk of
    logits over ``logit_positions`` positions per row (default: every position).
    ``keys > seq`` is a prefill into a cache of ``keys`` slots (full attention
    scores, the last position's logits); ``keys == seq`` (default) the log-prob
    forward of the reference.  ``param_itemsize``: the parameters' dtype bytes
    when it differs from the compute dtype's ``itemsize`` (copies in the compute
    dtype are counted)."""
    keys = seq if keys is None else keys
    positions = seq if logit_positions is None else logit_positions
    cast = _cast_bytes(config, itemsize, param_itemsize, head=keys == seq)
    return layer_activation_bytes(config, rows, seq, keys, itemsize) + logits_bytes(config, rows, positions) + cast


def training_activation_bytes(config: DecoderConfig, rows: int, seq: int, itemsize: int, *, logits: bool = True,
                              remat: bool = False, logit_positions: int | None = None,
                              param_itemsize: int | None = None) -> int:
    """A forward and backward pass over ``rows × seq`` tokens with logits at
    ``logit_positions`` positions per row (default ``seq``; ``logits=False`` for a
    value model, whose head is a single number per token).

    Without ``remat`` every layer keeps ``4 × tokens`` for the backward pass (its
    attention keeps only its blocks' inputs); with ``remat`` each layer keeps
    its input, the layers' weights are stacked in the compute dtype (and so is
    their gradient), and the backward pass holds one layer's working set.  The
    head's gradient accumulates over the logit chunks in the parameter dtype."""
    param_itemsize = itemsize if param_itemsize is None else param_itemsize
    layers, tokens = config.num_layers, rows * seq * token_bytes(config, itemsize)
    attention = attention_bytes(config, rows, seq, seq)
    from rlpipe.models.decoder import attention_query_block

    blocked = attention_query_block(rows, config.num_heads, seq) < seq
    if remat:
        out = (layers * rows * seq * config.hidden_size * itemsize + 2 * layers * layer_params(config) * itemsize
               + 11 * tokens // 2 + 7 * attention // 2)
    else:
        out = layers * 4 * tokens + (1 if blocked else layers) * 7 * attention // 2
    if logits:
        positions = seq if logit_positions is None else logit_positions
        out += logits_bytes(config, rows, positions) + config.vocab_size * config.hidden_size * param_itemsize
    return out


def model_shape(model_config: Any, path: str | None = None) -> DecoderConfig | None:
    """The decoder shape of a ``model`` config section: ``model.architecture``,
    or its preset (a
    pretrained preset's shape comes from its table entry, so this works before
    its file is fetched), or the ``config.json`` of ``path`` (default
    ``model.path``), or the metadata of a ``.gguf`` file.  ``None`` when the
    checkpoint cannot be read here (planning for another machine); building
    the role then reports the problem.

    Raises:
        ConfigError: an unknown preset.
    """
    path = path or getattr(model_config, "path", None)
    architecture = getattr(model_config, "architecture", None)
    if not path and architecture is not None:
        return from_architecture(architecture)
    if not path:
        name = model_config.preset
        if name in PRETRAINED:
            return DecoderConfig(**PRETRAINED[name].shape)
        if name not in PRESETS:
            known = [*PRESETS, *PRETRAINED]
            raise ConfigError(Problem("model.preset", f"unknown preset {name!r}{suggest(name, known)} "
                                                      f"(available: {choices_text(known)})"))
        return PRESETS[name]
    if str(path).endswith(".gguf"):
        from rlpipe.models import gguf  # numpy and the file format, on first use
        from rlpipe.models.hf import CheckpointError

        try:
            return gguf.gguf_config(path)
        except (CheckpointError, OSError, ValueError):  # unreadable or unsupported: reported when the role is built
            return None
    try:
        hf = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    from rlpipe.models.hf import CheckpointError, config_from_hf

    try:
        return config_from_hf(hf, source=str(Path(path) / "config.json"))
    except CheckpointError:
        return None


