"""DPO against hand-computed losses, the chat template, a count of reference forwards and held-out rewards."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, make_texts

from nanomind import checkpoint
from nanomind.model import Transformer, preset
from nanomind.tokenizer import IM_END, Tokenizer, render_chat
from nanomind.train import dpo
from nanomind.train.losses import dpo_loss


def test_dpo_loss_equals_hand_computed_values():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -1.5])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # rewards 0.5 * (policy - reference): chosen (0.25, 0), rejected (-0.5, 0.25); gaps 0.75 and -0.25
    torch.testing.assert_close(chosen, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5, 0.25]))
    expected = (math.log(1 + math.exp(-0.75)) + math.log(1 + math.exp(0.25))) / 2  # mean of -log sigmoid(gap)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def pair(prompt: list[dict], good: str, bad: str) -> dict:
    return {"chosen": [*prompt, {"role": "assistant", "content": good}],
            "rejected": [*prompt, {"role": "assistant", "content": bad}]}  # fmt: skip


def test_chosen_and_rejected_share_the_prompt_and_train_only_the_final_answer(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}]  # fmt: skip
    ids = dpo.encode_pair(tok, pair(prompt, "Now we talk. 😀", "No."))
    assert ids[0] == tok.encode(render_chat(prompt, add_generation_prompt=True)[0])
    data = dpo.Pairs(*[[np.asarray(x)] for x in ids])
    b = dpo.make_batch(data, [0], seq_len=512)
    longest = len(ids[0]) + max(len(ids[1]), len(ids[2]))
    assert b["input_ids"].shape == (2, -(-longest // 16) * 16)  # chosen row, rejected row; width a multiple of 16
    for row, answer in zip(range(2), ("Now we talk. 😀", "No."), strict=True):
        labels = b["labels"][row]
        assert tok.decode(labels[labels != -100].tolist()) == answer + IM_END
        assert b["input_ids"][row, : len(ids[0])].tolist() == ids[0]
    other = pair([{"role": "user", "content": "x"}], "a", "b")
    assert dpo.encode_pair(tok, {**pair(prompt, "a", "b"), "rejected": other["rejected"]}) == (
        "chosen and rejected differ before their final turn"
    )
    assert "last turn must be the assistant's" in dpo.encode_pair(tok, {"chosen": prompt, "rejected": prompt})


def synthetic_pairs(path: Path, n: int) -> Path:
    """A learnable preference: the chosen answer agrees and repeats the question's start, the rejected refuses."""
    rng, texts = random.Random(0), make_texts(n, seed=11)
    lines = []
    for t in texts:
        q = t[:50]
        good, bad = "Sure: " + q[:20], rng.choice(["No.", "I will not.", "Never, sorry."])
        lines.append(json.dumps(pair([{"role": "user", "content": q}], good, bad), ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def dpo_config(base: Path, data: Path, out: Path, **kw) -> dpo.DPOConfig:
    cfg = dict(init=str(base), data=[str(data)], out=str(out), steps=12, batch_size=8, seq_len=128, lr=3e-3,
               beta=0.1, dtype="fp32", eval_every=12, eval_batches=2, tensorboard=False, warmup_steps=2,
               val_fraction=0.2, save_every=0)  # fmt: skip
    return dpo.DPOConfig(**{**cfg, **kw})


@pytest.fixture()
def base(tokenizer_dir, tmp_path) -> Path:
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "base", 0, Transformer(preset("debug", vocab_size=400)), tokenizer_dir)
    return tmp_path / "base"


def test_reference_runs_once_per_pair_and_held_out_rewards_rise(base, tmp_path, monkeypatch):
    rows = {"no_grad": 0, "grad": 0}
    forward = Transformer.forward

    def counting(self, ids, *args, **kw):
        rows["grad" if torch.is_grad_enabled() else "no_grad"] += ids.shape[0]
        return forward(self, ids, *args, **kw)

    monkeypatch.setattr(Transformer, "forward", counting)
    cfg = dpo_config(base, synthetic_pairs(tmp_path / "pairs.jsonl", 100), tmp_path / "dpo")
    result = dpo.run(cfg)
    n_train, n_eval = 80, 16  # every 5th of 100 pairs held out; 2 evaluation batches of 8
    # one reference forward per pair (two rows), two evaluations of the held-out pairs; nothing more
    assert rows["no_grad"] == 2 * (n_train + n_eval) + 2 * (2 * n_eval)
    assert rows["grad"] == cfg.steps * 2 * cfg.batch_size  # each step runs the policy only
    start, end = result.evals[0], result.evals[-1]
    assert (start["reward_acc"], start["reward_margin"]) == (0.0, 0.0)  # the reference is the starting policy
    assert start["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert end["reward_acc"] > 0.5 and end["reward_margin"] > 0 and end["val_loss"] < math.log(2)


def test_dpo_on_real_pairs_fits_the_training_pairs(base, tmp_path):
    path = FIXTURES / "dpo_tiny.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    result = dpo.run(dpo_config(base, path, tmp_path / "dpo", seq_len=256, steps=8, eval_every=0, val_fraction=0.1))
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at the first step
    assert max(result.losses[-3:]) < 0.6 * math.log(2)
