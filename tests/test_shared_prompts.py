"""sequence_logprobs with each prompt given once for a group of completions
(GRPO's rows): the same log-probs, entropies and gradients as the repeated
prompts, with the prompts' tokens computed once per group."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlpipe.models import PRESETS, build, decoder
from rlpipe.models.decoder import sequence_logprobs
from rlpipe.models.lora import LoRAConfig, LoRAParam, apply_lora

P, G, LP, LC = 3, 4, 7, 5


def _batch(vocab, seed=0, lc=LC):
    """Left-padded prompts of different lengths; completions with masked tails."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, vocab, (P, LP)).astype(np.int32)
    pmask = np.ones((P, LP), bool)
    pmask[1, :3] = False  # a shorter prompt
    pmask[2, :1] = False
    prompt[~pmask] = 0
    completion = rng.integers(1, vocab, (P * G, lc)).astype(np.int32)
    cmask = np.ones((P * G, lc), bool)
    cmask[1, 3:] = False  # completions that ended early
    cmask[6, 1:] = False
    cmask[11, 4:] = False
    return prompt, pmask, completion, cmask


def _both(model, prompt, pmask, completion, cmask, **kw):
    shared = sequence_logprobs(model, prompt, pmask, completion, cmask, **kw)
    repeated = sequence_logprobs(model, np.repeat(prompt, G, 0), np.repeat(pmask, G, 0), completion, cmask, **kw)
    return shared, repeated


@pytest.fixture(scope="module")
def model():
    return build(PRESETS["tiny"], seed=0)


@pytest.mark.parametrize("remat", [False, True])
def test_shared_prompts_give_the_repeated_prompts_logprobs_and_entropy(model, remat):
    batch = _batch(model.config.vocab_size)
    (lp, ent), (lp_r, ent_r) = _both(model, *batch, temperature=0.7, with_entropy=True, remat=remat)
    assert lp.shape == (P * G, LC)
    np.testing.assert_allclose(lp, lp_r, atol=2e-5)
    np.testing.assert_allclose(ent, ent_r, atol=2e-5)
    assert not np.any(np.asarray(lp)[~batch[3]])


@pytest.mark.parametrize("remat", [False, True])
def test_shared_prompts_give_the_repeated_prompts_gradients(model, remat):
    graphdef, state = nnx.split(model)
    prompt, pmask, completion, cmask = _batch(model.config.vocab_size, seed=1)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal((P * G, LC)), jnp.float32)

    def loss(state, prompt, pmask):
        lp, ent = sequence_logprobs(nnx.merge(graphdef, state), prompt, pmask, completion, cmask,
                                    with_entropy=True, remat=remat)
        return (lp * weights).sum() + 0.1 * ent.sum()

    shared = jax.grad(loss)(state, prompt, pmask)
    repeated = jax.grad(loss)(state, np.repeat(prompt, G, 0), np.repeat(pmask, G, 0))
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(repeated)):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


def test_shared_prompts_with_blocked_attention(model, monkeypatch):
    """Long sequences run attention in query blocks: the completion's queries are
    then the last positions of a longer key sequence, blocked too."""
    lc, heads = 20, model.config.num_heads
    monkeypatch.setattr(decoder, "ATTENTION_BLOCK_ELEMENTS", P * G * heads * (LP + lc) * 16)
    assert decoder.attention_query_block(P * G, heads, LP + lc) == 16  # 2 blocks of the 20 completion queries
    lp, lp_r = _both(model, *_batch(model.config.vocab_size, lc=lc))
    np.testing.assert_allclose(lp, lp_r, atol=2e-5)


def test_shared_prompts_with_lora(model):
    lora = apply_lora(build(PRESETS["tiny"], seed=0), LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(3))
    graphdef, adapters, base = nnx.split(lora, LoRAParam, ...)
    # adapters that do something (B starts at zero)
    adapters = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(4), a.shape, a.dtype), adapters)
    lp, lp_r = _both(nnx.merge(graphdef, adapters, base), *_batch(model.config.vocab_size, seed=5))
    np.testing.assert_allclose(lp, lp_r, atol=2e-5)


