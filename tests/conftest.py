"""Shared fixtures: a small generated multilingual corpus and a byte-level BPE (vocab 400) trained on it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "fixtures"
_WORDS = [
    "the", "of", "and", "a", "to", "in", "is", "was", "he", "for", "it", "with", "as", "his", "on", "be", "at",
    "tokenizer", "language", "model", "Hello", "World", "2024", "3.14", "naïve", "café", "über",
    "你好", "世界", "语言", "模型", "训练", "数据", "的", "是", "在", "了", "😀", "🚀", "e\u0301",
]  # fmt: skip


def make_texts(n: int, seed: int = 0) -> list[str]:
    """n deterministic documents mixing English, accents, Chinese, digits, emoji, punctuation and newlines."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 60))]
        seps = [rng.choice([" ", " ", " ", ", ", ". ", "\n", "\n\n", "  "]) for _ in words]
        texts.append("".join(w + s for w, s in zip(words, seps)).strip())
    return texts


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nanomind.tokenizer import TokenizerTrainConfig, train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    corpus = write_jsonl(root / "corpus.jsonl", make_texts(400, seed=1))
    train_tokenizer(TokenizerTrainConfig(data=[str(corpus)], out=str(root / "tok"), vocab_size=400))
    return root / "tok"
