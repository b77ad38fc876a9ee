"""The algorithm parts (advantage estimators, policy losses, KL, aggregation,
DAPO's shaping and filtering) against independent numpy references written
here with plain loops, on random masked inputs and degenerate cases; the
`Algorithm` that puts them together; and their registration as plugins."""

from __future__ import annotations

import functools
import math
import re
import types
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlpipe import AdvantageEstimatorSpec, ConfigError, PolicyLossSpec, hookimpl
from rlpipe.core.config import structure
from rlpipe.core.plugins import load_registry
from rlpipe.plugins import algorithms as algorithms_plugin
from rlpipe.plugins.algorithms import (
    Algorithm,
    AlgorithmConfig,
    OverlongConfig,
    dapo,
    make_factory,
    preset,
)
from rlpipe.plugins.algorithms import advantages as adv
from rlpipe.plugins.algorithms import losses as L
from rlpipe.plugins.algorithms.presets import (
    PRESETS,
    DAPOConfig,
    GRPOConfig,
    GSPOConfig,
    PPOConfig,
)
from rlpipe.testing import register_plugin

SHAPES = [(1, 1, 1), (3, 5, 7), (4, 8, 16)]
TOL = {"rtol": 2e-5, "atol": 2e-5}


# -- random inputs ---------------------------------------------------------------------------


def make_mask(rng, P, G, N, *, holes=False):
    """Prefix masks of random lengths (some 0: fully masked rows); ``holes`` also
    masks random inner tokens."""
    lengths = rng.integers(0, N + 1, size=(P, G))
    if P * G > 1:
        lengths.flat[rng.integers(P * G)] = 0  # always one fully masked row
        lengths.flat[rng.integers(P * G)] = N
    mask = np.arange(N)[None, None, :] < lengths[..., None]
    if holes:
        mask &= rng.random((P, G, N)) > 0.2
    return mask


def make_rewards(rng, P, G):
    """Normal rewards, except one group of equal non-dyadic rewards (0.1) and one
    binary group, so degenerate and typical cases are always present."""
    r = rng.normal(size=(P, G)).astype(np.float32)
    if P >= 2:
        r[0] = np.float32(0.1)
        r[1] = rng.integers(0, 2, size=G).astype(np.float32)
    return r


def jitted(fn, **static):
    """``fn`` under ``jax.jit`` with ``static`` keyword arguments fixed.  (Compiling
    once is much faster than eager dispatch compiling every op for new shapes.)"""
    return jax.jit(functools.partial(fn, **static))


def garbage(x, mask, value):
    """``x`` with ``value`` (NaN, -inf, ...) where the mask is 0: padding must never leak."""
    return np.where(mask, x, value).astype(np.float32)


# -- numpy references (loops, float64) -------------------------------------------------------


def ref_group_advantages(rewards, mask, kind, eps=1e-6):
    P, G, N = mask.shape
    out = np.zeros((P, G, N))
    for p in range(P):
        rows = [g for g in range(G) if mask[p, g].any()]
        vals = [float(rewards[p, g]) for g in rows]
        if len(rows) < 2 or len(set(vals)) == 1:
            continue
        k = len(vals)
        mean = sum(vals) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (k - 1))
        for g, x in zip(rows, vals):
            if kind == "grpo":
                a = (x - mean) / (std + eps)
            elif kind in ("drgrpo", "reinforce-pp"):
                a = x - mean
            elif kind == "rloo":
                a = x - (sum(vals) - x) / (k - 1)
            for t in range(N):
                if mask[p, g, t]:
                    out[p, g, t] = a
    if kind == "reinforce-pp":
        tokens = [out[p, g, t] for p in range(P) for g in range(G) for t in range(N) if mask[p, g, t]]
        if tokens:
            mu = sum(tokens) / len(tokens)
            std = math.sqrt(sum((x - mu) ** 2 for x in tokens) / len(tokens))
            out = out / (std + eps)
    return out


def ref_gae(token_rewards, values, mask, gamma, lam):
    A = np.zeros(mask.shape)
    R = np.zeros(mask.shape)
    for idx in np.ndindex(mask.shape[:-1]):
        steps = [t for t in range(mask.shape[-1]) if mask[idx][t]]
        next_v, next_a = 0.0, 0.0
        for t in reversed(steps):
            delta = token_rewards[idx][t] + gamma * next_v - values[idx][t]
            a = delta + gamma * lam * next_a
            A[idx][t], R[idx][t] = a, a + values[idx][t]
            next_v, next_a = values[idx][t], a
    return A, R


def ref_ppo(logp, old, A, mask, eps_low, eps_high, dual_clip=None):
    loss = np.zeros(mask.shape)
    low = np.zeros(mask.shape, bool)
    high = np.zeros(mask.shape, bool)
    ratio = np.zeros(mask.shape)
    for i in np.ndindex(mask.shape):
        if not mask[i]:
            continue
        r = math.exp(float(logp[i]) - float(old[i]))
        a = float(A[i])
        l = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
        if dual_clip is not None and a < 0:
            l = min(l, -a * dual_clip)
        loss[i], ratio[i] = l, r
        low[i] = a < 0 and r < 1 - eps_low
        high[i] = a > 0 and r > 1 + eps_high
    return loss, ratio, low, high


def ref_gspo(logp, old, A, mask, eps_low, eps_high):
    loss = np.zeros(mask.shape)
    for idx in np.ndindex(mask.shape[:-1]):
        steps = [t for t in range(mask.shape[-1]) if mask[idx][t]]
        if not steps:
            continue
        s = math.exp(sum(float(logp[idx][t]) - float(old[idx][t]) for t in steps) / len(steps))
        for t in steps:
            a = float(A[idx][t])
            loss[idx][t] = max(-a * s, -a * min(max(s, 1 - eps_low), 1 + eps_high))
    return loss


