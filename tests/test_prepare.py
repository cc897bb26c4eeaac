"""prepare / TokenShards / PackedBatches against the input text, the tokenizer, and second runs."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, make_texts, write_jsonl

from nanomind.data import (
    PackedBatches,
    PrepareConfig,
    TokenShards,
    eval_batches,
    prepare,
)
from nanomind.jsonl import BadLines, read_jsonl
from nanomind.tokenizer import Tokenizer

BAD_LINES = [  # (line, reason or None for a good line)
    ('{"text": "first good line"}', None),
    ('{"text": "unterminated', "invalid JSON"),
    ('{"title": "no text field"}', "missing 'text'"),
    ('{"text": ""}', "empty 'text'"),
    ('{"text": 42}', "'text' is not a string"),
    ('["text", "an array"]', "not a JSON object"),
    ('{"text": " \\n\\t "}', "empty 'text'"),
    ('{"text": "second good, 中文 😀", "extra": 1}', None),
    ("", "blank line"),
    ('{"text": "lone \\ud800 surrogate"}', "'text' has a lone surrogate"),
    ('{"text": null}', "'text' is not a string"),
    ('{"text": "last good line"}', None),
]


def test_read_jsonl_counts_bad_lines_with_exact_line_numbers(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(line for line, _ in BAD_LINES) + "\n", encoding="utf-8")
    report = BadLines()
    got = list(read_jsonl(str(path), "text", report))
    good = [(n, json.loads(line)["text"]) for n, (line, why) in enumerate(BAD_LINES, 1) if why is None]
    assert got == good
    expected: dict[str, int] = {}
    for _, why in BAD_LINES:
        if why:
            expected[why] = expected.get(why, 0) + 1
    assert report.counts == expected
    bad_numbers = [n for n, (_, why) in enumerate(BAD_LINES, 1) if why]
    assert report.examples == [f"{path}:{n}: {BAD_LINES[n - 1][1]}" for n in bad_numbers[:5]]


def _split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(tokens == eos)
    assert len(ends) and ends[-1] == len(tokens) - 1, "every document ends with eos"
    return [tokens[a + 1 : b].tolist() for a, b in zip(np.r_[-1, ends[:-1]], ends)]


@pytest.fixture(scope="module")
def prepared(tokenizer_dir, tmp_path_factory):
    """Three input files (the middle one with bad lines); small shards so documents straddle shard boundaries."""
    root = tmp_path_factory.mktemp("prepared")
    texts = make_texts(150, seed=11)
    a = write_jsonl(root / "a.jsonl", texts[:100])
    b = root / "b.jsonl"
    b.write_text("\n".join(line for line, _ in BAD_LINES) + "\n", encoding="utf-8")
    good_b = [json.loads(line)["text"] for line, why in BAD_LINES if why is None]
    c = write_jsonl(root / "c.jsonl", texts[100:])
    cfg = PrepareConfig(data=[str(a), str(b), str(c)], tokenizer=str(tokenizer_dir), out=str(root / "out"),
                        val_fraction=0.1, shard_tokens=500, batch_docs=7)  # fmt: skip
    meta = prepare(cfg)
    return {"cfg": cfg, "meta": meta, "docs": texts[:100] + good_b + texts[100:], "tok": Tokenizer.load(tokenizer_dir)}


def test_prepare_meta_counts_and_shards_decode_to_the_input(prepared):
    cfg, meta, docs, tok = prepared["cfg"], prepared["meta"], prepared["docs"], prepared["tok"]
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["docs"] + val["docs"] == len(docs) == 153
    assert train["tokens"] + val["tokens"] == sum(len(tok.encode(t)) + 1 for t in docs)
    assert train["bytes"] + val["bytes"] == sum(len(t.encode()) for t in docs)
    assert [i["records"] for i in meta["inputs"]] == [100, 3, 50]
    assert meta["inputs"][1]["bad_lines"] == {
        "invalid JSON": 1, "missing 'text'": 1, "empty 'text'": 2, "'text' is not a string": 2,
        "not a JSON object": 1, "blank line": 1, "'text' has a lone surrogate": 1,
    }  # fmt: skip
    for info, path in zip(meta["inputs"], cfg.data):
        with open(path, "rb") as fh:
            assert info["sha256"] == hashlib.sha256(fh.read()).hexdigest()
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tok.eos_id == 0
    assert len(train["shards"]) > 2  # documents straddle shard boundaries
    # Documents 1, 11, 21, ... (0-based) are val, the rest train, each in input order.
    want = {"train": [t for i, t in enumerate(docs) if i % 10 != 1], "val": docs[1::10]}
    assert json.loads((Path(cfg.out) / "meta.json").read_text()) == meta
    for split in ("train", "val"):
        shards = TokenShards(cfg.out, split)
        assert len(shards) == meta["splits"][split]["tokens"]
        tokens = shards.get(0, len(shards))
        assert [tok.decode(d) for d in _split_docs(tokens, tok.eos_id)] == want[split]
        starts = np.r_[0, np.flatnonzero(tokens == tok.eos_id)[:-1] + 1]
        assert np.array_equal(shards.doc_starts(), starts)
    # A slice across a shard boundary (shards hold 500 tokens) equals the same slice of the concatenation.
    train_tokens = np.concatenate([np.fromfile(Path(cfg.out) / s["file"], np.uint16) for s in train["shards"]])
    assert np.array_equal(TokenShards(cfg.out, "train").get(480, 1050), train_tokens[480:1530])
    copied = Tokenizer.load(Path(cfg.out) / "tokenizer")
    assert copied.encode(" ".join(docs)) == tok.encode(" ".join(docs))


def test_prepare_is_independent_of_batch_size(prepared, tmp_path):
    cfg = prepared["cfg"]
    again = PrepareConfig(data=cfg.data, tokenizer=cfg.tokenizer, out=str(tmp_path / "again"),
                          val_fraction=cfg.val_fraction, shard_tokens=cfg.shard_tokens, batch_docs=1000)  # fmt: skip
    meta = prepare(again)
    assert meta["splits"] == prepared["meta"]["splits"]
    for shard in meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"]:
        for name in (shard["file"], shard["index"]):
            assert (tmp_path / "again" / name).read_bytes() == (Path(cfg.out) / name).read_bytes()


def test_val_split_has_a_document_when_there_are_two(tokenizer_dir, tmp_path):
    for n, (n_train, n_val) in {1: (1, 0), 2: (1, 1), 3: (2, 1)}.items():
        data = write_jsonl(tmp_path / f"{n}.jsonl", make_texts(n, seed=n))
        meta = prepare(PrepareConfig(data=[str(data)], tokenizer=str(tokenizer_dir), out=str(tmp_path / f"o{n}")))
        assert (meta["splits"]["train"]["docs"], meta["splits"]["val"]["docs"]) == (n_train, n_val)


def test_prepare_user_errors(tokenizer_dir, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ["fine"])
    all_bad = tmp_path / "all_bad.jsonl"
    all_bad.write_text('{"text": ""}\n[1]\nnope\n')
    out = tmp_path / "out"
    for data, name in [([good, all_bad], "all_bad.jsonl"), ([good, tmp_path / "nope.jsonl"], "nope.jsonl")]:
        with pytest.raises(ValueError, match=name):
            prepare(PrepareConfig(data=[str(p) for p in data], tokenizer=str(tokenizer_dir), out=str(out)))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["all_bad.jsonl", "good.jsonl"]  # nothing half-written
    with pytest.raises(ValueError, match="nanomind prepare"):
        TokenShards(tmp_path, "train")
    with pytest.raises(ValueError, match="not a prepared data directory"):  # never deletes unrelated files
        prepare(PrepareConfig(data=[str(good)], tokenizer=str(tokenizer_dir), out=str(tmp_path)))
    prepare(PrepareConfig(data=[str(good)], tokenizer=str(tokenizer_dir), out=str(out)))
    meta = prepare(PrepareConfig(data=[str(good), str(good)], tokenizer=str(tokenizer_dir), out=str(out)))
    assert TokenShards(out, "train").meta == meta  # a prepared directory is replaced
    with pytest.raises(ValueError, match="val-fraction"):
        PrepareConfig(data=["a"], tokenizer="t", out="o", val_fraction=0.9)


def _chunk_ids(shards: TokenShards, seq_len: int) -> dict[bytes, int]:
    n = (len(shards) - 1) // seq_len
    table = {shards.get(k * seq_len, seq_len + 1).tobytes(): k for k in range(n)}
    assert len(table) == n, "chunks must be distinct to identify rows"
    return table


def _row_chunks(batch: dict, table: dict[bytes, int], dtype) -> list[int]:
    x, y = batch["input_ids"], batch["labels"]
    assert x.dtype == y.dtype == torch.long and torch.equal(x[:, 1:], y[:, :-1])  # labels = inputs shifted by one
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy().astype(dtype)
    return [table[r.tobytes()] for r in rows]


def test_packed_batches_cover_each_chunk_once_per_epoch_and_resume(prepared):
    shards = TokenShards(prepared["cfg"].out, "train")
    seq_len = 16
    table = _chunk_ids(shards, seq_len)
    n = len(table)
    bs = 5 if n % 5 else 7  # not a divisor of n: some batches straddle two epochs
    loader = PackedBatches(shards, bs, seq_len, seed=1)
    assert loader.num_chunks == n
    seen = [k for _ in range(2 * n // bs + 1) for k in _row_chunks(loader.next(), table, shards.get(0, 1).dtype)]
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n : 2 * n]) == list(range(n))
    assert seen[:n] != list(range(n)) and seen[:n] != seen[n : 2 * n]  # shuffled, differently each epoch
    again = PackedBatches(shards, bs, seq_len, seed=1)
    assert _row_chunks(again.next(), table, np.uint16) == seen[:bs]
    other = PackedBatches(shards, bs, seq_len, seed=2)
    assert _row_chunks(other.next(), table, np.uint16) != seen[:bs]
    # Resume: a loader restored from a state dict continues exactly (also through torch.save, as checkpoints do).
    for _ in range(5):
        again.next()
    state = again.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed = PackedBatches(shards, bs, seq_len, seed=1)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(n):
        a, b = again.next(), resumed.next()
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    with pytest.raises(ValueError, match="seq_len"):
        PackedBatches(shards, bs, 32, seed=1).load_state_dict(state)


def test_ranks_partition_the_single_process_rows(prepared):
    shards = TokenShards(prepared["cfg"].out, "train")
    single = PackedBatches(shards, 4, 8, seed=3)
    ranks = [PackedBatches(shards, 2, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):
        rows = single.next()["input_ids"]
        parts = [r.next()["input_ids"] for r in ranks]
        assert torch.equal(parts[0], rows[0::2]) and torch.equal(parts[1], rows[1::2])


def test_short_splits(prepared):
    val = TokenShards(prepared["cfg"].out, "val")
    with pytest.raises(ValueError, match=f"{len(val)} tokens"):
        PackedBatches(val, 1, len(val), seed=0)
    tokens = val.get(0, len(val))
    batches = eval_batches(val, 4, 8, max_batches=3)
    assert len(batches) == 3 and all(b["input_ids"].shape == (4, 8) for b in batches)
    assert torch.equal(batches[1]["input_ids"][0], torch.from_numpy(tokens[32:40].astype(np.int64)))
    assert [b["labels"].tolist() for b in eval_batches(val, 4, 8, 3)] == [b["labels"].tolist() for b in batches]
    few = eval_batches(val, 1000, 8, max_batches=5)  # fewer chunks than one batch: one smaller batch
    assert len(few) == 1 and few[0]["input_ids"].shape == ((len(val) - 1) // 8, 8)
    (one,) = eval_batches(val, 4, 10 * len(val), max_batches=5)  # shorter than one row: one shorter row
    assert torch.equal(one["labels"][0], torch.from_numpy(tokens[1:].astype(np.int64)))


def test_real_fixture_round_trips(tokenizer_dir, tmp_path):
    path = FIXTURES / "pretrain_tiny.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared/data is not beside the repository)")
    docs = [t for _, t in read_jsonl(str(path))]
    meta = prepare(PrepareConfig(data=[str(path)], tokenizer=str(tokenizer_dir), out=str(tmp_path / "o")))
    tok = Tokenizer.load(tokenizer_dir)
    train = TokenShards(tmp_path / "o", "train")
    assert len(train) == meta["splits"]["train"]["tokens"]
    got = [tok.decode(d) for d in _split_docs(train.get(0, len(train)), tok.eos_id)]
    assert got == [t for i, t in enumerate(docs) if i % 200 != 1]
