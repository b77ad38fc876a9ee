"""The engine's sampler and decode loop: cheap counter-based noise, top-k / top-p
without sorting the vocabulary, ``ignore_eos``, and the segmented decode loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_fixtures import MASK, PROMPTS
from flax import nnx

from rlpipe.models import generation
from rlpipe.models.generation import (
    Engine,
    SamplingParams,
    _truncate,
    decode_segments,
    left_pad,
    sample,
    shrink_levels,
)
from rlpipe.roles.rollout import RolloutConfig


def reference_truncate(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Which tokens top-k then top-p keep, in numpy (float64), from a full sort."""
    keep = np.ones(logits.shape, bool)
    for r, row in enumerate(logits.astype(np.float64)):
        if 0 < top_k < row.size:
            keep[r] &= row >= np.sort(row)[::-1][top_k - 1]
        if top_p < 1.0:
            masked = np.where(keep[r], row, -np.inf)
            order = np.argsort(-masked, kind="stable")
            probs = np.exp(masked[order] - masked[order[0]])
            probs /= probs.sum()
            before = np.cumsum(probs) - probs
            threshold = masked[order][before < top_p].min()
            keep[r] &= row >= threshold
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 0.3), (0, 0.9), (0, 0.999), (10, 0.5), (300, 0.95), (5, 1.0)])
@pytest.mark.parametrize("spread", [0.1, 1.0, 8.0])
def test_truncation_without_a_full_sort_keeps_what_a_full_sort_keeps(top_k, top_p, spread):
    """Flat logits (spread 0.1: a nucleus of hundreds of tokens) and peaked
    ones (8.0: a few), against a numpy full sort."""
    logits = np.asarray(jax.random.normal(jax.random.key(int(spread * 10) + top_k), (16, 512))) * spread
    got = np.asarray(_truncate(jnp.asarray(logits), top_k, top_p)) > np.finfo(np.float32).min
    want = reference_truncate(logits, top_k, top_p)
    # Float32 against float64: a token whose cumulative mass is within rounding of top_p may differ.
    assert (got != want).sum() <= 2, (got.sum(axis=1), want.sum(axis=1))
    assert (got.sum(axis=1) >= 1).all()


def test_samples_follow_the_softmax():
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    n = 40_000
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 1))
    toks, lp = sample(logits, jax.random.key(3), SamplingParams(max_new_tokens=1, temperature=1.0))
    freq = np.bincount(np.asarray(toks), minlength=5) / n
    assert (np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / n)).all(), freq  # 4 standard errors
    np.testing.assert_allclose(np.asarray(lp), np.log(probs)[np.asarray(toks)], atol=1e-5)


def test_samples_at_a_temperature_follow_the_tempered_softmax():
    logits = jnp.tile(jnp.array([[2.0, 1.0, 0.0]]), (40_000, 1))
    toks, _ = sample(logits, jax.random.key(4), SamplingParams(max_new_tokens=1, temperature=2.0))
    p = np.exp(np.array([1.0, 0.5, 0.0]))
    p /= p.sum()
    np.testing.assert_allclose(np.bincount(np.asarray(toks), minlength=3) / 40_000, p, atol=0.01)


def test_a_rows_sample_depends_on_its_index_and_step_not_on_the_other_rows():
    logits = jax.random.normal(jax.random.key(0), (12, 64))
    params = SamplingParams(max_new_tokens=1, temperature=1.0)
    key = jax.random.key(9)
    whole, _ = sample(logits, key, params, step=5)
    part, _ = sample(logits[:5], key, params, step=5)  # fewer rows (no padding rows)
    np.testing.assert_array_equal(part, whole[:5])
    perm = np.random.default_rng(0).permutation(12)
    moved, _ = sample(logits[perm], key, params, index=jnp.asarray(perm), step=jnp.full((12,), 5))
    np.testing.assert_array_equal(moved, np.asarray(whole)[perm])  # another batch slot, same draw
    other_step, _ = sample(logits, key, params, step=6)
    other_key, _ = sample(logits, jax.random.key(10), params, step=5)
    assert not np.array_equal(other_step, whole) and not np.array_equal(other_key, whole)


def test_a_raw_uint32_key_works_too():
    logits = jax.random.normal(jax.random.key(0), (4, 32))
    toks, _ = sample(logits, jax.random.PRNGKey(1), SamplingParams(max_new_tokens=1))
    assert toks.shape == (4,)


