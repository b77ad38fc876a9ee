"""The GGUF file format (llama.cpp's): metadata, the tensor directory,
dequantisation, the decoder shape and the vocabulary a file describes.

This is the reading half of :mod:`rlpipe.models.gguf`, kept below
:mod:`rlpipe.models.hf` and :mod:`rlpipe.models.tokenizer` so that both can
hand a ``.gguf`` path to it without an import cycle; it needs neither jax nor
torch.  The ``gguf`` package reads the file (memory-mapped: tensor data is
read only when dequantised) and the ``tokenizers`` package builds the
vocabulary.

Example:
    >>> is_gguf("/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    True
    >>> gguf_config("/models/SmolLM2-135M-Instruct.Q4_1.gguf").num_layers
    30
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from rlpipe.core.errors import UsageError
from rlpipe.models.config import DecoderConfig, RopeScaling

__all__ = ["ARCHITECTURES", "PRE_TOKENIZERS", "GGUFError", "GGUFFile", "GGUFVocab", "gguf_config", "is_gguf",
           "open_gguf", "read_vocab"]

MAGIC = b"GGUF"
EXTRA = "pip install rlpipe[gguf]"

#: ``general.architecture`` values rlpipe loads.
ARCHITECTURES = ("llama", "qwen2")

#: Llama 3 RoPE scaling, as llama.cpp's converter stores it: one factor per frequency.
ROPE_FREQS = "rope_freqs.weight"


class GGUFError(UsageError, ValueError):
    """A GGUF file that rlpipe cannot read as asked; the message says why.

    Attributes:
        missing: tensor names (llama.cpp's) the model needs and the file lacks.
        unexpected: tensor names in the file that the model has no place for.
        mismatched: ``(name, expected_shape, found_shape)``, outermost dimension first.
    """

    def __init__(self, message: str, *, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = ()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        super().__init__(message)


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:  # a directory, a missing file, no permission
        return False


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"reading GGUF files needs the 'gguf' package: {EXTRA}") from None
    return gguf


class GGUFFile:
    """The metadata and tensor directory of one GGUF file; tensor data stays
    memory-mapped until :meth:`dequantize` reads it.  Use :func:`open_gguf`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not is_gguf(self.path):
            raise GGUFError(f"{self.path}: not a GGUF file (it does not start with {MAGIC!r})")
        gguf = _gguf()
        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
        except (ValueError, OSError, IndexError) as e:  # truncated or corrupt
            raise GGUFError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.tensors: dict[str, Any] = {t.name: t for t in self._reader.tensors}

    def __contains__(self, key: str) -> bool:
        return key in self._reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata ``key`` as a Python value (a list for arrays), or ``default``."""
        field = self._reader.fields.get(key)
        if field is None:
            return default
        kinds = _gguf().GGUFValueType
        if field.types[0] == kinds.ARRAY:
            if field.types[-1] == kinds.STRING:
                return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            return [field.parts[i][0].item() for i in field.data]
        if field.types[0] == kinds.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        return field.parts[field.data[0]][0].item()

    def length(self, key: str) -> int | None:
        """How many items array ``key`` has, without reading them."""
        field = self._reader.fields.get(key)
        return None if field is None else len(field.data)

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path}: metadata {key!r} is missing")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """Tensor ``name``'s shape in numpy (and Hugging Face) order, outermost
        first: GGUF lists dimensions innermost first."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def dequantize(self, name: str) -> np.ndarray:
        """The whole of tensor ``name`` as float32, in numpy order."""
        t = self.tensors[name]
        try:
            values = _gguf().quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{self.path}: tensor {name} has type {t.tensor_type.name}, which the installed "
                            "'gguf' package cannot dequantise") from None
        return np.asarray(values, dtype=np.float32).reshape(self.shape(name))


@functools.lru_cache(maxsize=4)
def _open(path: Path, stamp: tuple[int, int]) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed file at ``path``.  Loading a model reads the config, the
    tensors and the vocabulary of one file; its metadata (a vocabulary of 10⁵
    strings takes seconds) is parsed once, again only if the file changes."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        raise GGUFError(f"{path}: no such GGUF file") from None
    return _open(p, (st.st_mtime_ns, st.st_size))


# -- config --------------------------------------------------------------------


