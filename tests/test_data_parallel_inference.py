"""Data-parallel inference: the rollout and reference stages split rows (the
batch dimension of the prompts, the KV cache, the logits and the outputs) over
their mesh's ``fsdp`` axis, padding the rows to a multiple of its size, and
give the same completions and log-probs as on one device."""

import jax
import numpy as np
import pytest
from helpers import config

from rlpipe import Batch, BuildContext, StageContext
from rlpipe.core.placement import MeshSpec, RolePlacement
from rlpipe.models.generation import Engine, SamplingParams, row_shards
from rlpipe.models.tokenizer import load_tokenizer
from rlpipe.roles.reference_stage import ReferenceStage
from rlpipe.roles.rollout_stage import RolloutStage
from rlpipe.runtime import distributed

#: End to end: every test here trains, resumes or runs processes (`-m "not slow"` skips them).
pytestmark = pytest.mark.slow

G, N = 3, 8  # 5 prompts x 3 generations = 15 rows: not a multiple of 8, so rows are padded


@pytest.fixture(scope="module")
def registry_module():
    from rlpipe.core.plugins import load_registry

    return load_registry(warn=lambda m: None)


def run_config(registry, temperature):
    return config(registry, {"roles": {"rollout": {"num_generations": G, "max_new_tokens": N, "temperature": temperature,
                                                   "top_k": 20},
                                       "reference": {"micro_batch_size": 8}}})


def build(cls, registry, cfg, role, shape):
    placement = RolePlacement(name=role, devices=range(shape[0] * shape[1]), mesh=MeshSpec(shape, ("fsdp", "tp")))
    return cls(cfg.roles[role], placement, context=BuildContext(run_config=cfg, registry=registry, seed=cfg.train.seed))


