"""RL against hand-computed values and independent paths: GRPO-family losses and advantages, the Bradley-Terry
loss, rule rewards on hand-written strings, reward-model scores of padded rows against rows run alone, rollout
log-probs against token-by-token decoding; and short runs where GRPO and the reward model visibly learn."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanomind import checkpoint
from nanomind.model import Transformer, preset
from nanomind.model.reward import RewardModel
from nanomind.rewards import (
    REWARDS,
    exact,
    format_boxed,
    format_json,
    length_penalty,
    numeric,
    parse_reward_spec,
    repetition,
)
from nanomind.tokenizer import Tokenizer
from nanomind.train import grpo, reward_model
from nanomind.train.dpo import load_pairs, make_batch
from nanomind.train.grpo import Prompt, make_reward, make_rows, sample_groups
from nanomind.train.logprobs import token_logps
from nanomind.train.reward_model import RewardConfig, pair_loss
from nanomind.train.rl_losses import bradley_terry_loss, cispo_loss, dr_grpo_loss, group_advantages, grpo_loss

EPS = 1e-4


def test_group_advantages_by_hand():
    # group 1: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = sqrt(0.5); group 2: all equal -> 0, not NaN
    adv = group_advantages(torch.tensor([[1.0, 0.0], [2.0, 2.0]]))
    a = 0.5 / (math.sqrt(0.5) + EPS)
    torch.testing.assert_close(adv, torch.tensor([[a, -a], [0.0, 0.0]]))
    # three samples 0, 1, 2: mean 1, std 1
    adv = group_advantages(torch.tensor([[0.0, 1.0, 2.0]]))
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 0.0, 1.0]]) / (1 + EPS))
    # Dr.GRPO: mean-centred only
    adv = group_advantages(torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 3.0]]), normalise_std=False)
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5], [0.0, 0.0], [-1.5, 1.5]]))
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 2.0]))


def batch(logp_pad: float = -5.0):
    """2 completions, T = 2; the second has one token (its second slot is padding with a junk log-prob).
    Ratios r = exp(logp - old): row 0: [1.5, 1.0]; row 1: [0.5, pad]. adv = [+1, -1].
    ref - logp: ln 2 on token (0, 0), 0 elsewhere, so k3 = 2 - ln 2 - 1 = 1 - ln 2 there and 0 elsewhere."""
    old = torch.full((2, 2), -1.0)
    logp = old + torch.tensor([[math.log(1.5), 0.0], [math.log(0.5), 0.0]])
    logp[1, 1] = logp_pad
    ref = logp.detach().clone()
    ref[0, 0] += math.log(2.0)
    mask = torch.tensor([[1, 1], [1, 0]])
    return logp.requires_grad_(), old, ref, torch.tensor([1.0, -1.0]), mask


K3 = 1 - math.log(2)


def test_grpo_loss_by_hand():
    logp, old, ref, adv, mask = batch()
    loss, m = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_beta=0.1)
    # per-token -min(rA, clip(r, 0.8, 1.2)A): (0,0): r=1.5, A=+1 -> -min(1.5, 1.2) = -1.2 (clipped)
    # (0,1): r=1 -> -1; (1,0): r=0.5, A=-1 -> -min(-0.5, -0.8) = 0.8 (clipped)
    row0 = (-1.2 + 0.1 * K3 - 1.0) / 2
    row1 = 0.8 / 1
    torch.testing.assert_close(loss, torch.tensor((row0 + row1) / 2))
    torch.testing.assert_close(m["clip_fraction"], torch.tensor(2 / 3))
    torch.testing.assert_close(m["kl"], torch.tensor(K3 / 3))
    # padding does not matter, and clipped tokens get no policy gradient (only the KL term's at (0, 0))
    torch.testing.assert_close(grpo_loss(*batch(logp_pad=3.0), clip_eps=0.2, kl_beta=0.1)[0], loss)
    loss.backward()
    # d/dlogp of k3 = -exp(ref - logp) + 1 = -2 + 1 = -1 at (0,0); row 0 has 2 tokens, 2 rows: weight 1/4
    # (0,1): d(-r)/dlogp = -r = -1, times 1/4; (1,0) clipped -> 0; padding -> 0
    torch.testing.assert_close(logp.grad, torch.tensor([[0.1 * -1 / 4, -1 / 4], [0.0, 0.0]]))


def test_dr_grpo_loss_by_hand():
    logp, old, ref, adv, mask = batch()
    loss, m = dr_grpo_loss(logp, old, ref, adv, mask, max_len=4, clip_eps=0.2, kl_beta=0.1)
    # same per-token terms as GRPO, summed over the 3 completion tokens, divided by B * max_len = 2 * 4
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.1 * K3 - 1.0 + 0.8) / 8))
    torch.testing.assert_close(m["clip_fraction"], torch.tensor(2 / 3))
    loss.backward()
    # every unclipped token gets the same weight 1/8, whatever its sequence's length
    torch.testing.assert_close(logp.grad, torch.tensor([[0.1 * -1 / 8, -1 / 8], [0.0, 0.0]]))


def test_cispo_loss_by_hand():
    logp, old, ref, adv, mask = batch()
    loss, m = cispo_loss(logp, old, ref, adv, mask, eps_high=0.2, kl_beta=0.1)
    # weights min(r, 1.2) detached: [1.2, 1.0], [0.5]; per token -(w * A * logp), logp = -1 + ln r
    t00 = -(1.2 * 1 * (-1 + math.log(1.5))) + 0.1 * K3
    t01 = -(1.0 * 1 * -1.0)
    t10 = -(0.5 * -1 * (-1 + math.log(0.5)))
    torch.testing.assert_close(loss, torch.tensor((t00 + t01 + t10) / 3))
    torch.testing.assert_close(m["clip_fraction"], torch.tensor(1 / 3))  # only r = 1.5 > 1.2
    torch.testing.assert_close(m["kl"], torch.tensor(K3 / 3))
    loss.backward()
    # unlike PPO clipping, the clipped token (0, 0) keeps a gradient: -w * A / N (+ the KL's -0.1 / 3)
    want = torch.tensor([[-1.2 / 3 + 0.1 * -1 / 3, -1.0 / 3], [0.5 / 3, 0.0]])
    torch.testing.assert_close(logp.grad, want)


def test_losses_equal_plain_policy_gradient_on_policy():
    """With logp == old (first step on fresh rollouts) and no KL, GRPO's loss is -mean_seq(mean_tok(A)) and its
    gradient is -A / (len * B) per token; a reference computed independently of the clipping code."""
    torch.manual_seed(0)
    old = -torch.rand(4, 5) * 3
    logp = old.clone().requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0])
    loss, m = grpo_loss(logp, old, old, adv, mask, clip_eps=0.2, kl_beta=0.0)
    torch.testing.assert_close(loss, -adv.mean())
    assert m["clip_fraction"] == 0 and m["kl"] == 0
    loss.backward()
    torch.testing.assert_close(logp.grad, -(adv[:, None] * mask) / (mask.sum(1, keepdim=True) * 4))


def test_rule_rewards_on_handwritten_strings():
    assert exact("  The Answer  is 7 ", "the answer is 7") == 1.0 and exact("7.", "7") == 0.0
    assert exact("7", None) == 0.0
    assert numeric("3 + 4 = 7, so 1,234 is wrong; it is 7", "7") == 1.0
    assert numeric("the total is 1,234.5", "1234.5") == 1.0
    assert numeric("it is -3", "3") == 0.0 and numeric("no number", "3") == 0.0
    assert numeric("it is 3.0", "3") == 1.0
    assert format_boxed("so the answer is \\boxed{42}.") == 1.0
    assert format_boxed("\\boxed{42} is my answer") == 0.0  # not at the end
    assert format_boxed("\\boxed{ }") == 0.0
    assert format_json(' {"a": [1, 2]}\n') == 1.0 and format_json("{'a': 1}") == 0.0 and format_json("") == 0.0
    assert length_penalty("x" * 512) == 0.0 and length_penalty("x" * 768) == -0.5
    # trigrams of "a b c a b c": abc, bca, cab, abc -> 1 repeat of 4
    assert repetition("a b c a b c") == -0.25 and repetition("a b c d") == 0.0 and repetition("a b") == 0.0
    assert repetition("go " * 6) == -3 / 4  # 4 trigrams, all equal: 3 repeats


def test_reward_spec_combines_weighted_rewards():
    reward = parse_reward_spec("numeric, format_boxed:0.5,repetition:2")
    assert reward("so the answer is \\boxed{42}", "42") == 1.5
    assert reward("41", "42") == 0.0
    assert reward("a b c a b c 42", "42") == pytest.approx(1.0 + 2 * (-1 / 5))  # trigrams abc bca cab abc bc42
    assert set(REWARDS) >= {"exact", "numeric", "format_boxed", "format_json", "length", "repetition"}
    with pytest.raises(ValueError, match="unknown reward 'boxed'"):
        parse_reward_spec("exact,boxed")
    with pytest.raises(ValueError, match="not a number"):
        parse_reward_spec("exact:x")


def test_bradley_terry_loss_and_accuracy_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.5, 1.0])
    loss, acc = bradley_terry_loss(chosen, rejected)
    # margins 1, -0.5, 0: -log sigmoid(m) = log(1 + exp(-m)); a tie counts as wrong
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(0.5)) + math.log(2)) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6) and acc.item() == pytest.approx(1 / 3)


def _pairs_file(path, n: int):
    lines = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"question {i}" + " more" * (i % 4)}]
        good = "the model answers" + " well" * (i % 3)
        lines.append(json.dumps({"chosen": prompt + [{"role": "assistant", "content": good}],
                                 "rejected": prompt + [{"role": "assistant", "content": "no"}]}))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reward_model_scores_each_row_at_its_last_token_whatever_the_padding(tokenizer_dir, tmp_path):
    """pair_loss on a right-padded batch equals the Bradley-Terry loss and accuracy computed by hand from scores of
    each row run alone (unpadded), read at its final token; the checkpoint reloads as a RewardModel."""
    torch.manual_seed(0)
    model = RewardModel(preset("debug", vocab_size=400))
    tok = Tokenizer.load(tokenizer_dir)
    data = load_pairs([str(_pairs_file(tmp_path / "pairs.jsonl", 6))], tok, 128)
    batch = make_batch(data, list(range(6)), 128)
    with torch.no_grad():
        loss, metrics = pair_loss(model, batch)
        alone = []
        for side in (data.chosen, data.rejected):
            for i in range(6):
                ids = torch.from_numpy(np.concatenate([data.prompts[i], side[i]]))[None]
                alone.append(model.score(model(ids, return_hidden=True).hidden[0, -1]).item())
    margins = [alone[i] - alone[6 + i] for i in range(6)]
    assert len({len(r) for r in data.chosen + data.rejected}) > 1  # rows of different lengths: padding matters
    assert loss.item() == pytest.approx(sum(math.log(1 + math.exp(-m)) for m in margins) / 6, rel=1e-5)
    assert metrics["acc"] == pytest.approx(sum(m > 0 for m in margins) / 6)
    ckpt = checkpoint.save(tmp_path / "rm", 1, model, tokenizer_dir)
    again = checkpoint.load_model(ckpt)
    assert isinstance(again, RewardModel)
    with torch.no_grad():
        torch.testing.assert_close(pair_loss(again, batch)[0], loss)


def test_reward_model_learns_to_rank_held_out_pairs(tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "base", 0, Transformer(preset("debug", vocab_size=400)), tokenizer_dir)
    cfg = RewardConfig(init=str(tmp_path / "base"), data=[str(_pairs_file(tmp_path / "pairs.jsonl", 60))],
                       out=str(tmp_path / "rm"), steps=30, batch_size=4, seq_len=64, lr=3e-3, dtype="fp32",
                       eval_every=30, eval_batches=4, val_fraction=0.2, tensorboard=False)  # fmt: skip
    result = reward_model.run(cfg)
    start, end = result.evals[0], result.evals[-1]
    assert end["val_loss"] < start["val_loss"] - 0.2 and end["val_acc"] == 1.0
    # usable as a GRPO reward: a longer, polite answer scores above "no"
    reward = make_reward(f"model:{result.checkpoint}", torch.device("cpu"))
    p = [Prompt([{"role": "user", "content": "question 99"}], [1], None)] * 2
    good, bad = reward(p, ["the model answers well", "no"])
    assert good > bad


def test_rollout_batch_logps_match_token_by_token_decoding():
    """The GRPO pipeline (engine samples at temperature 0.8 -> make_rows -> token_logps at 0.8) against the
    log-probs of the same tokens seen while decoding them one by one through the KV cache."""
    torch.manual_seed(0)
    model = Transformer(preset("debug", vocab_size=128, max_position_embeddings=64)).eval()
    temp, stop = 0.8, 7
    prompts = [[5, 17, 42], [9, 3, 77, 12, 1]]
    outs = sample_groups(model, prompts, 2, 10, temp, stop, seeds=[3, 4])
    assert len(outs) == 4 and len({tuple(o) for o in outs}) > 1
    batch = make_rows(prompts, outs, 2)
    with torch.no_grad():
        logps, _ = token_logps(model, batch["input_ids"], batch["labels"], temp)
        for r, out in enumerate(outs):
            prompt = prompts[r // 2]
            cache = model.new_cache(1, len(prompt) + len(out))
            logits = model(torch.tensor([prompt]), cache, last_only=True).logits[0, -1]
            want = []
            for t in out:
                want.append(F.log_softmax(logits.float() / temp, -1)[t].item())
                logits = model(torch.tensor([[t]]), cache, last_only=True).logits[0, -1]
            got = logps[r][batch["labels"][r] != -100]
            torch.testing.assert_close(got, torch.tensor(want), atol=1e-4, rtol=1e-4)
    assert (logps[batch["labels"] == -100] == 0).all()
    # the same seeds give the same samples, alone or in a larger batch (what makes DDP runs reproducible)
    assert sample_groups(model, prompts[1:], 2, 10, temp, stop, seeds=[4]) == outs[2:]
    # the log-probs are those of the tempered distribution, not of temperature 1
    at_one, _ = token_logps(model, batch["input_ids"], batch["labels"])
    assert (at_one - logps).abs().max() > 1e-3


def _letter_reward(completion: str, answer: str | None) -> float:
    """Share of the completion's characters that are the letter e (a reward a random model can climb)."""
    return completion.count("e") / max(1, len(completion))