def test_ignore_eos_generates_every_token(model, engine):
    state = nnx.split(model)[1]
    greedy = engine.generate(state, PROMPTS, MASK, jax.random.key(0), SamplingParams(max_new_tokens=6, temperature=0))
    stops = tuple(int(t) for t in greedy.tokens[:, 1])
    stopped = engine.generate(state, PROMPTS, MASK, jax.random.key(0),
                              SamplingParams(max_new_tokens=6, temperature=0, stop_tokens=stops))
    assert not stopped.mask.all()
    ignored = engine.generate(state, PROMPTS, MASK, jax.random.key(0),
                              SamplingParams(max_new_tokens=6, temperature=0, stop_tokens=stops, ignore_eos=True))
    assert ignored.mask.all()
    np.testing.assert_array_equal(ignored.tokens, greedy.tokens)


def test_rollout_config_has_ignore_eos_off_by_default():
    assert RolloutConfig().ignore_eos is False
    assert RolloutConfig(ignore_eos=True).ignore_eos is True


def test_decode_segments_cover_every_step_with_growing_caches():
    for prompt, new in [(16, 16), (64, 256), (16, 300), (32, 1), (128, 64)]:
        segments = decode_segments(prompt, new)
        assert segments[-1] == (new, prompt + new)
        ends, slots = zip(*segments)
        assert list(ends) == sorted(set(ends)) and list(slots) == sorted(set(slots))
        assert all(prompt + end <= s for end, s in segments)  # each segment's writes fit in its cache


def test_greedy_decoding_across_segments_is_the_argmax_of_the_full_forward(model, engine):
    """60 new tokens after a 16-slot prompt bucket: three segments (32, 64, 76 slots)."""
    assert len(decode_segments(16, 60)) == 3
    out = engine.generate(nnx.split(model)[1], PROMPTS, MASK, jax.random.key(0),
                          SamplingParams(max_new_tokens=60, temperature=0))
    toks, mask = left_pad(PROMPTS, MASK, 5)
    seq = jnp.concatenate([jnp.asarray(toks), jnp.asarray(out.tokens)], axis=1)
    seq_mask = jnp.concatenate([jnp.asarray(mask), jnp.asarray(out.mask)], axis=1)
    full = nnx.jit(lambda m, t, k: m(t, k))(model, seq, seq_mask)[:, 4:-1]
    np.testing.assert_array_equal(np.argmax(full, axis=-1), out.tokens)