def ref_kl(logp, ref, kind):
    d = logp.astype(np.float64) - ref.astype(np.float64)
    return {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) + d - 1}[kind]


def ref_aggregate(x, mask, mode):
    N = mask.shape[-1]
    if mode == "token-mean":
        vals = [x[i] for i in np.ndindex(mask.shape) if mask[i]]
        return sum(vals) / len(vals) if vals else 0.0
    per_seq = []
    for idx in np.ndindex(mask.shape[:-1]):
        vals = [x[idx][t] for t in range(N) if mask[idx][t]]
        if not vals:
            continue
        per_seq.append({"seq-mean-token-mean": sum(vals) / len(vals), "seq-mean-token-sum": sum(vals),
                        "seq-mean-token-sum-norm": sum(vals) / N}[mode])
    return sum(per_seq) / len(per_seq) if per_seq else 0.0


def ref_overlong(length, max_len, buffer, factor):
    if length <= max_len - buffer:
        return 0.0
    if length <= max_len:
        return (max_len - buffer - length) / buffer * factor
    return -factor


# -- advantage estimators --------------------------------------------------------------------

GROUP_ESTIMATORS = {"grpo": adv.grpo, "drgrpo": adv.drgrpo, "rloo": adv.rloo, "reinforce-pp": adv.reinforce_pp}


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.slow
def test_group_estimators_match_numpy_reference(name, shape, seed):
    rng = np.random.default_rng(seed)
    mask = make_mask(rng, *shape, holes=seed == 1)
    rewards = make_rewards(rng, *shape[:2])
    got = np.asarray(jitted(GROUP_ESTIMATORS[name])(rewards, mask))
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_group_advantages(rewards, mask, name), **TOL)


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
def test_group_with_equal_rewards_gets_exactly_zero_advantage(name):
    fn = jitted(GROUP_ESTIMATORS[name])
    for value in [0.0, 1.0, 0.1, -3.7, 1e6]:
        rewards = np.full((3, 7), value, np.float32)
        rewards[2] = np.arange(7)  # one informative group, so reinforce-pp's batch std is not 0
        got = np.asarray(fn(rewards, np.ones((3, 7, 5), bool)))
        assert np.all(got[:2] == 0.0), value
        assert np.all(np.isfinite(got)) and np.any(got[2] != 0)


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
def test_all_degenerate_batches_give_zero_not_nan(name):
    for rewards, mask in [
        (np.ones((2, 4), np.float32), np.ones((2, 4, 3), bool)),  # every group equal
        (np.arange(8, dtype=np.float32).reshape(2, 4), np.zeros((2, 4, 3), bool)),  # nothing valid
        (np.arange(2, dtype=np.float32).reshape(2, 1), np.ones((2, 1, 3), bool)),  # G = 1
    ]:
        got = np.asarray(jitted(GROUP_ESTIMATORS[name])(rewards, mask))
        assert np.all(got == 0.0), (rewards, got)


def test_fully_masked_completions_are_left_out_of_their_group():
    rewards = np.array([[1.0, 3.0, 100.0]], np.float32)
    mask = np.ones((1, 3, 2), bool)
    mask[0, 2] = False
    # Group statistics over {1, 3} only: mean 2, sample std sqrt(2).
    np.testing.assert_allclose(np.asarray(jitted(adv.grpo)(rewards, mask))[0, :, 0], [-1 / math.sqrt(2), 1 / math.sqrt(2), 0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jitted(adv.drgrpo)(rewards, mask))[0, :, 0], [-1, 1, 0])
    np.testing.assert_allclose(np.asarray(jitted(adv.rloo)(rewards, mask))[0, :, 0], [-2, 2, 0])


def test_grpo_uses_the_sample_std():
    rewards = np.array([[0.0, 1.0]], np.float32)  # mean 0.5; sample std 1/sqrt(2), population 0.5
    got = np.asarray(jitted(adv.grpo, eps=0.0)(rewards, np.ones((1, 2, 1), bool)))[0, :, 0]
    np.testing.assert_allclose(got, [-0.5 * math.sqrt(2), 0.5 * math.sqrt(2)], rtol=1e-6)


def test_rloo_single_generation_gets_zero():
    assert np.all(np.asarray(jitted(adv.rloo)(np.array([[5.0], [-2.0]], np.float32), np.ones((2, 1, 4), bool))) == 0)


def test_sequence_rewards_to_tokens_puts_the_reward_on_the_last_valid_token():
    rng = np.random.default_rng(3)
    mask = make_mask(rng, 3, 4, 6, holes=True)
    rewards = rng.normal(size=(3, 4)).astype(np.float32)
    expected = np.zeros(mask.shape, np.float32)
    for p, g in np.ndindex(3, 4):
        valid = [t for t in range(6) if mask[p, g, t]]
        if valid:
            expected[p, g, valid[-1]] = rewards[p, g]
    np.testing.assert_array_equal(np.asarray(jitted(adv.sequence_rewards_to_tokens)(rewards, mask)), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_gae_matches_numpy_reference(shape):
    rng = np.random.default_rng(sum(shape))
    gae = jax.jit(adv.gae)  # gamma and lam traced: one compilation for all of them
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.0, 0.5)]:
        mask = make_mask(rng, *shape, holes=True)
        token_rewards = garbage(rng.normal(size=shape), mask, np.nan)
        values = garbage(rng.normal(size=shape), mask, np.inf)
        A, R = gae(token_rewards, values, mask, gamma=gamma, lam=lam)
        ref_A, ref_R = ref_gae(np.nan_to_num(token_rewards), np.where(mask, values, 0), mask, gamma, lam)
        np.testing.assert_allclose(np.asarray(A), ref_A, **TOL)
        np.testing.assert_allclose(np.asarray(R), ref_R, **TOL)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rng = np.random.default_rng(5)
    mask = make_mask(rng, 2, 3, 5)
    rewards = rng.normal(size=(2, 3)).astype(np.float32)
    values = rng.normal(size=(2, 3, 5)).astype(np.float32)
    A, R = jitted(adv.gae, gamma=1.0, lam=1.0)(jitted(adv.sequence_rewards_to_tokens)(rewards, mask), values, mask)
    np.testing.assert_allclose(np.asarray(A), np.where(mask, rewards[..., None] - values, 0), **TOL)
    np.testing.assert_allclose(np.asarray(R), np.where(mask, rewards[..., None], 0), **TOL)


