"""Training memory by XLA's own count: the programs are compiled from abstract
inputs (``jax.ShapeDtypeStruct``s, nothing is allocated) and
``compiled.memory_analysis().temp_size_in_bytes`` is what XLA plans for the
step's temporaries — activations, logits and attention scores.

Small shapes (the tiny preset, scaled in vocabulary, depth or sequence) so
that each compiles in seconds; benchmarks/train_memory.py measures the
qwen2.5-0.5b shapes (docs/performance.md §10)."""

import sys
from pathlib import Path

import attrs
import jax.numpy as jnp
import pytest
from flax import nnx

from rlpipe.models import memory
from rlpipe.models.config import PRESETS
from rlpipe.models.decoder import Decoder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import train_memory

TINY = PRESETS["tiny"]


def temp_bytes(cfg, program, rows, prompt, completion, *, remat=False):
    model = nnx.eval_shape(lambda: Decoder(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    if program == "train":
        fn = train_memory.train_program(graphdef, remat)
    elif program == "reference":
        fn = train_memory.reference_program(graphdef)
    else:
        fn = train_memory.prefill_program(graphdef, cfg, prompt + completion, jnp.bfloat16)
    sizes, _ = train_memory.analyse(fn, params, train_memory.abstract_rows(rows, prompt, completion))
    return sizes["temp_size_in_bytes"]


def test_no_full_float32_logits_are_needed():
    """With a vocabulary large enough to dominate, the training step needs less
    than one float32 ``[rows, completion, vocab]`` array: the head and its
    log-softmax run over chunks of positions, in the forward and the backward
    pass, and only at the completion's positions."""
    cfg = attrs.evolve(TINY, vocab_size=65536)
    rows, prompt, completion = 4, 64, 4096
    full = rows * completion * cfg.vocab_size * 4  # 4 GiB
    assert temp_bytes(cfg, "train", rows, prompt, completion) < full / 2
    assert temp_bytes(cfg, "reference", rows, prompt, completion) < full / 4


@pytest.mark.slow
def test_remat_reduces_training_memory_and_does_not_grow_with_depth():
    rows, prompt, completion = 4, 64, 448
    shallow, deep = attrs.evolve(TINY, num_layers=2), attrs.evolve(TINY, num_layers=8)
    off = temp_bytes(deep, "train", rows, prompt, completion, remat=False)
    on = temp_bytes(deep, "train", rows, prompt, completion, remat=True)
    assert on < off / 2
    # an extra layer costs its saved input and its weights' copies, not its activations
    on_shallow = temp_bytes(shallow, "train", rows, prompt, completion, remat=True)
    off_shallow = temp_bytes(shallow, "train", rows, prompt, completion, remat=False)
    assert on - on_shallow < (off - off_shallow) / 4


@pytest.mark.parametrize("program,remat", [("train", True), ("train", False), ("reference", False), ("prefill", False)])
@pytest.mark.slow
def test_the_estimate_is_within_20_percent_of_xla(program, remat):
    """The formulas of rlpipe.models.memory describe the compiled programs: the
    trainer's step (with and without remat), the reference's log-probs and the
    rollout's prefill, in bfloat16 with float32 parameters (the tiny preset at
    8 x 512 tokens: attention dominates; docs/performance.md has the
    qwen2.5-0.5b comparison, §10)."""
    cfg = TINY
    rows, prompt, completion = 8, 64, 448
    seq = prompt + completion
    if program == "train":
        est = memory.training_activation_bytes(cfg, rows, seq, 2, remat=remat, logit_positions=completion, param_itemsize=4)
    elif program == "reference":
        est = memory.forward_activation_bytes(cfg, rows, seq, 2, logit_positions=completion, param_itemsize=4)
    else:
        est = memory.forward_activation_bytes(cfg, rows, prompt, 2, keys=seq, logit_positions=1, param_itemsize=4)
    xla = temp_bytes(cfg, program, rows, prompt, completion, remat=remat)
    assert abs(est - xla) <= 0.2 * xla, (est, xla, est / xla)


@pytest.mark.slow
def test_blocks_chunks_and_remat_compute_the_same_values_and_gradients(monkeypatch):
    """Attention over several query blocks (with a padded last block), the head over
    several logit chunks (padded) and the rematerialised layer scan give the
    log-probs, entropies and gradients of the one-block, one-chunk, unrolled path."""
    import jax
    import numpy as np

    from rlpipe.models import decoder
    from rlpipe.models.decoder import build, sequence_logprobs

    model = build(TINY, seed=0)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(5, 100, (3, 8)), jnp.int32)
    prompt_mask = jnp.asarray(np.arange(8)[None, :] >= np.array([[0], [3], [5]]), jnp.int32)  # left-padded
    completion = jnp.asarray(rng.integers(5, 100, (3, 13)), jnp.int32)
    completion_mask = jnp.asarray(np.arange(13)[None, :] < np.array([[13], [9], [4]]), jnp.int32)  # right-padded

    def run(remat):
        def loss(p):
            lp, ent = sequence_logprobs(nnx.merge(graphdef, p), prompt, prompt_mask, completion, completion_mask, 0.7,
                                        with_entropy=True, remat=remat)
            return (lp * 1.3 + ent * 0.1).sum(), (lp, ent)
        (_, (lp, ent)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return lp, ent, g

    want = run(False)
    assert decoder.attention_query_block(3, TINY.num_heads, 21) == 21 and decoder.logit_chunk_tokens(TINY.vocab_size) > 39
    monkeypatch.setattr(decoder, "ATTENTION_BLOCK_ELEMENTS", 3 * TINY.num_heads * 21 * 16)  # blocks of 16: 2, the last padded
    monkeypatch.setattr(decoder, "LOGIT_CHUNK_ELEMENTS", 16 * TINY.vocab_size)  # 16 positions: 3 chunks of 39, padded
    assert decoder.attention_query_block(3, TINY.num_heads, 21) == 16 and decoder.logit_chunk_tokens(TINY.vocab_size) == 16
    for remat in (False, True):
        got = run(remat)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
