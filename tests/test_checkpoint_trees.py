"""Run checkpoints keep stage states and pending rollouts as nested trees
(checkpoint format 2), and a subtree is read by its tree path."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath
from flax import nnx

from rlpipe.runtime.checkpoint import FORMAT, CheckpointError, RunCheckpointer


def model() -> nnx.Module:
    return nnx.Linear(3, 4, rngs=nnx.Rngs(0))


def trainer_state(scale: float = 1.0) -> dict:
    params = nnx.state(model())
    params = jax.tree.map(lambda x: x * scale, params)
    opt_state = optax.adamw(1e-3).init(params)
    return {"params": params, "opt_state": opt_state, "extra": {"layers": {0: {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}},
            "version": 3, "skipped_updates": 1}


PENDING = {"rollout": {5: {0: {"tokens": np.arange(4, dtype=np.int32), "logprobs": np.linspace(0, 1, 4, dtype=np.float32)},
                           1: {"tokens": np.arange(4, 8, dtype=np.int32), "logprobs": np.zeros(4)}},
                       6: {0: {"tokens": np.full(4, 7, np.int32), "logprobs": np.ones(4)}}}}


@pytest.fixture
def saved(tmp_path):
    state = trainer_state(2.0)
    ck = RunCheckpointer(tmp_path / "checkpoints")  # asynchronous saves
    ck.save(4, states={"trainer": state}, pending=PENDING, meta={"policy_version": 3})
    ck.wait()
    yield ck, state
    ck.close()


def leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same(a, b) -> None:
    x, y = leaves(a), leaves(b)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)
        assert x[k].dtype == y[k].dtype, k


def test_a_stage_item_on_disk_is_a_nested_tree(saved):
    import orbax.checkpoint as ocp

    ck, _ = saved
    path = ck.directory / "4" / "stage.trainer"
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree
    assert set(tree) == {"params", "opt_state", "extra"}  # scalars live in meta
    assert tuple(tree["params"]["kernel"]["value"].shape) == (3, 4)
    assert tuple(tree["opt_state"]["0"]["mu"]["kernel"]["value"].shape) == (3, 4)  # optax NamedTuple fields
    assert tuple(tree["extra"]["layers"]["0"]["w"].shape) == (2, 3)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert names and not any("['[" in n or "|" in n for n in names), names
    # Readable with orbax alone.
    restored = ocp.StandardCheckpointer().restore(path)
    np.testing.assert_array_equal(restored["extra"]["layers"]["0"]["w"], np.arange(6.0).reshape(2, 3))
    meta = json.loads((ck.directory / "4" / "meta" / "metadata").read_text())
    assert meta["format"] == FORMAT == 2
    assert meta["scalars"]["trainer"] == {"version": 3, "skipped_updates": 1}


def test_restore_rebuilds_the_templates_structure(saved):
    ck, state = saved
    states, pending, meta = ck.restore(4, templates={"trainer": trainer_state()})
    got = states["trainer"]
    assert isinstance(got["params"], nnx.State) and type(got["opt_state"]) is type(state["opt_state"])
    assert got["version"] == 3 and got["skipped_updates"] == 1
    assert_same(got, state)
    assert meta["policy_version"] == 3
    assert sorted(pending["rollout"]) == [5, 6] and sorted(pending["rollout"][5]) == [0, 1]
    assert_same(pending, PENDING)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(pending))


def test_restore_subtree_takes_a_tree_path(saved):
    ck, state = saved
    template = nnx.state(nnx.eval_shape(model))
    params = ck.restore_subtree(4, "trainer", ("params",), template)
    assert isinstance(params, nnx.State)
    assert_same(params, state["params"])
    layer = ck.restore_subtree(4, "trainer", ("extra", "layers", 0), {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(layer["w"]), np.arange(6.0).reshape(2, 3))
    with pytest.raises(TypeError, match="tuple of keys"):
        ck.restore_subtree(4, "trainer", "['params']", template)


def test_mismatches_name_the_array_by_its_path(saved):
    ck, _ = saved
    wrong = nnx.state(nnx.eval_shape(lambda: nnx.Linear(2, 4, rngs=nnx.Rngs(0))))
    with pytest.raises(CheckpointError, match=r"stage\.trainer: params/kernel/value has shape \[3, 4\] in the "
                                              r"checkpoint but \[2, 4\] in this run"):
        ck.restore_subtree(4, "trainer", ("params",), wrong)
    with pytest.raises(CheckpointError, match=r"stage\.trainer: no array params/nope"):
        ck.restore_subtree(4, "trainer", ("params",), {"nope": jax.ShapeDtypeStruct((1,), jnp.float32)})
    fewer = trainer_state()
    del fewer["extra"]
    with pytest.raises(CheckpointError, match=r"array extra/layers/0/w is not part of this run's state"):
        ck.restore(4, templates={"trainer": fewer})


def test_a_format_1_checkpoint_is_refused_by_name(saved):
    ck, _ = saved
    path = ck.directory / "4" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(CheckpointError, match="not an rlpipe checkpoint of format 2"):
        ck.restore(4, templates={"trainer": trainer_state()})
