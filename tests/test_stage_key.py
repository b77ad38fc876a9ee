"""StageContext.key: a function of (seed, role, step, index) only, with the
whole role name in it, the same in every process."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlpipe import StageContext


def draws(role, seed=0, step=3, index=1):
    key = StageContext(role=role, seed=seed, step=step, index=index).key()
    return np.asarray(jax.random.uniform(key, (4,)))


def test_roles_sharing_a_prefix_draw_different_numbers():
    assert not np.array_equal(draws("reward_a"), draws("reward_b"))
    assert not np.array_equal(draws("reward"), draws("reward_a"))
    assert not np.array_equal(draws("judge_long_name_1"), draws("judge_long_name_2"))


def test_the_key_depends_on_seed_step_and_index_and_nothing_else():
    np.testing.assert_array_equal(draws("rollout"), draws("rollout"))
    assert not np.array_equal(draws("rollout", seed=1), draws("rollout"))
    assert not np.array_equal(draws("rollout", step=4), draws("rollout"))
    assert not np.array_equal(draws("rollout", index=2), draws("rollout"))
    barrier = StageContext(role="rollout", step=3, index=None).key()
    assert not np.array_equal(np.asarray(jax.random.key_data(barrier)),
                              np.asarray(jax.random.key_data(StageContext(role="rollout", step=3, index=0).key())))


@pytest.mark.slow
def test_the_key_is_the_same_in_another_process():
    code = ("import jax, numpy as np; from rlpipe import StageContext; "
            "k = StageContext(role='reward_b', seed=7, step=2, index=5).key(); "
            "print(np.asarray(jax.random.key_data(k)).tolist())")
    # another hash seed: Python's hash() of a str would differ between the processes
    env = {**os.environ, "PYTHONHASHSEED": "12345", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    here = np.asarray(jax.random.key_data(StageContext(role="reward_b", seed=7, step=2, index=5).key())).tolist()
    assert out.stdout.strip().splitlines()[-1] == str(here)
