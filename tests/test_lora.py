"""LoRA against references: the merged model's logits, the frozen base weights, peft on the HF model, a resumed run."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_texts
from safetensors.torch import load_file
from test_sft import write_chats

from nanomind import checkpoint
from nanomind.model import Transformer, preset
from nanomind.model.lora import TARGETS, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter
from nanomind.train import sft


def adapted(vocab=400, rank=4, targets=TARGETS, std=0.05, **kw) -> tuple[Transformer, Transformer]:
    """(base, base + LoRA with random B so the adapter changes the output)."""
    torch.manual_seed(0)
    base = Transformer(preset("debug", vocab_size=vocab, **kw)).eval()
    model = Transformer(base.config).eval()
    model.load_state_dict(base.state_dict())
    apply_lora(model, rank, alpha=8.0, targets=targets)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, std)
    return base, model


def test_adapter_starts_at_the_base_and_merges_to_the_same_logits():
    base, model = adapted(targets=("q_proj", "v_proj", "down_proj"))
    ids = torch.randint(0, 400, (2, 40))
    with torch.no_grad():
        unmerged = model(ids).logits
        fresh = Transformer(base.config).eval()
        fresh.load_state_dict(base.state_dict())
        apply_lora(fresh, 4, 8.0)  # B starts at zero: exactly the base model
        torch.testing.assert_close(fresh(ids).logits, base(ids).logits, atol=0, rtol=0)
        assert (unmerged - base(ids).logits).abs().max() > 1e-3  # the adapter does something
        merge_lora(model)
        assert not lora_layers(model) and set(model.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


@pytest.fixture()
def chat_ckpt(tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "base", 0, Transformer(preset("debug", vocab_size=400)), tokenizer_dir)
    texts = make_texts(120, seed=8)
    convs = [[{"role": "user", "content": t[:60]}, {"role": "assistant", "content": "Sure: " + t[:40]}] for t in texts]
    return tmp_path / "base", write_chats(tmp_path / "chat.jsonl", convs)


def lora_sft(base, data, out, **kw) -> sft.SFTConfig:
    cfg = dict(init=str(base), data=[str(data)], out=str(out), steps=6, batch_size=4, seq_len=128, lr=1e-2,
               dtype="fp32", eval_every=0, eval_batches=2, tensorboard=False, warmup_steps=1, lora_rank=4,
               lora_targets=["q_proj,v_proj", "gate_proj"], save_every=0)  # fmt: skip
    return sft.SFTConfig(**{**cfg, **kw})


def test_lora_training_changes_only_the_adapter_and_saves_it_apart(chat_ckpt, tmp_path):
    base, data = chat_ckpt
    cfg = lora_sft(base, data, tmp_path / "lora")
    assert cfg.lora_targets == ["q_proj", "v_proj", "gate_proj"]
    result = sft.run(cfg)
    assert result.losses[-1] < result.losses[0]
    before = load_file(str(checkpoint.resolve(base) / "model.safetensors"))
    after = load_file(str(result.checkpoint / "model.safetensors"))
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)  # base untouched
    adapter = load_file(str(result.checkpoint / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 3 * 2  # A and B of 3 targets in 2 layers, PEFT names
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight" in adapter
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B left zero: every B trained
    trained = checkpoint.load_model(result.checkpoint).eval()  # the adapter comes back on
    assert len(lora_layers(trained)) == 6
    ids = torch.randint(0, 400, (1, 30))
    plain = checkpoint.load_model(base).eval()
    with torch.no_grad():
        assert (trained(ids).logits - plain(ids).logits).abs().max() > 1e-4
    # a later stage started from the LoRA run trains the merged model in full
    full = sft.run(lora_sft(result.checkpoint, data, tmp_path / "full", lora_rank=0, steps=2))
    assert not (full.checkpoint / "adapter").exists()
    weights = load_file(str(full.checkpoint / "model.safetensors"))
    assert not torch.equal(weights["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_lora_run_resumes_exactly(chat_ckpt, tmp_path):
    base, data = chat_ckpt
    full = sft.run(lora_sft(base, data, tmp_path / "full", save_every=3, keep_last=0))
    assert [p.name for p in checkpoint.step_dirs(tmp_path / "full")] == ["step_0000003", "step_0000006"]
    shutil.rmtree(tmp_path / "full" / "step_0000006")
    resumed = sft.run(lora_sft(base, data, tmp_path / "full", save_every=3, keep_last=0, resume=True))
    assert resumed.losses == full.losses[3:]  # bitwise, fp32: adapter, optimizer and data cursor restored


def test_adapter_loads_with_peft_onto_the_hf_export(tmp_path, tokenizer_dir):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'nanomind[dev]')")
    transformers = pytest.importorskip("transformers")
    from nanomind.export import export_hf

    base, model = adapted(qk_norm=True)
    cfg = base.config
    save_adapter(model, tmp_path / "adapter", base="debug")
    export_hf(checkpoint.save(tmp_path / "base", 0, base, tokenizer_dir), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no trust_remote_code
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        theirs, ours = peft_model(ids).logits, model(ids).logits
        assert (ours - base(ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    again = Transformer(cfg).eval()  # and our loader reads what we wrote
    again.load_state_dict(base.state_dict())
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours, atol=0, rtol=0)


def test_merge_lora_command_and_chat_with_an_adapter(tokenizer_dir, tmp_path, capsys):
    from nanomind import chat, merge_lora

    base, model = adapted(std=1.0)  # a large change, so that the greedy replies differ
    checkpoint.save(tmp_path / "base", 5, base, tokenizer_dir)
    save_adapter(model, tmp_path / "adapter")
    merge_lora.main(["--ckpt", str(tmp_path / "base"), "--lora", str(tmp_path / "adapter"), "--out",
                     str(tmp_path / "merged")])  # fmt: skip
    merged = checkpoint.load_model(tmp_path / "merged").eval()
    assert checkpoint.resolve(tmp_path / "merged").name == "step_0000005" and not lora_layers(merged)
    ids = torch.randint(0, 400, (1, 25))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="has no LoRA adapter"):
        merge_lora.merge(merge_lora.MergeConfig(ckpt=str(tmp_path / "base"), out=str(tmp_path / "x")))
    replies = []
    for args in (["--ckpt", str(tmp_path / "base"), "--lora", str(tmp_path / "adapter")],
                 ["--ckpt", str(tmp_path / "merged")], ["--ckpt", str(tmp_path / "base")]):  # fmt: skip
        capsys.readouterr()
        chat.main([*args, "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "12"])
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] != replies[2]  # --lora gives the merged model's greedy reply