# -- continuous batching ---------------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.0, 0), (0.8, 20)])
def test_refilled_generation_equals_generation_of_every_prompt_at_once(model, engine, temperature, top_k):
    """13 prompts of mixed lengths on 4 batch slots: rows end at stop tokens
    (or the budget) and their slots take the next prompt; every prompt's
    completion equals what one ``generate`` over all 13 gives it."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, 128, size=(13, 9)).astype(np.int32)
    mask = np.ones_like(prompts)
    mask[3, :5] = 0
    mask[7, :8] = 0
    params = SamplingParams(max_new_tokens=20, temperature=temperature, top_k=top_k, stop_tokens=(5, 7, 9, 11, 13))
    state = nnx.split(model)[1]
    want = engine.generate(state, prompts, mask, jax.random.key(1), params)
    got = engine.generate_refill(state, prompts, mask, jax.random.key(1), params, rows=4, refill_every=4)
    if temperature:
        lengths = want.mask.sum(axis=1)
        assert lengths.min() < 20 and (lengths == 20).any()  # rows do end at different steps
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_refilled_generation_with_more_slots_than_prompts(model, engine):
    state = nnx.split(model)[1]
    params = SamplingParams(max_new_tokens=5, temperature=1.0)
    want = engine.generate(state, PROMPTS, MASK, jax.random.key(2), params)
    got = engine.generate_refill(state, PROMPTS, MASK, jax.random.key(2), params, rows=8)
    np.testing.assert_array_equal(got.tokens, want.tokens)


# -- fewer rows as rows finish (generate's shrinking batch) ---------------------------------


def test_shrink_levels_halve_down_to_eight_rows():
    assert shrink_levels(64) == (64, 32, 16, 8)
    assert shrink_levels(24) == (24, 12)
    assert shrink_levels(16) == (16, 8)
    assert shrink_levels(15) == (15,) and shrink_levels(13) == (13,) and shrink_levels(8) == (8,)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.8, 20)])
def test_a_shrinking_batch_samples_what_the_full_batch_samples(model, monkeypatch, temperature, top_k):
    """32 rows ending at stop tokens at different steps: once no more than 16
    (then 8) are live, generate goes on with 16 (then 8) rows; every row's
    completion is the one the full batch gives it (and continuous batching)."""
    rng = np.random.default_rng(4)
    prompts = rng.integers(1, 128, size=(32, 6)).astype(np.int32)
    mask = np.ones_like(prompts)
    mask[5, :3] = 0
    params = SamplingParams(max_new_tokens=48, temperature=temperature, top_k=top_k,
                            stop_tokens=(5, 7, 9, 11, 13, 17, 19, 23))
    state = nnx.split(model)[1]
    got = Engine(nnx.split(model)[0]).generate(state, prompts, mask, jax.random.key(3), params)
    lengths = got.mask.sum(axis=1)
    assert np.sort(lengths)[-9] < lengths.max()  # at most 8 rows live for a while: the 8-row batch runs
    refill = Engine(nnx.split(model)[0]).generate_refill(state, prompts, mask, jax.random.key(3), params, rows=8)
    monkeypatch.setattr(generation, "shrink_levels", lambda rows, minimum=8: (rows,))
    want = Engine(nnx.split(model)[0]).generate(state, prompts, mask, jax.random.key(3), params)
    for other in (want, refill):
        np.testing.assert_array_equal(got.mask, other.mask)
        np.testing.assert_array_equal(got.tokens, other.tokens)
        np.testing.assert_allclose(got.logprobs, other.logprobs, atol=1e-5)


# -- each prompt prefilled once for its group (generate(..., repeat=g)) -------------------


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 20), (0.0, 0)])
def test_repeat_equals_generating_the_repeated_prompts(model, engine, temperature, top_k):
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_k=top_k)
    state = nnx.split(model)[1]
    rows = engine.generate(state, np.repeat(PROMPTS, 4, axis=0), np.repeat(MASK, 4, axis=0), jax.random.key(5), params)
    grouped = engine.generate(state, PROMPTS, MASK, jax.random.key(5), params, repeat=4)
    assert grouped.tokens.shape == (12, 10)
    np.testing.assert_array_equal(rows.tokens, grouped.tokens)
    np.testing.assert_array_equal(rows.mask, grouped.mask)
    np.testing.assert_allclose(rows.logprobs, grouped.logprobs, atol=1e-5)
    if temperature > 0:  # the copies sample independently: a group's completions differ
        assert len({tuple(t) for t in grouped.tokens[4:8]}) > 1


def test_repeat_must_be_positive(model, engine):
    with pytest.raises(ValueError, match="repeat must be at least 1, got 0"):
        engine.generate(nnx.split(model)[1], PROMPTS, MASK, jax.random.key(0), SamplingParams(max_new_tokens=2), repeat=0)


def test_the_rollout_prefills_each_prompt_once_when_its_engine_can(registry, monkeypatch):
    from helpers import config

    from rlpipe import Batch, BuildContext, StageContext
    from rlpipe.core.placement import MeshSpec, RolePlacement
    from rlpipe.roles.rollout_stage import RolloutStage

    cfg = config(registry, {"roles": {"rollout": {"num_generations": 3, "max_new_tokens": 4}}})
    placement = RolePlacement(name="rollout", devices=range(1), mesh=MeshSpec((1, 1), ("fsdp", "tp")))
    stage = RolloutStage(cfg.roles["rollout"], placement,
                         context=BuildContext(run_config=cfg, registry=registry, seed=cfg.train.seed))
    assert stage.engine_repeats
    calls = []
    real = stage.engine.generate

    def spy(state, tokens, mask, key, params, **kw):
        calls.append((np.shape(tokens)[0], kw.get("repeat", 1)))
        return real(state, tokens, mask, key, params, **kw)

    stage.engine.generate = spy
    batch = Batch(prompt_tokens=PROMPTS, prompt_mask=MASK)
    context = StageContext(role="rollout", step=0, index=0, seed=0, behavior_version=0)
    grouped = stage.process(batch, context=context)
    assert calls == [(3, 3)] and grouped["completion_tokens"].shape == (3, 3, 4)
    # An engine whose generate has no ``repeat`` gets the repeated prompts, with the same result.
    stage.engine.generate = lambda state, tokens, mask, key, params, sharding=None: spy(state, tokens, mask, key, params,
                                                                                       sharding=sharding)
    stage.engine_repeats = False
    again = stage.process(batch, context=context)
    assert calls[-1] == (9, 1)
    np.testing.assert_array_equal(grouped["completion_tokens"], again["completion_tokens"])