def test_grpo_raises_the_reward_and_reports_its_metrics(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(REWARDS, "letter_e", _letter_reward)
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "base", 0, Transformer(preset("debug", vocab_size=400)), tokenizer_dir)
    lines = [json.dumps({"prompt": f"say something {i}"}) for i in range(40)]
    lines.insert(3, "{broken json")
    lines.insert(5, json.dumps({"messages": [{"role": "assistant", "content": "x"}]}))
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    cfg = grpo.GRPOConfig(init=str(tmp_path / "base"), data=[str(tmp_path / "prompts.jsonl")], reward="letter_e",
                          out=str(tmp_path / "grpo"), steps=60, batch_size=4, group_size=8, max_new_tokens=12,
                          seq_len=64, lr=1e-2, kl_beta=0.01, updates_per_batch=2, eval_every=30, dtype="fp32",
                          eval_prompts=16, val_fraction=0.2, samples_every=5, tensorboard=False)  # fmt: skip
    result = grpo.run(cfg)
    m = result.metrics
    assert {"reward", "reward_std", "kl", "clip_frac", "resp_len"} <= set(m[0])
    # step 0: policy == reference == sampler, so no KL and no clipping; its second update on the same samples clips
    assert m[0]["kl"] == 0 and m[0]["clip_frac"] == 0 and m[1]["clip_frac"] > 0
    first, last = np.mean([x["reward"] for x in m[:4]]), np.mean([x["reward"] for x in m[-4:]])
    assert last > first + 0.1, (first, last)
    start, end = result.evals[0], result.evals[-1]
    assert end["val_reward_sampled"] > start["val_reward_sampled"] + 0.1
    samples = [json.loads(line) for line in (tmp_path / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert [s["rollout"] for s in samples] == list(range(0, 30, 5)) and len(samples[0]["completions"]) == 8
