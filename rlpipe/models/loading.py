"""From the ``model`` config section to a sharded model on a role's mesh."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlpipe.core.errors import ConfigError, Problem, choices_text, suggest
from rlpipe.models.config import PRESETS, DecoderConfig
from rlpipe.models.decoder import Decoder
from rlpipe.models.hf import config_from_hf, from_pretrained
from rlpipe.models.sharding import shardings_for
from rlpipe.runtime import weights


def preset(name: str) -> DecoderConfig:
    if name not in PRESETS:
        raise ConfigError(Problem("model.preset", f"unknown preset {name!r}{suggest(name, PRESETS)} (available: {choices_text(PRESETS)})"))
    return PRESETS[name]


def init_sharded(config: DecoderConfig, mesh: jax.sharding.Mesh | None, *, seed: int, dtype: Any = jnp.float32) -> Decoder:
    """A randomly initialised decoder whose parameters are created directly in
    their shardings on ``mesh`` (no full copy on one device first)."""
    dtype = jnp.dtype(dtype)

    def create() -> Decoder:
        return Decoder(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(params=seed))

    if mesh is None:
        return create()
    abstract = nnx.eval_shape(create)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = shardings_for(abstract_state, mesh)
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def load_model(model_config: Any, *, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> Decoder:
    """The model a ``model`` config section describes, laid out on ``mesh``."""
    if model_config.path:
        return from_pretrained(model_config.path, mesh=mesh, dtype=model_config.dtype)
    return init_sharded(preset(model_config.preset), mesh, seed=seed, dtype=model_config.dtype)


def load_tokenizer(model_config: Any):
    """The tokenizer of a ``model`` config section (see ``model.tokenizer``)."""
    from rlpipe.models.tokenizer import load_tokenizer as load

    spec = model_config.tokenizer or (model_config.path if model_config.path else "char")
    return load(spec)


def policy_state(model_config: Any, mesh: jax.sharding.Mesh, model_state: Any = None, *, seed: int = 0) -> tuple[Any, Any, Any]:
    """A policy's graphdef, parameter state on ``mesh``, and dtype, for code
    that runs the policy outside a role (evaluation).

    Without ``model_state``: the model ``model_config`` describes, built as
    the rollout role builds it.  With it: only the model's shapes are derived
    (no random init, no checkpoint read) and ``model_state`` (an nnx state
    like ``nnx.split(model)[1]``, device or host arrays) is checked against
    them and laid out on ``mesh``.

    Raises:
        ValueError: ``model_state`` has another structure or other shapes.
    """
    if model_state is None:
        model = load_model(model_config, mesh=mesh, seed=seed)
        graphdef, state = nnx.split(model)
        return graphdef, state, model.dtype
    if model_config.path:
        file = Path(model_config.path) / "config.json"
        shape = config_from_hf(json.loads(file.read_text()), source=str(file))
    else:
        shape = preset(model_config.preset)
    dtype = jnp.dtype(model_config.dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(shape, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(params=seed))))
    return graphdef, install_state(abstract, model_state, shardings_for(abstract, mesh), dtype), dtype


def install_state(state: Any, model_state: Any, shardings: Any, dtype: Any) -> Any:
    """``model_state`` laid out as ``shardings`` and cast to ``dtype``, after
    checking that it has the structure and shapes of ``state``."""
    want, got = jax.tree_util.tree_structure(state), jax.tree_util.tree_structure(model_state)
    if want != got:
        raise ValueError("model_state does not have the policy's parameter structure (an nnx state like "
                         f"nnx.split(model)[1]); expected {want}, got {got}")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves(model_state)):
        if tuple(a.shape) != tuple(np.shape(b)):
            raise ValueError(f"model_state{jax.tree_util.keystr(path)}: shape {tuple(np.shape(b))}, "
                             f"the policy's is {tuple(a.shape)}")
    if not all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(model_state)):
        model_state = jax.device_put(model_state, shardings)  # host arrays (e.g. a restored checkpoint)
    return weights.sync(model_state, shardings, dtype=dtype)
