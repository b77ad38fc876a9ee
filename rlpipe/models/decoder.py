"""A flax.nnx decoder-only transformer of the Llama / Qwen2 family.

RoPE (with optional Llama-3 frequency scaling), grouped-query attention,
RMSNorm, SwiGLU MLP, optional QKV bias, tied or untied embeddings.  Parameter
names follow the Hugging Face layout (``layers[i].self_attn.q_proj.kernel``)
so that import and export are a rename and a transpose.

One forward serves training, scoring and generation:
:meth:`Decoder.forward` takes per-token positions (so left padding does not
shift RoPE), a key-validity mask, and optionally a KV cache plus the slot at
which to write.  Attention is causal over cache *slots*; with a cache the new
keys and values are written with ``dynamic_update_slice`` into the cache that
the caller owns (under ``jit`` with a donated or loop-carried cache, XLA
updates it in place — it is never copied whole per step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlpipe.models.config import DecoderConfig

_NEG = float(jnp.finfo(jnp.float32).min)


class LayerCache(NamedTuple):
    """Keys and values of one layer: keys ``[batch, kv_heads, head_dim, slots]``,
    values ``[batch, kv_heads, slots, head_dim]``.

    Each is laid out so that its product in a decode step reads it as stored,
    with the contracted axis where a matrix product wants it: the scores
    ``q · k`` contract ``head_dim`` (keys slots-minor), the output ``p · v``
    contracts ``slots`` (values head-dim-minor).  Measured on XLA:CPU at a
    decode step's shape (64 rows, 2 KV heads, 128-320 slots, head_dim 32), the
    scores product ran 3.3x faster on slots-minor keys than on keys laid out as
    the values are (docs/performance.md §16); a slots-major cache made XLA
    re-lay the whole cache every step.  Use :attr:`slots`, :meth:`prefix`,
    :meth:`grow` and :meth:`put_prefix` rather than indexing the slot axis.
    """

    k: jax.Array
    v: jax.Array

    @property
    def slots(self) -> int:
        return self.v.shape[2]

    def prefix(self, n: int) -> LayerCache:
        """The first ``n`` slots."""
        return LayerCache(self.k[..., :n], self.v[:, :, :n])

    def grow(self, slots: int) -> LayerCache:
        """Padded with zeros to ``slots`` slots."""
        extra = slots - self.slots
        return LayerCache(jnp.pad(self.k, ((0, 0), (0, 0), (0, 0), (0, extra))),
                          jnp.pad(self.v, ((0, 0), (0, 0), (0, extra), (0, 0))))

    def put_prefix(self, part: LayerCache, rows=None) -> LayerCache:
        """``part``'s slots written over the first ones of this cache: every
        row, or (``rows``, an index array; out-of-range rows are dropped) the
        rows ``rows`` from ``part``'s rows in order."""
        n = part.slots
        if rows is None:
            return LayerCache(jax.lax.dynamic_update_slice(self.k, part.k, (0, 0, 0, 0)),
                              jax.lax.dynamic_update_slice(self.v, part.v, (0, 0, 0, 0)))
        return LayerCache(self.k.at[rows, :, :, :n].set(part.k, mode="drop"),
                          self.v.at[rows, :, :n].set(part.v, mode="drop"))


def init_cache(config: DecoderConfig, batch: int, slots: int, dtype=jnp.float32) -> tuple[LayerCache, ...]:
    h, d = config.num_kv_heads, config.dim_per_head
    return tuple(LayerCache(jnp.zeros((batch, h, d, slots), dtype), jnp.zeros((batch, h, slots, d), dtype))
                 for _ in range(config.num_layers))


def rope_inv_freq(config: DecoderConfig) -> jax.Array:
    d = config.dim_per_head
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    s = config.rope_scaling
    if s is None:
        return inv
    # Llama-3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