# -- losses ------------------------------------------------------------------------------------


def loss_inputs(seed, shape, *, pad=np.nan):
    rng = np.random.default_rng(seed)
    mask = make_mask(rng, *shape, holes=True)
    old = rng.normal(-2.0, 1.0, size=shape).astype(np.float32)
    logp = (old + rng.normal(0, 0.4, size=shape)).astype(np.float32)  # ratios well inside and outside the clip range
    A = rng.normal(size=shape).astype(np.float32)
    return garbage(logp, mask, pad), garbage(old, mask, pad), garbage(A, mask, pad), mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("eps_low", "eps_high", "dual_clip"), [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 1.5), (0.2, 0.2, 3.0)])
def test_ppo_clip_matches_numpy_reference(shape, eps_low, eps_high, dual_clip):
    logp, old, A, mask = loss_inputs(sum(shape), shape)
    loss, stats = jitted(L.ppo_clip, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)(logp, old, A, mask)
    ref_loss, ref_ratio, low, high = ref_ppo(logp, old, A, mask, eps_low, eps_high, dual_clip)
    np.testing.assert_allclose(np.asarray(loss), ref_loss, **TOL)
    np.testing.assert_allclose(np.asarray(stats["ratio"]), ref_ratio, **TOL)
    np.testing.assert_array_equal(np.asarray(stats["clipped_low"]), low)
    np.testing.assert_array_equal(np.asarray(stats["clipped_high"]), high)
    if dual_clip is not None:
        capped = np.asarray(stats["dual_clipped"])
        assert not np.any(capped & ~mask)
        np.testing.assert_allclose(np.asarray(loss)[capped], (-A * dual_clip)[capped], rtol=1e-6)


