import jax
import jax.numpy as jnp
import pytest

from rlpipe import Batch
from rlpipe.core.stage import FieldConflictError


def test_add_returns_new_batch_and_keeps_the_old_one():
    b = Batch(prompt_tokens=jnp.ones((2, 3)))
    b2 = b.add(completion_tokens=jnp.zeros((2, 4)))
    assert set(b) == {"prompt_tokens"}
    assert set(b2) == {"prompt_tokens", "completion_tokens"}
    assert b2["prompt_tokens"] is b["prompt_tokens"]


def test_fields_are_never_replaced():
    b = Batch(rewards=jnp.ones(2))
    with pytest.raises(FieldConflictError, match="rewards"):
        b.add(rewards=jnp.zeros(2))
    with pytest.raises(AttributeError):
        b.rewards = 1


def test_missing_field_names_the_fields_present():
    with pytest.raises(KeyError, match="prompt_tokens"):
        Batch(prompt_tokens=1)["ref_logprobs"]


def test_merge_accepts_shared_fields_and_rejects_diverging_ones():
    x = jnp.arange(3)
    a = Batch(p=x).add(a=1)
    b = Batch(p=x).add(b=2)
    assert set(a.merge(b)) == {"p", "a", "b"}
    with pytest.raises(FieldConflictError, match="'p'"):
        a.merge(Batch(p=jnp.arange(3)))


def test_batch_is_a_pytree_with_field_keys():
    b = Batch(x=jnp.ones(2), y=jnp.zeros(3))
    doubled = jax.jit(lambda t: jax.tree.map(lambda v: v * 2, t))(b)
    assert isinstance(doubled, Batch)
    assert float(doubled["x"].sum()) == 4.0
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(b)[0]]
    assert paths == ["['x']", "['y']"]
