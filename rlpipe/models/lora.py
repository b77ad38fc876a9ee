"""LoRA adapters on the decoder's projections, and their PEFT-compatible export.

A targeted projection ``y = x W (+ b)`` becomes ``y = x W (+ b) + s (x A) B``
with ``A`` ``[in, rank]`` (random), ``B`` ``[rank, out]`` (zeros) and ``s =
alpha / rank``.  :func:`apply_lora` swaps each targeted
:class:`~rlpipe.models.decoder.Linear` for a :class:`LoRALinear` that adopts
the same ``kernel`` and ``bias`` Variables, so the base weights keep their
state paths (``layers[i].self_attn.q_proj.kernel``), their shardings and their
Hugging Face names; the adapters are two more leaves beside them,
``...q_proj.lora_a`` and ``...q_proj.lora_b``, of type :data:`LoRAParam`
(flax's ``nnx.LoRAParam``, a subclass of ``nnx.Param``), so that
``nnx.state(model, LoRAParam)`` is exactly the adapters.  Since ``B`` starts
at zero the adapted model computes the base model's logits bit for bit.

Everything else is a pure function of ``nnx`` states, for the roles to call
under ``jit``: :func:`adapter_state` / :func:`base_state` split a state;
:func:`base_graphdef` is the graph of the same model without adapters, so
``nnx.merge(base_graphdef(model), base_state(state))`` is the base model
sharing the adapted model's arrays (the reference policy for free);
:func:`merge` folds ``s A B`` into the kernels (a plain-model state);
:func:`save_peft` and :func:`save_merged` export.

Example:
    >>> model, lora = build(PRESETS["tiny"]), LoRAConfig(rank=8)
    >>> apply_lora(model, lora, rngs=nnx.Rngs(params=1))
    >>> graphdef, adapters, base = nnx.split(model, LoRAParam, ...)   # train `adapters` only
    >>> plain = base_graphdef(model)
    >>> reference = nnx.merge(plain, base_state(nnx.state(model)))   # the base model, no copy
    >>> merged = nnx.merge(plain, merge(nnx.state(model), lora))     # adapters folded in
    >>> save_peft("/tmp/adapter", nnx.state(model), lora, model.config)

See docs/lora.md for the design and what is not done yet.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlpipe.core.errors import UsageError
from rlpipe.core.lora_config import ATTENTION_TARGETS, MLP_TARGETS, TARGETS, LoRAConfig
from rlpipe.models.config import DecoderConfig
from rlpipe.models.decoder import Decoder, Linear, dense
from rlpipe.models.hf import hf_name, save_pretrained

__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "ATTENTION_TARGETS", "MLP_TARGETS", "TARGETS", "LoRAConfig",
           "LoRAError", "LoRALinear", "LoRAParam", "adapter_bytes", "adapter_state", "apply_lora", "base_graphdef",
           "base_state", "decoder_graphdef", "merge", "peft_tensors", "save_merged", "save_peft"]

#: The adapters' Variable type: flax's own, so that anything that filters on
#: ``nnx.LoRAParam`` (``nnx.Optimizer(..., wrt=nnx.LoRAParam)``, Tunix's trainers,
#: a qwix-adapted model) selects rlpipe's adapters too.
LoRAParam = nnx.LoRAParam

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"

#: PEFT's names of the two factors (``lora_A.weight`` is ``[rank, in]``, ``lora_B.weight`` ``[out, rank]``).
_PEFT_FACTOR = {"lora_a": "lora_A", "lora_b": "lora_B"}
_PEFT_PREFIX = "base_model.model."


class LoRAError(UsageError, ValueError):
    """A model, state or directory that LoRA cannot be applied to or exported from."""


# -- the layer -----------------------------------------------------------------


class LoRALinear(Linear):
    """``x @ kernel (+ bias) + scale * (x @ lora_a) @ lora_b``.

    Made by :func:`apply_lora` from a :class:`~rlpipe.models.decoder.Linear`,
    whose ``kernel`` and ``bias`` Variables it adopts (same arrays, same
    names).  ``lora_a`` ``[in, rank]`` starts uniform in ``±1/sqrt(in)`` (the
    distribution PEFT's default initialisation draws from), ``lora_b``
    ``[rank, out]`` at zero, so the layer starts as the base one exactly.
    Like the base product, the adapter's products accumulate in float32 and
    the factors are cast to the activations' dtype.
    """

    def __init__(self, base: Linear, *, rank: int, scale: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
        # Linear.__init__ is not called: it would draw a new kernel, and the
        # point is to keep the base's Variables (and with them, their paths).
        self.kernel = base.kernel
        self.bias = base.bias
        d_in, d_out = base.kernel.shape
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(rngs.params(), (d_in, rank), jnp.float32, -bound, bound)
        self.lora_a = LoRAParam(a.astype(param_dtype))
        self.lora_b = LoRAParam(jnp.zeros((rank, d_out), param_dtype))
        self.scale = float(scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        h = dense(x, self.lora_a[...].astype(x.dtype))
        delta = dense((h * self.scale).astype(x.dtype), self.lora_b[...].astype(x.dtype))
        return y + delta.astype(x.dtype)

    def without_adapter(self) -> Linear:
        """A plain :class:`Linear` holding this layer's ``kernel`` and ``bias``
        Variables (not copies)."""
        d_in, d_out = self.kernel.shape
        bias = self.bias is not None
        dtype = self.kernel.dtype
        # Built abstractly (no weights drawn), then given the base Variables.
        plain = nnx.eval_shape(lambda: Linear(d_in, d_out, bias=bias, param_dtype=dtype, rngs=nnx.Rngs(0)))
        plain.kernel = self.kernel
        plain.bias = self.bias
        return plain


def _owners(model: nnx.Module, names: Iterable[str], kind: type) -> list[tuple[nnx.Module, str, Any]]:
    """``(module, attribute, child)`` for every attribute named in ``names``
    whose value is a ``kind``, in graph order."""
    names = tuple(names)
    found = []
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        for n in names:
            child = getattr(node, n, None)
            if isinstance(child, kind):
                found.append((node, n, child))
    return found


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32) -> nnx.Module:
    """Adds adapters to ``model``'s targeted projections, in place; returns ``model``.

    Every layer gets the same adapters (the layers' states are stacked for
    ``lax.scan``, so they must share one structure).  Works on a
    :class:`~rlpipe.models.decoder.Decoder` or any module that contains one
    (the critic's value model); the LM head and a value head are never
    targets.

    Args:
        model: the model; its base Variables are kept (not copied).
        config: rank, alpha, targets.
        rngs: draws ``lora_a`` (from its ``params`` stream).
        param_dtype: the adapters' dtype.  float32 by default whatever the
            base's dtype: the adapters are what trains, and they are small.

    Raises:
        LoRAError: the model already has adapters, or has none of the
            targeted projections.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    already = _owners(model, TARGETS, LoRALinear)
    if already:
        raise LoRAError(f"the model already has LoRA adapters ({len(already)} projections); apply_lora once")
    owners = _owners(model, config.targets, Linear)
    missing = sorted(set(config.targets) - {name for _, name, _ in owners}, key=TARGETS.index)
    if missing:
        raise LoRAError(f"the model has no {', '.join(missing)} projection(s) to adapt "
                        f"({type(model).__name__} is not a decoder of the Llama / Qwen2 family?)")
    for module, name, linear in owners:
        setattr(module, name, LoRALinear(linear, rank=config.rank, scale=config.scale, param_dtype=param_dtype,
                                         rngs=rngs))
    return model


# -- pure functions over states ------------------------------------------------


def adapter_state(state: nnx.State) -> nnx.State:
    """The adapters of ``state`` (its :data:`LoRAParam` leaves), paths kept."""
    return nnx.filter_state(state, LoRAParam)


def base_state(state: nnx.State) -> nnx.State:
    """Everything in ``state`` but the adapters: the state of the model without
    LoRA, sharing ``state``'s arrays."""
    return nnx.filter_state(state, nnx.Not(LoRAParam))


def base_graphdef(model: nnx.Module) -> nnx.GraphDef:
    """The graph of ``model`` with every :class:`LoRALinear` a plain ``Linear``.

    ``nnx.merge(base_graphdef(model), base_state(state))`` is the base model
    over the very arrays of ``state`` (no copy of the weights): the reference
    policy when it is the base model; and ``nnx.merge(base_graphdef(model),
    merge(state, config))`` is the model with the adapters folded in.  Call it
    once (it builds an abstract copy of the model) and keep the result; it is
    hashable, fit for a ``jit`` static argument.
    """
    graphdef, state = nnx.split(model)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    clone = nnx.merge(graphdef, abstract)
    for module, name, lora in _owners(clone, TARGETS, LoRALinear):
        setattr(module, name, lora.without_adapter())
    return nnx.graphdef(clone)


def _names(path: Sequence[Any]) -> tuple[str, ...]:
    keys = (getattr(p, "key", getattr(p, "name", getattr(p, "idx", p))) for p in path)
    return tuple(str(k) for k in keys if k != "value")


def _adapter_pairs(state: nnx.State) -> dict[tuple[str, ...], dict[str, jax.Array]]:
    """Module path -> ``{"lora_a": A, "lora_b": B}`` for every adapter in ``state``."""
    pairs: dict[tuple[str, ...], dict[str, jax.Array]] = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(adapter_state(state)):
        names = _names(p)
        if names[-1] not in _PEFT_FACTOR:
            raise LoRAError(f"adapter {'.'.join(names)} is neither a lora_a nor a lora_b")
        pairs.setdefault(names[:-1], {})[names[-1]] = leaf
    for module, pair in pairs.items():
        if set(pair) != set(_PEFT_FACTOR):
            raise LoRAError(f"{'.'.join(module)} has {', '.join(pair)} but not both lora_a and lora_b")
    return pairs


def merge(state: nnx.State, config: LoRAConfig) -> nnx.State:
    """The state of the model without LoRA, with each adapted kernel replaced
    by ``kernel + (alpha / rank) A B`` (computed in float32, stored in the
    kernel's dtype).

    A pure function, fit for ``jit``: the kernels of projections without
    adapters and every other parameter are ``state``'s own arrays.  Merge
    with :func:`base_graphdef` to run it.  ``state`` may be the full state of
    an adapted model, or a base state merged with adapters received apart
    (``nnx.merge_state(base, adapters)``).
    """
    pairs = _adapter_pairs(state)
    done = set()

    def fold(p, kernel):
        names = _names(p)
        pair = pairs.get(names[:-1]) if names[-1] == "kernel" else None
        if pair is None:
            return kernel
        done.add(names[:-1])
        a, b = pair["lora_a"].astype(jnp.float32), pair["lora_b"].astype(jnp.float32)
        delta = jnp.einsum("ir,ro->io", a, b, precision=jax.lax.Precision.HIGHEST)
        return (kernel.astype(jnp.float32) + config.scale * delta).astype(kernel.dtype)

    merged = jax.tree_util.tree_map_with_path(fold, base_state(state))
    orphans = sorted(".".join(m) for m in set(pairs) - done)
    if orphans:
        raise LoRAError(f"adapters without a kernel beside them: {', '.join(orphans)}")
    return merged


def adapter_bytes(state: nnx.State) -> int:
    """Bytes of the adapters in ``state`` (all shards together): what an
    adapter-only weight sync moves."""
    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(adapter_state(state)))


# -- export --------------------------------------------------------------------


def _host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _expected_shape(module: tuple[str, ...], model_config: DecoderConfig) -> tuple[int, int] | None:
    c = model_config
    h, q, kv, ffn = c.hidden_size, c.num_heads * c.dim_per_head, c.num_kv_heads * c.dim_per_head, c.intermediate_size
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, ffn), "up_proj": (h, ffn), "down_proj": (ffn, h)}
    return shapes.get(module[-1])


