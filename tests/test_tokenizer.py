"""Tokenizers: the character tokenizer's fixed vocabulary, and Hugging Face
tokenizer directories (round trip, special tokens, chat templates)."""

from __future__ import annotations

import json
import sys

import pytest

from rlpipe.models.config import PRESETS
from rlpipe.models.tokenizer import (
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)

TEXT = "What is 12+7*(3-1)/2? Answer: [19], 'ok' = \"yes\"!\nnext line ~ 100%"


def test_char_tokenizer_round_trips_ascii_text():
    tok = CharTokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT)
    assert tok.UNK not in ids
    assert tok.decode(ids) == TEXT


def test_char_tokenizer_maps_unknown_characters_to_unk():
    tok = CharTokenizer()
    ids = tok.encode("a\tb é")
    assert ids[1] == tok.UNK == 3 and ids[-1] == 3
    assert tok.decode(ids) == "a\ufffdb \ufffd"


def test_char_tokenizer_ids_are_the_documented_ones():
    tok = CharTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.encode("\n ") == [4, 5]
    assert tok.encode("0a~") == [ord("0") - 27, ord("a") - 27, 99]
    assert tok.vocab_size == 100


def test_char_vocabulary_fits_the_tiny_preset():
    tok = CharTokenizer()
    assert tok.vocab_size <= PRESETS["tiny"].vocab_size
    every = "".join(chr(c) for c in range(0, 256))
    assert max(tok.encode(every)) < tok.vocab_size


def test_char_decode_drops_special_tokens_and_shows_ids_without_a_character_as_unk():
    tok = CharTokenizer()
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id, tok.pad_id]) == "hi"
    # the tiny model's output layer (128) is wider than the alphabet: a policy may sample such ids
    assert tok.decode([*tok.encode("a"), 100, 127]) == "a\ufffd\ufffd"


def test_char_chat_template_joins_contents():
    tok = CharTokenizer()
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "2+2="}]
    assert tok.apply_chat_template(messages) == "add\n2+2="
    assert tok.apply_chat_template(messages[1:], add_generation_prompt=False) == "2+2="


def test_char_tokenizer_satisfies_the_protocol():
    assert isinstance(CharTokenizer(), Tokenizer)


# -- Hugging Face ----------------------------------------------------------------

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _train(path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, "the quick brown fox jumps over the lazy dog"] * 20, trainer)
    path.mkdir(exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return tok


@pytest.fixture
def hf_dir(tmp_path):
    path = tmp_path / "tok"
    _train(path)
    config = {"bos_token": "<s>", "pad_token": {"content": "<pad>", "lstrip": False, "rstrip": False},
              "eos_token": {"content": "<|im_end|>", "special": True}, "chat_template": CHATML}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_hf_tokenizer_round_trips(hf_dir):
    tok = HFTokenizer.from_dir(hf_dir)
    assert isinstance(tok, Tokenizer)
    ids = tok.encode(TEXT + " é")
    assert ids and max(ids) < tok.vocab_size
    assert tok.decode(ids) == TEXT + " é"


def test_hf_tokenizer_reads_special_tokens(hf_dir):
    tok = HFTokenizer.from_dir(hf_dir)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 4)
    assert tok.vocab_size == 300
    assert tok.decode([tok.bos_id, *tok.encode("fox"), tok.eos_id, tok.pad_id]) == "fox"
    assert tok.encode("<s>fox") == [tok.bos_id, *tok.encode("fox")]  # no BOS added on top of the text's


def test_hf_tokenizer_pad_falls_back_to_eos_and_eos_to_config(hf_dir):
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({}))
    with pytest.raises(TokenizerError, match="no eos token"):
        HFTokenizer.from_dir(hf_dir)
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    tok = HFTokenizer.from_dir(hf_dir)
    assert tok.eos_id == tok.pad_id == 2 and tok.bos_id is None


def test_hf_chat_template_is_rendered(hf_dir):
    tok = HFTokenizer.from_dir(hf_dir)
    messages = [{"role": "user", "content": "2+2?"}]
    assert tok.apply_chat_template(messages) == "<s><|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == "<s><|im_start|>user\n2+2?<|im_end|>\n"
    ids = tok.encode(tok.apply_chat_template(messages))
    assert ids[:2] == [tok.bos_id, 3]


def test_hf_chat_template_renders_like_transformers(hf_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), bos_token="<s>",
                                               eos_token="<|im_end|>", pad_token="<pad>", chat_template=CHATML)
    tok = HFTokenizer.from_dir(hf_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXT}]
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    assert tok.encode(expected) == ref.encode(expected, add_special_tokens=False)


def test_hf_chat_template_from_jinja_file(hf_dir):
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (hf_dir / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}{{ eos_token }}")
    tok = HFTokenizer.from_dir(hf_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "[a][b]</s>"


def test_hf_missing_chat_template_is_a_clear_error(hf_dir):
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = HFTokenizer.from_dir(hf_dir)
    assert tok.encode("fox")  # still usable for plain text
    with pytest.raises(TokenizerError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_hf_special_token_outside_vocabulary_is_named(hf_dir):
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
    with pytest.raises(TokenizerError, match=r"eos_token '<\|eot\|>' is not in the vocabulary"):
        HFTokenizer.from_dir(hf_dir)


def test_load_tokenizer_by_spec(hf_dir, tmp_path):
    assert isinstance(load_tokenizer("char"), CharTokenizer)
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    assert isinstance(load_tokenizer(str(hf_dir)), HFTokenizer)
    with pytest.raises(TokenizerError, match="unknown tokenizer 'chars'"):
        load_tokenizer("chars")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_hf_tokenizer_without_the_package_says_how_to_install(hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(TokenizerError, match=r"pip install rlpipe\[hf\]"):
        HFTokenizer.from_dir(hf_dir)
