"""Generation: jitted prefill and decode with a KV cache, and the samplers.

One compiled program per (batch, prompt bucket, sampling parameters) does the
whole generation on the device: a prefill over the (left-padded) prompt, then
a ``lax.while_loop`` that samples one token per row and runs one decode step,
stopping early once every row has produced a stop token.  The KV cache is
created inside the program and carried by the loop, so XLA updates it in
place; nothing is copied whole per step and nothing returns to the host
before the end.  The loop runs in a few segments (:func:`decode_segments`)
whose caches hold the slots filled so far rounded up to a power of two, so
attention reads about the filled part of the cache, not all of it; the cache
grows (one copy) between segments.

Prompts are padded on the left to a *bucket* length (a power of two, at least
16), so prompts of varying length reuse a handful of compiled programs.

Sampling is Gumbel-max with noise from a counter-based integer hash
(:func:`gumbel_noise`) of (key, row index, step, token id): row ``r``'s
token depends only on its logits, the key, its index and its step, so the
samples do not depend on the number of rows, padding rows, how the rows are
split over devices, or (:meth:`Engine.generate_refill`) which batch slot a
prompt runs in.  Top-k / top-p find their threshold by bisection over the
logits (masked counts and sums), not by sorting the vocabulary.

Data parallelism: given a ``sharding`` whose first dimension is split over
mesh axes (:func:`row_sharding`, e.g. ``PartitionSpec("fsdp")``), the rows
are padded to a multiple of those axes' size, and the prompts, the KV cache,
the logits and the outputs are split by rows along them (explicit sharding
constraints inside the program); the padding rows generate nothing and are
dropped.

Continuous batching (:meth:`Engine.generate_refill`): a few batch slots, each
refilled with the next pending prompt when its row ends, for completions of
varying length; the result equals :meth:`Engine.generate`'s.
"""

from __future__ import annotations

import math
import threading
from typing import Any, NamedTuple

import attrs
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlpipe.models.decoder import init_cache
from rlpipe.runtime import distributed


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
        ignore_eos: no token ends a row (``stop_tokens`` are ignored): every
            row generates ``max_new_tokens``; for benchmarks.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    pad_id: int = 0
    ignore_eos: bool = False


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


def row_sharding(mesh: jax.sharding.Mesh, axes: tuple[str, ...] = ("fsdp",)) -> NamedSharding:
    """Rows (the first dimension) split over the ``axes`` of ``mesh`` that it
    has with a size above 1; replicated when there are none."""
    split = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(split if len(split) > 1 else (split[0] if split else None)))


def row_shards(sharding: Any) -> int:
    """Into how many parts ``sharding`` splits rows (its first dimension): 1
    when it replicates them, or is not a ``NamedSharding``."""
    if not isinstance(sharding, NamedSharding) or not sharding.spec or sharding.spec[0] is None:
        return 1
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def _rows_spec(sharding: Any) -> NamedSharding | None:
    """The row-split part of ``sharding`` (for constraints inside a program), or ``None``."""
    if row_shards(sharding) == 1:
        return None
    return NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0]))


def _constrain(tree: Any, rows: NamedSharding | None, *, exact: bool = False) -> Any:
    """Splits the first dimension of every array of ``tree`` as ``rows`` does,
    leaving the other dimensions to the compiler (tensor-parallel heads stay
    split), or with ``exact`` replicating them (a donated cache keeps one layout)."""
    if rows is None:
        return tree

    def one(x):
        rest = [None if exact else PartitionSpec.UNCONSTRAINED] * (x.ndim - 1)
        spec = PartitionSpec(rows.spec[0], *rest)
        return jax.lax.with_sharding_constraint(x, NamedSharding(rows.mesh, spec))

    return jax.tree_util.tree_map(one, tree)


def _pad_rows(a: np.ndarray, rows: int, value: Any = 0) -> np.ndarray:
    """``a`` with rows of ``value`` appended up to ``rows``."""
    a = np.asarray(a)
    if a.shape[0] == rows:
        return a
    return np.concatenate([a, np.full((rows - a.shape[0], *a.shape[1:]), value, a.dtype)])


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (negative floats bit-flipped, positive
    ones with the sign bit set), so that thresholds can be bisected exactly."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _from_order_key(k: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k), jnp.float32)


def _bisect(keys: jax.Array, lo: jax.Array, hi: jax.Array, ok, *, smallest: bool) -> jax.Array:
    """The smallest (or largest) ``t`` in ``[lo, hi]`` (``[rows, 1]`` uint32)
    with ``ok(t)`` (``[rows, 1]`` bool, monotone in ``t``; true at ``hi``, or at
    ``lo`` for the largest): 32 halvings cover the uint32 range."""
    def step(_, bounds):
        lo, hi = bounds
        if smallest:
            mid = lo + (hi - lo) // 2
            good = ok(mid)
            return jnp.where(good, lo, mid + 1), jnp.where(good, mid, hi)
        mid = hi - (hi - lo) // 2
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid - 1)
    lo, hi = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return hi if smallest else lo


