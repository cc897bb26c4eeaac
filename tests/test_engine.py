"""Continuous batching against the reference: each request, batched with others, joining late or alone, yields
exactly the tokens that generate() yields for it alone."""

from __future__ import annotations

import pytest
import torch

from nanomind.engine import Engine, Request
from nanomind.generate import SamplingConfig, generate
from nanomind.model import Transformer, preset

SETTINGS = [
    SamplingConfig(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0),
    SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=3),
    SamplingConfig(max_new_tokens=9, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=5),
    SamplingConfig(max_new_tokens=15, temperature=0.9, top_k=50, frequency_penalty=1.5, presence_penalty=0.5),
]
PROMPTS = [[5, 17, 42], [7] * 11, list(range(30, 60)), [99, 3]]
STOP = (11,)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("debug", vocab_size=128, max_position_embeddings=64)).eval()


def collect(requests_out: dict, key):
    def on_token(token, finish):
        requests_out.setdefault(key, {"tokens": [], "finish": None})
        if token is None:
            requests_out[key]["finish"] = finish
        else:
            requests_out[key]["tokens"].append(token)

    return on_token


def run(engine: Engine, until_idle: bool = True) -> None:
    while engine.running or not engine.waiting.empty():
        engine.step()


def test_a_batch_of_requests_yields_what_each_yields_alone(model):
    engine, out = Engine(model, max_batch=4), {}
    for i, (p, s) in enumerate(zip(PROMPTS[:3], SETTINGS[:3], strict=True)):
        engine.submit(Request(p, s, collect(out, i), stop_ids=STOP))
    engine.step()
    engine.step()
    engine.submit(Request(PROMPTS[3], SETTINGS[3], collect(out, 3), stop_ids=STOP))  # joins a running batch
    run(engine)
    for i, (p, s) in enumerate(zip(PROMPTS, SETTINGS, strict=True)):
        alone = list(generate(model, p, s, stop_ids=STOP))
        assert out[i]["tokens"] == alone, i
        assert out[i]["finish"] == ("stop" if len(alone) < s.max_new_tokens else "length")
    assert engine.steps < sum(len(o["tokens"]) for o in out.values())  # the requests shared steps


def test_context_end_more_requests_than_rows_and_cancel(model):
    engine, out = Engine(model, max_batch=2, max_len=40), {}
    long = SamplingConfig(max_new_tokens=100, temperature=1.0, seed=1, ignore_eos=True)
    reqs = [engine.submit(Request(list(range(1, 31)), long, collect(out, "ctx")))]  # 30 + 10 = the context
    reqs.append(engine.submit(Request([4, 5], long, collect(out, "cancel"))))
    reqs.append(engine.submit(Request([6], SETTINGS[0], collect(out, "queued"), stop_ids=STOP)))
    engine.step()
    assert len(engine.running) == 2 and engine.waiting.qsize() == 1  # the third waits for a free row
    reqs[1].cancel()
    engine.step()
    assert out["cancel"]["finish"] == "cancelled" and reqs[2] in engine.running
    run(engine)
    assert len(out["ctx"]["tokens"]) == 10 and out["ctx"]["finish"] == "length"
    cut = SamplingConfig(**{**vars(long), "max_new_tokens": 10})
    assert out["ctx"]["tokens"] == list(generate(model, list(range(1, 31)), cut))
    assert out["queued"]["tokens"] == list(generate(model, [6], SETTINGS[0], stop_ids=STOP))
    with pytest.raises(ValueError, match="at most"):
        engine.submit(Request(list(range(40)), long, collect(out, "x")))


def test_engine_thread_serves_requests(model):
    import threading

    engine, out, done = Engine(model, max_batch=4).start(), {}, threading.Event()

    def on_token(token, finish):
        collect(out, 0)(token, finish)
        if finish:
            done.set()

    try:
        engine.submit(Request(PROMPTS[1], SETTINGS[1], on_token, stop_ids=STOP))
        assert done.wait(30)
    finally:
        engine.stop()
    assert out[0]["tokens"] == list(generate(model, PROMPTS[1], SETTINGS[1], stop_ids=STOP))
