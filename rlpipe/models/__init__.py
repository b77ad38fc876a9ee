"""Models: a flax.nnx decoder of the Llama / Qwen2 family, presets, sharding.

The names below are imported on first use (``rlpipe.models.build`` loads
:mod:`rlpipe.models.decoder`), so that the role specs, which need only
:mod:`rlpipe.models.memory`'s formulas, load without jax or flax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlpipe.core.lazy import lazy_exports

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ resolves these
    from rlpipe.models.config import PRESETS, DecoderConfig, RopeScaling
    from rlpipe.models.decoder import (
        Decoder,
        LayerCache,
        build,
        completion_hidden,
        init_cache,
        sequence_logprobs,
        token_logprobs,
    )
    from rlpipe.models.gguf import from_gguf, gguf_config, gguf_tokenizer, is_gguf
    from rlpipe.models.hf import (
        CheckpointError,
        config_from_hf,
        from_pretrained,
        save_pretrained,
    )
    from rlpipe.models.tokenizer import (
        CharTokenizer,
        HFTokenizer,
        Tokenizer,
        TokenizerError,
        load_tokenizer,
    )

#: Each public name and the module that defines it.
_LAZY = {
    **dict.fromkeys(["PRESETS", "DecoderConfig", "RopeScaling"], "rlpipe.models.config"),
    **dict.fromkeys(["Decoder", "LayerCache", "build", "completion_hidden", "init_cache", "sequence_logprobs",
                     "token_logprobs"],
                    "rlpipe.models.decoder"),
    **dict.fromkeys(["CheckpointError", "config_from_hf", "from_pretrained", "save_pretrained"], "rlpipe.models.hf"),
    **dict.fromkeys(["from_gguf", "gguf_config", "gguf_tokenizer", "is_gguf"], "rlpipe.models.gguf"),
    **dict.fromkeys(["CharTokenizer", "HFTokenizer", "Tokenizer", "TokenizerError", "load_tokenizer"],
                    "rlpipe.models.tokenizer"),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = ["PRESETS", "CharTokenizer", "CheckpointError", "Decoder", "DecoderConfig", "HFTokenizer", "LayerCache",
           "RopeScaling", "Tokenizer", "TokenizerError", "build", "completion_hidden", "config_from_hf", "from_gguf", "from_pretrained",
           "gguf_config", "gguf_tokenizer", "init_cache", "is_gguf", "load_tokenizer", "save_pretrained", "sequence_logprobs", "token_logprobs"]