def _threshold(logits: jax.Array, top_k: int, top_p: float) -> jax.Array | None:
    """Per row ``[rows, 1]``, the smallest logit kept by top-k and then top-p
    (every token at or above it is kept), or ``None`` when both keep all.

    Found by bisection over the logits' values (as order-preserving integers,
    so the result is exactly a logit), each halving one masked count or sum
    over the vocabulary: no sort, and no ``lax.top_k``, which XLA:CPU runs
    about as slowly as a sort of the whole vocabulary (~6 ms for 64 x 512).

    * top-k: the largest value ``v`` with at least ``k`` logits ``>= v`` (the
      k-th largest; tokens tied with it are kept).
    * top-p, over the top-k-masked distribution: token ``i`` is kept when the
      mass of the strictly more likely tokens is below ``top_p`` (so the most
      likely token always is); the threshold is the smallest such logit.
    """
    vocab = logits.shape[-1]
    k = top_k if 0 < top_k < vocab else 0
    if not k and top_p >= 1.0:
        return None
    keys = _order_key(logits)
    lo = jnp.min(keys, axis=-1, keepdims=True)
    hi = jnp.max(keys, axis=-1, keepdims=True)
    if k:
        count = lambda t: jnp.sum(keys >= t, axis=-1, keepdims=True) >= k
        lo = _bisect(keys, lo, hi, count, smallest=False)
    if top_p < 1.0:
        # Probabilities as the sampler would see them after top-k.
        probs = jax.nn.softmax(jnp.where(keys >= lo, logits, -jnp.inf), axis=-1)
        mass_above = lambda t: jnp.sum(jnp.where(keys > t, probs, 0.0), axis=-1, keepdims=True) < top_p
        lo = _bisect(keys, lo, hi, mass_above, smallest=True)
    return _from_order_key(lo)


