"""Tokenizers: a small protocol, a character tokenizer for the built-in tasks,
and Hugging Face ``tokenizer.json`` directories.

Example:
    >>> tok = load_tokenizer("char")
    >>> tok.decode(tok.encode("12+7=19"))
    '12+7=19'
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rlpipe.core.errors import UsageError

__all__ = ["CharTokenizer", "HFTokenizer", "Tokenizer", "TokenizerError", "load_tokenizer"]

_HF_EXTRA = "pip install rlpipe[hf]"


class TokenizerError(UsageError, ValueError):
    """A tokenizer that cannot be loaded or used as asked; the message says why."""


@runtime_checkable
class Tokenizer(Protocol):
    """Turns text into token ids and back.

    An implementation must guarantee that

    * ``encode`` adds no special tokens (a chat template that wants a BOS puts
      it in the text, so encoding never doubles it);
    * ``decode`` drops the pad, bos and eos tokens;
    * every id ``encode`` returns, and ``pad_id``, ``eos_id`` and ``bos_id``
      (when not ``None``), are below ``vocab_size``;
    * ``apply_chat_template`` returns text, to be passed to ``encode``.

    Example:
        >>> class Bytes:
        ...     vocab_size, pad_id, eos_id, bos_id = 258, 256, 257, None
        ...     def encode(self, text): return list(text.encode())
        ...     def decode(self, ids): return bytes(i for i in ids if i < 256).decode(errors="replace")
        ...     def apply_chat_template(self, messages, add_generation_prompt=True):
        ...         return "\\n".join(m["content"] for m in messages)
    """

    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str: ...


class CharTokenizer:
    """One token per character, for the built-in tasks and the ``tiny`` preset.

    The vocabulary is fixed (checkpoints and tests rely on the ids):

    ====  =========================================
    id    token
    ====  =========================================
    0     pad
    1     bos
    2     eos
    3     unk (any character not listed below)
    4     ``"\\n"``
    5-99  printable ASCII, ``" "`` (32) to ``"~"`` (126), in code order:
          ``id = ord(c) - 27``; so digits, both letter cases, space and
          ``+-*/=()[],.:;?!'"`` and the other ASCII punctuation
    ====  =========================================

    ``vocab_size`` is 100, below the ``tiny`` preset's 128.  ``decode`` drops
    pad, bos and eos and shows unk as ``"\\ufffd"``.  The chat template joins
    the message contents with newlines and adds nothing for the generation
    prompt, so a one-message chat is exactly its content.
    """

    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    #: The characters, in id order from 4.
    ALPHABET: str = "\n" + "".join(chr(c) for c in range(32, 127))

    def __init__(self) -> None:
        self._ids = {c: i + 4 for i, c in enumerate(self.ALPHABET)}
        self.vocab_size = 4 + len(self.ALPHABET)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = self.PAD, self.BOS, self.EOS, self.UNK

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.UNK) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if 4 <= i < self.vocab_size:
                out.append(self.ALPHABET[i - 4])
            elif i not in (self.PAD, self.BOS, self.EOS):
                # unk, and ids the model's wider output layer can sample but no character has
                out.append("\ufffd")
        return "".join(out)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        return "\n".join(str(m["content"]) for m in messages)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face tokenizer directory, read with the ``tokenizers`` package.

    Use :meth:`from_dir`.  Special tokens come from ``tokenizer_config.json``
    (``eos_token``, ``bos_token``, ``pad_token``); the eos falls back to
    ``generation_config.json`` / ``config.json``'s ``eos_token_id`` and the
    pad to the eos.  The chat template is ``tokenizer_config.json``'s
    ``chat_template`` or a ``chat_template.jinja`` file, rendered with jinja2
    the way transformers does (sandboxed, ``trim_blocks``, ``lstrip_blocks``).
    """

    def __init__(self, tokenizer: Any, *, eos_id: int, bos_id: int | None = None, pad_id: int | None = None,
                 chat_template: str | None = None, special_tokens: Mapping[str, str | None] | None = None,
                 source: str = "tokenizer"):
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id, self.bos_id = eos_id, bos_id
        self.pad_id: int = eos_id if pad_id is None else pad_id
        self.chat_template = chat_template
        self._special = dict(special_tokens or {})
        self._source = source

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> HFTokenizer:
        """Loads ``tokenizer.json`` and ``tokenizer_config.json`` from ``path``.

        Raises:
            TokenizerError: ``tokenizers`` is not installed, ``tokenizer.json``
                is missing, or no eos token can be found.
        """
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise TokenizerError(f"Hugging Face tokenizers need the 'tokenizers' package: {_HF_EXTRA}") from None
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json (rlpipe reads Hugging Face 'fast' tokenizers only)")
        tok = _Tok.from_file(str(file))
        cfg = _read_json(path / "tokenizer_config.json")

        def token_id(key: str) -> tuple[str | None, int | None]:
            text = _token_text(cfg.get(key))
            if text is None:
                return None, None
            i = tok.token_to_id(text)
            if i is None:
                raise TokenizerError(f"{path / 'tokenizer_config.json'}: {key} {text!r} is not in the vocabulary")
            return text, i

        eos, eos_id = token_id("eos_token")
        bos, bos_id = token_id("bos_token")
        pad, pad_id = token_id("pad_token")
        if eos_id is None:
            for other in ("generation_config.json", "config.json"):
                found = _read_json(path / other).get("eos_token_id")
                if isinstance(found, list):
                    found = found[0] if found else None
                if found is not None:
                    eos_id, eos = int(found), tok.id_to_token(int(found))
                    break
        if eos_id is None:
            raise TokenizerError(f"{path}: no eos token (tokenizer_config.json has no eos_token and neither "
                                 "generation_config.json nor config.json has eos_token_id)")
        return cls(tok, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id, chat_template=_chat_template(path, cfg),
                   special_tokens={"eos_token": eos, "bos_token": bos, "pad_token": pad if pad_id is not None else eos},
                   source=str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id, self.bos_id)]
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Renders ``messages`` with the checkpoint's chat template.

        ``variables`` are passed to the template too (``tools=...``, ...).

        Raises:
            TokenizerError: the tokenizer has no chat template, or jinja2 is
                not installed.
        """
        if not self.chat_template:
            raise TokenizerError(f"{self._source}: has no chat template (tokenizer_config.json 'chat_template' or "
                                 "chat_template.jinja); pass prompts as plain text or add a template")
        template = _compile(self.chat_template)
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               **self._special, **variables)

    def __repr__(self) -> str:
        return f"HFTokenizer({self._source!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """The tokenizer named by ``spec``: ``"char"``, a Hugging Face tokenizer
    directory, or a GGUF file (its vocabulary: :func:`rlpipe.models.gguf_file.read_vocab`).

    Raises:
        TokenizerError: ``spec`` is none of these.
    """
    if str(spec) == "char":
        return CharTokenizer()
    path = Path(spec)
    if path.is_dir():
        return HFTokenizer.from_dir(path)
    if path.is_file():
        from rlpipe.models.gguf_file import GGUFError, is_gguf, read_vocab

        if is_gguf(path):
            try:
                vocab = read_vocab(path)
            except GGUFError as e:
                raise TokenizerError(str(e)) from None
            return HFTokenizer(vocab.tokenizer, eos_id=vocab.eos_id, bos_id=vocab.bos_id, pad_id=vocab.pad_id,
                               chat_template=vocab.chat_template, special_tokens=vocab.special_tokens,
                               source=vocab.source)
    raise TokenizerError(f"unknown tokenizer {str(spec)!r}: expected 'char', a directory with tokenizer.json "
                         "or a .gguf file")


# -- helpers -------------------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any]:
    return json.loads(file.read_text()) if file.is_file() else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json spells a special token either as its text or as a
    # serialised AddedToken ({"content": ..., "lstrip": ..., ...}).
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _chat_template(path: Path, cfg: Mapping[str, Any]) -> str | None:
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template:
        return template
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    return _read_json(path / "chat_template.json").get("chat_template")


_COMPILED: dict[str, Any] = {}


def _compile(source: str) -> Any:
    if source in _COMPILED:
        return _COMPILED[source]
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerError(f"chat templates need the 'jinja2' package: {_HF_EXTRA}") from None

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # The same environment transformers uses, so templates written for it render alike.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    _COMPILED[source] = env.from_string(source)
    return _COMPILED[source]
