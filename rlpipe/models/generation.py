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

Data parallelism: given a ``sharding`` whose first dimension is split over
mesh axes (:func:`row_sharding`, e.g. ``PartitionSpec("fsdp")``), the rows
are padded to a multiple of those axes' size, and the prompts, the KV cache,
the logits and the outputs are split by rows along them (explicit sharding
constraints inside the program); the padding rows generate nothing and are
dropped.  Each row samples with its own key (the call's key folded with the
row index), so the samples do not depend on how the rows are split.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import attrs
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlpipe.models.decoder import LayerCache, init_cache
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
    the tokens and their policy log-probabilities (see :class:`Generation`).

    Row ``r`` samples with ``fold_in(key, r)``: its token depends on its own
    logits and index only, not on the other rows, their number (padding rows)
    or how the rows are split over devices."""
    if params.temperature == 0:
        tokens = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / params.temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(logits.shape[0], dtype=jnp.uint32))
        truncated = _truncate(scaled, params.top_k, params.top_p)
        tokens = jax.vmap(lambda k, row: jax.random.categorical(k, row, axis=-1))(keys, truncated)
    return tokens.astype(jnp.int32), jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _decode(model, cache, valid, last_logits, next_pos, first_slot, key, params: SamplingParams, done,
            rows_sharding: NamedSharding | None = None):
    """The sampling loop shared by :func:`_generate` and :func:`_extend`: up to
    ``max_new_tokens`` steps, the token of step ``i`` written to cache slot
    ``first_slot + i``.  A slot is marked valid only for rows still live, so
    a cache kept between calls holds no padding as context.  Returns tokens,
    mask, log-probs, the cache and the validity mask.  With ``rows_sharding``
    every per-row value of the loop stays split by rows."""
    rows = valid.shape[0]
    n = params.max_new_tokens
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
        slot = first_slot + i
        valid = jax.lax.dynamic_update_slice(valid, live[:, None], (0, slot))
        logits, cache = model.forward(tok[:, None], next_pos[:, None], valid, cache, slot)
        return (i + 1, *_constrain((cache, logits[:, 0], next_pos + live, valid, out_tok, out_lp, out_mask, done),
                                   rows_sharding))

    carry = (jnp.int32(0), *_constrain((cache, last_logits, next_pos.astype(jnp.int32), valid,
                                        jnp.full((rows, n), params.pad_id, jnp.int32), jnp.zeros((rows, n), jnp.float32),
                                        jnp.zeros((rows, n), bool), done), rows_sharding))
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[5], carry[7], carry[6], carry[1], carry[4]


def _prefill(graphdef, state, tokens, mask, params: SamplingParams, cache_dtype, rows_sharding=None):
    """The prompt's pass of :func:`_generate`: the model, the KV cache (split
    by rows with ``rows_sharding``), its validity and the last position's logits."""
    model = nnx.merge(graphdef, state)
    tokens, mask = _constrain((tokens, mask), rows_sharding)
    rows, prompt_len = tokens.shape
    n = params.max_new_tokens
    cache = _constrain(init_cache(model.config, rows, prompt_len + n, cache_dtype), rows_sharding)
    valid = _constrain(jnp.concatenate([mask, jnp.zeros((rows, n), bool)], axis=1), rows_sharding)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    # Only the last prompt position's logits are needed: [rows, 1, vocab], not [rows, len, vocab].
    hidden, cache = model.hidden(tokens, positions, valid, cache, 0)
    logits = model.logits(hidden[:, -1:])
    return model, _constrain(cache, rows_sharding), valid, _constrain(logits[:, -1], rows_sharding)