def _truncate(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Masks (to -inf) tokens outside the top-k and outside the top-p nucleus."""
    threshold = _threshold(logits, top_k, top_p)
    if threshold is None:
        return logits
    return jnp.where(logits < threshold, jnp.finfo(logits.dtype).min, logits)


def _mix32(x: jax.Array) -> jax.Array:
    """A bijective avalanche mix of uint32 values (the "lowbias32" integer hash)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _key_words(key: jax.Array) -> jax.Array:
    """Two uint32 seeds derived from a JAX PRNG key (any implementation)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    data = jnp.asarray(key).reshape(-1).astype(jnp.uint32)  # a raw ``PRNGKey`` too
    h = jnp.uint32(0x9E3779B9)
    for i in range(data.shape[0]):
        h = _mix32(h ^ data[i]) + jnp.uint32(i + 1)
    return jnp.stack([_mix32(h), _mix32(h ^ jnp.uint32(0x85EBCA6B))])


def gumbel_noise(key: jax.Array, index: jax.Array, step: jax.Array, vocab: int) -> jax.Array:
    """Standard Gumbel noise ``[rows, vocab]`` from a counter-based hash.

    Element ``(r, v)`` is a pure function of ``key``, ``index[r]``,
    ``step[r]`` and ``v``: rows draw independently of how many there are, how
    they are split over devices or which batch slot they occupy.  A handful of
    integer operations per element (fused with the sampler's argmax), instead
    of the 20-round threefry loop of ``jax.random``, which took a quarter to
    two fifths of a CPU decode step."""
    words = _key_words(key)
    index = jnp.asarray(index).astype(jnp.uint32)
    step = jnp.broadcast_to(jnp.asarray(step).astype(jnp.uint32), index.shape)
    row = _mix32((_mix32(words[0] ^ _mix32(index)) + words[1]) ^ _mix32(step + jnp.uint32(0x68E31DA4)))
    column = _mix32(jnp.arange(vocab, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9) + jnp.uint32(0x1B873593))
    bits = _mix32(row[:, None] + column[None, :])
    # 24 bits to a float32 in (0, 1): never 0 or 1, so both logs are finite.
    u = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))
    return -jnp.log(-jnp.log(u))


def _argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax`` over the last axis (the first maximum), as two plain
    reductions: XLA:CPU runs argmax's value-and-index reduction as a scalar loop
    (with the Gumbel noise fused into it, the largest operation of a decode step)."""
    x = jax.lax.optimization_barrier(x)  # computed once, vectorised, not inside the reductions
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.minimum(jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1), x.shape[-1] - 1)  # NaN rows: the last


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams, *, index: jax.Array | None = None,
           step: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """Samples one token per row from ``[rows, vocab]`` float32 logits; returns
    the tokens and their policy log-probabilities (see :class:`Generation`).

    Gumbel-max over the truncated (:func:`_truncate`) scaled logits, with the
    noise of :func:`gumbel_noise`: row ``r``'s token depends only on its own
    logits, ``key``, ``index[r]`` (default ``r``) and ``step[r]``, not on the
    other rows, their number (padding rows), how the rows are split over
    devices, or which slot of a batch the row occupies."""
    if params.temperature == 0:
        tokens = _argmax(logits)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / params.temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        rows, vocab = logits.shape
        index = jnp.arange(rows, dtype=jnp.uint32) if index is None else index
        perturbed = scaled + gumbel_noise(key, index, step, vocab)
        threshold = _threshold(scaled, params.top_k, params.top_p)
        if threshold is not None:
            perturbed = jnp.where(scaled < threshold, -jnp.inf, perturbed)
        tokens = _argmax(perturbed)
    return tokens.astype(jnp.int32), jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def decode_segments(prompt_slots: int, max_new_tokens: int, minimum: int = 16) -> tuple[tuple[int, int], ...]:
    """How :func:`_generate` splits its sampling loop: ``(end step, cache
    slots)`` per segment.  Segment ``j`` runs the steps up to ``end`` with a
    cache of ``slots`` slots, the next power of two that holds them (the
    last one exactly ``prompt_slots + max_new_tokens``), so each step's
    attention reads at most twice the filled slots rather than the whole
    cache; the cache grows (one copy) between segments."""
    total = prompt_slots + max_new_tokens
    segments = []
    slots = bucket_length(prompt_slots + 1, minimum)
    while True:
        slots = min(slots, total)
        segments.append((slots - prompt_slots, slots))
        if slots == total:
            return tuple(segments)
        slots *= 2


def shrink_levels(rows: int, minimum: int = 8) -> tuple[int, ...]:
    """The batch sizes :func:`_generate`'s sampling loop steps down through as
    rows finish: ``rows``, then halves while they stay at least ``minimum``
    (``(64, 32, 16, 8)`` for 64 rows; ``(rows,)`` below ``2 * minimum``)."""
    levels = [rows]
    while levels[-1] % 2 == 0 and levels[-1] // 2 >= minimum:
        levels.append(levels[-1] // 2)
    return tuple(levels)


def _compact(carry, rows: int):
    """The loop state of :func:`_decode` cut to ``rows`` rows, the live ones first
    (in their order): every row left out has finished."""
    i, cache, last, next_pos, valid, out_tok, out_lp, out_mask, done, index = carry
    order = jnp.argsort(done, stable=True)[:rows]
    take = lambda x: jnp.take(x, order, axis=0)  # noqa: E731
    cache = jax.tree_util.tree_map(take, cache)
    return (i, cache, take(last), take(next_pos), take(valid), out_tok, out_lp, out_mask, take(done), take(index))


def _decode(model, cache, valid, last_logits, next_pos, first_slot, key, params: SamplingParams, done,
            rows_sharding: NamedSharding | None = None, segments: tuple[tuple[int, int], ...] | None = None,
            levels: tuple[int, ...] | None = None):
    """The sampling loop shared by :func:`_generate` and :func:`_extend`: up to
    ``max_new_tokens`` steps, the token of step ``i`` written to cache slot
    ``first_slot + i``.  A slot is marked valid only for rows still live, so
    a cache kept between calls holds no padding as context.  Returns tokens,
    mask, log-probs, the cache and the validity mask.  With ``rows_sharding``
    every per-row value of the loop stays split by rows.

    ``segments`` (:func:`decode_segments`): the loop runs in pieces, the
    cache grown to each piece's slots before it (``None``: one piece over
    the cache as given).

    ``levels`` (:func:`shrink_levels`, not with ``rows_sharding``): as rows
    finish, the loop goes on with fewer — once no more than the next level's
    number are live, the live rows are gathered into a batch of that size
    (a decode step's cost grows with its rows), each keeping its own index,
    so its samples are those it would have drawn in the full batch.  The
    returned cache and validity are then not meaningful (``_generate``
    drops them)."""
    rows = valid.shape[0]
    n = params.max_new_tokens
    levels = levels or (rows,)
    stop = jnp.asarray((params.stop_tokens if not params.ignore_eos else ()) or (-1,), jnp.int32)

    def body(carry):
        i, cache, last, next_pos, valid, out_tok, out_lp, out_mask, done, index = carry
        tok, lp = sample(last, key, params, index=index, step=i)
        live = ~done
        tok = jnp.where(live, tok, params.pad_id)
        if len(levels) > 1:  # rows may have moved: write at their own index
            out_tok = out_tok.at[index, i].set(tok)
            out_lp = out_lp.at[index, i].set(jnp.where(live, lp, 0.0))
            out_mask = out_mask.at[index, i].set(live)
        else:
            out_tok = out_tok.at[:, i].set(tok)
            out_lp = out_lp.at[:, i].set(jnp.where(live, lp, 0.0))
            out_mask = out_mask.at[:, i].set(live)
        done = done | jnp.isin(tok, stop)
        slot = first_slot + i
        valid = jax.lax.dynamic_update_slice(valid, live[:, None], (0, slot))
        logits, cache = model.forward(tok[:, None], next_pos[:, None], valid, cache, slot)
        return (i + 1, *_constrain((cache, logits[:, 0], next_pos + live, valid, out_tok, out_lp, out_mask, done),
                                   rows_sharding), index)

    carry = (jnp.int32(0), *_constrain((cache, last_logits, next_pos.astype(jnp.int32), valid,
                                        jnp.full((rows, n), params.pad_id, jnp.int32), jnp.zeros((rows, n), jnp.float32),
                                        jnp.zeros((rows, n), bool), done), rows_sharding),
             jnp.arange(rows, dtype=jnp.uint32))

    def running(c, end, below):
        """Steps left in this piece, and more than ``below`` rows live (``0``: any)."""
        return (c[0] < end) & (jnp.sum(~c[8]) > below)

    for level, rows_now in enumerate(levels):
        below = levels[level + 1] if level + 1 < len(levels) else 0
        if level:
            carry = _compact(carry, rows_now)
        for end, slots in (segments or ((n, None),)) if level == 0 else ((n, None),):
            if slots is not None and slots > carry[4].shape[1]:
                grown = (tuple(c.grow(slots) for c in carry[1]),
                         jnp.pad(carry[4], ((0, 0), (0, slots - carry[4].shape[1]))))
                carry = (carry[0], *_constrain(grown[:1], rows_sharding), *carry[2:4], *_constrain(grown[1:], rows_sharding),
                         *carry[5:])
            carry = jax.lax.while_loop(lambda c, end=end, below=below: running(c, end, below), body, carry)
    return carry[5], carry[7], carry[6], carry[1], carry[4]


def _prefill(graphdef, state, tokens, mask, params: SamplingParams, cache_dtype, rows_sharding=None,
             slots: int | None = None):
    """The prompt's pass of :func:`_generate`: the model, the KV cache of
    ``slots`` slots (default: prompt and every new token; split by rows with
    ``rows_sharding``), its validity and the last position's logits."""
    model = nnx.merge(graphdef, state)
    tokens, mask = _constrain((tokens, mask), rows_sharding)
    rows, prompt_len = tokens.shape
    slots = slots or prompt_len + params.max_new_tokens
    cache = _constrain(init_cache(model.config, rows, slots, cache_dtype), rows_sharding)
    valid = _constrain(jnp.concatenate([mask, jnp.zeros((rows, slots - prompt_len), bool)], axis=1), rows_sharding)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    # Only the last prompt position's logits are needed: [rows, 1, vocab], not [rows, len, vocab].
    hidden, cache = model.hidden(tokens, positions, valid, cache, 0)
    logits = model.logits(hidden[:, -1:])
    return model, _constrain(cache, rows_sharding), valid, _constrain(logits[:, -1], rows_sharding)


def _generate(graphdef, state, tokens, mask, done, key, params: SamplingParams, cache_dtype, rows_sharding=None,
              repeat: int = 1):
    """Prefill and sampling loop; ``done`` rows (padding) generate nothing.
    The loop runs in :func:`decode_segments`, the cache growing with them.

    ``repeat``: each prompt row of ``tokens`` is prefilled once and its cache,
    validity and last logits copied to ``repeat`` consecutive rows (``done``
    has the repeated rows), which then sample independently."""
    prompt_len = tokens.shape[1]
    segments = decode_segments(prompt_len, params.max_new_tokens)
    model, cache, valid, last = _prefill(graphdef, state, tokens, mask, params, cache_dtype, rows_sharding,
                                         slots=segments[0][1])
    if repeat > 1:
        cache, valid, last, mask = _constrain(jax.tree_util.tree_map(lambda x: jnp.repeat(x, repeat, axis=0),
                                                                     (cache, valid, last, mask)), rows_sharding)
    # Fewer rows as rows finish (one device's rows: across devices it would move rows between them).
    levels = shrink_levels(done.shape[0]) if rows_sharding is None else None
    out_tok, out_mask, out_lp, _, _ = _decode(model, cache, valid, last, jnp.sum(mask, axis=1), prompt_len, key,
                                              params, done, rows_sharding, segments, levels)
    return out_tok, out_mask, out_lp


def _extend(graphdef, state, cache, valid, tokens, mask, start_pos, reset, trim_from, trim_to, write, key,
            params: SamplingParams, attend: int, rows_sharding: NamedSharding | None = None):
    """One call of a :class:`CacheSession`: forget the slots of rows that
    start over (``reset``) and the discarded tail of each row's previous
    generation (slots ``[trim_from, trim_to)``), write each row's new chunk
    (left-padded ``[rows, K]``, its tokens at positions ``start_pos + 0, 1,
    ...``) at slot ``write``, then sample as :func:`_generate` does.  Rows
    with an empty chunk generate nothing.

    Only the first ``attend`` slots take part (every slot the call reads or
    writes is below it; the later ones have never been written): attention
    reads the filled part of the cache, not all of it."""
    model = nnx.merge(graphdef, state)
    k = tokens.shape[1]
    cache, valid, tokens, mask, start_pos, reset, trim_from, trim_to = _constrain(
        (cache, valid, tokens, mask, start_pos, reset, trim_from, trim_to), rows_sharding)
    full_cache, full_valid = cache, valid
    cache = tuple(c.prefix(attend) for c in cache)
    valid = valid[:, :attend]
    slot = jnp.arange(attend)[None, :]
    valid = valid & ~reset[:, None] & ~((slot >= trim_from[:, None]) & (slot < trim_to[:, None]))
    valid = jax.lax.dynamic_update_slice(valid, mask, (0, write))
    positions = start_pos[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    hidden, cache = model.hidden(tokens, positions, valid, cache, write)
    logits = model.logits(hidden[:, -1:])
    out_tok, out_mask, out_lp, cache, valid = _decode(model, cache, valid, logits[:, -1], start_pos + jnp.sum(mask, axis=1),
                                                      write + k, key, params, ~jnp.any(mask, axis=1), rows_sharding)
    cache = tuple(f.put_prefix(c) for f, c in zip(full_cache, cache))
    return out_tok, out_mask, out_lp, *_constrain((cache, jax.lax.dynamic_update_slice(full_valid, valid, (0, 0))),
                                                  rows_sharding, exact=True)


class _Slots(NamedTuple):
    """The device state of :meth:`Engine.generate_refill`: ``rows`` batch
    slots, each holding one prompt's generation at a time, and the outputs of
    every prompt ``[prompts, max_new_tokens]``."""

    cache: Any       # per-layer LayerCache of prompt_slots + max_new_tokens slots
    valid: Any       # [rows, slots]
    last: Any        # [rows, vocab] logits that sample the next token
    next_pos: Any    # [rows] position of the next token
    step: Any        # [rows] tokens the slot's prompt has generated
    index: Any       # [rows] which prompt the slot holds
    done: Any        # [rows] the slot is free
    out_tok: Any
    out_lp: Any
    out_mask: Any


def _slots_init(config, rows: int, prompts: int, params: SamplingParams, prompt_slots: int, cache_dtype, vocab: int):
    n = params.max_new_tokens
    return _Slots(init_cache(config, rows, prompt_slots + n, cache_dtype), jnp.zeros((rows, prompt_slots + n), bool),
                  jnp.zeros((rows, vocab), jnp.float32), jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.int32),
                  jnp.zeros((rows,), jnp.uint32), jnp.ones((rows,), bool),
                  jnp.full((prompts, n), params.pad_id, jnp.int32), jnp.zeros((prompts, n), jnp.float32),
                  jnp.zeros((prompts, n), bool))


def _slots_admit(graphdef, state, slots: _Slots, tokens, mask, where, index, params: SamplingParams, cache_dtype):
    """Prefills prompts ``tokens`` ``[a, prompt_slots]`` (their prompt ``index``)
    into batch slots ``where`` (``rows``: padding, dropped), exactly as
    :func:`_generate`'s prefill does (same cache length)."""
    a, p = tokens.shape
    first = decode_segments(p, params.max_new_tokens)[0][1]
    _, cache, _, logits = _prefill(graphdef, state, tokens, mask, params, cache_dtype, slots=first)
    total = slots.valid.shape[1]

    def put(x, v):
        return x.at[where].set(v, mode="drop")
    return _Slots(
        tuple(c.put_prefix(n.prefix(p), rows=where) for c, n in zip(slots.cache, cache)),
        put(slots.valid, jnp.concatenate([mask, jnp.zeros((a, total - p), bool)], axis=1)),
        put(slots.last, logits), put(slots.next_pos, jnp.sum(mask, axis=1).astype(jnp.int32)),
        put(slots.step, jnp.zeros((a,), jnp.int32)), put(slots.index, index.astype(jnp.uint32)),
        put(slots.done, jnp.zeros((a,), bool)), slots.out_tok, slots.out_lp, slots.out_mask)


def _slots_decode(graphdef, state, slots: _Slots, key, refill_at, params: SamplingParams, steps: int):
    """Up to ``steps`` decode steps of every occupied slot, each at its own
    step count (its write slot ``prompt_slots + step``); stops early once
    every slot is free or ``refill_at`` of them are."""
    model = nnx.merge(graphdef, state)
    n = params.max_new_tokens
    prompt_slots = slots.valid.shape[1] - n
    stop = jnp.asarray((params.stop_tokens if not params.ignore_eos else ()) or (-1,), jnp.int32)
    rows = jnp.arange(slots.done.shape[0])
    outside = slots.out_tok.shape[0]  # an out-of-range prompt row: the write is dropped

    def body(carry):
        i, c = carry
        tok, lp = sample(c.last, key, params, index=c.index, step=c.step)
        live = ~c.done
        tok = jnp.where(live, tok, params.pad_id)
        at = (jnp.where(live, c.index.astype(jnp.int32), outside), jnp.minimum(c.step, n - 1))
        out_tok = c.out_tok.at[at].set(tok, mode="drop")
        out_lp = c.out_lp.at[at].set(lp, mode="drop")
        out_mask = c.out_mask.at[at].set(True, mode="drop")
        slot = prompt_slots + jnp.minimum(c.step, n - 1)
        valid = c.valid.at[rows, slot].set(live)
        logits, cache = model.forward(tok[:, None], c.next_pos[:, None], valid, c.cache, slot)
        step = c.step + live
        done = c.done | jnp.isin(tok, stop) | (step >= n)
        return i + 1, _Slots(cache, valid, logits[:, 0], c.next_pos + live, step, c.index, done, out_tok, out_lp, out_mask)

    def cond(carry):
        i, c = carry
        free = jnp.sum(c.done)
        return (i < steps) & (free < c.done.shape[0]) & (free < refill_at)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), slots))[1]