def peft_tensors(state: nnx.State, model_config: DecoderConfig, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """The adapters of ``state`` as PEFT names them, on the host, in PEFT's
    ``[out, in]`` layout: ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
    ``[rank, in]`` and ``...lora_B.weight`` ``[out, rank]``.

    The names come from :func:`rlpipe.models.hf.hf_name` of the adapted
    kernel, so they follow the base checkpoint's names.

    Raises:
        LoRAError: ``state`` holds no adapters, or adapters whose shapes are
            not those of ``model_config``'s projections.
    """
    pairs = _adapter_pairs(state)
    if not pairs:
        raise LoRAError("the state holds no LoRA adapters (nnx.state(model) of a model given apply_lora?)")
    out: dict[str, np.ndarray] = {}
    for module, pair in sorted(pairs.items()):
        a, b = pair["lora_a"], pair["lora_b"]
        expected = _expected_shape(module, model_config)
        found = (a.shape[0], b.shape[1])
        if expected is None or found != expected or a.shape[1] != b.shape[0]:
            raise LoRAError(f"adapter {'.'.join(module)} has lora_a {list(a.shape)} and lora_b {list(b.shape)}, "
                            f"which do not fit {'that projection' if expected is None else list(expected)} "
                            "of the model config")
        weight, _ = hf_name((*module, "kernel"))  # model.layers.i.self_attn.q_proj.weight
        stem = _PEFT_PREFIX + weight.removesuffix(".weight")
        for factor, x in pair.items():
            arr = _host(x).T  # [in, r] -> [r, in]; [r, out] -> [out, r]
            out[f"{stem}.{_PEFT_FACTOR[factor]}.weight"] = np.ascontiguousarray(
                arr if dtype is None else arr.astype(jnp.dtype(dtype)))
    return out


def _peft_config(config: LoRAConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_peft(path: str | os.PathLike, adapter_state: nnx.State, config: LoRAConfig, model_config: DecoderConfig,
              *, base_model_name_or_path: str | None = None, dtype: Any = None) -> None:
    """Writes the adapters in PEFT's layout: ``adapter_model.safetensors`` (see
    :func:`peft_tensors`) and ``adapter_config.json``, which
    ``peft.PeftModel.from_pretrained(base, path)`` loads over the base
    checkpoint (one written by :func:`rlpipe.models.hf.save_pretrained`).

    With several processes every process must call this (sharded adapters are
    gathered collectively); only process 0 writes.

    Args:
        path: the directory (created if needed).
        adapter_state: the adapters, or the whole state of the adapted model.
        config: the adapters' rank, alpha and targets.
        model_config: the base model's shape (the adapters are checked against it).
        base_model_name_or_path: recorded in ``adapter_config.json``; PEFT's
            ``AutoPeftModelForCausalLM`` loads the base from it.
        dtype: the dtype to store; ``None`` keeps the adapters' own.
    """
    from safetensors.numpy import save_file

    tensors = peft_tensors(adapter_state, model_config, dtype=dtype)
    if jax.process_index() != 0:
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG_FILE).write_text(json.dumps(_peft_config(config, base_model_name_or_path), indent=2) + "\n")


def decoder_graphdef(model_config: DecoderConfig, *, dtype: Any = jnp.float32) -> nnx.GraphDef:
    """The graph of a plain :class:`Decoder` of ``model_config`` (no weights drawn)."""
    return nnx.graphdef(nnx.eval_shape(lambda: Decoder(model_config, dtype=dtype, rngs=nnx.Rngs(0))))


def save_merged(path: str | os.PathLike, state: nnx.State, config: LoRAConfig, model_config: DecoderConfig, *,
                dtype: Any = None, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Writes the decoder with its adapters folded in (:func:`merge`) as a
    Hugging Face checkpoint, through :func:`rlpipe.models.hf.save_pretrained`
    (whose arguments ``dtype`` and ``max_shard_bytes`` are).

    Args:
        state: the full state of an adapted :class:`Decoder`.
    """
    merged = nnx.merge(decoder_graphdef(model_config), merge(state, config))
    save_pretrained(merged, path, dtype=dtype, max_shard_bytes=max_shard_bytes)