def gguf_config(path: str | os.PathLike) -> DecoderConfig:
    """The :class:`DecoderConfig` of a GGUF file, from its metadata (and, for
    Llama 3 RoPE scaling, the small ``rope_freqs`` tensor); no weights are read.

    ``tie_embeddings`` is set when the file has no ``output.weight``;
    ``max_position_embeddings`` is the file's ``context_length``; the vocabulary
    size is ``<arch>.vocab_size``, else the length of the token list.

    Raises:
        GGUFError: not a GGUF file, an architecture other than ``llama`` and
            ``qwen2``, or a feature rlpipe's decoder lacks (named).
    """
    f = open_gguf(path)
    arch = f.need("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{f.path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")

    def key(name: str, default: Any = None) -> Any:
        return f.get(f"{arch}.{name}", default)

    num_heads = int(f.need(f"{arch}.attention.head_count"))
    num_kv_heads = key("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # per-layer counts
        if len(set(num_kv_heads)) != 1:
            raise GGUFError(f"{f.path}: per-layer KV head counts {num_kv_heads} are not supported")
        num_kv_heads = num_kv_heads[0]
    hidden = int(f.need(f"{arch}.embedding_length"))
    head_dim, value_dim = key("attention.key_length"), key("attention.value_length")
    rope_dim = key("rope.dimension_count")
    if head_dim is None:
        # What llama.cpp assumes, and how transformers reads Llama files.
        head_dim = rope_dim if (arch == "llama" and rope_dim) else hidden // num_heads
    head_dim = int(head_dim)
    unsupported = []
    if value_dim is not None and int(value_dim) != head_dim:
        unsupported.append(f"value heads of width {value_dim} and key heads of width {head_dim}")
    if rope_dim is not None and int(rope_dim) != head_dim:
        unsupported.append(f"partial rotary embeddings ({rope_dim} of {head_dim} dims)")
    if key("attention.sliding_window"):
        unsupported.append("sliding-window attention")
    if key("expert_count"):
        unsupported.append("mixture of experts")
    if unsupported:
        raise GGUFError(f"{f.path}: {arch} with {', '.join(unsupported)} is not supported")

    theta = float(key("rope.freq_base", 10000.0))
    vocab = key("vocab_size") or f.length("tokenizer.ggml.tokens")
    if vocab is None and "token_embd.weight" in f.tensors:
        vocab = f.shape("token_embd.weight")[0]
    if vocab is None:
        raise GGUFError(f"{f.path}: no vocabulary size ({arch}.vocab_size, tokenizer.ggml.tokens or token_embd.weight)")

    return DecoderConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(f.need(f"{arch}.feed_forward_length")),
        num_layers=int(f.need(f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=_rope_scaling(f, arch, theta, head_dim),
        rms_norm_eps=float(f.need(f"{arch}.attention.layer_norm_rms_epsilon")),
        # Qwen2 always has q/k/v biases; a Llama file has them when its source
        # checkpoint set attention_bias.
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in f.tensors,
        tie_embeddings="output.weight" not in f.tensors,
        max_position_embeddings=int(key("context_length", 2048)),
    )


def _rope_scaling(f: GGUFFile, arch: str, theta: float, head_dim: int) -> RopeScaling | None:
    kind = f.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        raise GGUFError(f"{f.path}: rope scaling type {kind!r} is not supported (rlpipe implements Llama 3's, "
                        f"which llama.cpp stores as a {ROPE_FREQS} tensor)")
    if ROPE_FREQS not in f.tensors:
        return None
    # llama.cpp's converter turns Llama 3 scaling into one factor per frequency
    # and drops its parameters.  Llama 3.1-3.3 all use low 1, high 4 and an
    # original context of 8192: take those, and check that they give the stored
    # factors rather than silently computing other frequencies.
    factors = f.dequantize(ROPE_FREQS).reshape(-1).astype(np.float64)
    original = int(f.get(f"{arch}.rope.scaling.original_context_length") or 8192)
    scaling = RopeScaling(factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=original)
    expected = llama3_rope_factors(scaling, theta, head_dim)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3, atol=1e-3):
        raise GGUFError(f"{f.path}: {ROPE_FREQS} is not Llama 3 RoPE scaling with low/high frequency factors 1/4 and "
                        f"an original context of {original}, the only form rlpipe reads from GGUF")
    return scaling


def llama3_rope_factors(s: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """The divisor of each inverse frequency under Llama 3 scaling ``s``, as
    llama.cpp's converter writes them into ``rope_freqs.weight``."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    original = s.original_max_position_embeddings
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / s.factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, s.factor, mid))


# -- vocabulary ----------------------------------------------------------------

# Pre-tokenizer splits, as llama.cpp applies them for each ``tokenizer.ggml.pre``
# (src/llama-vocab.cpp) and as the models' own tokenizer.json files spell them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3 and Qwen2 differ only in how many digits make one piece.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
DIGITS = "digits"

#: ``tokenizer.ggml.pre`` values rlpipe reads, and the splits each applies, in
#: order, before the byte-level BPE (:data:`DIGITS`: every digit alone).
PRE_TOKENIZERS: Mapping[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,), "gpt-2": (_GPT2_SPLIT,),
    # llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM: digits apart, then GPT-2's split
    "smollm": (DIGITS, _GPT2_SPLIT),
    "qwen2": (_QWEN2_SPLIT,), "deepseek-r1-qwen": (_QWEN2_SPLIT,),
    "llama-bpe": (_LLAMA3_SPLIT,), "llama3": (_LLAMA3_SPLIT,), "llama-v3": (_LLAMA3_SPLIT,),
}
# llama.cpp takes a whole piece that is in the vocabulary as one token,
# without merging, for these (as Llama 3's tokenizer.json sets ignore_merges).
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}

_CONTROL, _USER_DEFINED = 3, 4


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    # GPT-2's printable spelling of each byte: printable Latin-1 bytes stand for
    # themselves, the others for the code points from 256 up, in byte order.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled = {b: chr(b) for b in keep}
    extra = 256
    for b in range(256):
        if b not in spelled:
            spelled[b] = chr(extra)
            extra += 1
    return spelled


@attrs.frozen(kw_only=True)
class GGUFVocab:
    """The tokenizer a GGUF file describes.

    Attributes:
        tokenizer: a ``tokenizers.Tokenizer`` (byte-level BPE, pre-tokenizer
            as ``tokenizer.ggml.pre`` says, CONTROL tokens special).
        special_tokens: ``eos_token``, ``bos_token``, ``pad_token`` texts, for
            the chat template.
    """

    tokenizer: Any
    eos_id: int
    bos_id: int | None
    pad_id: int | None
    chat_template: str | None
    special_tokens: Mapping[str, str | None]
    source: str


def read_vocab(path: str | os.PathLike) -> GGUFVocab:
    """The vocabulary of a GGUF file, built with the ``tokenizers`` package.

    Reads byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``)
    with the pre-tokenizers in :data:`PRE_TOKENIZERS`.  Tokens marked CONTROL
    become special tokens and USER_DEFINED ones added tokens (both matched
    whole); bos, eos and pad come from ``tokenizer.ggml.*_token_id`` (pad
    falls back to eos), the chat template from ``tokenizer.chat_template``.

    Raises:
        GGUFError: no tokenizer in the file, another tokenizer model, an
            unknown pre-tokenizer (named), or no eos token.
    """
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise GGUFError(f"GGUF tokenizers need the 'tokenizers' package: {EXTRA}") from None
    f = open_gguf(path)
    kind = f.get("tokenizer.ggml.model")
    if kind is None:
        raise GGUFError(f"{f.path}: the file has no tokenizer (no tokenizer.ggml.model)")
    if kind != "gpt2":
        raise GGUFError(f"{f.path}: tokenizer.ggml.model {kind!r} is not supported "
                        "(rlpipe reads byte-level BPE, 'gpt2', from GGUF)")
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{f.path}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
                        f"(supported: {', '.join(PRE_TOKENIZERS)})")
    tokens: list[str] = f.need("tokenizer.ggml.tokens")
    types: list[int] = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{f.path}: {len(tokens)} tokens but {len(types)} token types")
    merges = [tuple(m.split(" ")) for m in f.get("tokenizer.ggml.merges") or []]
    if any(len(m) != 2 for m in merges):
        raise GGUFError(f"{f.path}: a merge in tokenizer.ggml.merges is not two tokens")

    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # A token outside GPT-2's byte alphabet (a special token spelt in plain
    # UTF-8) is looked up by its bytes' spelling, as transformers does.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode())): i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES))
    steps = [pre_tokenizers.Digits(individual_digits=True) if split == DIGITS
             else pre_tokenizers.Split(Regex(split), behavior="isolated") for split in PRE_TOKENIZERS[pre]]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    # A CONTROL token spelt outside the byte alphabet is a mislabel (llama.cpp
    # marks some that way); only real ones are matched whole as special.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types, strict=True) if k == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED and t in vocab])

    def special(key: str) -> tuple[int | None, str | None]:
        i = f.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None, None
        if not 0 <= int(i) < len(tokens):
            raise GGUFError(f"{f.path}: tokenizer.ggml.{key} {i} is outside the vocabulary ({len(tokens)} tokens)")
        return int(i), tokens[int(i)]

    eos_id, eos = special("eos_token_id")
    bos_id, bos = special("bos_token_id")
    pad_id, pad = special("padding_token_id")
    if eos_id is None:
        raise GGUFError(f"{f.path}: no eos token (tokenizer.ggml.eos_token_id)")
    specials = {"eos_token": eos, "bos_token": bos, "pad_token": pad if pad_id is not None else eos}
    return GGUFVocab(tokenizer=tok, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id,
                     chat_template=f.get("tokenizer.chat_template"), special_tokens=specials, source=str(f.path))
