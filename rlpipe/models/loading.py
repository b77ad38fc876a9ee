"""From the ``model`` config section to a sharded model on a role's mesh."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlpipe.core.errors import ConfigError, Problem, choices_text, suggest
from rlpipe.models.config import PRESETS, DecoderConfig
from rlpipe.models.decoder import Decoder
from rlpipe.models.sharding import shardings_for


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
        from rlpipe.models.hf import from_pretrained

        return from_pretrained(model_config.path, mesh=mesh, dtype=model_config.dtype)
    return init_sharded(preset(model_config.preset), mesh, seed=seed, dtype=model_config.dtype)


def load_tokenizer(model_config: Any):
    """The tokenizer of a ``model`` config section (see ``model.tokenizer``)."""
    from rlpipe.models.tokenizer import load_tokenizer as load

    spec = model_config.tokenizer or (model_config.path if model_config.path else "char")
    return load(spec)
