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
from rlpipe.models.config import PRESETS, DecoderConfig, from_architecture
from rlpipe.models.decoder import Decoder
from rlpipe.models.hf import config_from_hf, from_pretrained
from rlpipe.models.sharding import shardings_for
from rlpipe.runtime import pretrained, weights
from rlpipe.runtime.pretrained import PRETRAINED


def preset(name: str) -> DecoderConfig:
    """The shape of preset ``name``: a random-init preset's
    (:data:`rlpipe.models.config.PRESETS`) or a pretrained one's
    (:data:`rlpipe.runtime.pretrained.PRETRAINED`, from its table entry).

    Raises:
        ConfigError: at ``model.preset``, an unknown name.
    """
    if name in PRETRAINED:
        return DecoderConfig(**PRETRAINED[name].shape)
    if name not in PRESETS:
        known = [*PRESETS, *PRETRAINED]
        raise ConfigError(Problem("model.preset", f"unknown preset {name!r}{suggest(name, known)} "
                                                  f"(available: {choices_text(known)})"))
    return PRESETS[name]


def random_init_shape(model_config: Any) -> DecoderConfig:
    """The shape a ``model`` section without a checkpoint initialises:
    ``model.architecture`` when set, else the preset's."""
    architecture = getattr(model_config, "architecture", None)
    if architecture is not None:
        return from_architecture(architecture)
    return preset(model_config.preset)


