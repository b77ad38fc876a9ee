"""Models: a flax.nnx decoder of the Llama / Qwen2 family, presets, sharding."""

from rlpipe.models.config import PRESETS, DecoderConfig, RopeScaling
from rlpipe.models.decoder import (
           Decoder,
           LayerCache,
           build,
           init_cache,
           sequence_logprobs,
           token_logprobs,
)
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

__all__ = ["PRESETS", "CharTokenizer", "CheckpointError", "Decoder", "DecoderConfig", "HFTokenizer", "LayerCache",
           "RopeScaling", "Tokenizer", "TokenizerError", "build", "config_from_hf", "from_pretrained", "init_cache",
           "load_tokenizer", "save_pretrained", "sequence_logprobs", "token_logprobs"]
