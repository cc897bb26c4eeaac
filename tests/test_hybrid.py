"""The Qwen3-Next style hybrid (gated DeltaNet layers, every 4th layer full attention) as a whole model, against
references: the no-cache forward, generate() for the engine and the compiled step, each document run alone, a
second load, the parameter formula; and pretraining, SFT and DPO on a `debug-next` checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_engine_matches_generate, make_texts, write_jsonl
from test_dpo import dpo_config, synthetic_pairs
from test_sft import write_chats

from nanomind import checkpoint
from nanomind.data import PrepareConfig, prepare
from nanomind.generate import SamplingConfig, generate
from nanomind.model import Transformer, preset
from nanomind.model.linear_attention import GatedDeltaNet, LinearState
from nanomind.model.transformer import Attention, LayerKV
from nanomind.speculative import generate_speculative

F64 = dict(atol=1e-8, rtol=1e-7)


def hybrid(dtype=torch.float64, seed: int = 0, **kw) -> Transformer:
    """debug-next (3 gated DeltaNet layers, then full attention; MoE) with random norms and decay biases, so a
    mixed-up layer or gate cannot hide."""
    torch.manual_seed(seed)
    model = Transformer(preset("debug-next", **{"vocab_size": 128, "max_position_embeddings": 160, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "dt_bias")):
                p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


@pytest.mark.parametrize("name", ["debug-next", "qwen3-next-mini"])
def test_layer_kinds_and_parameter_count(name):
    cfg = preset(name, vocab_size=6400)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == cfg.num_params()
    kinds = [type(b.mixer) for b in model.model.layers]
    assert kinds == [GatedDeltaNet, GatedDeltaNet, GatedDeltaNet, Attention] * (cfg.num_hidden_layers // 4)
    assert all(hasattr(b.self_attn, "q_proj") and not isinstance(b.self_attn.q_norm, torch.nn.Identity)
               for b in model.model.layers if not b.linear)  # fmt: skip  # qk-norm on the full-attention layers
    assert all(b.mlp.shared_experts is not None for b in model.model.layers)
    if name == "qwen3-next-mini":
        assert 100e6 < cfg.num_params() < 200e6 and 40e6 < cfg.num_params(active=True) < 65e6
        expert = sum(p.numel() for n, p in model.named_parameters() if ".layers.0.mlp.experts.0." in n)
        routed = expert * (cfg.num_experts - cfg.num_experts_per_tok) * cfg.num_hidden_layers
        assert cfg.num_params(active=True) == cfg.num_params() - routed
    assert cfg.flops_per_token(256) > 6 * cfg.num_params(embeddings=False, active=True)


@pytest.mark.parametrize("dtype,size", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_cache_bytes_are_the_full_layers_kv_plus_a_fixed_state(dtype, size):
    cfg = preset("debug-next", vocab_size=128)
    for max_len in (10, 50):
        cache = Transformer(cfg).new_cache(2, max_len, dtype=dtype)
        kv = sum(t.nbytes for layer in cache.layers if isinstance(layer, LayerKV) for t in (layer.k, layer.v))
        state = sum(t.nbytes for layer in cache.layers if isinstance(layer, LinearState)
                    for t in (layer.state, layer.conv))  # fmt: skip
        assert kv == 2 * max_len * cfg.kv_cache_bytes_per_token(size)["cache"]
        assert state == 2 * cfg.linear_state_bytes(size)  # independent of max_len
    b = cfg.kv_cache_bytes_per_token()
    assert b["cache"] == b["gqa"] == 1 * 2 * 2 * 2 * 16  # one full layer x (k, v) x 2 kv heads x head_dim 16 x bf16
    assert preset("debug").linear_state_bytes() == 0


def test_cache_equals_no_cache():
    """Prefill across a chunk boundary (64), a second prefill chunk, then one token at a time; and the static
    positions-[T] path of the compiled decoding step."""
    model = hybrid()
    ids = torch.randint(0, 128, (2, 90))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 96)
        parts = [model(ids[:, :70], cache).logits, model(ids[:, 70:77], cache).logits]
        parts += [model(ids[:, i : i + 1], cache).logits for i in range(77, 90)]
        assert cache.pos == 90 and not cache.rewindable
        torch.testing.assert_close(torch.cat(parts, 1), full, **F64)
        static = model.new_cache(2, 96)
        model(ids[:, :85], static)
        for t in range(85, 90):
            out = model(ids[:, t : t + 1], static, positions=torch.tensor([t])).logits
            torch.testing.assert_close(out, full[:, t : t + 1], **F64)


def test_packed_rows_give_each_document_alone():
    """Documents across the 64-token chunk boundary, a one-token document and padding (doc id -1) at the end."""
    model = hybrid()
    docs = [torch.randint(0, 128, (n,)) for n in (50, 30, 1, 20)]
    row = torch.cat(docs + [torch.zeros(3, dtype=torch.long)])[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)] + [torch.full((3,), -1)])[None]
    with torch.no_grad():
        packed = model(row, doc_ids=doc_ids).logits
        start = 0
        for d in docs:
            torch.testing.assert_close(packed[:, start : start + len(d)], model(d[None]).logits, **F64)
            start += len(d)


def test_engine_yields_what_generate_yields():
    """copy_row moves the recurrent and convolution states of the request that takes over a finished row."""
    assert_engine_matches_generate(hybrid(torch.float32, max_position_embeddings=64))


def test_speculative_decoding_refuses_a_hybrid_with_mtp(tmp_path, tokenizer_dir):
    from nanomind.generate import main

    model = hybrid(torch.float32, vocab_size=400, num_nextn_predict_layers=1)
    with pytest.raises(ValueError, match="gated DeltaNet.*recurrent state"):
        list(generate_speculative(model, [1, 2], 5))
    ckpt = checkpoint.save(tmp_path / "run", 1, model, tokenizer_dir=tokenizer_dir)
    with pytest.raises(ValueError, match="gated DeltaNet.*recurrent state"):
        main(["--ckpt", str(ckpt), "--prompt", "the", "--speculative"])


def test_checkpoint_round_trip(tmp_path):
    model = hybrid(torch.float32, num_nextn_predict_layers=1)
    loaded = checkpoint.load_model(checkpoint.save(tmp_path / "run", 1, model)).eval()
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and "model.layers.0.linear_attn.A_log" in ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_gguf_export_refuses_the_hybrid_naming_the_differences(tmp_path, tokenizer_dir):
    from nanomind.export_gguf import export_gguf

    ckpt = checkpoint.save(tmp_path / "run", 1, hybrid(torch.float32, vocab_size=400), tokenizer_dir=tokenizer_dir)
    with pytest.raises(ValueError, match="GGUF export does not map gated DeltaNet.*qwen3next.*partial_rotary"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_export_hf_gives_our_logits_and_greedy_tokens(tmp_path, tokenizer_dir):
    """`export hf` writes Qwen3NextForCausalLM: output gate rows of zeros and a doubled o_proj, zero-centred norms
    (w - 1), full-width RoPE, a zero shared-expert gate with a doubled down_proj. 100 tokens cross the gated
    DeltaNet's 64-token chunk boundary."""
    transformers = pytest.importorskip("transformers")
    from nanomind.export import export_hf

    model = hybrid(torch.float32, vocab_size=400, initializer_range=0.05)
    assert model.config.qk_norm and model.config.num_experts and model.config.n_shared_experts
    out = export_hf(checkpoint.save(tmp_path / "run", 1, model, tokenizer_dir=tokenizer_dir), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(hf).__name__ == "Qwen3NextForCausalLM"
    assert hf.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    ids = torch.randint(0, 400, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    prompt = ids[0, :10].tolist()
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    ours = list(generate(model, prompt, greedy))
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16)[0, len(prompt) :].tolist()
    assert len(ours) == 16 and ours == theirs
    no_qk_norm = hybrid(torch.float32, vocab_size=400, qk_norm=False)
    with pytest.raises(ValueError, match="qk_norm=False.*Qwen3NextForCausalLM"):
        export_hf(checkpoint.save(tmp_path / "r2", 1, no_qk_norm, tokenizer_dir=tokenizer_dir), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def pretrained(tokenizer_dir, tmp_path_factory):
    """debug-next pretrained for 24 steps through `nanomind pretrain` (the loop, MoE balancing and all)."""
    from nanomind.train import pretrain

    root = tmp_path_factory.mktemp("hybrid")
    corpus = write_jsonl(root / "corpus.jsonl", make_texts(400, seed=3))
    prepare(PrepareConfig(data=[str(corpus)], tokenizer=str(tokenizer_dir), out=str(root / "data"),
                          val_fraction=0.05))  # fmt: skip
    cfg = pretrain.PretrainConfig(data=[str(root / "data")], preset="debug-next", out=str(root / "pt"), steps=24,
                                  batch_size=4, seq_len=96, lr=3e-3, warmup_steps=3, dtype="fp32", eval_every=12,
                                  eval_batches=2, save_every=0, tensorboard=False)  # fmt: skip
    return pretrain.run(cfg)


def test_pretraining_lowers_the_loss(pretrained):
    bpb = [e["val_bpb"] for e in pretrained.evals]
    assert len(bpb) == 3 and bpb[2] < bpb[1] < bpb[0] - 0.5, bpb
    assert all(math.isfinite(x) for x in pretrained.losses)


def test_sft_and_dpo_run_on_a_hybrid_checkpoint(pretrained, tmp_path):
    from nanomind.train import dpo, sft

    convs = [[{"role": "user", "content": t[:60]}, {"role": "assistant", "content": "Sure: " + t[:40]}]
             for t in make_texts(60, seed=8)]  # fmt: skip
    data = write_chats(tmp_path / "chat.jsonl", convs)
    result = sft.run(sft.SFTConfig(init=str(pretrained.checkpoint), data=[str(data)], out=str(tmp_path / "sft"),
                                   steps=8, batch_size=4, seq_len=128, lr=3e-3, dtype="fp32", eval_every=8,
                                   eval_batches=2, tensorboard=False, val_fraction=0.1))  # fmt: skip
    assert result.evals[-1]["val_loss"] < result.evals[0]["val_loss"]
    result = dpo.run(dpo_config(result.checkpoint, synthetic_pairs(tmp_path / "pairs.jsonl", 100), tmp_path / "dpo"))
    start, end = result.evals[0], result.evals[-1]
    assert start["val_loss"] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the starting policy
    assert end["reward_acc"] > 0.5 and end["val_loss"] < math.log(2)


@pytest.mark.slow  # torch.compile takes ~15 s on 2 cores
def test_compiled_static_decoding_equals_eager():
    model = hybrid(torch.float32, num_experts=0, max_position_embeddings=64)  # MoE dispatch does not compile
    s = SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=0, top_p=1.0, seed=3)
    assert list(generate(model, [3, 1, 4], s, compile=True)) == list(generate(model, [3, 1, 4], s))
