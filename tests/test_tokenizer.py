"""The tokenizer against exact round trips, transformers' AutoTokenizer, and byte counts of the input text."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
from conftest import make_texts, write_jsonl

from nanomind.tokenizer import (
    SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    TokenizerTrainConfig,
    tokenizer_files,
    train_tokenizer,
)

TRICKY = [
    "",
    "Hello, world!",
    "  two leading spaces and trailing   ",
    "\n\nparagraph\n\n\n",
    "tabs\tand\r\nCRLF",
    "emoji 😀🚀👩‍👩‍👧 flags 🇨🇳",
    "中文：你好，世界！日本語 한국어",
    "combining: e\u0301 a\u0308\u0323 Z\u0335\u0321",
    "control \x00\x01\x1b[31m \x7f and zero width \u200b\u200d\ufeff",
    "looks special: <|endoftext|> <|im_start|>user\nhi<|im_end|> <think></think> <|reserved_3|>",
    "almost special: <|im_start <|endoftext| <thinkk>",
    "numbers 1234567890 3.14159 -0.5e10",
    "math ∑∫√∞ ≠ ≤ and private use \ue000 and astral 𝔘𝔫𝔦 \U0010fffd",
]


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Strings of code points from every plane (no surrogates: not valid in UTF-8)."""
    rng = random.Random(seed)
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        chars = [chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 30))]
        out.append("".join(chars))
    return out


def test_round_trip_is_exact(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    for text in TRICKY + random_strings(200):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    batch = TRICKY + make_texts(20, seed=5)
    assert tok.encode_batch(batch) == [tok.encode(t) for t in batch]


def test_special_tokens_come_first_and_match_as_one_id(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.eos_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2)
    assert 256 + len(SPECIAL_TOKENS) <= tok.vocab_size <= 400
    assert tok.encode("<|im_start|>user") == [tok.im_start_id, *tok.encode("user")]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.token_id("<|no_such_token|>")


def test_transformers_autotokenizer_matches(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok = Tokenizer.load(tokenizer_dir)
    for text in TRICKY + make_texts(10, seed=7):
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, text  # same ids: no BOS, no post-processor
        assert hf.decode(ids) == text
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.eos_id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 😀"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好 😀<|im_end|>\n"
    assert hf.apply_chat_template(messages, tokenize=False) == expected
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == expected + "<|im_start|>assistant\n"
    assert hf(rendered)["input_ids"] == tok.encode(rendered)


def test_token_bytes_count_utf8_bytes(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    table = tok.token_bytes()
    assert table.shape == (tok.vocab_size,)
    assert (table[: len(SPECIAL_TOKENS)] == 0).all() and (table[len(SPECIAL_TOKENS) :] >= 1).all()
    for text in [t for t in TRICKY if "<" not in t] + random_strings(50, seed=1):
        assert table[tok.encode(text)].sum() == len(text.encode("utf-8"))
    assert table[tok.encode("<|im_start|>hi")].sum() == 2


def test_stream_decoder_holds_back_split_characters(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    text = "中文 😀 e\u0301 𝔘 ok"
    ids = tok.encode(text)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    # With a 400-token vocab the 4-byte emoji must be split across byte tokens, so some pushes hold back.
    assert "" in pieces
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text
    # Invalid UTF-8 (a lone continuation byte, a truncated sequence): the same U+FFFD as decode().
    byte_id = {b: i for i, b in enumerate(tok.id_bytes()) if len(b) == 1}
    bad = [byte_id[b"a"], byte_id[b"\x80"], tok.im_end_id, byte_id[b"\xe4"], byte_id[b"\xb8"]]
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in bad) + stream.flush() == tok.decode(bad)


def test_saved_files_reload_identically(tokenizer_dir, tmp_path):
    files = tokenizer_files(tokenizer_dir)
    assert sorted(p.rsplit("/", 1)[1] for p in files) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for f in files:
        shutil.copy(f, tmp_path)
    a, b = Tokenizer.load(tokenizer_dir), Tokenizer.load(tmp_path)
    text = " ".join(TRICKY)
    assert a.encode(text) == b.encode(text) and a.vocab_size == b.vocab_size
    assert np.array_equal(a.token_bytes(), b.token_bytes())


def test_training_holds_out_every_nth_record_and_stops_at_max_chars(tmp_path, capsys):
    texts = make_texts(300, seed=3)
    corpus = write_jsonl(tmp_path / "all.jsonl", texts)
    cfg = TokenizerTrainConfig(data=[str(corpus)], out=str(tmp_path / "a"), vocab_size=400, max_chars=3000)
    capped = train_tokenizer(cfg)
    out = capsys.readouterr().out
    assert "stopping at --max-chars 3000" in out and "bytes/token" in out
    # The same training text written out by hand: records 100, 200, ... (1-based) held out, stop at 3000 chars.
    seen, chars = [], 0
    for n, text in enumerate(texts, 1):
        if n % 100 and chars < 3000:
            seen.append(text)
            chars += len(text)
    by_hand = write_jsonl(tmp_path / "seen.jsonl", seen)
    reference = train_tokenizer(
        TokenizerTrainConfig(data=[str(by_hand)], out=str(tmp_path / "b"), vocab_size=400, heldout_fraction=0)
    )
    assert capped.backend.get_vocab() == reference.backend.get_vocab()


def test_user_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="at least 272"):
        TokenizerTrainConfig(data=["x.jsonl"], out="o", vocab_size=100)
    with pytest.raises(ValueError, match="heldout-fraction"):
        TokenizerTrainConfig(data=["x.jsonl"], out="o", heldout_fraction=0.9)
    with pytest.raises(ValueError, match="missing.jsonl"):
        train_tokenizer(TokenizerTrainConfig(data=[str(tmp_path / "missing.jsonl")], out=str(tmp_path / "o")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl"):
        train_tokenizer(TokenizerTrainConfig(data=[str(bad)], out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
