"""Mixture of experts against references: the dense MLP, hand-computed routing and balance loss, a per-token
loop, the no-cache forward; and the two training behaviours minimind got wrong (router gradient at top-1, balance)."""

from __future__ import annotations

import math

import pytest
import torch

from nanomind.model import Transformer, preset
from nanomind.model.layers import MLP
from nanomind.model.moe import MoE, load_stats


def moe_cfg(**kw):
    base = dict(vocab_size=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return preset("debug", **{**base, **kw})


def test_one_expert_equals_the_dense_mlp():
    torch.manual_seed(0)
    cfg = moe_cfg(num_experts=1, num_experts_per_tok=1, moe_intermediate_size=192)
    moe, mlp = MoE(cfg), MLP(cfg)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(mlp, name).weight.data.copy_(getattr(moe.experts[0], name).weight)
    x = torch.randn(3, 5, cfg.hidden_size)
    torch.testing.assert_close(moe(x), mlp(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_routing_weights_and_aux_loss_by_hand(scoring):
    cfg = moe_cfg(num_experts=3, num_experts_per_tok=2, scoring_func=scoring, router_aux_loss_coef=0.1)
    moe = MoE(cfg)
    moe.gate.weight.data.zero_()
    moe.gate.weight.data[:, :3] = torch.eye(3)  # the router's logits are the first 3 features
    x = torch.zeros(2, cfg.hidden_size)
    x[0, :3] = torch.tensor([2.0, 1.0, 0.0])
    x[1, :3] = torch.tensor([0.0, 0.5, 3.0])
    idx, weights, probs = moe.route(x)
    expected_idx, expected_w, expected_p = [], [], []
    for row in ([2.0, 1.0, 0.0], [0.0, 0.5, 3.0]):
        if scoring == "softmax":
            z = sum(math.exp(v) for v in row)
            s = [math.exp(v) / z for v in row]
        else:
            s = [1 / (1 + math.exp(-v)) for v in row]
        top = sorted(range(3), key=lambda i: -s[i])[:2]
        expected_idx.append(top)
        expected_w.append([s[i] / (s[top[0]] + s[top[1]]) for i in top])
        expected_p.append([v / sum(s) for v in s])
    assert idx.tolist() == expected_idx  # [[0, 1], [2, 1]]
    torch.testing.assert_close(weights, torch.tensor(expected_w))
    moe(x)
    f = [sum(i in top for top in expected_idx) / 4 for i in range(3)]  # share of the 4 assignments
    p = [(expected_p[0][i] + expected_p[1][i]) / 2 for i in range(3)]
    aux = 0.1 * 3 * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    assert moe.aux_loss.item() == pytest.approx(aux, rel=1e-5)


@pytest.mark.parametrize("k,shared", [(1, 0), (2, 1), (3, 2)])
def test_grouped_dispatch_equals_a_per_token_loop(k, shared):
    torch.manual_seed(1)
    cfg = moe_cfg(num_experts=4, num_experts_per_tok=k, n_shared_experts=shared)
    moe = MoE(cfg)
    x = torch.randn(2, 7, cfg.hidden_size)
    idx, weights, _ = moe.route(x.reshape(-1, cfg.hidden_size))
    expected = []
    for t, token in enumerate(x.reshape(-1, cfg.hidden_size)):
        y = sum(w * moe.experts[e](token[None])[0] for e, w in zip(idx[t].tolist(), weights[t], strict=True))
        if shared:
            y = y + moe.shared_experts(token[None])[0]
        expected.append(y)
    torch.testing.assert_close(moe(x), torch.stack(expected).reshape(x.shape), rtol=1e-5, atol=1e-6)


def test_top1_router_learns_from_the_language_model_loss_alone():
    torch.manual_seed(2)
    model = Transformer(moe_cfg(num_experts_per_tok=1, router_aux_loss_coef=0.0))
    gate = model.model.layers[0].mlp.gate.weight
    before = gate.detach().clone()
    ids = torch.randint(0, 64, (2, 16))
    out = model(ids)
    assert out.aux_loss is None
    torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert gate.grad is not None and gate.grad.abs().max() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, gate.detach())


def test_bias_balancing_moves_a_skewed_load_towards_uniform():
    torch.manual_seed(3)
    cfg = moe_cfg(num_experts=4, num_experts_per_tok=1, router_aux_loss_coef=0.0, router_bias_update_rate=0.01)
    moe = MoE(cfg).train()
    moe.gate.weight.data.normal_(0, 0.3)  # tokens differ in which expert they prefer...
    x = torch.randn(512, cfg.hidden_size)
    x[:, 0] = 1.0
    moe.gate.weight.data[0, 0] += 2.0  # ...but expert 0 gets a head start from every token
    shares = []
    for _ in range(100):
        with torch.no_grad():
            moe(x)
        shares.append((moe.load.max() / moe.load.sum()).item())
        moe.after_step()
    assert shares[0] > 0.5 and max(shares[-10:]) < 0.3  # the busiest expert's share falls towards 1/4
    assert moe.e_score_correction_bias[0] < 0 < moe.e_score_correction_bias[1:].min()


def test_moe_cache_equals_no_cache_and_load_stats():
    torch.manual_seed(4)
    model = Transformer(moe_cfg(n_shared_experts=1)).eval()
    ids = torch.randint(0, 64, (1, 12))
    full = model(ids).logits
    cache = model.new_cache(1, 12)
    steps = [model(ids[:, :5], cache).logits] + [model(ids[:, t : t + 1], cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    model.train()
    model(ids)
    stats = load_stats(model)
    assert stats["moe_load_max_min"] >= 1 and len(stats) == 1 + model.config.num_hidden_layers


def test_stage_losses_add_the_balance_loss():
    from nanomind.train.pretrain import cross_entropy
    from nanomind.train.sft import sft_loss

    torch.manual_seed(5)
    model = Transformer(moe_cfg(router_aux_loss_coef=0.5))
    ids = torch.randint(0, 64, (2, 10))
    labels = torch.randint(0, 64, (2, 10))
    labels[:, :3] = -100
    out = model(ids)
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert out.aux_loss.item() > 0.1
    sft, _ = sft_loss(model, {"input_ids": ids, "labels": labels})
    torch.testing.assert_close(sft, ce + out.aux_loss, rtol=1e-5, atol=1e-6)
    labels = torch.randint(0, 64, (2, 10))
    pre, _ = cross_entropy(model, {"input_ids": ids, "labels": labels})
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(pre, ce + out.aux_loss, rtol=1e-5, atol=1e-6)