def checkpoint_path(model_config: Any) -> str | None:
    """The checkpoint a ``model`` section loads: ``model.path`` (an HF
    directory or a ``.gguf`` file), else a pretrained preset's file in the
    model cache, else ``None`` (``model.architecture`` or a random-init preset).

    Raises:
        ConfigError: at ``model.preset``, a pretrained preset that is not in
            the cache, naming the command that fetches it.
    """
    if model_config.path:
        return str(model_config.path)
    if getattr(model_config, "architecture", None) is not None:
        return None
    if model_config.preset in PRETRAINED:
        return str(pretrained.require_file(model_config.preset))
    return None


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` is a GGUF file (else an HF checkpoint directory)."""
    if Path(path).is_dir():
        return False
    from rlpipe.models import gguf

    return gguf.is_gguf(path)


def load_checkpoint(path: str | Path, *, mesh: jax.sharding.Mesh | None = None, dtype: Any = None) -> Decoder:
    """The decoder in ``path`` (an HF directory or a ``.gguf`` file) on ``mesh``."""
    if is_gguf_file(path):
        from rlpipe.models import gguf

        return gguf.from_gguf(str(path), mesh=mesh, dtype=dtype)
    return from_pretrained(path, mesh=mesh, dtype=dtype)


def checkpoint_shape(path: str | Path) -> DecoderConfig:
    """The decoder shape of the checkpoint in ``path`` (metadata only: an HF
    directory's ``config.json`` or a ``.gguf`` file's header)."""
    if is_gguf_file(path):
        from rlpipe.models import gguf

        return gguf.gguf_config(str(path))
    file = Path(path) / "config.json"
    return config_from_hf(json.loads(file.read_text()), source=str(file))


def init_sharded(config: DecoderConfig, mesh: jax.sharding.Mesh | None, *, seed: int, dtype: Any = jnp.float32,
                 param_dtype: Any = None) -> Decoder:
    """A randomly initialised decoder whose parameters are created directly in
    their shardings on ``mesh`` (no full copy on one device first).
    ``dtype`` is the compute dtype, ``param_dtype`` (default: ``dtype``) the
    parameters'; the same seed gives the same values in either (drawn in
    float32, then cast)."""
    dtype = jnp.dtype(dtype)
    param_dtype = dtype if param_dtype is None else jnp.dtype(param_dtype)

    def create(param_dtype=param_dtype) -> Decoder:
        return Decoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(params=seed))

    if mesh is None:
        return create()
    abstract = nnx.eval_shape(create)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = shardings_for(abstract_state, mesh)
    if param_dtype == jnp.float32:
        state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    else:
        # Drawn in float32 and cast by a program of its own, so that the copy is
        # exactly the float32 master's cast (inside one program XLA may fuse the
        # scaling into the cast and round differently).
        state = jax.jit(lambda: nnx.split(create(jnp.float32))[1], out_shardings=shardings)()
        state = weights.sync(state, shardings, dtype=param_dtype)
    return nnx.merge(graphdef, state)


#: The parameter dtype of a trainable role's master copy (trainer, critic):
#: an update of ``lr * g`` on a weight near 0.02 is below half a bfloat16 ulp
#: for ``lr`` around 1e-5, so bfloat16 parameters would not learn.
MASTER_DTYPE = jnp.dtype(jnp.float32)


def compute_dtype(model_config: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
    """The dtype the roles compute in (``model.compute_dtype``), with ``null``
    resolved for the platform of ``mesh``'s devices (else JAX's default
    backend): bfloat16 on GPU and TPU, float32 on CPU."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    resolve = getattr(model_config, "resolved_compute_dtype", None)
    if resolve is None:  # a bare section (e.g. a plugin's) without the new key
        return jnp.dtype(model_config.dtype)
    return jnp.dtype(resolve(platform))


def load_model(model_config: Any, *, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
               master: bool = False) -> Decoder:
    """The model a ``model`` config section describes, laid out on ``mesh``.

    It computes in :func:`compute_dtype`.  Its parameters are in that dtype
    too (an inference copy: rollout, reference, evaluation), or with
    ``master`` in float32 (:data:`MASTER_DTYPE`: the trainer's and critic's
    parameters, which their optimizer state follows)."""
    dtype = compute_dtype(model_config, mesh)
    param_dtype = MASTER_DTYPE if master else dtype
    path = checkpoint_path(model_config)
    if path:
        model = load_checkpoint(path, mesh=mesh, dtype=param_dtype)
        model.dtype = dtype  # the compute dtype: a static attribute of the graph
        return model
    return init_sharded(random_init_shape(model_config), mesh, seed=seed, dtype=dtype, param_dtype=param_dtype)


#: Folded into the run's seed for the adapters' initial draw, so that every
#: policy role (trainer, rollout, evaluation) draws the same ``lora_a`` and the
#: adapters' stream differs from the base weights'.
LORA_SEED_STREAM = 0x10A


def adapter_rngs(seed: int) -> nnx.Rngs:
    """The random streams :func:`rlpipe.models.lora.apply_lora` draws the
    adapters from, derived from the run's ``seed`` alone."""
    return nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), LORA_SEED_STREAM))


def add_adapters(model: Decoder, lora: Any, *, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> Decoder:
    """``model`` with LoRA adapters (``lora``, a :class:`~rlpipe.core.lora_config.LoRAConfig`)
    on its projections, in place: float32 adapters drawn from :func:`adapter_rngs`
    and laid out on ``mesh`` (:func:`~rlpipe.models.sharding.shardings_for`);
    the base arrays are kept, not copied."""
    from rlpipe.models.lora import LoRAParam, apply_lora

    apply_lora(model, lora, rngs=adapter_rngs(seed), param_dtype=MASTER_DTYPE)
    if mesh is not None:
        adapters = nnx.state(model, LoRAParam)
        nnx.update(model, jax.device_put(adapters, shardings_for(adapters, mesh)))
    return model


def load_policy(model_config: Any, *, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                master: bool = False) -> Decoder:
    """The policy a ``model`` section describes: :func:`load_model`, plus the
    adapters of ``model.lora`` when set.

    With ``model.lora`` the base weights are frozen: they are always in the
    compute dtype (``master`` then only means float32 adapters, which they
    always are), and the same seed gives every policy role the same adapters,
    so trainer and rollout start identical.  Without it this is
    :func:`load_model` (``master``: float32 parameters)."""
    lora = getattr(model_config, "lora", None)
    if lora is None:
        return load_model(model_config, mesh=mesh, seed=seed, master=master)
    return add_adapters(load_model(model_config, mesh=mesh, seed=seed), lora, mesh=mesh, seed=seed)


def load_tokenizer(model_config: Any):
    """The tokenizer of a ``model`` config section (see ``model.tokenizer``):
    with ``tokenizer: null``, the checkpoint's own (``model.path``, or a
    pretrained preset's cached file), else ``char``."""
    from rlpipe.models.tokenizer import load_tokenizer as load

    spec = model_config.tokenizer or checkpoint_path(model_config) or "char"
    return load(spec)


def policy_state(model_config: Any, mesh: jax.sharding.Mesh, model_state: Any = None, *, seed: int = 0) -> tuple[Any, Any, Any]:
    """A policy's graphdef, parameter state on ``mesh``, and dtype, for code
    that runs the policy outside a role (evaluation).

    Without ``model_state``: the model ``model_config`` describes, built as
    the rollout role builds it.  With it: only the model's shapes are derived
    (no random init, no checkpoint read) and ``model_state`` (an nnx state
    like ``nnx.split(model)[1]``, device or host arrays) is checked against
    them and laid out on ``mesh``.

    With ``model.lora`` the policy is the base plus adapters, and
    ``model_state`` may be the adapters alone (what the trainer's
    ``params`` and a run checkpoint hold): they are installed over the base.

    Raises:
        ValueError: ``model_state`` has another structure or other shapes.
    """
    lora = getattr(model_config, "lora", None)
    if model_state is None or lora is not None:
        model = load_policy(model_config, mesh=mesh, seed=seed)
        if lora is None:
            graphdef, state = nnx.split(model)
            return graphdef, state, model.dtype
        from rlpipe.models.lora import LoRAParam

        graphdef, adapters, base = nnx.split(model, LoRAParam, ...)
        if model_state is not None:
            from rlpipe.models.lora import adapter_state

            given = adapter_state(model_state) if isinstance(model_state, nnx.State) else model_state
            adapters = install_state(adapters, given, shardings_for(adapters, mesh), None)
        return graphdef, nnx.merge_state(base, adapters), model.dtype
    path = checkpoint_path(model_config)
    shape = checkpoint_shape(path) if path else random_init_shape(model_config)
    dtype = compute_dtype(model_config, mesh)
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
