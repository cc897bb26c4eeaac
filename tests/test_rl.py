"""GRPO-family losses and advantages against hand-computed values, rule rewards on hand-written strings, and a
rollout's per-token log-probs: one batched padded forward against token-by-token decoding with the KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanomind.generate import SamplingConfig, generate
from nanomind.model import Transformer, preset
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
from nanomind.train.rl_losses import cispo_loss, dr_grpo_loss, group_advantages, grpo_loss

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


def test_rollout_logps_match_token_by_token_decoding():
    """Sample two completions with generate() at temperature 0.8, then compute the sampled tokens' log-probs
    (of softmax(logits / 0.8), the sampling distribution) from one right-padded batched forward, and compare
    with the log-probs seen while decoding the same tokens one by one through the KV cache."""
    torch.manual_seed(0)
    model = Transformer(preset("debug", vocab_size=128, max_position_embeddings=64)).eval()
    temp = 0.8
    prompts = [[5, 17, 42], [9, 3, 77, 12, 1]]
    rollouts = []
    for i, prompt in enumerate(prompts):
        s = SamplingConfig(max_new_tokens=10 - 3 * i, temperature=temp, top_k=0, top_p=1.0, seed=i)
        rollouts.append(list(generate(model, prompt, s)))
    assert [len(r) for r in rollouts] == [10, 7]

    with torch.no_grad():
        stepwise = []
        for prompt, out in zip(prompts, rollouts, strict=True):
            cache = model.new_cache(1, len(prompt) + len(out))
            logits = model(torch.tensor([prompt]), cache, last_only=True).logits[0, -1]
            row = []
            for tok in out:
                row.append(F.log_softmax(logits.float() / temp, -1)[tok].item())
                logits = model(torch.tensor([[tok]]), cache, last_only=True).logits[0, -1]
            stepwise.append(row)

        seqs = [p + r for p, r in zip(prompts, rollouts, strict=True)]
        T = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
        logps = F.log_softmax(model(ids).logits.float() / temp, -1)  # [B, T, V]
        # the token at position t is predicted by the logits at t - 1
        batched = [
            [logps[b, len(p) - 1 + j, tok].item() for j, tok in enumerate(r)]
            for b, (p, r) in enumerate(zip(prompts, rollouts, strict=True))
        ]
    for got, want in zip(batched, stepwise, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-4)
    # not vacuous: the log-probs are far from 0 (not all near-certain tokens) and depend on the temperature
    assert max(abs(x) for row in stepwise for x in row) > 0.05
    at_one = F.log_softmax(model(ids).logits.float(), -1)[0, len(prompts[0]) - 1, rollouts[0][0]].item()
    assert abs(at_one - stepwise[0][0]) > 1e-3
