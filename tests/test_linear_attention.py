"""Gated DeltaNet against references: the token-by-token recurrence, the no-cache forward, documents run one by
one, and transformers' Qwen3NextGatedDeltaNet."""

from __future__ import annotations

import pytest
import torch

from nanomind.model.config import ModelConfig
from nanomind.model.linear_attention import (
    GatedDeltaNet,
    chunk_gated_delta_rule,
    l2norm,
    linear_layer_params,
    recurrent_gated_delta_rule,
)

F64 = dict(rtol=1e-9, atol=1e-10)


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=8, linear_value_head_dim=6, linear_conv_kernel_dim=4)  # fmt: skip
    return ModelConfig(**{**base, **kw})


def make_net(dtype=torch.float64, seed: int = 0, **kw) -> GatedDeltaNet:
    torch.manual_seed(seed)
    net = GatedDeltaNet(small_cfg(**kw), layer_idx=0).to(dtype)
    with torch.no_grad():  # random norm weights so a wrong gate/norm layout cannot hide
        net.norm.weight.uniform_(0.5, 1.5)
        net.dt_bias.uniform_(-1, 1)
    return net


def rule_inputs(B, H, T, dk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(B, H, T, dk, generator=g, dtype=torch.float64)) * dk**-0.5
    k = l2norm(torch.randn(B, H, T, dk, generator=g, dtype=torch.float64))
    v = torch.randn(B, H, T, dv, generator=g, dtype=torch.float64)
    decay = -torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.5
    beta = torch.rand(B, H, T, generator=g, dtype=torch.float64)
    state = torch.randn(B, H, dk, dv, generator=g, dtype=torch.float64)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("T", [1, 5, 64, 150])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_form_equals_recurrence(T, with_state):
    q, k, v, g, beta, state = rule_inputs(2, 3, T, 8, 5)
    state = state if with_state else None
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(o, o_ref, **F64)
    torch.testing.assert_close(s, s_ref, **F64)


def test_segments_reset_the_state_in_the_chunked_form():
    """Boundaries mid-chunk, on a chunk's first token, and a one-token segment; chunk 16 for several chunks."""
    T, chunk = 70, 16
    q, k, v, g, beta, _ = rule_inputs(2, 3, T, 8, 5, seed=1)
    starts = [[0, 5, 16, 17, 40], [0, 33]]
    seg = torch.zeros(2, T, dtype=torch.long)
    for row, st in enumerate(starts):
        for s in st[1:]:
            seg[row, s:] += 1
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, None, seg, chunk=chunk)
    for row, st in enumerate(starts):
        for a, b in zip(st, st[1:] + [T]):
            part = (x[row : row + 1, :, a:b] for x in (q, k, v, g, beta))
            o_ref, _ = recurrent_gated_delta_rule(*part, None)
            torch.testing.assert_close(o[row : row + 1, :, a:b], o_ref, **F64)


@pytest.mark.parametrize("split", [7, 1, 64])
def test_prefill_then_decode_equals_one_forward(split):
    net = make_net()
    x = torch.randn(2, 80, 32, dtype=torch.float64)
    full = net(x, None, 0, None)
    cache = net.new_cache(2, 128, torch.float64, "cpu")
    cache.state.normal_()  # stale rows: at=0 must start afresh
    cache.conv.normal_()
    outs = [net(x[:, :split], cache, 0, None)]
    mid = min(split + 5, 80)
    outs.append(net(x[:, split:mid], cache, split, None))  # a second prefill chunk continues the state
    for t in range(mid, 80):
        at = t if t % 2 else torch.tensor([t])  # int and shared-position tensor both continue
        outs.append(net(x[:, t : t + 1], cache, at, None))
    torch.testing.assert_close(torch.cat(outs, 1), full, **F64)