def test_dual_clip_caps_negative_advantage_loss_at_c_times_abs_advantage():
    mask = np.ones((1, 1, 3), bool)
    A = np.full((1, 1, 3), -2.0, np.float32)
    old = np.zeros((1, 1, 3), np.float32)
    logp = np.log(np.array([[[0.5, 2.0, 10.0]]], np.float32))
    loss, stats = jitted(L.ppo_clip, eps_low=0.2, eps_high=0.2, dual_clip=3.0)(logp, old, A, mask)
    # ratio 0.5 -> clipped at 0.8: 1.6; ratio 2 -> 4; ratio 10 -> 20, capped at 3 * 2 = 6.
    np.testing.assert_allclose(np.asarray(loss)[0, 0], [1.6, 4.0, 6.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats["dual_clipped"])[0, 0], [False, False, True])
    with pytest.raises(ValueError, match="dual_clip"):
        L.ppo_clip(logp, old, A, mask, dual_clip=1.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_gspo_matches_numpy_reference(shape):
    logp, old, A, mask = loss_inputs(7 + sum(shape), shape)
    logp = np.where(mask, old + (logp - old) * 0.01, np.nan).astype(np.float32)  # GSPO's ratios live near 1
    loss, stats = jitted(L.gspo, eps_low=3e-4, eps_high=4e-4)(logp, old, A, mask)
    np.testing.assert_allclose(np.asarray(loss), ref_gspo(logp, old, A, mask, 3e-4, 4e-4), **TOL)
    assert np.all(np.asarray(stats["ratio"])[~mask] == 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_token_gradient_is_the_sequence_objective_gradient(seed):
    """With a sequence-level advantage and seq-mean-token-mean, the GSPO-token
    loss has GSPO's gradient: that of mean_i max(-A_i s_i, -A_i clip(s_i))."""
    rng = np.random.default_rng(seed)
    shape = (3, 4, 6)
    mask = make_mask(rng, *shape, holes=True)
    old = rng.normal(-2, 1, size=shape).astype(np.float32)
    logp = (old + rng.normal(0, 0.01, size=shape)).astype(np.float32)
    seq_adv = rng.normal(size=shape[:2]).astype(np.float32)
    A = np.where(mask, seq_adv[..., None], 0).astype(np.float32)
    eps_low, eps_high = 0.002, 0.003

    def ours(lp):
        return L.aggregate(L.gspo(lp, old, A, mask, eps_low=eps_low, eps_high=eps_high)[0], mask, "seq-mean-token-mean")

    def sequence_objective(lp):
        n = mask.sum(-1)
        s = jnp.exp(jnp.where(mask, lp - old, 0).sum(-1) / np.maximum(n, 1))
        per_seq = jnp.maximum(-seq_adv * s, -seq_adv * jnp.clip(s, 1 - eps_low, 1 + eps_high))
        return jnp.where(n > 0, per_seq, 0).sum() / (n > 0).sum()

    np.testing.assert_allclose(float(ours(logp)), float(sequence_objective(logp)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(ours))(logp)), np.asarray(jax.jit(jax.grad(sequence_objective))(logp)), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", L.KL_KINDS)
def test_kl_estimators_match_numpy_reference(kind):
    rng = np.random.default_rng(11)
    mask = make_mask(rng, 3, 4, 5, holes=True)
    logp = rng.normal(-2, 1, size=mask.shape).astype(np.float32)
    ref = rng.normal(-2, 1, size=mask.shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jitted(L.kl, kind=kind)(logp, ref)), ref_kl(logp, ref, kind), rtol=1e-5, atol=1e-5)
    got = np.asarray(jitted(L.kl, kind=kind)(garbage(logp, mask, -np.inf), garbage(ref, mask, np.nan), mask=mask))
    np.testing.assert_allclose(got, np.where(mask, ref_kl(logp, ref, kind), 0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="k4"):
        L.kl(logp, ref, "k4")


def test_k3_is_nonnegative_and_zero_at_equality():
    x = np.linspace(-5, 5, 101, dtype=np.float32)
    assert np.all(np.asarray(jitted(L.kl, kind="k3")(x, x[::-1])) >= 0)
    assert np.all(np.asarray(L.kl(x, x, "k3")) == 0)


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_aggregate_matches_numpy_reference(mode, shape):
    rng = np.random.default_rng(len(mode) + sum(shape))
    mask = make_mask(rng, *shape, holes=True)
    x = garbage(rng.normal(size=shape), mask, np.nan)
    np.testing.assert_allclose(float(jitted(L.aggregate, mode=mode)(x, mask)), ref_aggregate(np.nan_to_num(x), mask, mode), rtol=1e-5, atol=1e-6)
    assert float(jitted(L.aggregate, mode=mode)(x, np.zeros(shape, bool))) == 0.0


def test_seq_mean_token_sum_norm_divides_by_the_padded_length():
    x = np.ones((1, 2, 8), np.float32)
    mask = np.zeros((1, 2, 8), bool)
    mask[0, 0, :2] = True
    mask[0, 1, :6] = True
    assert float(jitted(L.aggregate, mode="seq-mean-token-sum-norm")(x, mask)) == pytest.approx((2 / 8 + 6 / 8) / 2)
    assert float(jitted(L.aggregate, mode="seq-mean-token-sum")(x, mask)) == pytest.approx(4.0)
    assert float(jitted(L.aggregate, mode="seq-mean-token-mean")(x, mask)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="token-mean"):
        L.aggregate(x, mask, "mean")


def test_truncated_importance_weights():
    rng = np.random.default_rng(2)
    mask = make_mask(rng, 2, 3, 5, holes=True)
    old = rng.normal(-2, 1, size=mask.shape).astype(np.float32)
    rollout = (old + rng.normal(0, 1, size=mask.shape)).astype(np.float32)
    w = jitted(L.truncated_importance_weights, cap=2.0)(garbage(old, mask, np.nan), garbage(rollout, mask, -np.inf), mask)
    expected = np.where(mask, np.minimum(np.exp(old.astype(np.float64) - rollout), 2.0), 0)
    np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-5)
    grad = jax.jit(jax.grad(lambda o: L.truncated_importance_weights(o, rollout, mask, 2.0).sum()))(old)
    assert np.all(np.asarray(grad) == 0)


def test_entropy_from_logits_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(2, 3, 11)).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(jax.jit(L.entropy_from_logits)(logits)), -(p * np.log(p)).sum(-1), rtol=1e-5)


# -- DAPO --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_len", "buffer", "factor"), [(20, 5, 1.0), (16, 16, 0.5), (10, 1, 2.0)])
def test_overlong_penalty_matches_reference(max_len, buffer, factor):
    lengths = np.arange(0, max_len + 5)
    expected = [ref_overlong(int(n), max_len, buffer, factor) for n in lengths]
    got = dapo.overlong_penalty(lengths, max_len=max_len, buffer=buffer, penalty_factor=factor)
    assert isinstance(got, np.ndarray)  # numpy in, numpy out (host side)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    jitted = jax.jit(lambda n: dapo.overlong_penalty(n, max_len=max_len, buffer=buffer, penalty_factor=factor))
    np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(lengths))), expected, rtol=1e-6, atol=1e-7)


def test_overlong_penalty_without_buffer_is_a_hard_cut_and_bad_buffers_are_refused():
    np.testing.assert_array_equal(dapo.overlong_penalty(np.array([9, 10, 11]), max_len=10, buffer=0), [0, 0, -1])
    with pytest.raises(ValueError, match="buffer"):
        dapo.overlong_penalty(np.array([1]), max_len=10, buffer=11)


def test_dynamic_sampling_keeps_groups_with_different_rewards():
    rewards = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [0.5, 0.5, 0.5000001]], np.float32)
    np.testing.assert_array_equal(dapo.dynamic_sampling_keep(rewards), [False, True, False, True])
    np.testing.assert_array_equal(np.asarray(jax.jit(dapo.dynamic_sampling_keep)(jnp.asarray(rewards))), [False, True, False, True])
    mask = np.ones((4, 3, 2), bool)
    mask[1, 1] = False  # the only differing completion is padding
    np.testing.assert_array_equal(dapo.dynamic_sampling_keep(rewards, mask), [False, False, False, True])


def rollout_stream(rng, P, G, N, n_batches):
    for b in range(n_batches):
        rewards = rng.integers(0, 2, size=(P, G)).astype(np.float32)
        yield {"rewards": rewards, "completion_mask": np.ones((P, G, N), bool), "batch_id": np.full((P,), b)}