def test_prompts_that_do_not_divide_the_rows_are_an_error(model):
    prompt, pmask, completion, cmask = _batch(model.config.vocab_size)
    with pytest.raises(ValueError, match="equal groups"):
        sequence_logprobs(model, prompt[:2], pmask[:2], completion[:11], cmask[:11])


def test_shared_prompts_compute_each_prompt_token_once(model):
    """The program's projections run over P * LP + P * G * LC tokens, not P * G * (LP + LC)."""
    prompt, pmask, completion, cmask = _batch(model.config.vocab_size)
    c = model.config

    def rows_of_q_proj(prompt, pmask):
        jaxpr = jax.make_jaxpr(lambda p, m: sequence_logprobs(model, p, m, completion, cmask))(prompt, pmask)
        width = c.num_heads * c.dim_per_head
        return sorted({e.invars[0].aval.shape[0] for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
                       and e.outvars[0].aval.shape[-1] == width and e.invars[1].aval.shape == (c.hidden_size, width)})

    assert rows_of_q_proj(prompt, pmask) == [P * LP + P * G * LC]
    assert rows_of_q_proj(np.repeat(prompt, G, 0), np.repeat(pmask, G, 0)) == [P * G * (LP + LC)]


# -- the stages: micro-batches of whole groups give each prompt once ------------------------------


def _prompt_rows(monkeypatch):
    """Per call of ``distributed.put`` that places prompts: (prompt rows, completion rows)."""
    from rlpipe.runtime import distributed

    placed, real = [], distributed.put

    def put(tree, sharding):
        if isinstance(tree, dict) and "prompt" in tree:  # the trainer's micro-batches
            placed.append((len(tree["prompt"]), len(tree["completion"])))
        elif isinstance(tree, list) and len(tree) == 4:  # the reference's: prompts, masks, completions, masks
            placed.append((len(tree[0]), len(tree[2])))
        return real(tree, sharding)

    monkeypatch.setattr(distributed, "put", put)
    return placed


def _group_batch(prompts=4, group=4, n=6, *, scored=True):
    from rlpipe import Batch

    rng = np.random.default_rng(3)
    prompt = rng.integers(5, 90, size=(prompts, 5)).astype(np.int32)
    pmask = np.ones_like(prompt)
    pmask[1, :2] = 0
    comp = rng.integers(5, 90, size=(prompts, group, n)).astype(np.int32)
    cmask = (np.arange(n) < rng.integers(1, n + 1, (prompts, group))[..., None]).astype(np.int32)
    ref = {"ref_logprobs": rng.normal(-2.0, 0.3, comp.shape).astype(np.float32)} if scored else {}
    return Batch(prompt_tokens=prompt, prompt_mask=pmask, completion_tokens=comp, completion_mask=cmask,
                 rollout_logprobs=rng.normal(-2.0, 0.3, comp.shape).astype(np.float32), **ref,
                 rewards=rng.random((prompts, group)).astype(np.float32), policy_version=np.zeros((prompts,), np.int32))


def _stage(cls, registry, role, devices, overrides, **kw):
    from helpers import config

    from rlpipe import BuildContext
    from rlpipe.core.placement import MeshSpec, RolePlacement

    cfg = config(registry, overrides)
    placement = RolePlacement(name=role, devices=range(devices), mesh=MeshSpec((devices, 1), ("fsdp", "tp")))
    return cls(cfg.roles[role], placement, context=BuildContext(run_config=cfg, registry=registry, seed=0), **kw)


#: (devices, micro-batch rows): 2 groups of 4 on one device; 4 groups over 4 devices, one each.
MESHES = [(1, 8), (4, 16)]