def _generate(graphdef, state, tokens, mask, done, key, params: SamplingParams, cache_dtype, rows_sharding=None):
    """Prefill and sampling loop; ``done`` rows (padding) generate nothing."""
    model, cache, valid, last = _prefill(graphdef, state, tokens, mask, params, cache_dtype, rows_sharding)
    prompt_len = tokens.shape[1]
    out_tok, out_mask, out_lp, _, _ = _decode(model, cache, valid, last, jnp.sum(mask, axis=1), prompt_len, key,
                                              params, done, rows_sharding)
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
    cache = tuple(LayerCache(c.k[:, :, :attend], c.v[:, :, :attend]) for c in cache)
    valid = valid[:, :attend]
    slot = jnp.arange(attend)[None, :]
    valid = valid & ~reset[:, None] & ~((slot >= trim_from[:, None]) & (slot < trim_to[:, None]))
    valid = jax.lax.dynamic_update_slice(valid, mask, (0, write))
    positions = start_pos[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    hidden, cache = model.hidden(tokens, positions, valid, cache, write)
    logits = model.logits(hidden[:, -1:])
    out_tok, out_mask, out_lp, cache, valid = _decode(model, cache, valid, logits[:, -1], start_pos + jnp.sum(mask, axis=1),
                                                      write + k, key, params, ~jnp.any(mask, axis=1), rows_sharding)
    cache = tuple(LayerCache(jax.lax.dynamic_update_slice(f.k, c.k, (0, 0, 0, 0)),
                             jax.lax.dynamic_update_slice(f.v, c.v, (0, 0, 0, 0))) for f, c in zip(full_cache, cache))
    return out_tok, out_mask, out_lp, *_constrain((cache, jax.lax.dynamic_update_slice(full_valid, valid, (0, 0))),
                                                  rows_sharding, exact=True)


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
        self._fn = jax.jit(self._traced, static_argnames=("params", "cache_dtype", "rows_sharding"))
        self._prefill_fn = jax.jit(self._traced_prefill, static_argnames=("params", "cache_dtype", "rows_sharding"))
        # The cache and its validity are donated: each call updates them in place.
        self._extend_fn = jax.jit(self._traced_extend, static_argnames=("params", "attend", "rows_sharding"),
                                  donate_argnums=(1, 2))

    def _traced(self, state, tokens, mask, done, key, params, cache_dtype, rows_sharding):
        with self._lock:
            self.compiles += 1
        return _generate(self.graphdef, state, tokens, mask, done, key, params, cache_dtype, rows_sharding)

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
                 params: SamplingParams, *, sharding: jax.sharding.Sharding | None = None) -> Generation:
        """Generates for every row of ``prompt_tokens`` (``[rows, len]``, any padding).

        Args:
            state: the model's parameter state, already on the role's devices.
            key: PRNG key; the same key, state and prompts give the same output
                (whatever ``sharding``: each row samples with its own key).
            sharding: where to put the prompts: replicated on the role's mesh,
                or split by rows (:func:`row_sharding`): rows are then padded
                to a multiple of the row shards, and the KV cache, logits and
                outputs are split by rows too.
        """
        tokens, mask, done = self._inputs(prompt_tokens, prompt_mask, params, sharding)
        if sharding is not None:
            # Not jax.device_put: on a mesh spanning processes it would compare the prompts across them.
            tokens, mask, done = distributed.put((tokens, mask, done), sharding)
        out = self._fn(state, tokens, mask, done, key, params=params, cache_dtype=self.cache_dtype,
                       rows_sharding=_rows_spec(sharding))
        rows = np.asarray(prompt_tokens).shape[0]
        toks, m, lp = (np.asarray(x)[:rows] for x in distributed.to_host(out))
        return Generation(tokens=toks, mask=m, logprobs=lp)

    def prefill_cache(self, state: Any, prompt_tokens: np.ndarray, prompt_mask: np.ndarray, params: SamplingParams, *,
                      sharding: jax.sharding.Sharding | None = None) -> tuple[Any, Any]:
        """The KV cache and validity mask that :meth:`generate` starts its
        sampling loop from (the prefill of the same program, device arrays with
        its shardings): for inspecting where the cache lives."""
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
