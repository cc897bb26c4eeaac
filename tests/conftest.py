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


def assert_engine_matches_generate(model) -> None:
    """Four requests through a 3-row continuous-batching engine (per-row positions, one request joining a running
    batch, one waiting for a free row, finished rows taken over by the last request) yield exactly the tokens
    generate() yields for each alone: greedy, and seeded sampling with top-k / top-p."""
    from nanomind.engine import Engine, Request
    from nanomind.generate import SamplingConfig, generate

    settings = [SamplingConfig(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0),
                SamplingConfig(max_new_tokens=5, temperature=0.9, top_k=20, seed=3),
                SamplingConfig(max_new_tokens=15, temperature=1.0, top_k=0, top_p=1.0, seed=5),
                SamplingConfig(max_new_tokens=8, temperature=0.7, seed=7)]  # fmt: skip
    prompts = [[5, 17, 42], [7] * 11, list(range(30, 50)), [99, 3]]
    engine, out = Engine(model, max_batch=3), {}

    def collect(key):
        return lambda token, finish: out.setdefault(key, []).append(token) if token is not None else None

    engine.submit(Request(prompts[0], settings[0], collect(0)))
    engine.submit(Request(prompts[1], settings[1], collect(1)))
    engine.step()
    engine.submit(Request(prompts[2], settings[2], collect(2)))  # joins a running batch
    engine.submit(Request(prompts[3], settings[3], collect(3)))  # waits for a free row
    while engine.running or not engine.waiting.empty():
        engine.step()
    for i, (p, s) in enumerate(zip(prompts, settings, strict=True)):
        assert out[i] == list(generate(model, p, s)), i
