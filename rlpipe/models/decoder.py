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
    """Keys and values of one layer: ``[batch, kv_heads, slots, head_dim]`` each.

    Heads-major, so that attention's matrix products read the cache as stored;
    a slots-major cache made XLA re-lay the whole cache every decode step.
    """

    k: jax.Array
    v: jax.Array


def init_cache(config: DecoderConfig, batch: int, slots: int, dtype=jnp.float32) -> tuple[LayerCache, ...]:
    shape = (batch, config.num_kv_heads, slots, config.dim_per_head)
    return tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))


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


class Linear(nnx.Module):
    """``x @ kernel (+ bias)`` with kernel ``[in, out]``."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, param_dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32).astype(param_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
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
        k = _rope(self.k_proj(x).reshape(b, s, kvh, d), cos, sin).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, s, kvh, d).transpose(0, 2, 1, 3)
        if cache is None:
            keys, values, q_slot = k, v, jnp.arange(s)
        else:
            start = (0, 0, cache_index, 0)
            keys = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
            values = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
            cache = LayerCache(keys, values)
            q_slot = cache_index + jnp.arange(s)
        t = keys.shape[2]
        scores = jnp.einsum("bskgd,bktd->bkgst", q, keys.astype(q.dtype), preferred_element_type=jnp.float32) / math.sqrt(d)
        allowed = (jnp.arange(t)[None, :] <= q_slot[:, None])[None, None, None] & kv_valid[:, None, None, None, :]
        probs = jax.nn.softmax(jnp.where(allowed, scores, _NEG), axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgst,bktd->bskgd", probs, values.astype(x.dtype), preferred_element_type=jnp.float32)
        return self.o_proj(out.astype(x.dtype).reshape(b, s, kvh * g * d)), cache


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

    def hidden(self, tokens, positions, kv_valid, cache=None, cache_index=None):
        """Final normalised hidden states ``[batch, seq, hidden]`` (and the new cache)."""
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)
        freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(self.config)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb)[:, :, None], jnp.sin(emb)[:, :, None]
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, cos, sin, kv_valid, None if cache is None else cache[i], cache_index)
            new_cache.append(c)
        return self.norm(x), (None if cache is None else tuple(new_cache))

    def logits(self, h: jax.Array) -> jax.Array:
        if self.lm_head is None:
            w = self.embed_tokens[...].astype(h.dtype)
            return jnp.einsum("bsh,vh->bsv", h, w, preferred_element_type=jnp.float32)
        return jnp.einsum("bsh,hv->bsv", h, self.lm_head.kernel[...].astype(h.dtype), preferred_element_type=jnp.float32)

    def forward(self, tokens, positions, kv_valid, cache=None, cache_index=None):
        """Logits ``[batch, seq, vocab]`` (float32) and the updated cache.

        Args:
            tokens: ``[batch, seq]`` token ids.
            positions: ``[batch, seq]`` RoPE positions (count only real tokens).
            kv_valid: ``[batch, slots]`` which key slots hold real tokens; slots
                equal ``seq`` without a cache, the cache length with one.
            cache: per-layer :class:`LayerCache`, or ``None``.
            cache_index: the slot where ``tokens[:, 0]`` is written.
        """
        h, cache = self.hidden(tokens, positions, kv_valid, cache, cache_index)
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


def sequence_logprobs(model: Decoder, prompt: jax.Array, prompt_mask: jax.Array, completion: jax.Array,
                      completion_mask: jax.Array, temperature: float = 1.0, *, with_entropy: bool = False):
    """Per-token log-probs ``[batch, completion_len]`` of ``completion`` given
    ``prompt`` (left-padded), in one full-sequence forward; 0 where masked.

    ``temperature`` divides the logits, as the sampler did, so that rollout,
    reference and trainer log-probs describe the same distribution.  With
    ``with_entropy``, also returns the entropy of that distribution at each
    completion position (0 where masked): ``(logprobs, entropy)``.
    """
    tokens = jnp.concatenate([prompt, completion], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    logits, _ = model.forward(tokens, positions, mask)
    p = prompt.shape[1]
    # logits at position t predict token t + 1
    scaled = logits[:, p - 1:-1] / temperature
    lp = jnp.where(completion_mask.astype(bool), token_logprobs(scaled, completion), 0.0)
    if not with_entropy:
        return lp
    z = scaled.astype(jnp.float32)
    logz = jax.nn.logsumexp(z, axis=-1)
    entropy = logz - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)  # H = log Z - E[z]
    return lp, jnp.where(completion_mask.astype(bool), entropy, 0.0)
