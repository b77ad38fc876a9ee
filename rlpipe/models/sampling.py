"""Generation: jitted prefill and decode with a KV cache, and the samplers.

One compiled program per (batch, prompt bucket, sampling parameters) does the
whole generation on the device: a prefill over the (left-padded) prompt, then
a ``lax.while_loop`` that samples one token per row and runs one decode step,
stopping early once every row has produced a stop token.  The KV cache is
created inside the program and carried by the loop, so XLA updates it in
place; nothing is copied whole per step and nothing returns to the host
before the end.

Prompts are padded on the left to a *bucket* length (a power of two, at least
16), so prompts of varying length reuse a handful of compiled programs.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlpipe import distributed
from rlpipe.models.decoder import init_cache


@attrs.frozen(kw_only=True)
class SamplingParams:
    """How to sample.  Hashable: it is part of the compiled program's key.

    Attributes:
        max_new_tokens: tokens generated per row (fewer when a stop token comes).
        temperature: 0 is greedy (argmax).
        top_k: keep the k most likely tokens; 0 keeps all.
        top_p: keep the smallest set of most likely tokens whose probability
            reaches ``top_p``; 1.0 keeps all.
        stop_tokens: a row ends after emitting one of these (it is kept, with mask 1).
        pad_id: written after a row ends (with mask 0).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    pad_id: int = 0


@attrs.frozen
class Generation:
    """What :meth:`Engine.generate` returns, as host numpy arrays ``[rows, max_new_tokens]``.

    ``logprobs`` are the log-probabilities of the sampled tokens under the
    policy at the sampling temperature, ``log_softmax(logits / T)`` (plain
    ``log_softmax(logits)`` when greedy) *before* top-k / top-p truncation:
    the distribution the trainer recomputes, so importance ratios compare like
    with like.
    """

    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray


def bucket_length(n: int, minimum: int = 16) -> int:
    """The smallest power of two that is at least ``max(n, minimum)``."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


def left_pad(tokens: np.ndarray, mask: np.ndarray, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Moves each row's real tokens (``mask`` 1, in order) to the right end of a
    ``[rows, length]`` array, so the last slot is always the last real token."""
    tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
    rows = tokens.shape[0]
    out = np.full((rows, length), pad_id, dtype=np.int32)
    out_mask = np.zeros((rows, length), dtype=bool)
    for r in range(rows):
        real = tokens[r][mask[r]]
        if len(real) > length:
            raise ValueError(f"prompt of {len(real)} tokens does not fit in {length}")
        if len(real):
            out[r, length - len(real):] = real
            out_mask[r, length - len(real):] = True
    return out, out_mask


def _truncate(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Masks (to -inf) tokens outside the top-k and outside the top-p nucleus."""
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = before < top_p                        # always keeps the most likely token
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Samples one token per row from ``[rows, vocab]`` float32 logits; returns
    the tokens and their policy log-probabilities (see :class:`Generation`)."""
    if params.temperature == 0:
        tokens = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / params.temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        tokens = jax.random.categorical(key, _truncate(scaled, params.top_k, params.top_p), axis=-1)
    return tokens.astype(jnp.int32), jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _generate(graphdef, state, tokens, mask, key, params: SamplingParams, cache_dtype):
    model = nnx.merge(graphdef, state)
    rows, prompt_len = tokens.shape
    n = params.max_new_tokens
    cache = init_cache(model.config, rows, prompt_len + n, cache_dtype)
    valid = jnp.concatenate([mask, jnp.zeros((rows, n), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    # Only the last prompt position's logits are needed: [rows, 1, vocab], not [rows, len, vocab].
    hidden, cache = model.hidden(tokens, positions, valid, cache, 0)
    logits = model.logits(hidden[:, -1:])
    stop = jnp.asarray(params.stop_tokens or (-1,), jnp.int32)

    def cond(carry):
        i, done = carry[0], carry[-1]
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, cache, last, next_pos, valid, out_tok, out_lp, out_mask, done = carry
        tok, lp = sample(last, jax.random.fold_in(key, i), params)
        live = ~done
        tok = jnp.where(live, tok, params.pad_id)
        out_tok = out_tok.at[:, i].set(tok)
        out_lp = out_lp.at[:, i].set(jnp.where(live, lp, 0.0))
        out_mask = out_mask.at[:, i].set(live)
        done = done | jnp.isin(tok, stop)
        slot = prompt_len + i
        valid = valid.at[:, slot].set(True)
        logits, cache = model.forward(tok[:, None], next_pos[:, None], valid, cache, slot)
        return i + 1, cache, logits[:, 0], next_pos + 1, valid, out_tok, out_lp, out_mask, done

    carry = (jnp.int32(0), cache, logits[:, -1], jnp.sum(mask, axis=1).astype(jnp.int32), valid,
             jnp.full((rows, n), params.pad_id, jnp.int32), jnp.zeros((rows, n), jnp.float32),
             jnp.zeros((rows, n), bool), jnp.zeros((rows,), bool))
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[5], carry[7], carry[6]


class Engine:
    """The built-in pure-JAX rollout engine (the ``jax`` rollout-engine plugin).

    Args:
        graphdef: the model's ``nnx`` graph definition (``nnx.split(model)[0]``).
        cache_dtype: KV-cache dtype (the model's compute dtype).
        min_bucket: smallest prompt bucket.
    """

    def __init__(self, graphdef: Any, *, cache_dtype=jnp.float32, min_bucket: int = 16):
        self.graphdef = graphdef
        self.min_bucket = min_bucket
        self.cache_dtype = jnp.dtype(cache_dtype)
        self._lock = threading.Lock()
        self.compiles = 0  # programs traced so far (bucketing keeps this small)
        self._fn = jax.jit(self._traced, static_argnames=("params", "cache_dtype"))

    def _traced(self, state, tokens, mask, key, params, cache_dtype):
        with self._lock:
            self.compiles += 1
        return _generate(self.graphdef, state, tokens, mask, key, params, cache_dtype)

    def generate(self, state: Any, prompt_tokens: np.ndarray, prompt_mask: np.ndarray, key: jax.Array,
                 params: SamplingParams, *, sharding: jax.sharding.Sharding | None = None) -> Generation:
        """Generates for every row of ``prompt_tokens`` (``[rows, len]``, any padding).

        Args:
            state: the model's parameter state, already on the role's devices.
            key: PRNG key; the same key, state and prompts give the same output.
            sharding: where to put the prompts (e.g. replicated on the role's mesh).
        """
        prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
        length = bucket_length(int(prompt_mask.sum(axis=1).max(initial=1)), self.min_bucket)
        tokens, mask = left_pad(prompt_tokens, prompt_mask, length, params.pad_id)
        if sharding is not None:
            # Not jax.device_put: on a mesh spanning processes it would compare the prompts across them.
            tokens, mask = distributed.put((tokens, mask), sharding)
        out = self._fn(state, tokens, mask, key, params=params, cache_dtype=self.cache_dtype)
        toks, m, lp = distributed.to_host(out)
        return Generation(tokens=np.asarray(toks), mask=np.asarray(m), logprobs=np.asarray(lp))
