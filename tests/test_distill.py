"""Distillation against hand-computed losses, a plain SFT run (alpha = 1) and the teacher it should move toward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_texts, write_jsonl
from test_sft import write_chats

from nanomind import checkpoint
from nanomind.conversations import ChatBatches, load_chat
from nanomind.model import ModelConfig, Transformer, preset
from nanomind.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from nanomind.train import distill, sft
from nanomind.train.losses import distill_loss


def test_distill_loss_equals_hand_computed_values():
    student, teacher, labels = torch.zeros(1, 3), torch.tensor([[math.log(2), 0.0, 0.0]]), torch.tensor([0])
    loss, ce, kl = distill_loss(student, teacher, labels, alpha=0.25, temperature=1.0)
    # teacher probabilities (1/2, 1/4, 1/4), student uniform: CE = ln 3, KL = 1/2 ln(3/2) + 1/2 ln(3/4)
    assert ce.item() == pytest.approx(math.log(3))
    assert kl.item() == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75))
    assert loss.item() == pytest.approx(0.25 * math.log(3) + 0.75 * 0.5 * math.log(1.125))
    loss, _, kl = distill_loss(student, teacher, labels, alpha=0.25, temperature=2.0)
    p = torch.tensor([math.sqrt(2), 1.0, 1.0]) / (math.sqrt(2) + 2)  # softmax of the teacher's logits / 2
    expected_kl = float((p * (3 * p).log()).sum())
    assert kl.item() == pytest.approx(expected_kl, rel=1e-6)
    assert loss.item() == pytest.approx(0.25 * math.log(3) + 0.75 * 4 * expected_kl, rel=1e-6)
    scaled, _, _ = distill_loss(student, teacher, labels, 0.25, 2.0, scale=torch.tensor([3.0]))
    assert scaled.item() == pytest.approx(3 * loss.item())


@pytest.fixture()
def setup(tokenizer_dir, tmp_path):
    """A debug student, a differently shaped teacher, and the data. The teacher is trained to answer the same
    questions differently, so that moving toward it and fitting the data are not the same thing."""
    texts = make_texts(160, seed=9)
    convs = [[{"role": "user", "content": t[:50]}, {"role": "assistant", "content": "Sure: " + t[:30]}] for t in texts]
    data = write_chats(tmp_path / "chat.jsonl", convs)
    other = [[c[0], {"role": "assistant", "content": "No, " + c[0]["content"][-20:]}] for c in convs]
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "student", 0, Transformer(preset("debug", vocab_size=400)), tokenizer_dir)
    big = ModelConfig(vocab_size=400, hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=3, qk_norm=True, max_position_embeddings=256)  # fmt: skip
    checkpoint.save(tmp_path / "teacher0", 0, Transformer(big), tokenizer_dir)
    other_data = write_chats(tmp_path / "other.jsonl", other)
    teacher = sft.run(config(sft.SFTConfig, tmp_path / "teacher0", other_data, tmp_path / "teacher", steps=15))
    return tmp_path / "student", teacher.checkpoint, data


def config(cls, init, data, out, **kw):
    cfg = dict(init=str(init), data=[str(data)], out=str(out), steps=8, batch_size=4, seq_len=128, lr=3e-3,
               dtype="fp32", eval_every=0, eval_batches=2, tensorboard=False, warmup_steps=2, val_fraction=0.1,
               save_every=0)  # fmt: skip
    return cls(**{**cfg, **kw})


def mean_kl(student: Transformer, teacher: Transformer, data, tok_dir) -> float:
    """KL(teacher || student) per trained token on the first rows of the data."""
    chats = load_chat([str(data)], Tokenizer.load(tok_dir), 128)
    b = ChatBatches(chats, 8, 128, seed=0).next()
    mask = b["labels"] != -100
    with torch.no_grad():
        s = student(b["input_ids"], doc_ids=b["doc_ids"]).logits[mask]
        t = teacher(b["input_ids"], doc_ids=b["doc_ids"]).logits[mask]
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean").item()


def test_alpha_one_is_sft_and_alpha_zero_moves_the_student_to_the_teacher(setup, tokenizer_dir, tmp_path):
    student, teacher, data = setup
    plain = sft.run(config(sft.SFTConfig, student, data, tmp_path / "sft"))
    kw = dict(teacher=str(teacher))
    ce_only = distill.run(config(distill.DistillConfig, student, data, tmp_path / "d1", alpha=1.0, **kw))
    assert ce_only.losses == pytest.approx(plain.losses, rel=1e-5)  # the teacher plays no part at alpha = 1
    kd = distill.run(config(distill.DistillConfig, student, data, tmp_path / "d0", alpha=0.0, **kw))
    t = checkpoint.load_model(teacher).eval()
    kl = {name: mean_kl(checkpoint.load_model(path).eval(), t, data, tokenizer_dir)
          for name, path in [("start", student), ("sft", plain.checkpoint), ("kd", kd.checkpoint)]}  # fmt: skip
    assert kl["kd"] < 0.8 * min(kl["start"], kl["sft"])


def test_teacher_and_student_must_share_a_tokenizer(setup, tmp_path):
    student, teacher, data = setup
    corpus = write_jsonl(tmp_path / "other.jsonl", make_texts(200, seed=3))
    train_tokenizer(TokenizerTrainConfig(data=[str(corpus)], out=str(tmp_path / "tok2"), vocab_size=350))
    checkpoint.save(tmp_path / "stranger", 0, Transformer(preset("debug", vocab_size=350)), tmp_path / "tok2")
    with pytest.raises(ValueError, match="must share one tokenizer"):
        distill.run(config(distill.DistillConfig, tmp_path / "stranger", data, tmp_path / "x", teacher=str(teacher)))
