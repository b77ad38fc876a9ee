"""Weight sync between placements and host offload through memory kinds."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlpipe.core.placement import MeshSpec, RolePlacement, make_mesh
from rlpipe.models import PRESETS
from rlpipe.models.loading import init_sharded
from rlpipe.models.sharding import shardings_for
from rlpipe.runtime import weights


def mesh(devices, shape):
    return make_mesh(RolePlacement(name="x", devices=devices, mesh=MeshSpec(shape, ("fsdp", "tp"))))


def tiny_state(m, seed=0):
    return nnx.split(init_sharded(PRESETS["tiny"], m, seed=seed))[1]


def leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def test_same_layout_and_dtype_shares_buffers():
    m = mesh(range(4), (4, 1))
    src = tiny_state(m)
    out = weights.sync(src, shardings_for(src, m))
    assert all(a is b for a, b in zip(leaves(out), leaves(src)))


def test_same_devices_other_mesh_and_dtype_relays_and_casts():
    src = tiny_state(mesh(range(4), (4, 1)))
    target_mesh = mesh(range(4), (1, 4))
    target = shardings_for(src, target_mesh)
    out = weights.sync(src, target, dtype=jnp.bfloat16)
    for a, b, s in zip(leaves(out), leaves(src), leaves(target)):
        assert a.dtype == jnp.bfloat16 and a.sharding.is_equivalent_to(s, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))


def test_disjoint_devices_reshard_across_meshes():
    src = tiny_state(mesh(range(4), (4, 1)))
    target = shardings_for(src, mesh(range(4, 8), (2, 2)))
    out = weights.sync(src, target)
    for a, b in zip(leaves(out), leaves(src)):
        assert {d.id for d in a.sharding.device_set} <= {4, 5, 6, 7}
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def device_arrays_on(ids):
    ids = set(ids)
    return [x for x in jax.live_arrays() if x.sharding.memory_kind == "device" and {d.id for d in x.sharding.device_set} & ids]


@pytest.mark.slow
def test_offload_then_onload_restores_parameters_and_frees_device_buffers():
    m = mesh(range(6, 8), (2, 1))  # devices no other test keeps arrays on
    state = tiny_state(m, seed=4)
    expected = [np.asarray(x) for x in leaves(state)]
    gc.collect()
    before = len(device_arrays_on({6, 7}))
    assert before >= len(expected)
    host = weights.offload(state)
    del state
    gc.collect()
    assert len(device_arrays_on({6, 7})) <= before - len(expected)  # at least our buffers are gone
    assert all(x.sharding.memory_kind == "pinned_host" for x in leaves(host))
    assert weights.device_bytes(host) == 0
    back = weights.onload(host)
    assert all(x.sharding.memory_kind == "device" for x in leaves(back))
    for a, b in zip(leaves(back), expected):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_a_repeated_cast_sync_compiles_once():
    import jax.numpy as jnp

    from rlpipe.runtime import weights

    tree = {"w": jnp.ones((8, 8), jnp.float32), "b": jnp.zeros((8,), jnp.float32)}
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, tree)
    weights.sync(tree, shardings, dtype=jnp.bfloat16)
    before = len(weights._CAST_PROGRAMS)
    for _ in range(3):
        out = weights.sync(jax.tree_util.tree_map(lambda x: x + 1, tree), shardings, dtype=jnp.bfloat16)
    assert len(weights._CAST_PROGRAMS) == before and out["w"].dtype == jnp.bfloat16
