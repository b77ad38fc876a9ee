"""The decoder and the KV-cache generator against full-sequence forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_fixtures import MASK, PROMPTS
from flax import nnx

from rlpipe.core.placement import MeshSpec, RolePlacement, make_mesh
from rlpipe.models import LayerCache, init_cache
from rlpipe.models.decoder import sequence_logprobs
from rlpipe.models.generation import (
    Engine,
    SamplingParams,
    _truncate,
    bucket_length,
    left_pad,
    sample,
)
from rlpipe.models.loading import init_sharded


def state(model):
    return nnx.split(model)[1]


@pytest.mark.slow
def test_cached_decoding_equals_the_full_forward(model):
    toks = jnp.array([[1, 2, 3, 4, 5, 6]])
    cache = init_cache(model.config, 1, 6)
    valid = jnp.zeros((1, 6), bool).at[:, :2].set(True)
    logits, cache = model.forward(toks[:, :2], jnp.arange(2)[None], valid, cache, 0)
    steps = [logits]
    for t in range(2, 6):
        valid = valid.at[:, t].set(True)
        logits, cache = model.forward(toks[:, t:t + 1], jnp.full((1, 1), t), valid, cache, t)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), model(toks), atol=1e-5)


def test_layer_cache_slot_helpers_move_the_same_slots_of_keys_and_values(model):
    """Keys are slots-minor, values head-dim-minor: prefix / grow / put_prefix
    address slot ``t`` of both alike (checked against numpy on the slot-major view)."""
    c = model.config
    [cache, *_] = init_cache(c, 3, 5)
    assert cache.k.shape == (3, c.num_kv_heads, c.dim_per_head, 5)
    assert cache.v.shape == (3, c.num_kv_heads, 5, c.dim_per_head) and cache.slots == 5
    rng = np.random.default_rng(0)
    full = LayerCache(jnp.asarray(rng.standard_normal(cache.k.shape), jnp.float32),
                      jnp.asarray(rng.standard_normal(cache.v.shape), jnp.float32))
    slot_major = lambda x: (np.swapaxes(np.asarray(x.k), 2, 3), np.asarray(x.v))  # both [rows, heads, slots, dim]
    keys, values = slot_major(full)
    for got, want in zip(slot_major(full.prefix(2)), (keys[:, :, :2], values[:, :, :2])):
        np.testing.assert_array_equal(got, want)
    grown = full.grow(8)
    assert grown.slots == 8
    for got, want in zip(slot_major(grown), (keys, values)):
        np.testing.assert_array_equal(got[:, :, :5], want)
        assert not np.any(got[:, :, 5:])
    part = full.prefix(2)  # every row's first two slots
    onto = LayerCache(jnp.zeros_like(full.k), jnp.zeros_like(full.v))
    for got, want in zip(slot_major(onto.put_prefix(part)), (keys, values)):
        np.testing.assert_array_equal(got[:, :, :2], want[:, :, :2])
        assert not np.any(got[:, :, 2:])
    # rows: part's row 0 -> row 2, row 1 -> row 0, row 2 dropped (out of range)
    for got, want in zip(slot_major(onto.put_prefix(part, rows=jnp.array([2, 0, 3]))), (keys, values)):
        np.testing.assert_array_equal(got[2, :, :2], want[0, :, :2])
        np.testing.assert_array_equal(got[0, :, :2], want[1, :, :2])
        assert not np.any(got[1]) and not np.any(got[:, :, 2:])


@pytest.mark.slow
def test_left_padding_does_not_change_the_logits(model):
    padded = model(jnp.array([[0, 0, 0, 1, 2, 3]]), jnp.array([[0, 0, 0, 1, 1, 1]]))[0, 3:]
    np.testing.assert_allclose(padded, model(jnp.array([[1, 2, 3]]))[0], atol=1e-5)


def full_logits(model, out, length=5):
    """Logits of one causal forward over (left-padded prompt + completion): the
    logits at each completion position depend only on what precedes it, so this
    is the reference for every decoding step at once."""
    toks, mask = left_pad(PROMPTS, MASK, length)
    seq = jnp.concatenate([jnp.asarray(toks), jnp.asarray(out.tokens)], axis=1)
    seq_mask = jnp.concatenate([jnp.asarray(mask), jnp.asarray(out.mask)], axis=1)
    return nnx.jit(lambda m, t, k: m(t, k))(model, seq, seq_mask)[:, length - 1:-1]


def test_greedy_decoding_is_the_argmax_of_the_full_forward_at_every_step(model, engine):
    out = engine.generate(state(model), PROMPTS, MASK, jax.random.key(0), SamplingParams(max_new_tokens=7, temperature=0))
    assert out.mask.all()
    np.testing.assert_array_equal(np.argmax(full_logits(model, out), axis=-1), out.tokens)


@pytest.mark.slow
def test_sampled_logprobs_are_the_log_softmax_of_the_forward_logits(model, engine):
    out = engine.generate(state(model), PROMPTS, MASK, jax.random.key(1), SamplingParams(max_new_tokens=6, temperature=1.0))
    comp = jnp.asarray(out.tokens)
    expected = sequence_logprobs(model, jnp.asarray(left_pad(PROMPTS, MASK, 5)[0]), jnp.asarray(left_pad(PROMPTS, MASK, 5)[1]),
                                 comp, jnp.asarray(out.mask))
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-4)
    # and they are a proper sample: not all the argmax
    assert len(np.unique(out.tokens)) > 3


def test_same_seed_same_output_other_seed_other_output(model, engine):
    p = SamplingParams(max_new_tokens=8, temperature=1.0)
    a = engine.generate(state(model), PROMPTS, MASK, jax.random.key(7), p)
    b = engine.generate(state(model), PROMPTS, MASK, jax.random.key(7), p)
    c = engine.generate(state(model), PROMPTS, MASK, jax.random.key(8), p)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_stop_tokens_end_a_row_and_are_kept(model, engine):
    greedy = engine.generate(state(model), PROMPTS, MASK, jax.random.key(0), SamplingParams(max_new_tokens=7, temperature=0))
    stop = int(greedy.tokens[0, 2])  # row 0 emits this at step 2 (maybe earlier too)
    first = int(np.argmax(greedy.tokens[0] == stop))
    out = engine.generate(state(model), PROMPTS, MASK, jax.random.key(0),
                          SamplingParams(max_new_tokens=7, temperature=0, stop_tokens=(stop,), pad_id=0))
    assert out.mask[0, : first + 1].all() and not out.mask[0, first + 1:].any()
    assert out.tokens[0, first] == stop and (out.tokens[0, first + 1:] == 0).all()
    assert (out.logprobs[0, first + 1:] == 0).all()
    for r in range(1, len(PROMPTS)):  # other rows continue unless they hit the stop too
        hit = np.flatnonzero(greedy.tokens[r] == stop)
        end = hit[0] + 1 if hit.size else 7
        np.testing.assert_array_equal(out.tokens[r, :end], greedy.tokens[r, :end])


def test_top_k_keeps_exactly_the_k_largest():
    logits = jnp.array([[0.1, 3.0, 2.0, -1.0, 2.5]])
    kept = np.asarray(_truncate(logits, 2, 1.0)) > -1e30
    np.testing.assert_array_equal(kept, [[False, True, False, False, True]])


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.array([probs]))
    for p, expected in [(0.5, [1, 0, 0, 0]), (0.6, [1, 1, 0, 0]), (0.8, [1, 1, 0, 0]), (0.81, [1, 1, 1, 0]), (1.0, [1, 1, 1, 1])]:
        np.testing.assert_array_equal(np.asarray(_truncate(logits, 0, p))[0] > -1e30, np.array(expected, bool), err_msg=str(p))


def test_sampling_never_picks_a_truncated_token():
    logits = jnp.tile(jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]])), (512, 1))
    toks, _ = sample(logits, jax.random.key(0), SamplingParams(max_new_tokens=1, temperature=1.0, top_k=3, top_p=0.65))
    assert set(np.unique(np.asarray(toks))) == {0, 1}


def test_prompt_buckets_avoid_recompiling(model):
    eng = Engine(nnx.split(model)[0])
    p = SamplingParams(max_new_tokens=3, temperature=0)
    for length in (3, 9, 16):  # all in the 16-token bucket
        eng.generate(state(model), np.ones((2, length), np.int32), np.ones((2, length), np.int32), jax.random.key(0), p)
    assert eng.compiles == 1
    eng.generate(state(model), np.ones((2, 17), np.int32), np.ones((2, 17), np.int32), jax.random.key(0), p)
    assert eng.compiles == 2
    assert [bucket_length(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


@pytest.mark.parametrize("shape", [(2, 4), (8, 1)])
@pytest.mark.slow
def test_generation_on_8_devices_equals_single_device(model, shape):
    mesh = make_mesh(RolePlacement(name="rollout", devices=range(8), mesh=MeshSpec(shape, ("fsdp", "tp"))))
    sharded = init_sharded(model.config, mesh, seed=3)
    g, s = nnx.split(sharded)
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(s))
    fwd = nnx.jit(lambda m, t: m(t))
    np.testing.assert_allclose(fwd(sharded, jnp.asarray(PROMPTS)), fwd(model, jnp.asarray(PROMPTS)), atol=1e-5)
    p = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=20)
    one = Engine(nnx.split(model)[0]).generate(state(model), PROMPTS, MASK, jax.random.key(5), p)
    many = Engine(g).generate(s, PROMPTS, MASK, jax.random.key(5), p,
                              sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    np.testing.assert_array_equal(one.tokens, many.tokens)
    np.testing.assert_allclose(one.logprobs, many.logprobs, atol=1e-4)


def test_left_pad_moves_real_tokens_right():
    toks, mask = left_pad(np.array([[1, 2, 0], [0, 3, 4]]), np.array([[1, 1, 0], [0, 1, 1]]), 4)
    np.testing.assert_array_equal(toks, [[0, 0, 1, 2], [0, 0, 3, 4]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 1, 1]])


# -- a KV cache kept between calls -------------------------------------------------------------


def full_generation(engine, model, contexts, key, params):
    """The reference: each context prefilled from scratch by ``generate``."""
    width = max(len(c) for c in contexts)
    tokens = np.zeros((len(contexts), width), np.int32)
    mask = np.zeros((len(contexts), width), np.int32)
    for r, c in enumerate(contexts):
        tokens[r, :len(c)], mask[r, :len(c)] = c, 1
    return engine.generate(state(model), tokens, mask, key, params)


def test_a_cache_session_generates_what_a_full_prefill_of_each_context_does(model, engine):
    """Three calls on three rows: first prompts, then observations appended
    after part of the generated tokens (the rest forgotten), an idle row, and
    a row that starts over with a new prompt — each row's tokens equal a
    fresh ``generate`` over its whole context, log-probs to float tolerance."""
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    session = engine.open_session(state(model), rows=3, slots=64)
    contexts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    calls = [
        # (chunk per row, reset per row)
        (contexts, [True, True, True]),
        ([[20, 21], [22], []], [False, False, False]),   # row 2 idle
        ([[23], [30, 31, 32], [24, 25]], [False, True, False]),  # row 1: a new episode
    ]
    kept = [[2, 4, 4], [4, 1, 4]]  # how many generated tokens each row keeps after calls 1 and 2
    cached = [0, 0, 0]
    for n, (chunks, reset) in enumerate(calls):
        for r in range(3):
            if reset[r]:
                contexts[r], cached[r] = list(chunks[r]), 0
            elif chunks[r]:
                contexts[r] = contexts[r] + list(chunks[r])
        key = jax.random.key(n)
        got = engine.extend(state(model), session, chunks, np.array(cached), np.array(reset), key, params)
        live = [r for r in range(3) if chunks[r]]
        want = full_generation(engine, model, [contexts[r] for r in live], key, params)
        for i, r in enumerate(live):
            np.testing.assert_array_equal(got.tokens[r], want.tokens[i])
            np.testing.assert_allclose(got.logprobs[r], want.logprobs[i], atol=2e-5)
        assert not got.mask[[r for r in range(3) if not chunks[r]]].any()  # an idle row generates nothing
        if n < len(kept):
            session.keep(np.array(kept[n]))
            for r in live:
                cached[r] = len(contexts[r]) + kept[n][r]
                contexts[r] = contexts[r] + got.tokens[r][:kept[n][r]].tolist()
    assert session.write == 3 * 8 + 3 * 4  # three chunks of the minimum width 8, and 4 new tokens each
    assert not session.fits(8 + 64, params)
    with pytest.raises(ValueError, match="do not fit"):
        engine.extend(state(model), session, [[1] * 30, [], []], np.zeros(3), np.ones(3, bool), jax.random.key(0), params)