def test_per_row_positions_decode_each_row_from_its_own_state():
    """Continuous batching: rows prefilled through views at different lengths, then decoded together with
    positions [B, 1]; one row moves into another with copy_row, as the engine does when a request finishes."""
    net = make_net()
    seqs = torch.randn(3, 30, 32, dtype=torch.float64)
    lens = [4, 11, 7]
    refs = [net(seqs[i : i + 1], None, 0, None)[0] for i in range(3)]
    cache = net.new_cache(3, 64, torch.float64, "cpu")
    for i, n in enumerate(lens):
        y = net(seqs[i : i + 1, :n], cache.view(slice(i, i + 1), n), 0, None)
        torch.testing.assert_close(y[0], refs[i][:n], **F64)
    pos = list(lens)
    for _ in range(6):
        ids = torch.stack([seqs[i, p] for i, p in enumerate(pos)])[:, None]
        y = net(ids, cache.view(slice(0, 3), max(pos) + 1), torch.tensor(pos)[:, None], None)
        for i, p in enumerate(pos):
            torch.testing.assert_close(y[i, 0], refs[i][p], **F64)
        pos = [p + 1 for p in pos]
    cache.copy_row(2, 0, pos[2])  # request 2 moves into row 0; decode only rows 0..1 now
    rows = [2, 1]
    for _ in range(3):
        ids = torch.stack([seqs[r, pos[r]] for r in rows])[:, None]
        y = net(ids, cache.view(slice(0, 2), 64), torch.tensor([pos[r] for r in rows])[:, None], None)
        for i, r in enumerate(rows):
            torch.testing.assert_close(y[i, 0], refs[r][pos[r]], **F64)
        for r in rows:
            pos[r] += 1


def test_view_shares_memory_and_copy_row_copies_both_states():
    net = make_net()
    cache = net.new_cache(4, 16, torch.float32, "cpu")
    assert cache.state.dtype == torch.float32 and cache.state.shape == (4, 4, 8, 6)
    assert cache.conv.shape == (4, net.conv_dim, 3)
    view = cache.view(slice(1, 3), 5)
    view.state.fill_(2.0)
    view.conv.fill_(3.0)
    assert (cache.state[1:3] == 2).all() and (cache.state[[0, 3]] == 0).all()
    assert (cache.conv[1:3] == 3).all() and (cache.conv[[0, 3]] == 0).all()
    cache.state[2].normal_()
    cache.conv[2].normal_()
    cache.copy_row(2, 0, 9)
    assert torch.equal(cache.state[0], cache.state[2]) and torch.equal(cache.conv[0], cache.conv[2])
    assert (cache.state[3] == 0).all()


def test_packed_row_equals_documents_run_alone():
    """Boundaries in the middle of a chunk, on a chunk start (64), a one-token document, one shorter than the
    convolution; the packed row goes through the chunked form and the masked convolution."""
    net = make_net()
    lengths = [[64, 30, 1, 40, 15], [2, 148]]
    x = torch.randn(2, 150, 32, dtype=torch.float64)
    doc_ids = torch.cat([torch.cat([torch.full((n,), d) for d, n in enumerate(row)])[None] for row in lengths])
    y = net(x, None, 0, doc_ids)
    for row, ls in enumerate(lengths):
        start = 0
        for n in ls:
            ref = net(x[row : row + 1, start : start + n], None, 0, None)
            torch.testing.assert_close(y[row : row + 1, start : start + n], ref, **F64)
            start += n


@pytest.mark.parametrize("T", [1, 70])
def test_parity_with_transformers_qwen3_next(T):
    try:
        from transformers import Qwen3NextConfig
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet
    except ImportError as e:  # transformers is an optional extra
        pytest.skip(f"transformers Qwen3-Next not importable: {e}")
    net = make_net(torch.float32)
    cfg = small_cfg()
    hf_cfg = Qwen3NextConfig(
        vocab_size=64, hidden_size=cfg.hidden_size, num_hidden_layers=1, layer_types=["linear_attention"],
        linear_num_key_heads=cfg.linear_num_key_heads, linear_num_value_heads=cfg.linear_num_value_heads,
        linear_key_head_dim=cfg.linear_key_head_dim, linear_value_head_dim=cfg.linear_value_head_dim,
        linear_conv_kernel_dim=cfg.linear_conv_kernel_dim, rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu",
    )  # fmt: skip
    hf = Qwen3NextGatedDeltaNet(hf_cfg, layer_idx=0)
    hf.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x, None, 0, None), hf(x), rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter():
    net = make_net(torch.float32)
    x = torch.randn(2, 70, 32, requires_grad=True)
    doc_ids = torch.tensor([[0] * 30 + [1] * 40, [0] * 70])
    net(x, None, 0, doc_ids).pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and p.grad.isfinite().all(), name
    assert x.grad.isfinite().all()


@pytest.mark.parametrize("kw", [{}, dict(linear_num_value_heads=2, linear_conv_kernel_dim=2)])
def test_parameter_count(kw):
    cfg = small_cfg(**kw)
    assert linear_layer_params(cfg) == sum(p.numel() for p in GatedDeltaNet(cfg, 0).parameters())