def prompts():
    tok = load_tokenizer("char")
    ids = [tok.encode(t) for t in ["12+7=", "reverse 345:", "9*9=", "a", "copy hello world:"]]
    width = max(map(len, ids))
    toks = np.zeros((len(ids), width), np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    for i, row in enumerate(ids):
        toks[i, :len(row)], mask[i, :len(row)] = row, 1
    return Batch(prompt_tokens=toks, prompt_mask=mask)


def ctx(role):
    return StageContext(role=role, step=3, index=1, seed=0, behavior_version=0)


@pytest.fixture
def puts(monkeypatch):
    """What the stages place on their devices: the arrays ``distributed.put`` returns."""
    placed = []
    real = distributed.put

    def put(tree, sharding):
        out = real(tree, sharding)
        placed.append((sharding, out))
        return out

    monkeypatch.setattr(distributed, "put", put)
    return placed


def per_device_rows(array):
    """The rows of ``array`` on each of its devices."""
    shards = array.addressable_shards
    assert len({s.device for s in shards}) == len(shards)
    return sorted(s.data.shape[0] for s in shards)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollout_on_8_devices_splits_rows_and_equals_one_device(registry_module, puts, temperature):
    cfg = run_config(registry_module, temperature)
    one = build(RolloutStage, registry_module, cfg, "rollout", (1, 1))
    eight = build(RolloutStage, registry_module, cfg, "rollout", (8, 1))
    a = one.process(prompts(), context=ctx("rollout"))
    puts.clear()
    b = eight.process(prompts(), context=ctx("rollout"))
    np.testing.assert_array_equal(a["completion_tokens"], b["completion_tokens"])
    np.testing.assert_array_equal(a["completion_mask"], b["completion_mask"])
    np.testing.assert_allclose(a["rollout_logprobs"], b["rollout_logprobs"], atol=1e-5)
    assert b["completion_tokens"].shape == (5, G, N)
    # The prompts went in split by rows: 15 rows padded to 16, 2 per device.
    [(sharding, (tokens, mask, *_))] = puts
    assert row_shards(sharding) == 8
    assert tokens.shape[0] == 16 and per_device_rows(tokens) == [2] * 8 == per_device_rows(mask)


def test_rollout_prefilling_each_prompt_once_splits_rows_and_equals_one_device(registry_module, puts):
    """4 prompts over fsdp=4: the prompts themselves split evenly, so each is
    prefilled once and its cache copied to its G rows on its own device."""
    cfg = run_config(registry_module, 1.0)
    one = build(RolloutStage, registry_module, cfg, "rollout", (1, 1))
    four = build(RolloutStage, registry_module, cfg, "rollout", (4, 1))
    full = prompts()
    batch = Batch(prompt_tokens=full["prompt_tokens"][:4], prompt_mask=full["prompt_mask"][:4])
    a = one.process(batch, context=ctx("rollout"))
    puts.clear()
    b = four.process(batch, context=ctx("rollout"))
    np.testing.assert_array_equal(a["completion_tokens"], b["completion_tokens"])
    np.testing.assert_allclose(a["rollout_logprobs"], b["rollout_logprobs"], atol=1e-5)
    [(sharding, (tokens, mask, done))] = puts
    assert row_shards(sharding) == 4
    assert per_device_rows(tokens) == [1] * 4 == per_device_rows(mask)  # one prompt per device, prefilled once
    assert per_device_rows(done) == [G] * 4  # and its G rows on that device


def test_rollout_kv_cache_holds_an_eighth_of_the_rows_per_device(registry_module):
    cfg = run_config(registry_module, 1.0)
    stage = build(RolloutStage, registry_module, cfg, "rollout", (8, 1))
    batch = prompts()
    toks, mask = np.repeat(batch["prompt_tokens"], G, axis=0), np.repeat(batch["prompt_mask"], G, axis=0)
    # The prefill of the program `generate` runs, with the sharding the stage generates with.
    # 17 prompt tokens at most: the 32-token bucket.
    cache, valid = stage.engine.prefill_cache(stage.holder.state, toks, mask, stage.params, sharding=stage.holder.rows)
    c = stage.holder.config
    for layer in cache:
        # keys slots-minor, values head-dim-minor (LayerCache)
        for x, shape in ((layer.k, (c.num_kv_heads, c.dim_per_head, 32 + N)),
                         (layer.v, (c.num_kv_heads, 32 + N, c.dim_per_head))):
            assert x.shape == (16, *shape)
            assert [s.data.shape for s in x.addressable_shards] == [(2, *shape)] * 8
            assert len(x.sharding.device_set) == 8
    assert per_device_rows(valid) == [2] * 8


def test_rollout_on_a_4x2_mesh_with_tp_equals_one_device(registry_module, puts):
    cfg = run_config(registry_module, 1.0)
    one = build(RolloutStage, registry_module, cfg, "rollout", (1, 1))
    mixed = build(RolloutStage, registry_module, cfg, "rollout", (4, 2))
    a = one.process(prompts(), context=ctx("rollout"))
    puts.clear()
    b = mixed.process(prompts(), context=ctx("rollout"))
    np.testing.assert_array_equal(a["completion_tokens"], b["completion_tokens"])
    np.testing.assert_allclose(a["rollout_logprobs"], b["rollout_logprobs"], atol=1e-5)
    [(sharding, (tokens, *_))] = puts
    assert row_shards(sharding) == 4
    assert per_device_rows(tokens) == [4] * 8  # 16 rows over fsdp=4, each row block on both tp devices
    cache, _ = mixed.engine.prefill_cache(mixed.holder.state, np.repeat(prompts()["prompt_tokens"], G, axis=0),
                                          np.repeat(prompts()["prompt_mask"], G, axis=0), mixed.params,
                                          sharding=mixed.holder.rows)
    assert all(s.data.shape[0] == 4 for s in cache[0].k.addressable_shards)


def test_reference_on_8_devices_splits_rows_and_equals_one_device(registry_module, puts):
    cfg = run_config(registry_module, 1.0)
    rollout = build(RolloutStage, registry_module, cfg, "rollout", (1, 1))
    batch = rollout.process(prompts(), context=ctx("rollout"))
    one = build(ReferenceStage, registry_module, cfg, "reference", (1, 1))
    eight = build(ReferenceStage, registry_module, cfg, "reference", (8, 1))
    a = one.process(batch, context=ctx("reference"))["ref_logprobs"]
    puts.clear()
    b = eight.process(batch, context=ctx("reference"))["ref_logprobs"]
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(b, batch["rollout_logprobs"], atol=1e-4)  # the same policy scored it
    assert len(puts) == 2  # 15 rows: two micro-batches of 8
    for sharding, arrays in puts:
        assert row_shards(sharding) == 8
        assert all(per_device_rows(x) == [1] * 8 for x in arrays)


def test_sampled_rows_do_not_depend_on_padding_rows(registry_module):
    """Each row samples with its own key: adding rows leaves the others' samples as they were."""
    cfg = run_config(registry_module, 1.0)
    stage = build(RolloutStage, registry_module, cfg, "rollout", (1, 1))
    engine = Engine(stage.holder.graphdef)
    batch = prompts()
    params = SamplingParams(max_new_tokens=N, temperature=1.0)
    key = jax.random.key(7)
    few = engine.generate(stage.holder.state, batch["prompt_tokens"][:3], batch["prompt_mask"][:3], key, params)
    more = engine.generate(stage.holder.state, batch["prompt_tokens"], batch["prompt_mask"], key, params)
    np.testing.assert_array_equal(few.tokens, more.tokens[:3])
    np.testing.assert_allclose(few.logprobs, more.logprobs[:3], atol=1e-6)


def test_cache_sessions_split_rows_and_equal_one_device(registry_module):
    """Agentic episodes' cache sessions: 3 rows padded to 8, one per device, across donated calls."""
    from rlpipe.models.generation import row_sharding

    cfg = run_config(registry_module, 1.0)
    outs = []
    for shape in ((1, 1), (8, 1)):
        stage = build(RolloutStage, registry_module, cfg, "rollout", shape)
        sharding = row_sharding(stage.holder.mesh)
        engine, state, params = stage.engine, stage.holder.state, SamplingParams(max_new_tokens=4, temperature=1.0)
        session = engine.open_session(state, 3, 64, sharding=sharding)
        key = jax.random.key(11)
        first = engine.extend(state, session, [[5, 6, 7], [8, 9], [10, 11, 12, 13]], np.zeros(3, np.int32),
                              np.ones(3, bool), key, params, sharding=sharding)
        session.keep(np.array([4, 2, 0]))
        start = np.array([3 + 4, 2 + 2, 4], np.int32)
        second = engine.extend(state, session, [[20], [21, 22], [23]], start, np.zeros(3, bool),
                               jax.random.fold_in(key, 1), params, sharding=sharding)
        outs.append((first, second))
        if shape == (8, 1):
            assert session.cache_rows == 8 and first.tokens.shape == (3, 4)
            for x in (session.cache[0].k, session.valid):
                assert per_device_rows(x) == [1] * 8
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