#: Attention without a cache runs over blocks of queries so that one block's
#: float32 scores ``[batch, heads, block, keys]`` hold at most about this many elements.
ATTENTION_BLOCK_ELEMENTS = 1 << 26


def attention_query_block(batch: int, heads: int, seq: int) -> int:
    """Queries per block of :func:`_attention` (``seq`` when one block holds them all)."""
    per_query = batch * heads * seq
    block = max(16, ATTENTION_BLOCK_ELEMENTS // per_query // 16 * 16)
    return min(block, seq)


def _attention(q, k, v, kv_valid, scale):
    """Causal attention with a key-validity mask, without a cache: ``q`` ``[batch, sq,
    heads, dim]``, ``k``/``v`` ``[batch, sk, kv_heads, dim]`` (query heads grouped per
    key head), ``kv_valid`` ``[batch, sk]``.  The queries are the last ``sq`` of the
    ``sk`` positions (all of them when ``sq == sk``): query ``i`` sees keys up to
    ``sk - sq + i``.

    ``jax.nn.dot_product_attention`` over blocks of :func:`attention_query_block`
    queries (a ``lax.map`` whose body is rematerialised), so the scores of one block
    exist at a time, in the forward and the backward pass.  Keys and values enter
    the blocks in float32 so that their gradients accumulate over blocks in float32.
    """
    b, s, n, d = q.shape
    t = k.shape[1]
    offset = t - s
    block = attention_query_block(b, n, t)
    if block >= s:
        if offset == 0:
            return jax.nn.dot_product_attention(q, k, v, mask=kv_valid[:, None, None, :], is_causal=True, scale=scale)
        allowed = (jnp.arange(t)[None, :] <= offset + jnp.arange(s)[:, None])[None, None] & kv_valid[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale)
    blocks = -(-s // block)
    qb = jnp.pad(q, ((0, 0), (0, blocks * block - s), (0, 0), (0, 0))).reshape(b, blocks, block, n, d).transpose(1, 0, 2, 3, 4)
    dtype = q.dtype

    @jax.checkpoint
    def one(k, v, q, start):
        allowed = (jnp.arange(t)[None, :] <= (offset + start + jnp.arange(block))[:, None])[None, None] & kv_valid[:, None, None, :]
        return jax.nn.dot_product_attention(q, k.astype(dtype), v.astype(dtype), mask=allowed, scale=scale)

    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    out = jax.lax.map(lambda xs: one(k32, v32, *xs), (qb, jnp.arange(blocks) * block))
    return out.transpose(1, 0, 2, 3, 4).reshape(b, blocks * block, n, d)[:, :s]


def _joint(fn, *parts):
    """``fn`` (a per-token function of ``[tokens, features]``) applied to the
    tokens of every ``[rows, seq, features]`` array of ``parts`` at once (one
    set of matrix products), split back into the parts' shapes."""
    flat = [x.reshape(-1, x.shape[-1]) for x in parts]
    y = fn(jnp.concatenate(flat) if len(flat) > 1 else flat[0])
    out, start = [], 0
    for x, f in zip(parts, flat):
        out.append(y[start:start + f.shape[0]].reshape(*x.shape[:-1], y.shape[-1]))
        start += f.shape[0]
    return out


class Rope(NamedTuple):
    """RoPE's ``cos`` and ``sin`` per token ``[batch, seq, 1, head_dim]``."""

    cos: jax.Array
    sin: jax.Array


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis of ``x`` (``[..., in]`` by ``[in, out]``), in float32.

    Computed as one ``[rows, in] x [in, out]`` product: with the batch and
    sequence axes kept apart, the weight gradient contracts two axes, which
    XLA:CPU runs at about half the speed (docs/performance.md §14).
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, preferred_element_type=jnp.float32)
    return y.reshape(*x.shape[:-1], w.shape[-1])


class Linear(nnx.Module):
    """``x @ kernel (+ bias)`` with kernel ``[in, out]``."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, param_dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32).astype(param_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dense(x, self.kernel[...].astype(x.dtype)).astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, c: DecoderConfig, *, param_dtype, rngs: nnx.Rngs):
        d = c.dim_per_head
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, d
        self.q_proj = Linear(c.hidden_size, c.num_heads * d, bias=c.qkv_bias, param_dtype=param_dtype, rngs=rngs)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias, param_dtype=param_dtype, rngs=rngs)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias, param_dtype=param_dtype, rngs=rngs)
        self.o_proj = Linear(c.num_heads * d, c.hidden_size, bias=False, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, kv_valid, cache: LayerCache | None, cache_index):
        b, s, _ = x.shape
        kvh, g, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = _rope(self.q_proj(x).reshape(b, s, kvh, g, d), cos[:, :, None], sin[:, :, None])
        k = _rope(self.k_proj(x).reshape(b, s, kvh, d), cos, sin)
        v = self.v_proj(x).reshape(b, s, kvh, d)
        if cache is None:
            # Training and scoring: jax.nn.dot_product_attention, causal within the sequence
            # plus the key-validity mask (left- and right-padding); grouped-query attention by
            # grouping the query heads of each key head, as laid out here.
            out = _attention(q.reshape(b, s, kvh * g, d), k, v, kv_valid.astype(bool), 1.0 / math.sqrt(d))
            return self.o_proj(out.reshape(b, s, kvh * g * d)), None
        # With a cache (prefill, decode): the cache is read in its stored layout (LayerCache) by
        # the einsums below; handing it to dot_product_attention ([batch, slots, heads, dim])
        # would re-lay the whole cache every decode step.
        if jnp.ndim(cache_index) == 1:
            # A write slot per row (rows at different steps: continuous batching), a scatter.
            rows, q_slot = jnp.arange(b)[:, None], cache_index[:, None] + jnp.arange(s)[None, :]  # [b, s]
            keys = cache.k.at[rows, :, :, q_slot].set(k.astype(cache.k.dtype))
            values = cache.v.at[rows, :, q_slot].set(v.astype(cache.v.dtype))
        else:
            keys = jax.lax.dynamic_update_slice(cache.k, k.transpose(0, 2, 3, 1).astype(cache.k.dtype),
                                                (0, 0, 0, cache_index))
            values = jax.lax.dynamic_update_slice(cache.v, v.transpose(0, 2, 1, 3).astype(cache.v.dtype),
                                                  (0, 0, cache_index, 0))
            q_slot = jnp.broadcast_to(cache_index + jnp.arange(s), (b, s))
        cache = LayerCache(keys, values)
        t = keys.shape[3]
        if s == 1:
            # A decode step: the products without the query axis, so that XLA:CPU runs the
            # probabilities x values one with a fast kernel (with it, a slow generic one).
            scores = jnp.einsum("bkgd,bkdt->bkgt", q[:, 0], keys.astype(q.dtype),
                                preferred_element_type=jnp.float32) / math.sqrt(d)
            allowed = (jnp.arange(t)[None, :] <= q_slot)[:, None, None] & kv_valid[:, None, None, :]
            probs = jax.nn.softmax(jnp.where(allowed, scores, _NEG), axis=-1).astype(x.dtype)
            out = jnp.einsum("bkgt,bktd->bkgd", probs, values.astype(x.dtype), preferred_element_type=jnp.float32)
            return self.o_proj(out.astype(x.dtype).reshape(b, s, kvh * g * d)), cache
        scores = jnp.einsum("bskgd,bkdt->bkgst", q, keys.astype(q.dtype), preferred_element_type=jnp.float32) / math.sqrt(d)
        allowed = (jnp.arange(t)[None, None, :] <= q_slot[:, :, None])[:, None, None] & kv_valid[:, None, None, None, :]
        probs = jax.nn.softmax(jnp.where(allowed, scores, _NEG), axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgst,bktd->bskgd", probs, values.astype(x.dtype), preferred_element_type=jnp.float32)
        return self.o_proj(out.astype(x.dtype).reshape(b, s, kvh * g * d)), cache

    def shared(self, xp, xc, rope_p: Rope, rope_c: Rope, prompt_valid, completion_valid, group: int):
        """Attention over prompts shared by groups of rows, without a cache: ``xp``
        ``[prompts, Lp, hidden]`` (each prompt once), ``xc`` ``[prompts * group, Lc,
        hidden]`` (row ``r`` continues prompt ``r // group``).  The prompts attend to
        themselves; each row's completion to its prompt's keys and values (computed
        once, repeated to its ``group`` rows) and causally to its own.  Equal to
        ``__call__`` on the concatenated, repeated sequences, with the prompts'
        projections done once per prompt instead of once per row."""
        kvh, g, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q, k, v = (_joint(proj, xp, xc) for proj in (self.q_proj, self.k_proj, self.v_proj))
        qp, qc = (_rope(x.reshape(*x.shape[:2], kvh, g, d), r.cos[:, :, None], r.sin[:, :, None])
                  for x, r in zip(q, (rope_p, rope_c)))
        kp, kc = (_rope(x.reshape(*x.shape[:2], kvh, d), r.cos, r.sin) for x, r in zip(k, (rope_p, rope_c)))
        vp, vc = (x.reshape(*x.shape[:2], kvh, d) for x in v)
        scale = 1.0 / math.sqrt(d)
        out_p = _attention(qp.reshape(*qp.shape[:2], kvh * g, d), kp, vp, prompt_valid.astype(bool), scale)
        repeat = lambda x: jnp.repeat(x, group, axis=0)
        keys, values = jnp.concatenate([repeat(kp), kc], axis=1), jnp.concatenate([repeat(vp), vc], axis=1)
        valid = jnp.concatenate([repeat(prompt_valid), completion_valid], axis=1).astype(bool)
        out_c = _attention(qc.reshape(*qc.shape[:2], kvh * g, d), keys, values, valid, scale)
        return _joint(self.o_proj, out_p.reshape(*out_p.shape[:2], -1), out_c.reshape(*out_c.shape[:2], -1))


class MLP(nnx.Module):
    def __init__(self, c: DecoderConfig, *, param_dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False, param_dtype=param_dtype, rngs=rngs)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False, param_dtype=param_dtype, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, c: DecoderConfig, *, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(c, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(c, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, kv_valid, cache, cache_index):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, kv_valid, cache, cache_index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache

    def shared(self, xp, xc, rope_p: Rope, rope_c: Rope, prompt_valid, completion_valid, group: int):
        """The block over prompts shared by groups of rows (:meth:`Attention.shared`):
        ``(xp, xc)`` in, ``(xp, xc)`` out; the per-token parts run on both at once."""
        hp, hc = self.self_attn.shared(*_joint(self.input_layernorm, xp, xc), rope_p, rope_c, prompt_valid,
                                       completion_valid, group)
        xp, xc = xp + hp, xc + hc
        mp, mc = _joint(lambda x: self.mlp(self.post_attention_layernorm(x)), xp, xc)
        return xp + mp, xc + mc


def _remat_layers(layers, x, apply):
    """The blocks applied in turn without a cache, each recomputed in the backward
    pass: ``x = apply(block, x)`` per layer (``x`` any tree of activations).

    A ``lax.scan`` over the layers' parameters, stacked here (cast to the compute
    dtype first, which every use casts them to anyway, so the values and gradients
    are those of the unrolled layers) with a rematerialised body: the backward pass
    keeps each layer's input and one layer's working set at a time.  A loop is what
    makes that hold: XLA's CPU compiler drops the optimization barriers of an
    unrolled ``jax.checkpoint`` and merges the recomputation back into the forward
    pass.  The parameter tree itself is unchanged (``layers[i]``), and the program
    has one copy of the block however deep the model.
    """
    graphdef, _ = nnx.split(layers[0])
    dtype = jax.tree.leaves(x)[0].dtype
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
    stacked = jax.tree.map(lambda *a: jnp.stack([cast(t) for t in a]), *[nnx.split(layer)[1] for layer in layers])

    @jax.checkpoint
    def body(x, state):
        return apply(nnx.merge(graphdef, state), x)

    x, _ = jax.lax.scan(lambda x, state: (body(x, state), None), x, stacked)
    return x


class Decoder(nnx.Module):
    """The policy (and reference, and critic trunk) model.

    Args:
        config: the shape.
        dtype: compute dtype of activations (``float32`` or ``bfloat16``).
        param_dtype: dtype the parameters are created in.
        rngs: initialisation randomness.

    ``model(tokens)`` on ``[batch, seq]`` int tokens returns ``[batch, seq,
    vocab]`` float32 logits.
    """

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Param(0.02 * jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size), jnp.float32).astype(param_dtype))
        self.layers = nnx.List([Block(config, param_dtype=param_dtype, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if config.tie_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False, param_dtype=param_dtype, rngs=rngs)

    def hidden(self, tokens, positions, kv_valid, cache=None, cache_index=None, *, remat: bool = False):
        """Final normalised hidden states ``[batch, seq, hidden]`` (and the new cache).

        ``remat``: recompute each layer in the backward pass instead of keeping its
        activations (the layers run as a rematerialised ``lax.scan``, see
        :func:`_remat_layers`): a training step then keeps only each layer's input
        plus one layer's working set at a time.  Meant for gradients (the trainer's
        ``roles.trainer.remat``); it changes nothing in the values, and is ignored
        with a cache.
        """
        x = self.embed(tokens)
        cos, sin = self.rope(positions)
        if remat and cache is None:
            return self.norm(_remat_layers(self.layers, x, lambda b, x: b(x, cos, sin, kv_valid, None, None)[0])), None
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, cos, sin, kv_valid, None if cache is None else cache[i], cache_index)
            new_cache.append(c)
        return self.norm(x), (None if cache is None else tuple(new_cache))

    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)

    def rope(self, positions: jax.Array) -> Rope:
        """RoPE's ``cos`` and ``sin`` ``[batch, seq, 1, head_dim]`` at ``positions`` ``[batch, seq]``."""
        freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(self.config)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return Rope(jnp.cos(emb)[:, :, None], jnp.sin(emb)[:, :, None])

    def hidden_shared(self, prompt, prompt_positions, prompt_valid, completion, completion_positions,
                      completion_valid, *, remat: bool = False):
        """:meth:`hidden` of rows that share their prompts in groups, without a
        cache: ``prompt`` ``[P, Lp]`` (each prompt once), ``completion``
        ``[P * g, Lc]`` (row ``r`` continues prompt ``r // g``).  Returns the
        final normalised hidden states of the prompts ``[P, Lp, hidden]`` and of
        the completions ``[P * g, Lc, hidden]``: those of :meth:`hidden` on the
        repeated, concatenated rows, with each prompt's tokens computed once
        rather than ``g`` times (:meth:`Block.shared`)."""
        group = completion.shape[0] // prompt.shape[0]
        rope_p, rope_c = self.rope(prompt_positions), self.rope(completion_positions)

        def apply(block, x):
            return block.shared(*x, rope_p, rope_c, prompt_valid, completion_valid, group)

        x = (self.embed(prompt), self.embed(completion))
        if remat:
            x = _remat_layers(self.layers, x, apply)
        else:
            for layer in self.layers:
                x = apply(layer, x)
        return tuple(_joint(self.norm, *x))

    def logits(self, h: jax.Array) -> jax.Array:
        if self.lm_head is None:
            w = self.embed_tokens[...].astype(h.dtype)
            return jnp.einsum("bsh,vh->bsv", h, w, preferred_element_type=jnp.float32)
        return jnp.einsum("bsh,hv->bsv", h, self.lm_head.kernel[...].astype(h.dtype), preferred_element_type=jnp.float32)

    def forward(self, tokens, positions, kv_valid, cache=None, cache_index=None, *, remat: bool = False):
        """Logits ``[batch, seq, vocab]`` (float32) and the updated cache.

        Args:
            tokens: ``[batch, seq]`` token ids.
            positions: ``[batch, seq]`` RoPE positions (count only real tokens).
            kv_valid: ``[batch, slots]`` which key slots hold real tokens; slots
                equal ``seq`` without a cache, the cache length with one.
            cache: per-layer :class:`LayerCache`, or ``None``.
            cache_index: the slot where ``tokens[:, 0]`` is written: one for
                every row, or ``[batch]``, one per row.
            remat: recompute each layer in the backward pass (see :meth:`hidden`).
        """
        h, cache = self.hidden(tokens, positions, kv_valid, cache, cache_index, remat=remat)
        return self.logits(h), cache

    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        tokens = jnp.asarray(tokens)
        mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        return self.forward(tokens, positions, mask)[0]


