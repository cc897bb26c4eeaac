"""Export against real readers: transformers loads our HF export and gives our logits and greedy tokens; import
inverts export bit for bit; gguf's reader finds the tensors and metadata llama.cpp needs (and, when
llama-cpp-python is installed, llama.cpp itself generates our greedy tokens)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nanomind import checkpoint
from nanomind.cli import main as cli
from nanomind.export import architecture, export_hf, import_hf, model_config_from_hf
from nanomind.export_gguf import export_gguf, llamacpp_pre, permute_qk
from nanomind.generate import SamplingConfig, generate
from nanomind.model import Transformer, preset
from nanomind.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, render_chat

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

# (qk_norm, tied, rope_scaling): Qwen3 and Llama, tied and untied, and both RoPE scalings transformers has natively
CASES = [
    (True, True, None),
    (False, False, None),
    (False, True, {"rope_type": "linear", "factor": 2.0}),
    (True, False, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
]
GREEDY = SamplingConfig(max_new_tokens=32, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)


def make_checkpoint(tmp_path, tokenizer_dir, qk_norm=True, tied=True, scaling=None, **moe):
    """A saved `debug` model with a wide init (clear argmax margins for greedy decoding) and random norm weights
    (so a norm mapped to the wrong tensor shows); `moe`: MoE fields (num_experts=4, ...)."""
    torch.manual_seed(0)
    vocab = Tokenizer.load(tokenizer_dir).vocab_size
    cfg = preset("debug", vocab_size=vocab, qk_norm=qk_norm, tie_word_embeddings=tied, rope_scaling=scaling,
                 max_position_embeddings=128, rope_theta=10000.0, initializer_range=0.2, **moe)  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias") and cfg.router_bias_update_rate:
                buf.uniform_(-0.3, 0.3)  # as aux-loss-free balancing leaves it: it changes choices
    return model, checkpoint.save(tmp_path / "run", 7, model, tokenizer_dir=tokenizer_dir)


@pytest.mark.parametrize("qk_norm,tied,scaling", CASES)
def test_transformers_gives_our_logits_and_greedy_tokens(tmp_path, tokenizer_dir, qk_norm, tied, scaling):
    model, ckpt = make_checkpoint(tmp_path, tokenizer_dir, qk_norm, tied, scaling)
    out = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    ids = torch.randint(0, model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-4
    prompt = ids[0, :10].tolist()
    ours = list(generate(model, prompt, GREEDY))
    hf.generation_config.eos_token_id = None  # 32 tokens on both sides, whatever they are
    theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)[0, len(prompt) :].tolist()
    assert len(ours) == 32 and ours == theirs


def test_export_carries_tokenizer_chat_template_and_stop_tokens(tmp_path, tokenizer_dir):
    _, ckpt = make_checkpoint(tmp_path, tokenizer_dir)
    out = export_hf(ckpt, tmp_path / "hf")
    tok = Tokenizer.load(tokenizer_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello World, naïve café 2024 你好 😀\n\n  x"
    assert hf_tok.encode(text) == tok.encode(text)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == render_chat(messages, add_generation_prompt=True)[0]
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [tok.im_end_id, tok.eos_id]
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tok.im_end_id and config["rope_theta"] == 10000.0  # legacy key for old readers


@pytest.mark.parametrize("qk_norm,tied,scaling", CASES[:2] + CASES[3:])
def test_import_of_export_is_bitwise_identical(tmp_path, tokenizer_dir, qk_norm, tied, scaling):
    _, ckpt = make_checkpoint(tmp_path, tokenizer_dir, qk_norm, tied, scaling)
    back = import_hf(export_hf(ckpt, tmp_path / "hf"), tmp_path / "imported")
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.load_config(back) == checkpoint.load_config(ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (back / "tokenizer" / name).read_bytes() == (ckpt / "tokenizer" / name).read_bytes()


# MoE: Qwen3-MoE top-2 (renormalised or not) and top-1, and Mixtral (no qk-norm) top-2; 4 experts of 96
# (qk_norm, tied, moe fields)
MOE = dict(num_experts=4, moe_intermediate_size=96)
SIGMOID = dict(MOE, scoring_func="sigmoid")
MOE_CASES = [
    (True, True, dict(MOE, num_experts_per_tok=2)),
    (True, False, dict(MOE, num_experts_per_tok=1)),
    (True, True, dict(MOE, num_experts_per_tok=2, norm_topk_prob=False)),
    (False, False, dict(num_experts=4, num_experts_per_tok=2)),  # Mixtral: its experts are intermediate_size wide
    (False, True, dict(MOE, num_experts_per_tok=2, n_shared_experts=1)),  # minimind-moe's layout
    (False, False, dict(MOE, num_experts_per_tok=1, n_shared_experts=2)),
    # DeepSeek-V3-style routing: sigmoid scores, the selection bias in use, shared experts or none
    (True, True, dict(SIGMOID, num_experts_per_tok=2, n_shared_experts=1, router_bias_update_rate=1e-3)),
    (False, False, dict(SIGMOID, num_experts_per_tok=1)),
]
MOE_IDS = ["qwen3moe-top2", "qwen3moe-top1", "qwen3moe-top2-unnormalised", "mixtral-top2", "qwen2moe-top2-shared",
           "qwen2moe-top1-2shared", "glm4moe-sigmoid-shared-bias", "glm4moe-sigmoid-top1"]  # fmt: skip
MOE_CLASS = {"qwen3moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM",
             "glm4moe": "Glm4MoeForCausalLM"}  # fmt: skip


@pytest.mark.parametrize("qk_norm,tied,moe", MOE_CASES, ids=MOE_IDS)
def test_transformers_moe_gives_our_logits_and_greedy_tokens(tmp_path, tokenizer_dir, qk_norm, tied, moe, request):
    model, ckpt = make_checkpoint(tmp_path, tokenizer_dir, qk_norm, tied, **moe)
    out = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == MOE_CLASS[request.node.callspec.id.split("-")[0]]
    ids = torch.randint(0, model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        diff = (hf(ids).logits - ref).abs().max().item()
        assert diff < 1e-4
        if moe["num_experts_per_tok"] == 1:  # HF's renormalisation would weigh the one expert 1.0: not our model
            assert hf.config.norm_topk_prob is False
            for layer in hf.model.layers:
                layer.mlp.gate.norm_topk_prob = True
            assert (hf(ids).logits - ref).abs().max().item() > 1e-2
            for layer in hf.model.layers:
                layer.mlp.gate.norm_topk_prob = False
    prompt = ids[0, :10].tolist()
    ours = list(generate(model, prompt, GREEDY))
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)[0, len(prompt) :].tolist()
    assert len(ours) == 32 and ours == theirs


@pytest.mark.parametrize("qk_norm,tied,moe", MOE_CASES, ids=MOE_IDS)
def test_import_of_moe_export_is_bitwise_identical(tmp_path, tokenizer_dir, qk_norm, tied, moe, request):
    model, ckpt = make_checkpoint(tmp_path, tokenizer_dir, qk_norm, tied, **moe)
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    hf_state = load_file(str(hf_dir / "model.safetensors"))
    mixtral = request.node.callspec.id.startswith("mixtral")
    expert = "model.layers.1.block_sparse_moe.experts.3.w3.weight" if mixtral else (
        "model.layers.1.mlp.experts.3.up_proj.weight")  # fmt: skip  # the Hub's per-expert layouts
    biases = {k for k in hf_state if "e_score_correction_bias" in k}  # GLM-4.5's router has it, the others none
    glm = request.node.callspec.id.startswith("glm4moe")
    assert expert in hf_state
    assert biases == ({f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in range(2)} if glm else set())
    if request.node.callspec.id.startswith("qwen2moe"):  # gate sigmoid(0) = 0.5 times a doubled down_proj
        assert not hf_state["model.layers.0.mlp.shared_expert_gate.weight"].any()
        ours = model.model.layers[0].mlp.shared_experts.down_proj.weight
        assert torch.equal(hf_state["model.layers.0.mlp.shared_expert.down_proj.weight"], ours * 2)
    back = import_hf(hf_dir, tmp_path / "imported")
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.load_config(back) == checkpoint.load_config(ckpt)


def test_import_reads_experts_fused_by_transformers(tmp_path, tokenizer_dir):
    """transformers 5 holds experts as 3-D `experts.gate_up_proj` / `down_proj`: a checkpoint written that way
    imports to the same weights."""
    _, ckpt = make_checkpoint(tmp_path, tokenizer_dir, num_experts=4, moe_intermediate_size=96)
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    fused = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 192, 64)
    from safetensors.torch import save_file

    save_file(fused, str(hf_dir / "model.safetensors"))
    back = import_hf(hf_dir, tmp_path / "imported")
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_import_refuses_a_gated_shared_expert(tmp_path, tokenizer_dir):
    _, ckpt = make_checkpoint(tmp_path, tokenizer_dir, False, num_experts=4, n_shared_experts=1)
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    state = load_file(str(hf_dir / "model.safetensors"))
    state["model.layers.1.mlp.shared_expert_gate.weight"][0, 3] = 0.1
    from safetensors.torch import save_file

    save_file(state, str(hf_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.1.mlp.shared_expert_gate.weight.*nonzero: a gated shared expert"):
        import_hf(hf_dir, tmp_path / "imported")


def test_import_refuses_moe_our_model_cannot_run():
    dims = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    base = dict(dims, intermediate_size=64, num_experts=4, moe_intermediate_size=16)
    with pytest.raises(ValueError, match="mixes dense and MoE layers"):
        model_config_from_hf(transformers.Qwen3MoeConfig(**base, mlp_only_layers=[1]))
    with pytest.raises(ValueError, match="mixes dense and MoE layers"):
        model_config_from_hf(transformers.Qwen3MoeConfig(**base, decoder_sparse_step=2))
    with pytest.raises(ValueError, match="num_experts_per_tok=1 with norm_topk_prob=True"):
        model_config_from_hf(transformers.Qwen3MoeConfig(**base, num_experts_per_tok=1, norm_topk_prob=True))
    cfg = model_config_from_hf(transformers.Qwen3MoeConfig(**base, num_experts_per_tok=2, norm_topk_prob=False))
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.qk_norm) == (4, 2, False, True)
    with pytest.raises(ValueError, match="shared expert is 24 wide, not a multiple of its experts' 16"):
        model_config_from_hf(transformers.Qwen2MoeConfig(**base, shared_expert_intermediate_size=24))
    cfg = model_config_from_hf(transformers.Qwen2MoeConfig(**base, shared_expert_intermediate_size=32))
    assert (cfg.n_shared_experts, cfg.qk_norm) == (2, False)
    mixtral = dict(dims, num_local_experts=4, intermediate_size=16)
    with pytest.raises(ValueError, match="num_experts_per_tok=1 .*Mixtral weighs the one expert 1.0"):
        model_config_from_hf(transformers.MixtralConfig(**mixtral, num_experts_per_tok=1))
    with pytest.raises(ValueError, match="sliding_window"):
        model_config_from_hf(transformers.MixtralConfig(**mixtral, sliding_window=32))
    glm = dict(dims, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, partial_rotary_factor=1.0,
               first_k_dense_replace=0)  # fmt: skip
    cfg = model_config_from_hf(transformers.Glm4MoeConfig(**glm, use_qk_norm=True))
    assert (cfg.scoring_func, cfg.n_shared_experts, cfg.qk_norm) == ("sigmoid", 1, True)
    for bad, match in [(dict(first_k_dense_replace=1), "dense leading layers"), (dict(n_group=2), "group-limited"),
                       (dict(routed_scaling_factor=2.5), "routed_scaling_factor=2.5"),
                       (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            model_config_from_hf(transformers.Glm4MoeConfig(**glm | bad))


def test_import_refuses_what_our_model_cannot_run(tmp_path):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="attention_bias"):
        model_config_from_hf(transformers.LlamaConfig(**base, attention_bias=True))
    with pytest.raises(ValueError, match="'llama3' is not supported"):
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}  # fmt: skip
        model_config_from_hf(transformers.LlamaConfig(**base, rope_scaling=rope))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        model_config_from_hf(transformers.GPT2Config())
    with pytest.raises(ValueError, match="no config.json"):
        import_hf(tmp_path, tmp_path / "out")


def test_export_names_features_it_cannot_map(tmp_path, tokenizer_dir):
    assert architecture(preset("debug")).hf_class == "LlamaForCausalLM"
    assert architecture(preset("debug", num_experts_per_tok=1, scoring_func="sigmoid")).hf_class == "LlamaForCausalLM"
    assert architecture(preset("minimind3-moe")).hf_class == "Qwen3MoeForCausalLM"
    assert architecture(preset("minimind-moe")).hf_class == "Qwen2MoeForCausalLM"
    with pytest.raises(ValueError, match="n_shared_experts=1 with qk_norm.*no native class has both"):
        architecture(preset("minimind-moe", qk_norm=True))
    sigmoid = preset("minimind-moe", qk_norm=True, scoring_func="sigmoid", router_bias_update_rate=1e-3)
    assert architecture(sigmoid).hf_class == "Glm4MoeForCausalLM"
    with pytest.raises(ValueError, match="without qk_norm.*num_experts_per_tok=1.*Mixtral"):
        architecture(preset("debug", num_experts=4, num_experts_per_tok=1))
    with pytest.raises(ValueError, match="without qk_norm.*norm_topk_prob=False.*Mixtral"):
        architecture(preset("debug", num_experts=4, norm_topk_prob=False))
    # the aux-loss-free bias: refused once it would change which experts are chosen, and only then
    model, _ = make_checkpoint(tmp_path, tokenizer_dir, num_experts=4, router_bias_update_rate=1e-3)
    for layer in model.model.layers:
        layer.mlp.e_score_correction_bias.zero_()  # as before the first step: the model routes as Qwen3-MoE does
    export_hf(checkpoint.save(tmp_path / "unbiased", 8, model, tokenizer_dir=tokenizer_dir), tmp_path / "hf")
    model.model.layers[1].mlp.e_score_correction_bias[2] = 0.05
    ckpt = checkpoint.save(tmp_path / "biased", 8, model, tokenizer_dir=tokenizer_dir)
    with pytest.raises(ValueError, match="layers.1.mlp.e_score_correction_bias is nonzero.*with softmax scores"):
        export_hf(ckpt, tmp_path / "hf2")
    meta, _ = read_gguf(export_gguf(ckpt, tmp_path / "m.gguf"))  # llama.cpp's glm4moe has the bias
    assert meta["general.architecture"] == "glm4moe"


def test_a_lora_run_exports_merged(tmp_path, tokenizer_dir):
    from nanomind.model.lora import apply_lora

    model, _ = make_checkpoint(tmp_path, tokenizer_dir)
    apply_lora(model, rank=4, alpha=8.0, targets=["q_proj", "down_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.2)  # B starts at zero: give the adapter an effect to carry
    ckpt = checkpoint.save(tmp_path / "lora", 1, model, tokenizer_dir=tokenizer_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ckpt, tmp_path / "hf")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - model.eval()(ids).logits).abs().max().item() < 1e-4


def read_gguf(path):
    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    return meta, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize(
    "qk_norm,tied,kind", [(True, True, "f32"), (False, False, "f32"), (True, False, "f16"), (False, True, "q8_0")]
)
def test_gguf_reads_back_with_tensors_and_metadata(tmp_path, tokenizer_dir, qk_norm, tied, kind):
    model, ckpt = make_checkpoint(tmp_path, tokenizer_dir, qk_norm, tied)
    cfg, tok = model.config, Tokenizer.load(tokenizer_dir)
    meta, tensors = read_gguf(export_gguf(ckpt, tmp_path / "m.gguf", kind))
    arch = "qwen3" if qk_norm else "llama"
    assert meta["general.architecture"] == arch
    expected = {"block_count": 2, "embedding_length": 64, "feed_forward_length": 192, "context_length": 128,
                "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 16,
                "rope.freq_base": 10000.0}  # fmt: skip
    assert {k: meta[f"{arch}.{k}"] for k in expected} == expected
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [tok.backend.id_to_token(i) for i in range(tok.vocab_size)]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in data["model"]["merges"]]
    types = meta["tokenizer.ggml.token_type"]
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == list(range(len(SPECIAL_TOKENS)))
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.add_bos_token"]) == (tok.im_end_id, False)
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE

    names = {"token_embd", "output_norm"} | ({"output"} if not tied else set())
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    per_layer += ["attn_q_norm", "attn_k_norm"] if qk_norm else []
    names |= {f"blk.{i}.{n}" for i in range(2) for n in per_layer}
    assert set(tensors) == {n + ".weight" for n in names}
    matrix_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[kind]
    state = model.state_dict()
    pairs = [("model.embed_tokens.weight", "token_embd.weight"), ("model.layers.1.self_attn.k_proj.weight",
             "blk.1.attn_k.weight"), ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
             ("model.layers.0.post_attention_layernorm.weight", "blk.0.ffn_norm.weight")]  # fmt: skip
    for hf_name, gguf_name in pairs:
        t = tensors[gguf_name]
        ours = state[hf_name].numpy()
        if gguf_name == "blk.1.attn_k.weight" and not qk_norm:  # llama.cpp's llama ropes adjacent pairs
            ours = permute_qk(state[hf_name], cfg.num_key_value_heads).numpy()
        assert t.tensor_type.name == ("F32" if ours.ndim == 1 else matrix_type)
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        # q8_0 rounds each value to 1/254 of its 32-value block's largest magnitude
        atol = {"f32": 0.0, "f16": 1e-3, "q8_0": np.abs(ours).max() / 254 * 1.01}[kind if ours.ndim == 2 else "f32"]
        np.testing.assert_allclose(back, ours, rtol=0, atol=atol)


@pytest.mark.parametrize("qk_norm,tied,kind", [(True, True, "f32"), (False, False, "f16"), (True, False, "q8_0")])
def test_gguf_moe_reads_back_with_stacked_experts(tmp_path, tokenizer_dir, qk_norm, tied, kind):
    width = 96 if qk_norm else 192  # Mixtral's (llama.cpp `llama`) experts are intermediate_size wide
    model, ckpt = make_checkpoint(tmp_path, tokenizer_dir, qk_norm, tied, num_experts=4, moe_intermediate_size=width)
    meta, tensors = read_gguf(export_gguf(ckpt, tmp_path / "m.gguf", kind))
    arch = "qwen3moe" if qk_norm else "llama"
    assert meta["general.architecture"] == arch
    expected = {"block_count": 2, "embedding_length": 64, "feed_forward_length": 192, "expert_count": 4,
                "expert_used_count": 2, "expert_feed_forward_length": width, "attention.head_count_kv": 2}  # fmt: skip
    assert {k: meta[f"{arch}.{k}"] for k in expected} == expected
    names = {"token_embd", "output_norm"} | ({"output"} if not tied else set())
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp",
                 "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]  # fmt: skip
    per_layer += ["attn_q_norm", "attn_k_norm"] if qk_norm else []
    names |= {f"blk.{i}.{n}" for i in range(2) for n in per_layer}
    assert set(tensors) == {n + ".weight" for n in names}
    state, matrix_type = model.state_dict(), {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[kind]
    for proj, gguf_name in [("gate_proj", "blk.1.ffn_gate_exps.weight"), ("down_proj", "blk.0.ffn_down_exps.weight")]:
        layer = gguf_name.split(".")[1]
        ours = torch.stack([state[f"model.layers.{layer}.mlp.experts.{j}.{proj}.weight"] for j in range(4)]).numpy()
        t = tensors[gguf_name]
        assert t.tensor_type.name == matrix_type and list(t.shape) == list(ours.shape[::-1])  # llama.cpp's {in, out, E}
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        atol = {"f32": 0.0, "f16": 1e-3, "q8_0": np.abs(ours).max() / 254 * 1.01}[kind]
        np.testing.assert_allclose(back, ours, rtol=0, atol=atol)
    router = tensors["blk.0.ffn_gate_inp.weight"]  # f32 whatever the type: its rounding would change the choices
    assert router.tensor_type.name == "F32" and list(router.shape) == [64, 4]
    np.testing.assert_array_equal(router.data.reshape(4, 64), state["model.layers.0.mlp.gate.weight"].numpy())


# MoE that llama.cpp's qwen3moe / llama graphs compute differently (they always renormalise the top-k weights) or
# cannot express (shared experts, sigmoid, the selection bias) goes to its `glm4moe` graph: (qk_norm, moe fields)
GLM_CASES = [
    (True, dict(MOE, num_experts_per_tok=1)),  # minimind3-moe's routing
    (False, dict(MOE, num_experts_per_tok=2, n_shared_experts=1)),  # minimind-moe's
    (True, dict(MOE, num_experts_per_tok=2, norm_topk_prob=False)),
    (False, dict(MOE, num_experts_per_tok=2, n_shared_experts=1, scoring_func="sigmoid", router_bias_update_rate=1e-3)),
]
GLM_IDS = ["top1", "shared", "unnormalised", "sigmoid-shared-bias"]


def make_glm_checkpoint(tmp_path, tokenizer_dir, qk_norm, moe):
    model, _ = make_checkpoint(tmp_path, tokenizer_dir, qk_norm, **moe)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # as aux-loss-free balancing leaves it
                buf.uniform_(-0.3, 0.3)
    return model, checkpoint.save(tmp_path / "glm", 9, model, tokenizer_dir=tokenizer_dir)


@pytest.mark.parametrize("qk_norm,moe", GLM_CASES, ids=GLM_IDS)
def test_gguf_moe_beyond_qwen3moe_is_glm4moe(tmp_path, tokenizer_dir, qk_norm, moe):
    model, ckpt = make_glm_checkpoint(tmp_path, tokenizer_dir, qk_norm, moe)
    cfg = model.config
    meta, tensors = read_gguf(export_gguf(ckpt, tmp_path / "m.gguf", "q8_0"))
    assert meta["general.architecture"] == "glm4moe"
    k = cfg.num_experts_per_tok
    expected = {"expert_count": 4, "expert_used_count": k, "expert_feed_forward_length": 96,
                "expert_shared_count": 1, "leading_dense_block_count": 0,
                "expert_weights_norm": cfg.norm_topk_prob and k > 1,
                "expert_gating_func": 1 if cfg.scoring_func == "softmax" else 2}  # fmt: skip
    assert {key: meta[f"glm4moe.{key}"] for key in expected} == expected
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "post_attention_norm", "ffn_gate_inp"]
    per_layer += [f"ffn_{p}_{e}" for p in ("gate", "up", "down") for e in ("exps", "shexp")]
    per_layer += ["attn_q_norm", "attn_k_norm"] if qk_norm else []
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}
    assert set(tensors) == names | {"blk.0.exp_probs_b.bias", "blk.1.exp_probs_b.bias"}
    bias = tensors["blk.1.exp_probs_b.bias"].data
    ours = model.model.layers[1].mlp.e_score_correction_bias.numpy()
    np.testing.assert_array_equal(bias, ours if cfg.router_bias_update_rate else np.zeros(4))  # unused: zeros
    shared = gguf.quants.dequantize(tensors["blk.0.ffn_down_shexp.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    if not cfg.n_shared_experts:  # llama.cpp's glm4moe always runs one: zeros add exactly nothing
        assert shared.shape == (64, 96) and not shared.any()


def test_permute_qk_pairs_the_halves_of_each_head():
    w = torch.arange(8.0)[:, None].repeat(1, 3)  # 2 heads of head_dim 4: rows [0 1 | 2 3] and [4 5 | 6 7]
    assert permute_qk(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_gguf_pre_tokenizer_names(tokenizer_dir):
    from tokenizers import Regex, pre_tokenizers

    from nanomind.export_gguf import QWEN2_REGEX

    assert llamacpp_pre(json.loads((tokenizer_dir / "tokenizer.json").read_text())) == "gpt-2"
    qwen = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    )
    assert llamacpp_pre({"pre_tokenizer": json.loads(qwen.__getstate__())}) == "qwen2"
    with pytest.raises(ValueError, match="no llama.cpp pre-tokenizer"):
        llamacpp_pre({"pre_tokenizer": {"type": "Whitespace"}})


def test_cli_exports_imports_and_explains_errors(tmp_path, tokenizer_dir, capsys):
    _, ckpt = make_checkpoint(tmp_path, tokenizer_dir)
    cli(["export", "gguf", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "g" / "m.gguf"), "--type",
         "q8_0", "--ollama"])  # fmt: skip
    modelfile = (tmp_path / "g" / "m.Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    cli(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--dtype", "bf16"])
    assert load_file(str(tmp_path / "hf" / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
    cli(["import", "hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    assert checkpoint.load_config(tmp_path / "back") == checkpoint.load_config(ckpt)
    (ckpt / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(SystemExit):
        cli(["export", "gguf", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.gguf")])
    assert "no tokenizer/ directory; pass --tokenizer" in capsys.readouterr().err


# llama.cpp itself: opt-in, since llama-cpp-python compiles llama.cpp on install (about 3 minutes on 2 cores)
# (qk_norm, tied, scaling, moe): qwen3 and llama, and MoE as qwen3moe and as llama with experts (Mixtral)
LLAMA_CASES = [(True, True, None, {}), (False, False, CASES[2][2], {}), (True, False, CASES[3][2], {}),
               (True, True, None, MOE_CASES[0][2]), (False, False, None, MOE_CASES[3][2])]  # fmt: skip
LLAMA_CASES += [(qk_norm, False, None, moe) for qk_norm, moe in GLM_CASES]
LLAMA_IDS = ["qwen3", "llama-linear", "qwen3-yarn", "qwen3moe-top2", "llama-moe-top2"] + [
    f"glm4moe-{i}" for i in GLM_IDS
]


@pytest.mark.parametrize("qk_norm,tied,scaling,moe", LLAMA_CASES, ids=LLAMA_IDS)
def test_llamacpp_generates_our_greedy_tokens(tmp_path, tokenizer_dir, qk_norm, tied, scaling, moe):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (opt-in: pip install -e '.[llamacpp]', ~3 min build)"
    )
    if moe in [m for _, m in GLM_CASES]:
        model, ckpt = make_glm_checkpoint(tmp_path, tokenizer_dir, qk_norm, moe)
    else:
        model, ckpt = make_checkpoint(tmp_path, tokenizer_dir, qk_norm, tied, scaling, **moe)
    tok = Tokenizer.load(tokenizer_dir)
    path = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    # f32 KV cache (type 0): the default f16 cache alone moves logits by ~1e-2
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, type_k=0, type_v=0, logits_all=True, verbose=False)
    for text in ["Hello World, naïve café", "  two  spaces\n\n\nand 3.14 2024", "你好世界 😀 e\u0301", "x<|im_end|>y"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)
    prompt = tok.encode("the model of the language")
    ours = list(generate(model, prompt, GREEDY))
    llm.reset()
    llm.eval(prompt + ours[:-1])  # teacher-forced: the logits of every position of our sequence
    with torch.no_grad():
        ref = model(torch.tensor([prompt + ours[:-1]])).logits[0].numpy()
    assert np.abs(np.asarray(llm.scores[: len(ref)]) - ref).max() < 1e-3
    llm.reset()
    theirs = []
    for t in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):  # greedy; never stops by itself
        if len(theirs) == 32:
            break
        theirs.append(t)
    assert theirs == ours
