"""Multi-head latent attention against references: the no-cache path, single-row runs, transformers'
DeepseekV3ForCausalLM with the same weights (directly and through `nanomind export hf`), generate() for the engine."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_engine_matches_generate

from nanomind import checkpoint
from nanomind.model import ModelConfig, Transformer, preset
from nanomind.model.mla import LatentCache


def mla(**kw) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=128, attention="mla", q_lora_rank=24,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)  # fmt: skip
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("q_lora_rank", [24, 0])
def test_mla_cache_equals_no_cache(q_lora_rank):
    torch.manual_seed(0)
    model = Transformer(mla(q_lora_rank=q_lora_rank)).eval()
    assert isinstance(model.new_cache(1, 4).layers[0], LatentCache)
    ids = torch.randint(0, 300, (2, 21))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 32)
        parts = [model(ids[:, :8], cache).logits, model(ids[:, 8:13], cache).logits]  # prefill, then a chunk
        parts += [model(ids[:, i : i + 1], cache).logits for i in range(13, 21)]  # one token at a time
        assert cache.pos == 21
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
        static = model.new_cache(2, 32)  # positions [T]: the whole cache, masked (torch.compile's path)
        model(ids[:, :20], static)
        last = model(ids[:, 20:], static, positions=torch.tensor([20])).logits
        torch.testing.assert_close(last, full[:, 20:], atol=1e-5, rtol=1e-5)


def test_per_row_positions_equal_single_rows():
    """Continuous batching's path: rows at different positions ([B, T] positions) in one forward, each row giving
    what it gives alone; the cache's view and copy_row keep the rows apart."""
    torch.manual_seed(0)
    model = Transformer(mla()).eval()
    prompts = [torch.randint(0, 300, (1, n)) for n in (5, 9)]
    nxt = torch.tensor([[7], [11]])
    with torch.no_grad():
        alone = []
        for p, t in zip(prompts, nxt, strict=True):
            c = model.new_cache(1, 16)
            model(p, c)
            alone.append(model(t[None], c).logits)
        cache = model.new_cache(3, 16)
        for row, p in zip((2, 1), prompts, strict=True):  # prompt 0 into row 2, then moved to row 0
            model(p, cache.view(slice(row, row + 1), p.shape[1]))
        cache.copy_row(2, 0, 5)
        batched = model(nxt, cache.view(slice(0, 2), 10), positions=torch.tensor([[5], [9]])).logits
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_cache_bytes_per_token_are_the_latent_and_rope_key():
    cfg = mla()
    cache = Transformer(cfg).new_cache(1, 10, dtype=torch.bfloat16)
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.latent, layer.k_rope))
    b = cfg.kv_cache_bytes_per_token()
    assert stored == 10 * b["cache"] == 10 * 2 * 2 * (32 + 8)
    assert b["gqa"] == 2 * 2 * 2 * 4 * cfg.head_dim  # layers x bytes x (k, v) x heads x head_dim


@pytest.mark.parametrize("name", ["debug-mla", "deepseek-v3-mini"])
def test_param_count_formula_matches_the_model(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == cfg.num_params()
    if name == "deepseek-v3-mini":
        assert 100e6 < cfg.num_params() < 200e6 and 40e6 < cfg.num_params(active=True) < 65e6
        expert = [p.numel() for n, p in model.named_parameters() if ".experts.0." in n and ".layers.1." in n]
        routed = sum(expert) * (cfg.num_experts - cfg.num_experts_per_tok)
        assert cfg.num_params(active=True) == cfg.num_params() - routed * (cfg.num_hidden_layers - 1 + 1)
    assert cfg.flops_per_token(256) > 6 * cfg.num_params(embeddings=False, active=True)


def test_config_refuses_incomplete_mla():
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla(kv_lora_rank=0)
    with pytest.raises(ValueError, match="attention must be"):
        mla(attention="mha")
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        mla(first_k_dense_replace=3)
    with pytest.raises(ValueError, match="linear_num_key_heads"):
        mla(full_attention_interval=2)


def _copy_into_hf(model: Transformer, hf) -> None:
    """Our state dict into a DeepseekV3ForCausalLM: experts fused as transformers 5 holds them, the bias in the
    router; the MTP modules have no counterpart."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.mtp.")}
    out = {}
    for k, v in state.items():
        if ".mlp.experts." in k:
            continue
        out[k.replace(".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias")] = v
    cfg = model.config
    for i in range(cfg.first_k_dense_replace if cfg.num_experts else cfg.num_hidden_layers, cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        e = range(cfg.num_experts)
        out[f"{p}.gate_up_proj"] = torch.stack([torch.cat([state[f"{p}.{j}.gate_proj.weight"],
                                                           state[f"{p}.{j}.up_proj.weight"]]) for j in e])  # fmt: skip
        out[f"{p}.down_proj"] = torch.stack([state[f"{p}.{j}.down_proj.weight"] for j in e])
    missing, unexpected = hf.load_state_dict(out, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or ".shared_experts." in k for k in missing), missing


@pytest.mark.parametrize("q_lora_rank,moe", [(24, False), (0, False), (24, True)])
def test_logits_match_transformers_deepseek_v3(q_lora_rank, moe):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    extra = {}
    if moe:
        extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                     scoring_func="sigmoid", router_bias_update_rate=1e-3, first_k_dense_replace=1)  # fmt: skip
    cfg = mla(q_lora_rank=q_lora_rank, rope_theta=10000.0, **extra)
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:  # random norms: a norm mapped to the wrong tensor shows
                p.uniform_(0.5, 1.5)
        for name, buf in ours.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(-0.3, 0.3)
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True, q_lora_rank=q_lora_rank or None,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, rope_interleave=False, rope_parameters={"rope_type": "default",
        "rope_theta": 10000.0}, n_routed_experts=max(cfg.num_experts, 2), num_experts_per_tok=2,
        moe_intermediate_size=32, n_shared_experts=1 if moe else 0, routed_scaling_factor=1.0, n_group=1,
        topk_group=1, norm_topk_prob=True, first_k_dense_replace=1 if moe else cfg.num_hidden_layers,
        num_nextn_predict_layers=0,
    )  # fmt: skip
    theirs = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    _copy_into_hf(ours, theirs)
    ids = torch.randint(0, cfg.vocab_size, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=2e-5, rtol=1e-4)


def test_export_hf_gives_our_logits(tmp_path, tokenizer_dir, capsys):
    transformers = pytest.importorskip("transformers")
    from nanomind.export import export_hf
    from nanomind.tokenizer import Tokenizer

    torch.manual_seed(0)
    vocab = Tokenizer.load(tokenizer_dir).vocab_size
    model = Transformer(preset("debug-mla", vocab_size=vocab, max_position_embeddings=128, rope_theta=10000.0,
                               initializer_range=0.2)).eval()  # fmt: skip
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(-0.3, 0.3)
    ckpt = checkpoint.save(tmp_path / "run", 3, model, tokenizer_dir=tokenizer_dir)
    out = export_hf(ckpt, tmp_path / "hf")
    assert "multi-token prediction" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, vocab, (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() < 1e-4
    softmax = Transformer(preset("debug-mla", vocab_size=vocab, scoring_func="softmax"))
    with pytest.raises(ValueError, match="scoring_func='softmax'"):
        export_hf(checkpoint.save(tmp_path / "softmax", 1, softmax, tokenizer_dir=tokenizer_dir), tmp_path / "x")


def test_engine_yields_what_generate_yields():
    torch.manual_seed(0)
    assert_engine_matches_generate(Transformer(preset("debug-mla", vocab_size=128, max_position_embeddings=64)).eval())