def test_top_up_assembles_target_informative_groups_in_order():
    batches = list(rollout_stream(np.random.default_rng(0), 4, 3, 2, 10))
    drawn = []

    def stream():
        for b in batches:
            drawn.append(b)
            yield b

    out = dapo.top_up(stream(), 6)
    assert out.batch["rewards"].shape == (6, 3) and out.batch["completion_mask"].shape == (6, 3, 2)
    expected = np.concatenate([b["rewards"][dapo.dynamic_sampling_keep(b["rewards"])] for b in drawn])[:6]
    np.testing.assert_array_equal(out.batch["rewards"], expected)
    assert out.batches_drawn == len(drawn) < len(batches)  # stopped drawing once full
    assert out.groups_seen == 4 * len(drawn) and out.groups_kept >= 6
    assert np.all(out.batch["rewards"].max(1) > out.batch["rewards"].min(1))


def test_top_up_says_how_far_it_got_when_the_stream_runs_dry():
    equal = ({"rewards": np.ones((4, 3), np.float32)} for _ in range(3))
    with pytest.raises(RuntimeError, match="kept 0 of 12 groups from 3"):
        dapo.top_up(equal, 2)
    endless = rollout_stream(np.random.default_rng(0), 1, 3, 2, 10**6)
    with pytest.raises(RuntimeError, match="from 2 rollout batch"):
        dapo.top_up(endless, 100, max_batches=2)


# -- the algorithm -----------------------------------------------------------------------------


def batch_inputs(seed, shape=(3, 4, 6)):
    rng = np.random.default_rng(seed)
    logp, old, _, mask = loss_inputs(seed, shape)
    rewards = make_rewards(rng, *shape[:2])
    ref = garbage(rng.normal(-2, 1, size=shape), mask, np.nan)
    rollout = garbage(np.nan_to_num(old) + rng.normal(0, 0.3, size=shape), mask, -np.inf)
    return logp, old, ref, rollout, rewards, mask


@pytest.mark.parametrize("config", [
    GRPOConfig(),
    GRPOConfig(kl_kind="k1", aggregation="token-mean", dual_clip=2.0, tis_cap=1.5),
    DAPOConfig(overlong=None, kl_beta=0.1, kl_kind="k2", aggregation="seq-mean-token-sum"),
    AlgorithmConfig(advantage="rloo", aggregation="seq-mean-token-sum-norm", eps_high=0.28),
    GSPOConfig(eps_low=0.01, eps_high=0.02),
], ids=["grpo", "grpo-k1-dual-tis", "dapo-kl", "rloo", "gspo"])
@pytest.mark.slow
def test_algorithm_loss_matches_numpy_reference(config):
    logp, old, ref, rollout, rewards, mask = batch_inputs(4)
    algo = Algorithm(config)
    A = np.asarray(jax.jit(algo.advantages)(rewards, mask))
    np.testing.assert_allclose(A, ref_group_advantages(rewards, mask, config.advantage), **TOL)
    batch = {"completion_mask": mask, "old_logprobs": old, "advantages": A, "ref_logprobs": ref, "rollout_logprobs": rollout}
    loss, metrics = jax.jit(algo.loss)(logp, batch)

    if config.loss == "gspo":
        per_token = ref_gspo(logp, old, A, mask, config.eps_low, config.eps_high)
    else:
        per_token, ratio, low, high = ref_ppo(logp, old, A, mask, config.eps_low, config.eps_high, config.dual_clip)
        assert float(metrics["clip_frac_low"]) == pytest.approx(ref_aggregate(low, mask, "token-mean"), abs=1e-6)
        assert float(metrics["clip_frac_high"]) == pytest.approx(ref_aggregate(high, mask, "token-mean"), abs=1e-6)
        assert float(metrics["ratio_mean"]) == pytest.approx(ref_aggregate(ratio, mask, "token-mean"), rel=1e-5)
        assert float(metrics["ratio_max"]) == pytest.approx(ratio[mask].max(), rel=1e-5)
    if config.tis_cap is not None:
        w = np.where(mask, np.minimum(np.exp(np.nan_to_num(old).astype(np.float64) - np.where(mask, rollout, 0)), config.tis_cap), 0)
        per_token = per_token * w
        assert float(metrics["tis_weight_mean"]) == pytest.approx(ref_aggregate(w, mask, "token-mean"), rel=1e-5)
    pg = ref_aggregate(per_token, mask, config.aggregation)
    kl_value = ref_aggregate(np.where(mask, ref_kl(np.nan_to_num(logp), np.nan_to_num(ref), config.kl_kind), 0), mask, config.aggregation)
    assert float(metrics["pg_loss"]) == pytest.approx(pg, rel=1e-4, abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx(kl_value, rel=1e-4, abs=1e-6)
    assert float(loss) == pytest.approx(pg + config.kl_beta * kl_value, rel=1e-4, abs=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(loss))


@pytest.mark.parametrize(("name", "aggregation"), [(n, None) for n in sorted(PRESETS)] + [("grpo", a) for a in L.AGGREGATIONS])
@pytest.mark.slow
def test_loss_gradient_is_finite_on_degenerate_inputs(name, aggregation):
    """All-zero advantages, fully masked rows, a fully masked batch, and -inf / NaN
    padding must never give a NaN loss or gradient."""
    shape = (2, 3, 4)
    cfg = PRESETS[name](kl_beta=0.1, tis_cap=2.0, overlong=None, **({} if aggregation is None else {"aggregation": aggregation}))
    algo = Algorithm(cfg)
    rng = np.random.default_rng(0)
    mask = make_mask(rng, *shape)
    value_and_grad = jax.jit(jax.value_and_grad(algo.loss, has_aux=True))
    for m, pad in [(mask, -np.inf), (mask, np.nan), (np.zeros(shape, bool), -np.inf)]:
        logp = garbage(rng.normal(-2, 1, size=shape), m, pad)
        batch = {"completion_mask": m, "old_logprobs": garbage(rng.normal(-2, 1, size=shape), m, pad),
                 "advantages": np.zeros(shape, np.float32), "ref_logprobs": garbage(rng.normal(-2, 1, size=shape), m, pad),
                 "rollout_logprobs": garbage(rng.normal(-2, 1, size=shape), m, pad)}
        (loss, metrics), grad = value_and_grad(logp, batch)
        assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values()), metrics
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)) and np.all(grad[~m] == 0)
        if not m.any():
            assert float(loss) == 0.0 and np.all(grad == 0)


