"""The model against references: the no-cache path, and transformers' Llama / Qwen3 with the same weights."""

import pytest
import torch

from nanomind.model import ModelConfig, Transformer, preset


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, qk_norm=True)  # fmt: skip
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("qk_norm", [True, False])
def test_cache_equals_no_cache(qk_norm):
    torch.manual_seed(0)
    model = Transformer(small(qk_norm=qk_norm)).eval()
    ids = torch.randint(0, 300, (2, 21))
    full = model(ids).logits
    cache = model.new_cache(2, 32)
    parts = [model(ids[:, :8], cache).logits, model(ids[:, 8:13], cache).logits]  # prefill, then a chunk
    parts += [model(ids[:, i : i + 1], cache).logits for i in range(13, 21)]  # one token at a time
    assert cache.pos == 21
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    last = model(ids, model.new_cache(2, 32), last_only=True).logits
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_cache_refuses_too_long():
    model = Transformer(small())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.new_cache(1, 129)


def _hf_model(cfg: ModelConfig, rope_parameters: dict):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                  tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope_parameters,
                  attention_bias=False)  # fmt: skip
    if cfg.qk_norm:
        hf_cfg = transformers.Qwen3Config(**common)
        return transformers.Qwen3ForCausalLM(hf_cfg)
    hf_cfg = transformers.LlamaConfig(**common, mlp_bias=False)
    return transformers.LlamaForCausalLM(hf_cfg)


@pytest.mark.parametrize(
    "qk_norm,tied,scaling",
    [
        (True, True, None),
        (False, False, None),
        (False, True, {"rope_type": "linear", "factor": 2.0}),
        (True, True, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ],
)
def test_logits_match_transformers(qk_norm, tied, scaling):
    torch.manual_seed(0)
    cfg = small(qk_norm=qk_norm, tie_word_embeddings=tied, rope_theta=10000.0, rope_scaling=scaling)
    ours = Transformer(cfg).eval()
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(scaling or {})}
    theirs = _hf_model(cfg, rope).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, cfg.vocab_size, (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=2e-5, rtol=1e-4)


def test_presets_have_documented_sizes():
    # hand-computed from the dimensions in the issue: 26.9M, 108.7M, 30.0M, 63.9M at vocab 6400
    sizes = {name: Transformer(preset(name)).num_params() for name in ("minimind-26m", "minimind3-30m")}
    assert sizes == {"minimind-26m": 26_878_464, "minimind3-30m": 30_025_216}
    assert preset("minimind3-64m").num_params() == 63_912_192
    assert 400_000 < Transformer(preset("debug")).num_params() < 600_000


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = Transformer(preset("minimind3-30m"))
    q = model.model.layers[0].self_attn.q_proj.weight
    o = model.model.layers[0].self_attn.o_proj.weight
    assert abs(q.std().item() - 0.02) < 1e-3
    assert abs(o.std().item() - 0.02 / 4) < 1e-3  # 1/sqrt(2 * 8 layers)
    assert torch.equal(model.model.norm.weight, torch.ones(512))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_packed_rows_give_the_logits_of_each_document_alone():
    torch.manual_seed(0)
    model = Transformer(small()).eval()
    docs = [torch.randint(0, 300, (n,)) for n in (7, 12, 5)]
    row = torch.cat(docs + [torch.zeros(4, dtype=torch.long)])[None]  # 4 padding tokens at the end
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)] + [torch.full((4,), -1)])[None]
    with torch.no_grad():
        packed = model(row, doc_ids=doc_ids).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(packed[:24], alone, atol=1e-5, rtol=1e-5)