def build(config: DecoderConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32) -> Decoder:
    """A randomly initialised decoder."""
    return Decoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(params=seed))


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log softmax(logits)[..., targets]`` in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


#: Logits are computed ``logit_chunk_tokens(vocab)`` positions at a time, so that one
#: chunk's float32 ``[tokens, vocab]`` array holds about this many elements (128 MiB).
LOGIT_CHUNK_ELEMENTS = 1 << 25


def logit_chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk of :func:`sequence_logprobs`'s head and log-softmax: a
    multiple of 8, at least 8, with ``tokens × vocab`` at most about
    :data:`LOGIT_CHUNK_ELEMENTS`."""
    return max(8, LOGIT_CHUNK_ELEMENTS // vocab_size // 8 * 8)


def _chunk_stats(w, h, targets, *, tied: bool, temperature: float, with_entropy: bool):
    """Log-prob of ``targets`` (and the entropy) under ``softmax(h @ head / T)`` for
    one chunk of positions: ``h`` ``[tokens, hidden]``, ``targets`` ``[tokens]``.
    ``w`` is cast to ``h``'s dtype here, inside the chunk, so that the head's
    gradient accumulates over chunks in the parameter dtype."""
    wc = w.astype(h.dtype)
    eq = "nh,vh->nv" if tied else "nh,hv->nv"
    z = jnp.einsum(eq, h, wc, preferred_element_type=jnp.float32) / temperature
    logz = jax.nn.logsumexp(z, axis=-1)
    lp = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0] - logz
    if not with_entropy:
        return lp, None
    entropy = logz - jnp.sum(jnp.exp(z - logz[:, None]) * z, axis=-1)  # H = log Z - E[z]
    return lp, entropy


def completion_hidden(model: Decoder, prompt: jax.Array, prompt_mask: jax.Array, completion: jax.Array,
                      completion_mask: jax.Array, *, remat: bool = False) -> jax.Array:
    """The final hidden states ``[rows, completion_len, hidden]`` that predict
    each completion token: at position ``t``, the state after the prompt and
    the completion's tokens before ``t`` (what the head, or a value head, reads).

    ``prompt`` is left-padded ``[rows, Lp]``, or has ``P`` rows for ``P * g``
    completion rows (shared prompts: completion row ``r`` continues prompt
    ``r // g``; each prompt's tokens are computed once, :meth:`Decoder.hidden_shared`).
    ``completion_mask`` marks the completion tokens attended to.
    """
    rows, b = prompt.shape[0], completion.shape[0]
    if rows < 1 or b % rows:
        raise ValueError(f"{b} completion rows do not continue {rows} prompts in equal groups")
    if rows == b:
        tokens = jnp.concatenate([prompt, completion], axis=1)
        mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(bool)
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        h, _ = model.hidden(tokens, positions, mask, remat=remat)
        # the hidden state at position t predicts token t + 1
        return h[:, prompt.shape[1] - 1:-1]
    pmask, cmask = prompt_mask.astype(bool), completion_mask.astype(bool)
    prompt_positions = jnp.maximum(jnp.cumsum(pmask, axis=-1) - 1, 0)
    before = jnp.repeat(jnp.sum(pmask, axis=-1, dtype=jnp.int32), b // rows)[:, None]  # each row's prompt length
    completion_positions = jnp.maximum(before + jnp.cumsum(cmask, axis=-1) - 1, 0)
    hp, hc = model.hidden_shared(prompt, prompt_positions, pmask, completion, completion_positions, cmask, remat=remat)
    return jnp.concatenate([jnp.repeat(hp[:, -1:], b // rows, axis=0), hc[:, :-1]], axis=1)


def sequence_logprobs(model: Decoder, prompt: jax.Array, prompt_mask: jax.Array, completion: jax.Array,
                      completion_mask: jax.Array, temperature: float = 1.0, *, with_entropy: bool = False,
                      remat: bool = False):
    """Per-token log-probs ``[batch, completion_len]`` of ``completion`` given
    ``prompt`` (left-padded), in one full-sequence forward; 0 where masked.

    ``temperature`` divides the logits, as the sampler did, so that rollout,
    reference and trainer log-probs describe the same distribution.  With
    ``with_entropy``, also returns the entropy of that distribution at each
    completion position (0 where masked): ``(logprobs, entropy)``.

    Memory: hidden states are computed for the whole sequence, but the head runs
    only at the completion's positions, :func:`logit_chunk_tokens` positions at a
    time (a ``lax.map`` over chunks whose body is rematerialised), so no
    ``[batch, completion_len, vocab]`` float32 array exists, in the forward or the
    backward pass.  ``remat`` recomputes each layer in the backward pass
    (:meth:`Decoder.hidden`); use it for training.

    **Shared prompts**: ``prompt`` may have fewer rows than ``completion``, a
    divisor ``P`` of its ``P * g`` rows: completion row ``r`` then continues
    prompt ``r // g`` (GRPO's groups, in ``np.repeat`` order), and each prompt's
    tokens go through the model once instead of ``g`` times
    (:meth:`Decoder.hidden_shared`).  The values are those of the repeated
    prompts (tested to float rounding, gradients included).
    """
    h = completion_hidden(model, prompt, prompt_mask, completion, completion_mask, remat=remat)
    b, c = completion.shape
    hc = h.reshape(b * c, h.shape[-1])
    targets = completion.reshape(b * c)
    tied = model.lm_head is None
    w = model.embed_tokens[...] if tied else model.lm_head.kernel[...]
    n = b * c
    chunk = min(n, logit_chunk_tokens(model.config.vocab_size))
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    if pad:
        hc = jnp.concatenate([hc, jnp.zeros((pad, hc.shape[-1]), hc.dtype)])
        targets = jnp.concatenate([targets, jnp.zeros((pad,), targets.dtype)])
    body = jax.checkpoint(lambda w, h, t: _chunk_stats(w, h, t, tied=tied, temperature=temperature,
                                                         with_entropy=with_entropy))
    lp, entropy = jax.lax.map(lambda xs: body(w, *xs), (hc.reshape(chunks, chunk, -1), targets.reshape(chunks, chunk)))
    keep = completion_mask.astype(bool)
    lp = jnp.where(keep, lp.reshape(-1)[:n].reshape(b, c), 0.0)
    if not with_entropy:
        return lp
    return lp, jnp.where(keep, entropy.reshape(-1)[:n].reshape(b, c), 0.0)
