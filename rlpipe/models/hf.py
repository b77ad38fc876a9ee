"""Hugging Face checkpoints: load a Llama / Qwen2 directory into a sharded
:class:`~rlpipe.models.decoder.Decoder`, and write one back.

Loading never materialises the whole model on the host, nor one full copy per
device: the model's abstract state gives every parameter's shape and target
``NamedSharding``, and each device's shard is read straight from the
safetensors file (memory-mapped) by ``jax.make_array_from_callback``.

The name mapping is a rename and, for projections, a transpose: rlpipe keeps a
kernel as ``[in, out]`` where Hugging Face keeps ``weight`` as ``[out, in]``::

    embed_tokens                         model.embed_tokens.weight
    layers[i].self_attn.q_proj.kernel    model.layers.i.self_attn.q_proj.weight  (transposed)
    layers[i].self_attn.q_proj.bias      model.layers.i.self_attn.q_proj.bias
    layers[i].input_layernorm.scale      model.layers.i.input_layernorm.weight
    norm.scale                           model.norm.weight
    lm_head.kernel                       lm_head.weight                          (transposed)

Example:
    >>> model = from_pretrained("/ckpt/Qwen2.5-0.5B-Instruct", mesh=mesh, dtype="bfloat16")
    >>> save_pretrained(model, "/tmp/out")  # readable by transformers
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh

from rlpipe.core.errors import UsageError
from rlpipe.models.config import DecoderConfig, RopeScaling
from rlpipe.models.decoder import Decoder
from rlpipe.models.sharding import shardings_for
from rlpipe.models.tensor_check import check_tensors

__all__ = ["CheckpointError", "classifier_config_from_hf", "config_from_hf", "from_pretrained",
           "from_pretrained_classifier", "hf_name", "save_pretrained"]

#: ``architectures[0]`` -> ``DecoderConfig.architecture``.
ARCHITECTURES: Mapping[str, str] = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

#: Parameter dtypes rlpipe loads and saves.
PARAM_DTYPES: Mapping[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype codes.  Those numpy cannot name (bf16, fp8) are read through
# our own memory map rather than safetensors' numpy backend, which rejects them.
_ST_DTYPES: Mapping[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
    "F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NUMPY_NATIVE = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
_ST_CODES: Mapping[Any, str] = {np.dtype(np.float32): "F32", np.dtype(jnp.bfloat16): "BF16",
                                np.dtype(np.float16): "F16"}

# Buffers some exporters write that are recomputed, not learned.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_SHARD_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


class CheckpointError(UsageError, ValueError):
    """A checkpoint directory that rlpipe cannot load (or a model it cannot save).

    Attributes:
        missing: Hugging Face tensor names the model needs and the files lack.
        unexpected: tensor names in the files that the model has no place for.
        mismatched: ``(name, expected_shape, found_shape)`` triples, shapes in
            the checkpoint's ``[out, in]`` layout.
    """

    def __init__(self, message: str, *, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = ()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        super().__init__(message)


# -- config --------------------------------------------------------------------


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> DecoderConfig:
    """The :class:`DecoderConfig` of a Hugging Face ``config.json`` (as a dict).

    Reads both the transformers 4 spelling (``rope_theta``, ``rope_scaling``)
    and the transformers 5 one (``rope_parameters``).

    Raises:
        CheckpointError: the architecture or one of its options is one that
            rlpipe's decoder does not implement; the message names it.
    """
    archs = list(hf.get("architectures") or [])
    model_type = hf.get("model_type")
    if archs:
        arch = ARCHITECTURES.get(archs[0])
        if arch is None:
            raise CheckpointError(f"{source}: unsupported architecture {archs[0]!r} "
                                  f"(supported: {', '.join(ARCHITECTURES)})")
    elif model_type in ARCHITECTURES.values():
        arch = model_type
    else:
        raise CheckpointError(f"{source}: unsupported model_type {model_type!r} and no 'architectures' "
                              f"(supported: {', '.join(ARCHITECTURES)} / model_type llama, qwen2)")

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise CheckpointError(f"{source}: missing {key!r}")
        return hf[key]

    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r} (only 'silu')")
    if hf.get("mlp_bias"):
        unsupported.append("mlp_bias=true")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
        unsupported.append("sliding-window attention")
    rope_theta, scaling = _rope(hf, source)
    if unsupported:
        raise CheckpointError(f"{source}: {archs[0] if archs else arch} with {', '.join(unsupported)} is not supported")

    num_heads = int(need("num_attention_heads"))
    return DecoderConfig(
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=int(need("hidden_size")),
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=None if hf.get("head_dim") is None else int(hf["head_dim"]),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        # Qwen2 always has q/k/v biases; for Llama `attention_bias` adds them (and
        # an o_proj bias, which rlpipe accepts only when it is zero: see below).
        qkv_bias=True if arch == "qwen2" else bool(hf.get("attention_bias", False)),
        # LlamaConfig and Qwen2Config both default to untied.
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
    )


def _rope(hf: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise CheckpointError(f"{source}: per-layer-type rope_parameters ({', '.join(params)}) are not supported")
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise CheckpointError(f"{source}: rope scaling type {kind!r} is not supported (supported: 'default', 'llama3')")
    try:
        return theta, RopeScaling(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                                  high_freq_factor=float(params["high_freq_factor"]),
                                  original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    except KeyError as e:
        raise CheckpointError(f"{source}: llama3 rope scaling lacks {e.args[0]!r}") from None


def _param_dtype(dtype: Any, hf: Mapping[str, Any] | None = None) -> Any:
    if dtype is None:
        stored = str((hf or {}).get("dtype") or (hf or {}).get("torch_dtype") or "float32").removeprefix("torch.")
        return PARAM_DTYPES.get(stored, jnp.float32)
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in PARAM_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not a parameter dtype rlpipe supports ({', '.join(PARAM_DTYPES)})")
    return PARAM_DTYPES[name]


# -- names ---------------------------------------------------------------------


def _keys(path: Iterable[Any]) -> tuple[str, ...]:
    names = (str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
    return tuple(n for n in names if n != "value")


def hf_name(path: Iterable[Any]) -> tuple[str, bool]:
    """The Hugging Face tensor name of the parameter at ``path``, and whether
    its layout is transposed there (``kernel [in, out]`` vs ``weight [out, in]``).

    Raises:
        CheckpointError: ``path`` is not a decoder parameter.
    """
    keys = _keys(path)
    if keys == ("embed_tokens",):
        return "model.embed_tokens.weight", False
    if not keys or keys[-1] not in ("kernel", "bias", "scale"):
        raise CheckpointError(f"parameter {'.'.join(keys)} has no Hugging Face name")
    leaf = {"kernel": "weight", "bias": "bias", "scale": "weight"}[keys[-1]]
    prefix = "" if keys[0] == "lm_head" else "model."
    return prefix + ".".join((*keys[:-1], leaf)), keys[-1] == "kernel"


def _o_proj_biases(config: DecoderConfig) -> list[str]:
    # transformers' Llama `attention_bias` also puts a bias on o_proj; the
    # Decoder has none, so such checkpoints load only when it is zero, and
    # export writes zeros to keep transformers' model identical.
    if config.architecture == "llama" and config.qkv_bias:
        return [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(config.num_layers)]
    return []


# -- reading safetensors -------------------------------------------------------


@attrs.frozen
class _Tensor:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(file: Path) -> dict[str, _Tensor]:
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (struct.error, ValueError) as e:  # truncated, or not safetensors at all
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    base = 8 + n
    return {name: _Tensor(name, file, info["dtype"], tuple(info["shape"]), base + info["data_offsets"][0],
                          base + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


def _checkpoint_tensors(path: Path) -> dict[str, _Tensor]:
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index}: names shard files that do not exist: {', '.join(absent)}")
    else:
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        hint = f" (found {', '.join(found)}; only safetensors are supported)" if found else ""
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    tensors: dict[str, _Tensor] = {}
    for f in files:
        tensors.update(_read_header(f))
    return tensors


class _Reader:
    """Reads index slices of checkpoint tensors, touching only the bytes needed."""

    def __init__(self, stack: contextlib.ExitStack):
        self._stack = stack
        self._safe: dict[Path, Any] = {}
        self._maps: dict[Path, np.memmap] = {}
        stack.callback(self._maps.clear)  # dropping the last reference unmaps the file

    def read(self, t: _Tensor, index: tuple[slice, ...]) -> np.ndarray:
        if t.dtype in _NUMPY_NATIVE:
            from safetensors import safe_open

            if t.file not in self._safe:
                self._safe[t.file] = self._stack.enter_context(safe_open(str(t.file), framework="numpy"))
            return np.asarray(self._safe[t.file].get_slice(t.name)[index])
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{t.file.name}: tensor {t.name} has dtype {t.dtype}, which rlpipe cannot read")
        if t.file not in self._maps:
            self._maps[t.file] = np.memmap(t.file, dtype=np.uint8, mode="r")
        whole = self._maps[t.file][t.start:t.end].view(_ST_DTYPES[t.dtype]).reshape(t.shape)
        return np.array(whole[index])


def _single_device_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)


def from_pretrained(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: Any = None) -> Decoder:
    """A :class:`Decoder` with the weights of a local Hugging Face checkpoint.

    Args:
        path: a directory with ``config.json`` and either ``model.safetensors``
            or shards listed in ``model.safetensors.index.json``; or a GGUF
            file, loaded by :func:`rlpipe.models.gguf.from_gguf` (where
            ``dtype=None`` means float32).
        mesh: the mesh to lay the parameters out on (see
            :func:`rlpipe.models.sharding.shardings_for`); ``None`` puts them
            on the first device.
        dtype: parameter and compute dtype (``jnp.bfloat16``, ``"float32"``,
            ...); ``None`` keeps the checkpoint's ``torch_dtype`` when it is
            float32, bfloat16 or float16, and uses float32 otherwise.

    Returns:
        The model; each parameter is a ``jax.Array`` with its target sharding,
        built shard by shard from the memory-mapped files.

    Raises:
        CheckpointError: no ``config.json``, an unsupported architecture, or
            tensors missing, unexpected or of the wrong shape (all of them
            listed by name in one message).
        ShardingError: a parameter dimension the mesh does not divide.
    """
    path = Path(path)
    if path.is_file():
        from rlpipe.models.gguf import GGUFError, from_gguf, is_gguf

        if is_gguf(path):
            try:
                return from_gguf(path, mesh=mesh, dtype=dtype)
            except GGUFError as e:
                raise CheckpointError(str(e), missing=e.missing, unexpected=e.unexpected,
                                      mismatched=e.mismatched) from None
    config_file = path / "config.json"
    if not config_file.is_file():
        what = "is not a directory" if not path.is_dir() else "has no config.json"
        raise CheckpointError(f"{path} {what}: expected a Hugging Face checkpoint directory or a .gguf file")
    try:
        hf = json.loads(config_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    config = config_from_hf(hf, source=str(config_file))
    dtype = _param_dtype(dtype, hf)
    tensors = _checkpoint_tensors(path)
    ignored = {"lm_head.weight"} if config.tie_embeddings else set()
    return _load_decoder(path, config, tensors, mesh=mesh, dtype=dtype, ignored=ignored)


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        what = "is not a directory" if not path.is_dir() else "has no config.json"
        raise CheckpointError(f"{path} {what}: expected a Hugging Face checkpoint directory")
    try:
        return json.loads(config_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None


def _load_decoder(path: Path, config: DecoderConfig, tensors: Mapping[str, _Tensor], *, mesh: Mesh | None,
                  dtype: Any, ignored: set[str]) -> Decoder:
    abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    wanted: dict[str, tuple[int, ...]] = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(state):
        name, transposed = hf_name(p)
        wanted[name] = tuple(reversed(leaf.shape)) if transposed else tuple(leaf.shape)
    zero_biases = {n: (config.hidden_size,) for n in _o_proj_biases(config)}
    _check(path, tensors, {**wanted, **zero_biases}, ignored)
    _check_zero(tensors, zero_biases)

    mesh = mesh if mesh is not None else _single_device_mesh()
    shardings = shardings_for(state, mesh)
    with contextlib.ExitStack() as stack:
        reader = _Reader(stack)

        def load(p, leaf, sharding):
            name, transposed = hf_name(p)
            tensor = tensors[name]
            shards: dict[Any, np.ndarray] = {}  # devices holding the same shard share one host read

            def shard(index):
                index = tuple(index)
                key = tuple((s.start, s.stop, s.step) for s in index)
                if key not in shards:
                    src = reader.read(tensor, index[::-1] if transposed else index)
                    shards[key] = np.ascontiguousarray((src.T if transposed else src).astype(dtype))
                return shards[key]

            return jax.make_array_from_callback(leaf.shape, sharding, shard, dtype=dtype)

        state = jax.tree_util.tree_map_with_path(load, state, shardings)
    return nnx.merge(graphdef, state)


#: ``architectures[0]`` of a sequence-classification checkpoint -> the causal LM sharing its trunk.
CLASSIFIER_ARCHITECTURES: Mapping[str, str] = {"LlamaForSequenceClassification": "LlamaForCausalLM",
                                               "Qwen2ForSequenceClassification": "Qwen2ForCausalLM"}
SCORE_HEAD = "score.weight"


def classifier_config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> DecoderConfig:
    """The trunk's :class:`DecoderConfig` of a Hugging Face sequence-classification
    ``config.json`` (``LlamaForSequenceClassification``,
    ``Qwen2ForSequenceClassification``): the decoder without an LM head
    (``tie_embeddings`` set, so it has none of its own).

    Raises:
        CheckpointError: another architecture, or ``num_labels`` other than 1.
    """
    archs = list(hf.get("architectures") or [])
    if not archs or archs[0] not in CLASSIFIER_ARCHITECTURES:
        found = repr(archs[0]) if archs else "none"
        raise CheckpointError(f"{source}: a reward model needs a sequence-classification checkpoint "
                              f"({', '.join(CLASSIFIER_ARCHITECTURES)}); architecture is {found}")
    labels = len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))
    if labels != 1:
        raise CheckpointError(f"{source}: num_labels is {labels}; a reward model has one (a scalar score)")
    config = config_from_hf({**hf, "architectures": [CLASSIFIER_ARCHITECTURES[archs[0]]]}, source=source)
    return attrs.evolve(config, tie_embeddings=True)


def from_pretrained_classifier(path: str | os.PathLike, *, mesh: Mesh | None = None,
                               dtype: Any = None) -> tuple[Decoder, np.ndarray]:
    """The trunk and score head of a local Hugging Face sequence-classification
    checkpoint with one label (a reward model).

    The trunk's tensors are named as a causal LM's (``model.layers...``) and
    load as :func:`from_pretrained` loads them; the checkpoint has no
    ``lm_head`` (the returned decoder's ``logits`` are meaningless: use
    :meth:`Decoder.hidden`).  The head is ``score.weight`` (``[1, hidden]``,
    no bias), returned transposed as a float32 host array ``[hidden, 1]``:
    the score of a sequence is ``hidden[last real token] @ head``.

    Raises:
        CheckpointError: not a ``*ForSequenceClassification`` checkpoint,
            ``num_labels`` other than 1, no ``score.weight`` or one of another
            shape, or the trunk's tensors missing, unexpected or misshapen.
    """
    path = Path(path)
    hf = _read_config(path)
    config = classifier_config_from_hf(hf, source=str(path / "config.json"))
    dtype = _param_dtype(dtype, hf)
    tensors = _checkpoint_tensors(path)
    score = tensors.get(SCORE_HEAD)
    if score is None:
        raise CheckpointError(f"{path}: no {SCORE_HEAD} tensor: not a sequence-classification checkpoint",
                              missing=[SCORE_HEAD])
    if score.shape != (1, config.hidden_size):
        raise CheckpointError(f"{path}: tensor {SCORE_HEAD} has shape {list(score.shape)}, expected "
                              f"[1, {config.hidden_size}] (one label, no bias)",
                              mismatched=[(SCORE_HEAD, (1, config.hidden_size), score.shape)])
    unexpected = [n for n in tensors if n.startswith("score.") and n != SCORE_HEAD]
    if unexpected:
        raise CheckpointError(f"{path}: the score head has a bias ({', '.join(unexpected)}), which rlpipe does not load",
                              unexpected=unexpected)
    with contextlib.ExitStack() as stack:
        head = _Reader(stack).read(score, (slice(None), slice(None))).astype(np.float32).T.copy()
    model = _load_decoder(path, config, tensors, mesh=mesh, dtype=dtype, ignored={"lm_head.weight", SCORE_HEAD})
    return model, head


def _check(path: Path, tensors: Mapping[str, _Tensor], wanted: Mapping[str, tuple[int, ...]], ignored: set[str]) -> None:
    check_tensors({n: t.shape for n, t in tensors.items()}, wanted, error=CheckpointError,
                  ignore=lambda n: n in ignored or bool(_IGNORED.search(n)),
                  header=f"{path}: checkpoint does not match its config.json")


def _check_zero(tensors: Mapping[str, _Tensor], names: Iterable[str]) -> None:
    nonzero = []
    with contextlib.ExitStack() as stack:
        reader = _Reader(stack)
        for n in names:
            if np.any(reader.read(tensors[n], (slice(None),)).astype(np.float32) != 0):
                nonzero.append(n)
    if nonzero:
        raise CheckpointError(f"Llama attention_bias checkpoints load only with zero o_proj biases "
                              f"(rlpipe's Decoder has none); non-zero: {', '.join(nonzero)}", unexpected=nonzero)


# -- writing -------------------------------------------------------------------


def _host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_pretrained(model: Decoder, path: str | os.PathLike, *, dtype: Any = None,
                    max_shard_bytes: int = 2 * 1024**3) -> None:
    """Writes ``model`` as a Hugging Face checkpoint that transformers'
    ``AutoModelForCausalLM.from_pretrained`` (and :func:`from_pretrained`) reads.

    Parameters are gathered to the host one at a time, so host memory holds at
    most one full parameter beyond what is already written.  With several
    processes every process must call this (the gather is collective); only
    process 0 writes.

    Args:
        model: the decoder, on any mesh.
        path: the directory to write (created if needed).  Earlier
            ``model*.safetensors`` files and index there are removed first,
            because they would shadow or mix with the new ones.
        dtype: the dtype to store; ``None`` keeps the embedding's dtype.
        max_shard_bytes: above this many bytes the tensors are split over
            ``model-0000i-of-0000n.safetensors`` files plus
            ``model.safetensors.index.json``; a tensor larger than the limit
            gets a file of its own.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    config: DecoderConfig = model.config
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    dtype = np.dtype(_param_dtype(model.embed_tokens[...].dtype if dtype is None else dtype))

    entries: list[tuple[str, Any, bool]] = []  # (name, array or shape for zeros, transposed)
    for p, leaf in leaves:
        name, transposed = hf_name(p)
        entries.append((name, leaf, transposed))
    entries += [(n, (config.hidden_size,), False) for n in _o_proj_biases(config)]

    def shape_of(entry) -> tuple[int, ...]:
        _, x, transposed = entry
        shape = tuple(x) if isinstance(x, tuple) else tuple(x.shape)
        return shape[::-1] if transposed else shape

    shards: list[list[tuple[str, Any, bool]]] = [[]]
    size = 0
    for e in entries:
        nbytes = int(np.prod(shape_of(e), dtype=np.int64)) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes

    writer = jax.process_index() == 0
    path = Path(path)
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        for old in path.iterdir():
            if old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.match(old.name):
                old.unlink()
        hf = {**config.to_hf(), "torch_dtype": dtype.name}
        (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")

    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = 0
    for fname, shard in zip(names, shards):
        total += _write_safetensors(path / fname if writer else None, shard, shape_of, dtype)
    if writer and n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_safetensors(file: Path | None, entries, shape_of, dtype: np.dtype) -> int:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        shape = shape_of(e)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[e[0]] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    f = open(file, "wb") if file is not None else None
    try:
        if f:
            f.write(struct.pack("<Q", len(raw)) + raw)
        for name, x, transposed in entries:
            if isinstance(x, tuple):
                arr = np.zeros(x, dtype)
            else:
                arr = _host(x)  # collective across processes: every process gathers
                arr = arr.T if transposed else arr
            if f:
                f.write(np.ascontiguousarray(arr.astype(dtype, copy=False)).view(np.uint8).data)
    finally:
        if f:
            f.close()
    return offset
