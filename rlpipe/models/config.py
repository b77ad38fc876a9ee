"""Decoder shapes: the Llama / Qwen2 family as one attrs record, plus presets."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen(kw_only=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_scaling.rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@attrs.frozen(kw_only=True)
class DecoderConfig:
    """The shape of a decoder-only transformer of the Llama / Qwen2 family.

    Attributes:
        architecture: ``llama`` or ``qwen2`` (Qwen2 = Llama with QKV bias); used
            for HF export.
        head_dim: per-head width; ``None`` means ``hidden_size // num_heads``.
        qkv_bias: bias on the q, k and v projections (Qwen2).
        tie_embeddings: the output projection reuses the token embedding.
    """

    architecture: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048

    def __attrs_post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
            # Normalised, so that a config saved and loaded back compares equal.
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, d, kv = self.hidden_size, self.dim_per_head, self.num_kv_heads
        attn = h * self.num_heads * d * 2 + h * kv * d * 2 + ((self.num_heads + 2 * kv) * d if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` for transformers' LlamaForCausalLM / Qwen2ForCausalLM."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.architecture]
        out: dict[str, Any] = {
            "architectures": [arch], "model_type": self.architecture,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.dim_per_head, "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
        }
        if self.architecture == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = False
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **attrs.asdict(self.rope_scaling)}
        return out


def from_architecture(section: Any) -> DecoderConfig:
    """The decoder shape of a ``model.architecture`` config section
    (:class:`rlpipe.runtime.run_config.ArchitectureConfig`, whose short keys
    are mapped here; its derived keys are already filled in)."""
    return DecoderConfig(
        architecture=section.family, vocab_size=section.vocab, hidden_size=section.hidden,
        intermediate_size=section.ffn, num_layers=section.layers, num_heads=section.heads,
        num_kv_heads=section.kv_heads, head_dim=section.head_dim, rope_theta=section.rope_theta,
        rms_norm_eps=section.norm_eps, qkv_bias=section.qkv_bias, tie_embeddings=section.tied,
        max_position_embeddings=section.max_positions)


#: Built-in shapes (random weights unless loaded from a checkpoint).
PRESETS: dict[str, DecoderConfig] = {
    # Trains on a 2-core CPU in seconds; vocabulary sized for the character tokenizer.
    "tiny": DecoderConfig(architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=192, num_layers=2,
                          num_heads=4, num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512),
    "qwen2.5-0.5b": DecoderConfig(architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                  num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0,
                                  rms_norm_eps=1e-6, qkv_bias=True, tie_embeddings=True, max_position_embeddings=32768),
    "llama-3.2-1b": DecoderConfig(architecture="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                  num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                                  rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                           original_max_position_embeddings=8192),
                                  rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=131072),
}