@pytest.mark.parametrize(("devices", "mb"), MESHES)
def test_the_trainer_update_with_shared_prompts_equals_the_repeated_one(registry, monkeypatch, devices, mb):
    from helpers import config

    from rlpipe import StageContext
    from rlpipe.roles.trainer_stage import TrainerStage
    from rlpipe.runtime.planning import make_algorithm

    overrides = {"roles": {"trainer": {"optimizer": "sgd", "grad_clip": 0.0, "learning_rate": 1.0,
                                       "micro_batch_size": mb, "mini_batch_size": None, "num_iterations": None}}}
    deltas, placed, calls = [], {}, _prompt_rows(monkeypatch)
    for share in (True, False):
        _, algorithm = make_algorithm(config(registry, overrides), registry)
        monkeypatch.setattr(TrainerStage, "share_prompts", share)
        t = _stage(TrainerStage, registry, "trainer", devices, overrides, algorithm=algorithm)
        before = [np.asarray(x) for x in jax.tree.leaves(t.params)]
        calls.clear()
        t.process(_group_batch(), context=StageContext(role="trainer", step=0, index=0))
        t.on_barrier(context=StageContext(role="trainer", step=0))
        placed[share] = list(calls)
        deltas.append([np.asarray(a) - b for a, b in zip(jax.tree.leaves(t.params), before)])
    assert set(placed[True]) == {(mb // 4, mb)} and set(placed[False]) == {(mb, mb)}
    scale = max(float(np.abs(d).max()) for d in deltas[1])
    for a, b in zip(*deltas):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(("devices", "mb"), MESHES)
def test_reference_logprobs_with_shared_prompts_equal_the_repeated_ones(registry, monkeypatch, devices, mb):
    from rlpipe import StageContext
    from rlpipe.roles.reference_stage import ReferenceStage

    overrides = {"roles": {"reference": {"micro_batch_size": mb}}}
    out, placed, calls = {}, {}, _prompt_rows(monkeypatch)
    for share in (True, False):
        monkeypatch.setattr(ReferenceStage, "share_prompts", share)
        stage = _stage(ReferenceStage, registry, "reference", devices, overrides)
        calls.clear()
        batch = _group_batch(prompts=3, scored=False)  # 12 rows: padded to whole micro-batches
        out[share] = stage.process(batch, context=StageContext(role="reference", step=0, index=0))["ref_logprobs"]
        placed[share] = list(calls)
    assert set(placed[True]) == {(mb // 4, mb)} and set(placed[False]) == {(mb, mb)}
    np.testing.assert_allclose(out[True], out[False], atol=2e-5)
    assert not np.any(out[True][~batch["completion_mask"].astype(bool)])


@pytest.mark.parametrize("mb", [8, 3])  # whole groups of 4 (shared), or not (repeated: 12 rows padded to 15)
def test_critic_values_and_update_with_shared_prompts_equal_the_repeated_ones(registry, monkeypatch, mb):
    import jax

    from rlpipe import StageContext
    from rlpipe.roles.critic_stage import CriticStage

    overrides = {"algorithm": {"name": "ppo"}, "roles": {"critic": {"learning_rate": 1e-2, "micro_batch_size": mb}}}
    values, params, placed, calls = {}, {}, {}, _prompt_rows(monkeypatch)
    for share in (True, False):
        monkeypatch.setattr(CriticStage, "share_prompts", share)
        from helpers import config

        from rlpipe import BuildContext
        from rlpipe.core.placement import MeshSpec, RolePlacement

        cfg = config(registry, overrides)
        placement = RolePlacement(name="critic", devices=[0], mesh=MeshSpec((1, 1), ("fsdp", "tp")))
        critic = registry.roles["critic"].factory(cfg.roles["critic"], placement,
                                                  context=BuildContext(run_config=cfg, registry=registry))
        calls.clear()
        out = critic.process(_group_batch(prompts=3, scored=False), context=StageContext(role="critic", step=0, index=0))
        critic.on_barrier(context=StageContext(role="critic", step=0))
        values[share], params[share], placed[share] = out["values"], jax.tree.leaves(critic.params), list(calls)
    shared = mb % 4 == 0
    assert set(placed[True]) == ({(mb // 4, mb)} if shared else {(mb, mb)}) and set(placed[False]) == {(mb, mb)}
    np.testing.assert_allclose(values[True], values[False], atol=2e-5)
    for a, b in zip(params[True], params[False]):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_which_micro_batches_share_prompts():
    from rlpipe.roles.optimization import prompts_shared_by

    assert prompts_shared_by(4, 8) == 4 and prompts_shared_by(4, 16, 4) == 4
    assert prompts_shared_by(4, 6) == 1  # not whole groups
    assert prompts_shared_by(4, 8, 4) == 1  # 2 groups over 4 shards
    assert prompts_shared_by(1, 8) == 1 and prompts_shared_by(4, 8, enabled=False) == 1