@attrs.define
class CacheSession:
    """A KV cache kept on the device between generation calls, one row per
    episode slot (:meth:`Engine.open_session`, :meth:`Engine.extend`).

    Every call writes all rows' new chunks at the same slot, ``write``
    (chunks are left-padded to one width), and its generated tokens after
    them, so the write position only grows; when the next call would not fit
    (:meth:`fits`) the caller opens a new session and prefills again.

    Attributes:
        rows, slots: the caller's rows and the cache's slots.
        cache, valid: the per-layer keys and values and ``[cache_rows, slots]``
            validity (device arrays, donated to each call).
        cache_rows: the cache's rows: ``rows`` padded to a multiple of the
            devices the rows are split over (the padding rows stay idle).
        sharding: where the session's rows live (split by rows, or replicated).
        write: the slot the next chunk is written at.
        generated: the slots ``[start, end)`` of the last call's generated tokens.
        trim_from: per row, the first of those slots to forget at the next call
            (:meth:`keep`); ``end`` keeps them all.
    """

    rows: int
    slots: int
    cache: Any
    valid: Any
    write: int = 0
    generated: tuple[int, int] = (0, 0)
    trim_from: np.ndarray = attrs.field(default=None)
    cache_rows: int = attrs.field(default=attrs.Factory(lambda self: self.rows, takes_self=True))
    sharding: Any = None

    def fits(self, chunk_width: int, params: SamplingParams) -> bool:
        """Whether a call with chunks this wide (bucketed) fits in the slots left."""
        return self.write + chunk_bucket(chunk_width) + params.max_new_tokens <= self.slots

    def keep(self, kept: np.ndarray) -> None:
        """Of the last call's generated tokens, row ``r`` keeps the first
        ``kept[r]`` as context; the slots of the rest are forgotten."""
        start, end = self.generated
        self.trim_from = np.minimum(start + np.asarray(kept, np.int32), end).astype(np.int32)


