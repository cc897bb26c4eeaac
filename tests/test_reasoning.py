"""Reasoning SFT: the think-tag loss weight against a hand computation, enable_thinking against transformers, and a
model trained on reasoning conversations that opens its replies with <think>."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_texts, write_jsonl
from test_sft import write_chats

from nanomind import checkpoint
from nanomind.chat import THINK_PREFILL, ChatConfig, Session
from nanomind.generate import SamplingConfig, generate
from nanomind.model import Transformer, preset
from nanomind.tokenizer import NO_THINK, Tokenizer, TokenizerTrainConfig, render_chat, train_tokenizer
from nanomind.train import sft


def reasoning_chats(path, n: int = 120):
    texts = make_texts(n, seed=12)
    convs = [[{"role": "user", "content": t[:40]},
              {"role": "assistant", "content": "Answer: " + t[:12], "reasoning_content": "They ask " + t[:20]}]
             for t in texts]  # fmt: skip
    return write_chats(path, convs)


def test_tag_weight_changes_the_loss_by_the_hand_computed_amount(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    cfg = sft.SFTConfig(init="unused", data=[str(reasoning_chats(tmp_path / "r.jsonl"))], batch_size=4, seq_len=256,
                        tag_weight=10.0, val_fraction=0)  # fmt: skip
    batches, _ = sft.chat_data(cfg, tok, 0, 1)
    batch = batches.next()
    plain = {k: v for k, v in batch.items() if k != "loss_scale"}
    torch.manual_seed(0)
    model = Transformer(preset("debug", vocab_size=tok.vocab_size))
    tags = torch.isin(batch["labels"], torch.tensor([tok.token_id("<think>"), tok.token_id("</think>")]))
    assert tags.sum() == 2 * batch["doc_ids"].max(dim=1).values.add(1).sum()  # both tags of every conversation
    logits = model(batch["input_ids"], doc_ids=batch["doc_ids"]).logits
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none").view_as(tags)
    n = (batch["labels"] != -100).sum()
    # minimind's weighting: tag tokens count `weight` times, the mean still divides by the trained tokens
    expected = (ce.sum() + 9.0 * ce[tags].sum()) / n
    weighted, base = sft.sft_loss(model, batch)[0], sft.sft_loss(model, plain)[0]
    torch.testing.assert_close(weighted - base, 9.0 * ce[tags].sum() / n, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weighted, expected, atol=1e-5, rtol=1e-5)
    # the chunked loss's hand-written backward with a scale equals autograd on the full logits
    grads = torch.autograd.grad(weighted, [model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight])
    reference = torch.autograd.grad(expected, [model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight])
    for g, r in zip(grads, reference, strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


def test_enable_thinking_matches_transformers_and_chat_think_off(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning_content": "greet"},
            {"role": "user", "content": "2+2?"}]  # fmt: skip
    for flag in (True, False):
        ours = render_chat(conv, add_generation_prompt=True, enable_thinking=flag)[0]
        assert ours == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, enable_thinking=flag)
    assert render_chat(conv, True, enable_thinking=False)[0] == render_chat(conv, True)[0] + NO_THINK
    tok = Tokenizer.load(tokenizer_dir)
    session = Session(Transformer(preset("debug", vocab_size=tok.vocab_size)).eval(), tok,
                      ChatConfig(ckpt="unused", think="off"))  # fmt: skip
    assert THINK_PREFILL["off"] == NO_THINK
    assert session.prompt_ids("2+2?") == tok.encode(render_chat([{"role": "user", "content": "2+2?"}], True, False)[0])


def test_reasoning_sft_teaches_the_think_block(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "base", 0, Transformer(preset("debug", vocab_size=400)), tokenizer_dir)
    cfg = sft.SFTConfig(init=str(tmp_path / "base"), data=[str(reasoning_chats(tmp_path / "r.jsonl"))],
                        out=str(tmp_path / "sft"), steps=25, batch_size=4, seq_len=256, lr=3e-3, dtype="fp32",
                        eval_every=0, tensorboard=False, tag_weight=10.0, warmup_steps=2, save_every=0)  # fmt: skip
    model = checkpoint.load_model(sft.run(cfg).checkpoint).eval()
    greedy = SamplingConfig(temperature=0, max_new_tokens=1, repetition_penalty=1.0)
    prompt = render_chat([{"role": "user", "content": "the model"}], add_generation_prompt=True)[0]
    assert next(generate(model, tok.encode(prompt), greedy)) == tok.token_id("<think>")  # think: auto
    off = next(generate(model, tok.encode_prompt(prompt + NO_THINK), greedy))  # think: off
    assert off != tok.token_id("<think>")  # (a 0.1M model is too weak to write a real answer after it)


def test_prompt_ids_split_trailing_whitespace_as_training_saw_it(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["one\n\n two\n\n three"] * 100)  # teaches a "\n\n" token
    tok = train_tokenizer(TokenizerTrainConfig(data=[str(corpus)], out=str(tmp_path / "tok"), vocab_size=300))
    assert len(tok.encode(NO_THINK)) == 4 and len(tok.encode(NO_THINK + "Answer")) > 6  # the trap: "\n\n" merges
    prompt = render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)[0] + NO_THINK
    for text in (prompt, prompt + "word  ", "a\n\n\n", "plain"):
        ids = tok.encode_prompt(text)
        assert tok.decode(ids) == text
        assert tok.encode(text + "Answer: yes")[: len(ids)] == ids or text.endswith(" ")