def test_ppo_estimate_uses_the_critic_and_gives_returns():
    rng = np.random.default_rng(8)
    mask = make_mask(rng, 2, 3, 5, holes=True)
    rewards = rng.normal(size=(2, 3)).astype(np.float32)
    values = rng.normal(size=(2, 3, 5)).astype(np.float32)
    algo = make_factory("ppo")()
    assert algo.needs_critic and not algo.needs_reference and algo.config.lam == 0.95
    est = jax.jit(algo.estimate)(rewards, mask, values)
    token_rewards = np.zeros(mask.shape)
    for p, g in np.ndindex(2, 3):
        valid = np.flatnonzero(mask[p, g])
        if valid.size:
            token_rewards[p, g, valid[-1]] = rewards[p, g]
    ref_A, ref_R = ref_gae(token_rewards, values, mask, 1.0, 0.95)
    np.testing.assert_allclose(np.asarray(est.advantages), ref_A, **TOL)
    np.testing.assert_allclose(np.asarray(est.returns), ref_R, **TOL)
    with pytest.raises(ValueError, match="values"):
        algo.estimate(rewards, mask)


def test_kl_in_reward_penalises_rewards_not_the_loss():
    rng = np.random.default_rng(9)
    mask = make_mask(rng, 2, 4, 5)
    rewards = rng.normal(size=(2, 4)).astype(np.float32)
    logp = rng.normal(-2, 1, size=mask.shape).astype(np.float32)
    ref = rng.normal(-2, 1, size=mask.shape).astype(np.float32)
    beta = 0.05
    algo = Algorithm(AlgorithmConfig(advantage="drgrpo", kl_beta=beta, kl_kind="k1", kl_in_reward=True))
    assert algo.needs_reference
    penalised = rewards - beta * np.where(mask, logp.astype(np.float64) - ref, 0).sum(-1)
    got = np.asarray(jax.jit(algo.advantages)(rewards, mask, logprobs=logp, ref_logprobs=ref))
    np.testing.assert_allclose(got, ref_group_advantages(penalised, mask, "drgrpo"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        algo.advantages(rewards, mask)
    batch = {"completion_mask": mask, "old_logprobs": logp, "advantages": got, "ref_logprobs": ref}
    loss, metrics = algo.loss(logp, batch)
    assert float(loss) == pytest.approx(float(metrics["pg_loss"]))  # no KL term in the loss
    # GAE gets each token's own KL as a per-token reward.
    ppo = Algorithm(PPOConfig(kl_beta=beta, kl_kind="k1", kl_in_reward=True, lam=1.0))
    values = np.zeros(mask.shape, np.float32)
    A = np.asarray(jax.jit(ppo.advantages)(rewards, mask, values, logprobs=logp, ref_logprobs=ref))
    token_rewards = np.asarray(adv.sequence_rewards_to_tokens(rewards, mask)) - beta * np.where(mask, logp.astype(np.float64) - ref, 0)
    np.testing.assert_allclose(A, ref_gae(token_rewards, values, mask, 1.0, 1.0)[0], rtol=1e-5, atol=1e-5)


def test_the_entropy_bonus_is_subtracted_from_the_loss_aggregated_like_it():
    rng = np.random.default_rng(0)
    mask = np.ones((2, 3, 4), bool)
    mask[0, 0, 2:] = False
    logp = rng.normal(-1.0, 0.3, mask.shape).astype(np.float32)
    entropy = rng.uniform(0.5, 2.0, mask.shape).astype(np.float32)
    batch = {"completion_mask": mask, "old_logprobs": logp, "advantages": rng.normal(size=mask.shape).astype(np.float32)}
    plain = Algorithm(AlgorithmConfig(aggregation="seq-mean-token-mean"))
    bonus = Algorithm(AlgorithmConfig(aggregation="seq-mean-token-mean", entropy_coef=0.1))
    base, _ = plain.loss(logp, batch, entropy=entropy)
    loss, metrics = bonus.loss(logp, batch, entropy=entropy)
    per_seq = np.where(mask, entropy, 0).sum(-1) / mask.sum(-1)
    assert float(metrics["entropy_bonus"]) == pytest.approx(per_seq.mean(), rel=1e-5)
    assert float(loss) == pytest.approx(float(base) - 0.1 * per_seq.mean(), rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(float(loss))
    with pytest.raises(KeyError, match="entropy"):
        bonus.loss(logp, batch)


def test_overlong_penalty_is_added_before_the_advantages():
    mask = np.zeros((1, 2, 20), bool)
    mask[0, 0, :4] = True
    mask[0, 1, :18] = True  # default max_len N = 20, buffer 20 // 5 = 4: half the penalty
    rewards = np.ones((1, 2), np.float32)
    algo = make_factory("dapo")()
    np.testing.assert_allclose(np.asarray(algo.shaped_rewards(rewards, mask)), [[1.0, 1.0 - 0.5]], rtol=1e-6)
    a = np.asarray(algo.advantages(rewards, mask))
    assert a[0, 0, 0] > 0 > a[0, 1, 0]  # equal task rewards, but the long one is penalised
    assert OverlongConfig(max_len=8, buffer=4).resolve(100) == (8, 4)


def test_keep_groups_follows_dynamic_sampling():
    rewards = np.array([[1, 1], [0, 1]], np.float32)
    np.testing.assert_array_equal(make_factory("dapo")().keep_groups(rewards), [False, True])
    np.testing.assert_array_equal(make_factory("grpo")().keep_groups(rewards), [True, True])


@pytest.mark.parametrize("name", ["grpo", "gspo"])
def test_extreme_log_ratios_give_finite_losses_and_gradients(name):
    """A token whose log-prob moved by 200-300 nats (exp overflows float32) must not
    turn a zero advantage into NaN: log-ratios are clamped before exp."""
    mask = np.ones((1, 2, 3), bool)
    logp = np.array([[[-300.0, -1.0, -1.0], [-1.0, -1.0, -1.0]]], np.float32)
    old = np.array([[[-100.0, -1.0, -1.0], [-1.0, -1.0, -301.0]]], np.float32)
    algo = Algorithm(PRESETS[name](kl_beta=0.1, dual_clip=None))
    for advantages in (np.zeros(mask.shape, np.float32), np.array([[[1.0] * 3, [-1.0] * 3]], np.float32)):
        batch = {"completion_mask": mask, "old_logprobs": old, "advantages": advantages, "ref_logprobs": old}
        (loss, metrics), grad = jax.jit(jax.value_and_grad(algo.loss, has_aux=True))(logp, batch)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
        assert all(np.isfinite(float(v)) for v in metrics.values()), metrics


def test_missing_batch_fields_are_named():
    logp, old, ref, rollout, rewards, mask = batch_inputs(1)
    batch = {"completion_mask": mask, "old_logprobs": old, "advantages": np.zeros(mask.shape, np.float32)}
    with pytest.raises(KeyError, match="ref_logprobs"):
        make_factory("grpo")().loss(logp, batch)
    with pytest.raises(KeyError, match="rollout_logprobs"):
        Algorithm(AlgorithmConfig(tis_cap=2.0)).loss(logp, batch)


# -- config ------------------------------------------------------------------------------------


def test_presets_carry_each_algorithms_defaults():
    assert preset("grpo").kl_beta == 0.04 and preset("grpo").aggregation == "seq-mean-token-mean"
    assert preset("dapo").eps_high == 0.28 and preset("dapo").dynamic_sampling and preset("dapo").overlong == OverlongConfig()
    assert preset("drgrpo").aggregation == "seq-mean-token-sum-norm" and preset("drgrpo").advantage == "drgrpo"
    assert preset("gspo").loss == "gspo" and preset("ppo").advantage == "gae" and preset("rloo").advantage == "rloo"
    assert all(isinstance(preset(n), AlgorithmConfig) for n in PRESETS)
    # Structured from YAML data, the options start from the preset.
    assert structure({"eps_low": 0.1}, DAPOConfig) == DAPOConfig(eps_low=0.1)
    assert structure({}, GRPOConfig).kl_beta == 0.04


@pytest.mark.parametrize(("data", "cls", "expected"), [
    ({"eps_low": 1.5}, AlgorithmConfig, "algorithm.options.eps_low: must be in (0, 1), got 1.5"),
    ({"dual_clip": 1.0}, AlgorithmConfig, "algorithm.options.dual_clip: must be greater than 1"),
    ({"kl_kind": "k4"}, GRPOConfig, "algorithm.options.kl_kind: must be one of k1, k2, k3, got 'k4'"),
    ({"aggregation": "mean"}, DAPOConfig, "algorithm.options.aggregation: must be one of token-mean"),
    ({"overlong": {"max_len": 8, "buffer": 9}}, DAPOConfig, "algorithm.options.overlong.buffer: must not exceed max_len (8), got 9"),
    ({"dual_clip": 3.0}, GSPOConfig, "algorithm.options.dual_clip: the gspo loss has no dual clip"),
    ({"kl_betta": 0.1}, GRPOConfig, "algorithm.options.kl_betta: unknown key (did you mean 'kl_beta'?)"),
    ({"gamma": "high"}, PPOConfig, "algorithm.options.gamma: expected a number, got 'high'"),
])
def test_config_errors_name_the_key(data, cls, expected):
    with pytest.raises(ConfigError) as err:
        structure(data, cls, ("algorithm", "options"))
    assert any(line.startswith(expected) for line in err.value.lines()), err.value.lines()


def test_unknown_estimator_or_loss_name_lists_the_choices():
    with pytest.raises(ConfigError, match=r"algorithm.options.advantage: unknown advantage estimator 'gpro' \(did you mean 'grpo'\?\)"):
        Algorithm(AlgorithmConfig(advantage="gpro"))
    with pytest.raises(ConfigError, match=r"algorithm.options.loss: unknown policy loss 'pp'.*available: gspo, ppo"):
        Algorithm(AlgorithmConfig(loss="pp"))


def test_needs_reference_and_critic():
    assert make_factory("grpo")().needs_reference and not make_factory("dapo")().needs_reference
    assert make_factory("ppo")().needs_critic and not make_factory("grpo")().needs_critic
    assert make_factory("ppo")().roles == ("rollout", "reward", "critic", "trainer")
    assert make_factory("grpo")(GRPOConfig(kl_beta=0.0)).roles == ("rollout", "reward", "trainer")


# -- plugin registration -----------------------------------------------------------------------


ALGORITHMS_ENTRY_POINT_INSTALLED = any(ep.value == "rlpipe.plugins.algorithms" for ep in metadata.entry_points(group="rlpipe"))


def load_with(*plugins):
    """A registry holding the algorithms plugin (and ``plugins``), whether or not
    the ``algorithms`` entry point is installed yet."""
    with ExitStack() as stack:
        if not ALGORITHMS_ENTRY_POINT_INSTALLED:
            stack.enter_context(register_plugin(algorithms_plugin, name="algorithms-test", distribution=None))
        for i, p in enumerate(plugins):
            stack.enter_context(register_plugin(p, name=f"extra-{i}", distribution=f"extra-{i}-dist"))
        return load_registry(warn=lambda m: None)


def test_builtin_algorithms_estimators_and_losses_are_registered():
    reg = load_with()
    algos = reg.specs("rlpipe_algorithms")
    assert set(PRESETS) <= set(algos)
    assert set(algos["ppo"].roles) >= {"rollout", "critic", "trainer"}
    assert "reference" in algos["grpo"].roles and "reference" not in algos["dapo"].roles
    assert algos["dapo"].config_type is DAPOConfig and issubclass(algos["grpo"].config_type, AlgorithmConfig)
    assert isinstance(algos["grpo"].factory(None), Algorithm)
    assert algos["gspo"].factory(GSPOConfig(eps_high=0.001)).config.eps_high == 0.001
    estimators = reg.specs("rlpipe_advantage_estimators")
    assert {n: s.fn for n, s in estimators.items()}.items() >= {
        "grpo": adv.grpo, "drgrpo": adv.drgrpo, "rloo": adv.rloo, "gae": adv.gae, "reinforce-pp": adv.reinforce_pp}.items()
    assert {n: s.fn for n, s in reg.specs("rlpipe_policy_losses").items()}.items() >= {"ppo": L.ppo_clip, "gspo": L.gspo}.items()


def test_a_third_party_estimator_and_loss_are_usable_by_name():
    def median_baseline(rewards, mask):
        return jnp.where(mask, (rewards - jnp.median(rewards, axis=-1, keepdims=True))[..., None], 0.0)

    def vanilla_pg(logp, advantages, mask, **_):
        return jnp.where(mask, -logp * advantages, 0.0), {}

    plugin = types.SimpleNamespace(
        rlpipe_advantage_estimators=hookimpl(lambda: [AdvantageEstimatorSpec(name="median", description="d", fn=median_baseline)]),
        rlpipe_policy_losses=hookimpl(lambda: [PolicyLossSpec(name="pg", description="d", fn=vanilla_pg)]),
    )
    reg = load_with(plugin)
    estimators = {n: s.fn for n, s in reg.specs("rlpipe_advantage_estimators").items()}
    loss_fns = {n: s.fn for n, s in reg.specs("rlpipe_policy_losses").items()}
    algo = reg.specs("rlpipe_algorithms")["grpo"].factory(GRPOConfig(advantage="median", loss="pg", kl_beta=0.0),
                                                          estimators=estimators, losses=loss_fns)
    rewards = np.array([[0.0, 1.0, 5.0]], np.float32)
    mask = np.ones((1, 3, 2), bool)
    a = np.asarray(algo.advantages(rewards, mask))
    np.testing.assert_allclose(a[0, :, 0], [-1.0, 0.0, 4.0])
    logp = np.full(mask.shape, -1.0, np.float32)
    loss, metrics = algo.loss(logp, {"completion_mask": mask, "old_logprobs": logp, "advantages": a})
    assert float(loss) == pytest.approx(float(np.mean(np.sum(a, -1) / 2)))  # seq-mean-token-mean of -logp * A
    assert set(metrics) == {"pg_loss", "loss"}
    # The hookspec's example estimator: one advantage per completion, all keywords.
    batch_mean = Algorithm(AlgorithmConfig(advantage="mean"), estimators={"mean": lambda rewards, **_: rewards - rewards.mean()})
    np.testing.assert_allclose(np.asarray(batch_mean.advantages(rewards, mask))[0], [[-2.0] * 2, [-1.0] * 2, [3.0] * 2])
    with pytest.raises(ConfigError, match="dual_clip"):
        Algorithm(AlgorithmConfig(loss="pg", dual_clip=2.0), losses={"pg": lambda logp, old_logp, advantages, mask, eps_low, eps_high: 0})


@pytest.mark.skipif(not ALGORITHMS_ENTRY_POINT_INSTALLED, reason="pyproject.toml lacks the entry point algorithms = 'rlpipe.plugins.algorithms' (or rlpipe is not reinstalled)")
def test_builtin_algorithms_come_from_rlpipes_own_entry_point(registry):
    provided = registry.provided("rlpipe_algorithms")
    assert set(PRESETS) <= set(provided)
    assert all(provided[n].plugin.source.builtin for n in PRESETS)
    assert registry.provided("rlpipe_advantage_estimators")["grpo"].plugin.source.builtin


def test_the_docs_plugin_example_works():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "algorithms.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", doc, re.S) if "def rlpipe_algorithms" in block)
    plugin = types.ModuleType("docs_example_plugin")
    exec(compile(code, "docs/algorithms.md", "exec"), plugin.__dict__)  # noqa: S102 - our own docs
    reg = load_with(plugin)
    spec = reg.specs("rlpipe_algorithms")["median-pg"]
    options = structure({}, spec.config_type, ("algorithm", "options"))
    algo = spec.factory(options, estimators={n: s.fn for n, s in reg.specs("rlpipe_advantage_estimators").items()},
                        losses={n: s.fn for n, s in reg.specs("rlpipe_policy_losses").items()})
    a = np.asarray(algo.advantages(np.array([[0.0, 1.0, 5.0]], np.float32), np.ones((1, 3, 2), bool)))
    np.testing.assert_allclose(a[0, :, 0], [-1.0, 0.0, 4.0])
    assert algo.policy_loss is reg.specs("rlpipe_policy_losses")["pg"].fn
