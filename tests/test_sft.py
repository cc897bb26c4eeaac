"""SFT data and training against references: transformers' chat template, hand-built masks, the unpacked rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, make_texts

from nanomind import checkpoint
from nanomind.conversations import ChatBatches, load_chat, make_row, pack
from nanomind.tokenizer import IM_END, Tokenizer, render_chat

SYSTEM = {"role": "system", "content": "You are {{name}}, made by {{author}}."}
CONVS = {
    "single": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! 😀 你好"}],
    "multi": [{"role": "user", "content": "one"}, {"role": "assistant", "content": " two\n"},
              {"role": "user", "content": "three"}, {"role": "assistant", "content": "four",
                                                     "reasoning_content": "count on"}],
    "system": [SYSTEM, {"role": "user", "content": "who?"}, {"role": "assistant", "content": "I am {{name}}."}],
}  # fmt: skip


def write_chats(path: Path, convs: list[list[dict]], extra_lines: list[str] = ()) -> Path:
    lines = [json.dumps({"conversations": c}, ensure_ascii=False) for c in convs] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer_dir, kind):
    tok = Tokenizer.load(tokenizer_dir)
    ids, trained = tok.encode_chat(CONVS[kind])
    picked = tok.decode([i for i, t in zip(ids, trained, strict=True) if t])
    expected = ""
    for m in CONVS[kind]:
        if m["role"] == "assistant":
            think = f"<think>\n{m['reasoning_content']}\n</think>\n\n" if m.get("reasoning_content") else ""
            expected += think + m["content"] + IM_END
    assert picked == expected
    assert tok.decode(ids) == render_chat(CONVS[kind])[0]


def test_rendering_equals_transformers_apply_chat_template(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok = Tokenizer.load(tokenizer_dir)
    for conv in CONVS.values():
        assert render_chat(conv)[0] == hf.apply_chat_template(conv, tokenize=False)
        assert tok.encode_chat(conv)[0] == hf.apply_chat_template(conv, tokenize=True, return_dict=False)
        prompt = conv[:-1]
        assert render_chat(prompt, True)[0] == hf.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True
        )


def test_bad_records_long_conversations_and_placeholders(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    long_turns = [{"role": r, "content": "word " * 8} for r in ("user", "assistant") * 4]
    path = write_chats(tmp_path / "c.jsonl", [CONVS["system"], long_turns, [{"role": "user", "content": "x" * 900},
                       {"role": "assistant", "content": "y"}]],
                       ["{not json", json.dumps({"conversations": [{"role": "robot", "content": "x"}]}),
                        json.dumps({"conversations": [{"role": "user", "content": "only a question"}]})])  # fmt: skip
    data = load_chat([str(path)], tok, max_len=120, placeholders={"name": "nano", "author": "us"})
    assert data.bad.counts == {"invalid JSON": 1, "turn 0 needs a role in ['assistant', 'system', 'user'] and a "
                               "string content": 1, "no assistant turn with content": 1}  # fmt: skip
    assert [e.split(":")[1] for e in data.bad.examples] == ["4", "5", "6"]  # line numbers
    assert (data.truncated, data.dropped, len(data.ids)) == (1, 1, 2)
    assert len(data.ids[1]) <= 120 and tok.decode(data.ids[1].tolist()).endswith(IM_END + "\n")
    assert "I am nano." in tok.decode(data.ids[0].tolist()) and "made by us" in tok.decode(data.ids[0].tolist())
    with pytest.raises(ValueError, match="no usable conversation"):
        load_chat([str(write_chats(tmp_path / "bad.jsonl", [], ["[1, 2]"]))], tok, 120)


def test_packed_rows_hold_every_conversation_once_with_its_own_labels(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    texts = make_texts(60, seed=4)
    convs = [[{"role": "user", "content": a[:80]}, {"role": "assistant", "content": b[:120]}]
             for a, b in zip(texts[::2], texts[1::2], strict=True)]  # fmt: skip
    data = load_chat([str(write_chats(tmp_path / "c.jsonl", convs))], tok, max_len=512)
    batches = ChatBatches(data, batch_size=4, seq_len=512, seed=0)
    assert sorted(i for row in batches.rows for i in row) == list(range(len(data.ids)))
    assert batches.fill() > 2 * ChatBatches(data, 4, 512, 0, packed=False).fill()
    row = max(batches.rows, key=len)
    assert len(row) > 2
    ids, labels, docs = make_row(data, row, 512)
    n = 0
    for d, i in enumerate(row):  # each conversation's slice: its ids, its own shifted masked labels
        x, t = data.ids[i], data.trained[i]
        assert (ids[n : n + len(x)] == x).all() and (docs[n : n + len(x)] == d).all()
        assert (labels[n : n + len(x) - 1] == np.where(t[1:], x[1:], -100)).all() and labels[n + len(x) - 1] == -100
        n += len(x)
    assert (labels[n:] == -100).all() and (docs[n:] == -1).all()


def test_best_fit_packing_is_near_the_lower_bound():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=2000).tolist()
    rows = pack(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(2000))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    lower = max(sum(n > 256 for n in lengths), math.ceil(sum(lengths) / 512))
    assert len(rows) <= lower * 1.02


def _epoch_visits_every_row_once_and_trims_only_padding(batches: ChatBatches) -> None:
    """Drain one epoch through next(): each row comes once, and every batch holds all of its rows' tokens."""
    n, size = len(batches.rows), batches.batch_size
    order = np.concatenate([batches.order(0), batches.order(1)])  # the last batch may run into the next epoch
    for start in range(0, n, size):
        b, rows = batches.next(), order[start : start + size]
        assert b["input_ids"].shape[1] >= batches.row_len[rows].max()
        assert int((b["doc_ids"] >= 0).sum()) == batches.row_len[rows].sum()
    assert sorted(batches.order(0).tolist()) == list(range(n))


