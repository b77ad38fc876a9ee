"""models/decoder.py::dense: every projection (and LoRA factor) is one 2-D
product, forward and backward (XLA:CPU runs a weight gradient that contracts
the batch and sequence axes separately at about half the speed)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlpipe.models import PRESETS, build
from rlpipe.models.decoder import dense, sequence_logprobs
from rlpipe.models.lora import LoRAConfig, LoRAParam, apply_lora


def _weight_gradient_contractions(jaxpr) -> list[int]:
    """How many axes each 2-D-output dot_general of ``jaxpr`` contracts (nested
    jaxprs included): in a gradient those are the weight gradients."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.ndim == 2:
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            out.append(len(lhs_contract))
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", p)
            if hasattr(inner, "eqns"):
                out += _weight_gradient_contractions(inner)
    return out


def _trainer_loss(graphdef, *states):
    """The trainer's forward (sequence_logprobs, as TrainerStage runs it), summed."""
    prompt = jnp.ones((2, 4), jnp.int32)
    completion = jnp.full((2, 3), 2, jnp.int32)
    mask_p, mask_c = jnp.ones((2, 4), bool), jnp.ones((2, 3), bool)
    return sequence_logprobs(nnx.merge(graphdef, *states), prompt, mask_p, completion, mask_c).sum()


def test_dense_is_the_matmul_over_the_last_axis():
    x = jax.random.normal(jax.random.key(0), (2, 3, 5))
    w = jax.random.normal(jax.random.key(1), (5, 7))
    np.testing.assert_allclose(dense(x, w), np.einsum("bsi,io->bso", np.asarray(x), np.asarray(w)), rtol=1e-5, atol=1e-5)
    assert dense(x, w).dtype == jnp.float32
    assert dense(x[0, 0], w).shape == (7,)


def test_the_weight_gradients_of_a_training_step_contract_one_axis():
    model = build(PRESETS["tiny"], seed=0)
    graphdef, state = nnx.split(model)
    dims = _weight_gradient_contractions(jax.make_jaxpr(jax.grad(lambda s: _trainer_loss(graphdef, s)))(state).jaxpr)
    assert len(dims) >= 7 * 2 and set(dims) == {1}, dims  # every projection of both layers, and the head


def test_lora_adapter_gradients_contract_one_axis():
    model = build(PRESETS["tiny"], seed=0)
    apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(params=1))
    graphdef, adapters, base = nnx.split(model, LoRAParam, ...)
    dims = _weight_gradient_contractions(jax.make_jaxpr(jax.grad(lambda a: _trainer_loss(graphdef, a, base)))(adapters).jaxpr)
    assert len(dims) >= 7 * 2 * 2 and set(dims) == {1}, dims  # A and B of every projection of both layers