#: Chunks of a cache session are padded to a power of two, at least this wide.
MIN_CHUNK = 8


def chunk_bucket(width: int) -> int:
    return bucket_length(width, MIN_CHUNK)


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
        self._fn = jax.jit(self._traced, static_argnames=("params", "cache_dtype", "rows_sharding", "repeat"))
        self._prefill_fn = jax.jit(self._traced_prefill, static_argnames=("params", "cache_dtype", "rows_sharding"))
        self._slots_init_fn = jax.jit(_slots_init, static_argnums=(0, 1, 2, 3, 4, 5, 6))
        self._slots_admit_fn = jax.jit(self._traced_admit, static_argnames=("params", "cache_dtype"), donate_argnums=(1,))
        self._slots_decode_fn = jax.jit(self._traced_slots_decode, static_argnames=("params", "steps"), donate_argnums=(1,))
        # The cache and its validity are donated: each call updates them in place.
        self._extend_fn = jax.jit(self._traced_extend, static_argnames=("params", "attend", "rows_sharding"),
                                  donate_argnums=(1, 2))

    def _traced(self, state, tokens, mask, done, key, params, cache_dtype, rows_sharding, repeat=1):
        with self._lock:
            self.compiles += 1
        return _generate(self.graphdef, state, tokens, mask, done, key, params, cache_dtype, rows_sharding, repeat)

    def _traced_admit(self, state, slots, tokens, mask, where, index, params, cache_dtype):
        with self._lock:
            self.compiles += 1
        return _slots_admit(self.graphdef, state, slots, tokens, mask, where, index, params, cache_dtype)

    def _traced_slots_decode(self, state, slots, key, refill_at, params, steps):
        with self._lock:
            self.compiles += 1
        return _slots_decode(self.graphdef, state, slots, key, refill_at, params, steps)

    def _traced_prefill(self, state, tokens, mask, params, cache_dtype, rows_sharding):
        return _prefill(self.graphdef, state, tokens, mask, params, cache_dtype, rows_sharding)[1:3]

    def _traced_extend(self, state, cache, valid, tokens, mask, start_pos, reset, trim_from, trim_to, write, key, params,
                       attend, rows_sharding):
        with self._lock:
            self.compiles += 1
        return _extend(self.graphdef, state, cache, valid, tokens, mask, start_pos, reset, trim_from, trim_to, write,
                       key, params, attend, rows_sharding)

    def _inputs(self, prompt_tokens, prompt_mask, params: SamplingParams, sharding):
        """The prompts left-padded to their bucket, with rows padded to a
        multiple of the row shards of ``sharding``, and which rows are padding."""
        prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
        length = bucket_length(int(prompt_mask.sum(axis=1).max(initial=1)), self.min_bucket)
        tokens, mask = left_pad(prompt_tokens, prompt_mask, length, params.pad_id)
        rows = tokens.shape[0]
        padded = -(-rows // row_shards(sharding)) * row_shards(sharding)
        tokens, mask = _pad_rows(tokens, padded, params.pad_id), _pad_rows(mask, padded, False)
        return tokens, mask, np.arange(padded) >= rows

    def generate(self, state: Any, prompt_tokens: np.ndarray, prompt_mask: np.ndarray, key: jax.Array,
                 params: SamplingParams, *, sharding: jax.sharding.Sharding | None = None,
                 repeat: int = 1) -> Generation:
        """Generates for every row of ``prompt_tokens`` (``[rows, len]``, any padding).

        Args:
            state: the model's parameter state, already on the role's devices.
            key: PRNG key; the same key, state and prompts give the same output
                (whatever ``sharding``: each row samples with its own key).
            sharding: where to put the prompts: replicated on the role's mesh,
                or split by rows (:func:`row_sharding`): rows are then padded
                to a multiple of the row shards, and the KV cache, logits and
                outputs are split by rows too.
            repeat: completions per prompt (GRPO's group): the output has
                ``rows * repeat`` rows, prompt ``r``'s at ``r * repeat`` to
                ``r * repeat + repeat - 1`` (``np.repeat``'s order), and equals
                ``generate`` of the repeated prompts (same tokens; log-probs to
                float rounding) — but each prompt is prefilled once and its KV
                cache copied to its rows, not prefilled ``repeat`` times.
        """
        if repeat < 1:
            raise ValueError(f"repeat must be at least 1, got {repeat}")
        if repeat > 1 and np.shape(prompt_tokens)[0] % row_shards(sharding):
            # The prompts do not split evenly over the row shards (their repetitions may): prefill
            # every row rather than pad whole prompts' worth of rows.
            prompt_tokens, prompt_mask = np.repeat(prompt_tokens, repeat, axis=0), np.repeat(prompt_mask, repeat, axis=0)
            repeat = 1
        tokens, mask, done = self._inputs(prompt_tokens, prompt_mask, params, sharding)
        done = np.repeat(done, repeat)
        if sharding is not None:
            # Not jax.device_put: on a mesh spanning processes it would compare the prompts across them.
            tokens, mask, done = distributed.put((tokens, mask, done), sharding)
        out = self._fn(state, tokens, mask, done, key, params=params, cache_dtype=self.cache_dtype,
                       rows_sharding=_rows_spec(sharding), repeat=repeat)
        rows = np.asarray(prompt_tokens).shape[0] * repeat
        toks, m, lp = (np.asarray(x)[:rows] for x in distributed.to_host(out))
        return Generation(tokens=toks, mask=m, logprobs=lp)

    def generate_refill(self, state: Any, prompt_tokens: np.ndarray, prompt_mask: np.ndarray, key: jax.Array,
                        params: SamplingParams, *, rows: int, refill_every: int = 16) -> Generation:
        """:meth:`generate` for every row of ``prompt_tokens`` with continuous
        batching: ``rows`` batch slots, each refilled with the next pending
        prompt as soon as its row ends, so a batch of completions of varying
        length runs at the throughput of full rows.

        The result equals ``generate(state, prompt_tokens, prompt_mask, key,
        params)`` (same tokens; log-probs to float rounding): a prompt's cache
        has the layout it has there and its randomness comes from its index
        and its own step count, not from its slot or when it started.

        Args:
            rows: batch slots (rows decoded together); at most the prompts.
            refill_every: decode steps between two looks at which slots are
                free (a program returns to the host then); a segment also
                ends early once an eighth of the slots are free.
        """
        tokens, mask, _ = self._inputs(prompt_tokens, prompt_mask, params, None)
        prompts, prompt_slots = tokens.shape
        rows = max(1, min(rows, prompts))
        config = nnx.merge(self.graphdef, state).config
        slots = self._slots_init_fn(config, rows, prompts, params, prompt_slots, self.cache_dtype, config.vocab_size)
        free, pending = list(range(rows)), 0
        while True:
            if free and pending < prompts:
                take = free[:prompts - pending]
                width = min(bucket_length(len(take), 1), rows)  # a few admission programs
                where = np.full((width,), rows, np.int32)
                where[:len(take)] = take
                index = np.zeros((width,), np.int32)
                index[:len(take)] = np.arange(pending, pending + len(take))
                chunk = np.zeros((width, prompt_slots), np.int32)
                chunk_mask = np.zeros((width, prompt_slots), bool)
                chunk[:len(take)] = tokens[pending:pending + len(take)]
                chunk_mask[:len(take)] = mask[pending:pending + len(take)]
                slots = self._slots_admit_fn(state, slots, chunk, chunk_mask, where, index, params=params,
                                             cache_dtype=self.cache_dtype)
                pending += len(take)
            refill_at = max(1, rows // 8) if pending < prompts else rows + 1
            slots = self._slots_decode_fn(state, slots, key, jnp.int32(refill_at), params=params, steps=refill_every)
            done = np.asarray(slots.done)
            if pending == prompts and done.all():
                break
            free = np.flatnonzero(done).tolist()
        return Generation(tokens=np.asarray(slots.out_tok), mask=np.asarray(slots.out_mask),
                          logprobs=np.asarray(slots.out_lp))

    def prefill_cache(self, state: Any, prompt_tokens: np.ndarray, prompt_mask: np.ndarray, params: SamplingParams, *,
                      sharding: jax.sharding.Sharding | None = None) -> tuple[Any, Any]:
        """The KV cache and validity mask of :meth:`generate`'s prefill
        (device arrays with its shardings), at the full length the cache grows
        to (prompt bucket + ``max_new_tokens`` slots; ``generate`` itself starts
        with the first of :func:`decode_segments`): for inspecting where the
        cache lives."""
        tokens, mask, _ = self._inputs(prompt_tokens, prompt_mask, params, sharding)
        if sharding is not None:
            tokens, mask = distributed.put((tokens, mask), sharding)
        return self._prefill_fn(state, tokens, mask, params=params, cache_dtype=self.cache_dtype,
                                rows_sharding=_rows_spec(sharding))

    # -- a KV cache kept between calls (multi-turn episodes) ----------------------------

    def open_session(self, state: Any, rows: int, slots: int, *, sharding: jax.sharding.Sharding | None = None) -> CacheSession:
        """An empty :class:`CacheSession` of ``rows`` x ``slots`` for the model of ``state``.

        With ``sharding`` split by rows (:func:`row_sharding`) the cache's rows
        are padded to a multiple of the row shards and split over them."""
        config = nnx.merge(self.graphdef, state).config  # modules over the same arrays: nothing is copied
        cache_rows = -(-rows // row_shards(sharding)) * row_shards(sharding)

        def empty():
            return init_cache(config, cache_rows, slots, self.cache_dtype), jnp.zeros((cache_rows, slots), bool)

        # Created where it is used, not on one device and then moved.
        cache, valid = jax.jit(empty, out_shardings=sharding)() if sharding is not None else empty()
        return CacheSession(rows=rows, slots=slots, cache=cache, valid=valid, trim_from=np.zeros((rows,), np.int32),
                            cache_rows=cache_rows, sharding=sharding)

    def extend(self, state: Any, session: CacheSession, chunks: list[list[int]], start_pos: np.ndarray,
               reset: np.ndarray, key: jax.Array, params: SamplingParams, *,
               sharding: jax.sharding.Sharding | None = None) -> Generation:
        """Appends ``chunks[r]`` (new token ids; empty: the row is idle) to row
        ``r`` of ``session`` and generates after it, reusing the keys and
        values already cached.

        Args:
            start_pos: per row, the position of its chunk's first token (the
                number of context tokens already cached; 0 for a reset row).
            reset: rows whose earlier slots are forgotten (a new episode).
            sharding: where to put the chunks; the session's own (the one it
                was opened with) when it has one.

        Raises:
            ValueError: the call does not fit in the slots left (check :meth:`CacheSession.fits`).
        """
        width = max((len(c) for c in chunks), default=0)
        k = chunk_bucket(width)
        if session.write + k + params.max_new_tokens > session.slots:
            raise ValueError(f"a chunk of {width} tokens and {params.max_new_tokens} new ones do not fit in the "
                             f"{session.slots - session.write} slots left of the session")
        sharding = session.sharding if session.sharding is not None else sharding
        n = session.cache_rows
        right = np.full((n, max(width, 1)), params.pad_id, np.int32)
        right_mask = np.zeros(right.shape, bool)
        for r, c in enumerate(chunks):
            right[r, :len(c)] = c
            right_mask[r, :len(c)] = True
        tokens, mask = left_pad(right, right_mask, k, params.pad_id)
        end = session.generated[1]
        host = (tokens, mask, _pad_rows(np.asarray(start_pos, np.int32), n), _pad_rows(np.asarray(reset, bool), n, True),
                _pad_rows(session.trim_from, n, end), np.full((n,), end, np.int32))
        if sharding is not None:
            host = distributed.put(host, sharding)
        write = session.write
        # Attention reads the slots up to the end of this call's writes, bucketed to a power of two
        # (a few programs per session size).
        attend = min(bucket_length(write + k + params.max_new_tokens, MIN_CHUNK), session.slots)
        out = self._extend_fn(state, session.cache, session.valid, *host, jnp.int32(write), key, params=params,
                              attend=attend, rows_sharding=_rows_spec(sharding))
        toks, m, lp, session.cache, session.valid = out
        toks, m, lp = (np.asarray(x)[:session.rows] for x in distributed.to_host((toks, m, lp)))
        # The next chunk goes right after the longest generation: the slots the loop did not
        # reach (every row had stopped) were never written.
        end = write + k + int(m.sum(axis=1).max(initial=0))
        session.generated = (write + k, end)
        session.trim_from = np.full((session.rows,), end, np.int32)
        session.write = end
        return Generation(tokens=toks, mask=m, logprobs=lp)