def test_batches_are_cut_to_their_longest_row_and_lose_nothing(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    texts = make_texts(300, seed=5)  # long and short conversations: many rows cannot be filled
    convs = [[{"role": "user", "content": t}, {"role": "assistant", "content": t[: len(t) // 3]}] for t in texts]
    data = load_chat([str(write_chats(tmp_path / "c.jsonl", convs))], tok, max_len=256)
    batches = ChatBatches(data, batch_size=4, seq_len=256, seed=0)
    _epoch_visits_every_row_once_and_trims_only_padding(batches)
    widths = [batches.width(batches.order(0)[i : i + 4]) for i in range(0, len(batches.rows), 4)]
    assert min(widths) < 256 and all(w % 16 == 0 or w == 256 for w in widths)
    computed = sum(len(batches.order(0)[i : i + 4]) * w for i, w in zip(range(0, len(batches.rows), 4), widths))
    assert batches.fill() == pytest.approx(batches.row_len.sum() / computed)


def test_packing_waste_on_sft_zh_reading_qa(tmp_path):
    """The acceptance figure: a 6400-token BPE trained on the shared tokenizer corpus, seq_len 512."""
    from nanomind.tokenizer import TokenizerTrainConfig, train_tokenizer

    shared = FIXTURES.parent
    path, corpus = shared / "sft" / "sft_zh_reading_qa.jsonl", shared / "tokenizer" / "tokenizer_corpus.jsonl"
    if not (path.is_file() and corpus.is_file()):
        pytest.skip(f"{path} or {corpus} not present")
    train_tokenizer(TokenizerTrainConfig(data=[str(corpus)], vocab_size=6400, out=str(tmp_path / "tok")))
    data = load_chat([str(path)], Tokenizer.load(tmp_path / "tok"), max_len=512)
    assert len(data.ids) + data.dropped + data.bad.total == 3104  # every record is used, cut, or reported
    packed, padded = ChatBatches(data, 8, 512, 0), ChatBatches(data, 8, 512, 0, packed=False)
    assert sorted(i for row in packed.rows for i in row) == list(range(len(data.ids)))
    lengths = [len(i) for i in data.ids]
    lower = max(sum(n > 256 for n in lengths), math.ceil(sum(lengths) / 512))
    assert len(packed.rows) <= lower + 1  # within one row of the best any exact packing can do
    assert packed.fill() > 0.95 > padded.fill()
    _epoch_visits_every_row_once_and_trims_only_padding(packed)


def test_sft_lowers_held_out_assistant_loss_and_resumes(tokenizer_dir, tmp_path):
    from nanomind.model import Transformer, preset
    from nanomind.train import sft

    torch.manual_seed(0)
    checkpoint.save(tmp_path / "base", 0, Transformer(preset("debug", vocab_size=400)), tokenizer_dir)
    texts = make_texts(200, seed=8)
    convs = [[{"role": "user", "content": t[:60]}, {"role": "assistant", "content": "Sure: " + t[:40]}]
             for t in texts]  # fmt: skip
    data = write_chats(tmp_path / "chat.jsonl", convs)
    cfg = dict(init=str(tmp_path / "base"), data=[str(data)], out=str(tmp_path / "sft"), steps=30, batch_size=4,
               seq_len=128, lr=3e-3, dtype="fp32", eval_every=30, eval_batches=4, tensorboard=False,
               val_fraction=0.1)  # fmt: skip
    result = sft.run(sft.SFTConfig(**cfg))
    assert result.evals[-1]["val_loss"] < result.evals[0]["val_loss"] - 1.0
