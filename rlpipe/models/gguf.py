"""GGUF files (llama.cpp's format): a Llama / Qwen2 ``.gguf`` as a sharded
:class:`~rlpipe.models.decoder.Decoder`, and its tokenizer.

A GGUF file holds the model's shape as metadata (``llama.block_count``, ...),
its tensors under llama.cpp's names, many of them quantised (``Q4_1``,
``Q8_0``, ...), and the tokenizer's vocabulary, merges and chat template.
:mod:`rlpipe.models.gguf_file` reads them; this module lays the weights out.
Each decoder parameter has one tensor in the file::

    embed_tokens                         token_embd.weight
    layers[i].self_attn.q_proj.kernel    blk.i.attn_q.weight        (transposed; rows un-permuted for Llama)
    layers[i].self_attn.k_proj.kernel    blk.i.attn_k.weight        (transposed; rows un-permuted for Llama)
    layers[i].self_attn.v_proj / o_proj  blk.i.attn_v / attn_output (.bias for Qwen2's q, k, v)
    layers[i].mlp.gate_proj / up / down  blk.i.ffn_gate / ffn_up / ffn_down
    layers[i].input_layernorm.scale      blk.i.attn_norm.weight
    layers[i].post_attention_layernorm   blk.i.ffn_norm.weight
    norm.scale                           output_norm.weight
    lm_head.kernel                       output.weight              (transposed; absent when tied)

GGUF lists a tensor's dimensions innermost first, so a ``[576, 192]`` tensor
is Hugging Face's ``[192, 576]`` (``[out, in]``) weight, which rlpipe keeps
transposed.  llama.cpp's converter permutes the rows of a Llama model's q and
k projections (weights and biases) so that each head's rotary pairs are
adjacent; rlpipe rotates halves, as Hugging Face does, so those rows are
permuted back.  Qwen2's converter does not permute them.

:func:`rlpipe.models.hf.from_pretrained` and
:func:`rlpipe.models.tokenizer.load_tokenizer` accept a ``.gguf`` file too.

Example:
    >>> model = from_gguf("/models/SmolLM2-135M-Instruct.Q4_1.gguf", mesh=mesh, dtype="bfloat16")
    >>> tok = gguf_tokenizer("/models/SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from rlpipe.models.gguf_file import (
    PRE_TOKENIZERS,
    ROPE_FREQS,
    GGUFError,
    GGUFFile,
    gguf_config,
    is_gguf,
    open_gguf,
)
from rlpipe.models.tensor_check import check_tensors

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from rlpipe.models.decoder import Decoder
    from rlpipe.models.tokenizer import HFTokenizer

__all__ = ["PRE_TOKENIZERS", "GGUFError", "from_gguf", "gguf_config", "gguf_name", "gguf_tokenizer", "is_gguf",
           "unpermute_rows"]

# Decoder module name -> llama.cpp's, inside ``layers[i]`` / ``blk.i``.
_BLOCK_NAMES: Mapping[tuple[str, ...], str] = {
    ("self_attn", "q_proj"): "attn_q", ("self_attn", "k_proj"): "attn_k", ("self_attn", "v_proj"): "attn_v",
    ("self_attn", "o_proj"): "attn_output", ("mlp", "gate_proj"): "ffn_gate", ("mlp", "up_proj"): "ffn_up",
    ("mlp", "down_proj"): "ffn_down", ("input_layernorm",): "attn_norm", ("post_attention_layernorm",): "ffn_norm",
}
_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight"}

#: Parameter and compute dtypes from_gguf makes.
PARAM_DTYPES = ("float32", "bfloat16", "float16")


def _keys(path: Iterable[Any]) -> tuple[str, ...]:
    names = (str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
    return tuple(n for n in names if n != "value")


def gguf_name(path: Iterable[Any]) -> tuple[str, bool]:
    """llama.cpp's name for the decoder parameter at ``path`` (an nnx state
    path), and whether the parameter is that tensor transposed.

    Raises:
        GGUFError: ``path`` is not a decoder parameter.
    """
    keys = _keys(path)
    if keys == ("embed_tokens",):
        return "token_embd.weight", False
    if keys == ("norm", "scale"):
        return "output_norm.weight", False
    if keys == ("lm_head", "kernel"):
        return "output.weight", True
    if len(keys) >= 3 and keys[0] == "layers" and keys[-1] in _LEAVES and keys[2:-1] in _BLOCK_NAMES:
        return f"blk.{keys[1]}.{_BLOCK_NAMES[keys[2:-1]]}.{_LEAVES[keys[-1]]}", keys[-1] == "kernel"
    raise GGUFError(f"parameter {'.'.join(keys)} has no GGUF name")


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's rotary row permutation of a Llama q or k projection.

    The converter reorders each head's rows ``[first half, second half]`` into
    pairs ``(0, half), (1, half + 1), ...``; this puts them back.  ``w`` is
    ``[n_head * head_dim, ...]``, a weight in ``[out, in]`` layout or a bias.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dtype(dtype: Any) -> Any:
    import jax.numpy as jnp

    if dtype is None:
        return jnp.float32
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in PARAM_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not a parameter dtype rlpipe supports ({', '.join(PARAM_DTYPES)})")
    return jnp.dtype(name)


def from_gguf(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: Any = None) -> Decoder:
    """A :class:`Decoder` with the weights of a Llama or Qwen2 GGUF file.

    Each tensor is dequantised once on the host (numpy, float32), un-permuted
    and cast, and each device's shard is sliced from that copy by
    ``jax.make_array_from_callback``: host memory holds one full tensor at a
    time beyond the memory-mapped file.

    Args:
        path: a ``.gguf`` file (``general.architecture`` ``llama`` or ``qwen2``).
        mesh: the mesh to lay the parameters out on (see
            :func:`rlpipe.models.sharding.shardings_for`); ``None`` puts them
            on the first device.
        dtype: parameter and compute dtype; ``None`` means float32 (quantised
            tensors have no dtype of their own to keep).

    Raises:
        GGUFError: an unsupported architecture or tensor type, or tensors
            missing, unexpected or of the wrong shape (listed by name).
        ShardingError: a parameter dimension the mesh does not divide.
    """
    import jax
    from flax import nnx
    from jax.sharding import AxisType
    from jax.sharding import Mesh as DeviceMesh

    from rlpipe.models.decoder import Decoder
    from rlpipe.models.sharding import shardings_for

    f = open_gguf(path)
    config = gguf_config(path)
    dtype = _dtype(dtype)
    abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    wanted: dict[str, tuple[int, ...]] = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(state):
        name, transposed = gguf_name(p)
        wanted[name] = tuple(reversed(leaf.shape)) if transposed else tuple(leaf.shape)
    # transformers' Llama `attention_bias` puts a bias on o_proj too, which the
    # Decoder lacks: such files load only when it is zero.
    o_biases = [f"blk.{i}.attn_output.bias" for i in range(config.num_layers)
                if config.architecture == "llama" and f"blk.{i}.attn_output.bias" in f.tensors]
    _check(f, wanted, allowed={ROPE_FREQS, *o_biases})
    nonzero = [n for n in o_biases if np.any(f.dequantize(n) != 0)]
    if nonzero:
        raise GGUFError(f"{f.path}: Llama attention-output biases load only when zero (rlpipe's Decoder has none); "
                        f"non-zero: {', '.join(nonzero)}", unexpected=nonzero)

    permuted = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads} if config.architecture == "llama" else {}
    if mesh is None:
        mesh = DeviceMesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    shardings = shardings_for(state, mesh)

    def load(p, leaf, sharding):
        name, transposed = gguf_name(p)
        full: list[np.ndarray] = []  # dequantised when the first shard is asked for

        def shard(index):
            if not full:
                w = f.dequantize(name)
                module = name.split(".")[-2]
                if module in permuted:
                    w = unpermute_rows(w, permuted[module])
                full.append((w.T if transposed else w).astype(dtype))
            return np.ascontiguousarray(full[0][tuple(index)])

        return jax.make_array_from_callback(leaf.shape, sharding, shard, dtype=dtype)

    state = jax.tree_util.tree_map_with_path(load, state, shardings)
    return nnx.merge(graphdef, state)


def _check(f: GGUFFile, wanted: Mapping[str, tuple[int, ...]], allowed: set[str]) -> None:
    check_tensors({n: f.shape(n) for n in f.tensors}, wanted, ignore=allowed.__contains__, error=GGUFError,
                  header=f"{f.path}: the tensors do not match the file's metadata", shape_note=" (outermost first)")


def gguf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer a GGUF file describes (see :func:`rlpipe.models.gguf_file.read_vocab`):
    byte-level BPE with the file's pre-tokenizer, special tokens and chat template.

    Raises:
        TokenizerError: not a GGUF file, or a vocabulary rlpipe cannot read (named).
    """
    from rlpipe.models.tokenizer import TokenizerError, load_tokenizer

    if not is_gguf(path):
        raise TokenizerError(f"{path}: not a GGUF file")
    return load_tokenizer(path)
