"""Multi-token prediction against references: a hand-computed loss, each document run alone (packed rows),
plain greedy generate() for speculative decoding, and a save/load round trip."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from nanomind import checkpoint
from nanomind.generate import SamplingConfig, generate
from nanomind.model import Transformer, preset
from nanomind.speculative import generate_speculative
from nanomind.train.losses import mtp_loss
from nanomind.train.pretrain import cross_entropy
from nanomind.train.sft import sft_loss


def test_packed_rows_give_the_mtp_states_of_each_document_alone():
    torch.manual_seed(0)
    model = Transformer(preset("debug-mla", vocab_size=100, num_nextn_predict_layers=2)).eval()
    docs = [torch.randint(0, 100, (n,)) for n in (7, 12, 5)]
    row = torch.cat(docs + [torch.zeros(4, dtype=torch.long)])[None]  # 4 padding tokens at the end
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)] + [torch.full((4,), -1)])[None]
    with torch.no_grad():
        packed = model(row, doc_ids=doc_ids, return_hidden=True, mtp=True)
        alone = [model(d[None], return_hidden=True, mtp=True) for d in docs]
    assert [h.shape[1] for h in packed.mtp_hidden] == [27, 26]
    start = 0
    for d, out in zip(docs, alone, strict=True):
        n = len(d)
        torch.testing.assert_close(packed.hidden[0, start : start + n], out.hidden[0], atol=1e-5, rtol=1e-5)
        for k, h in enumerate(out.mtp_hidden, start=1):  # depth k: the doc's first n - k positions
            torch.testing.assert_close(packed.mtp_hidden[k - 1][0, start : start + n - k], h[0], atol=1e-5,
                                       rtol=1e-5)  # fmt: skip
        start += n


def test_mtp_loss_equals_hand_computed():
    torch.manual_seed(0)
    B, T, C, V = 2, 6, 5, 7
    weight = torch.randn(V, C, requires_grad=True)
    hidden = [torch.randn(B, T - k, C, requires_grad=True) for k in (1, 2)]
    labels = torch.randint(0, V, (B, T))
    labels[0, 3] = labels[1, 5] = -100
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]])
    loss = mtp_loss(hidden, weight, labels, 0.3, doc_ids)

    def depth_ce(h, k):  # position i predicts labels[i + k], unless ignored or in another document
        terms = []
        for b in range(B):
            for i in range(T - k):
                y = labels[b, i + k].item()
                if y != -100 and doc_ids[b, i] == doc_ids[b, i + k]:
                    terms.append(-F.log_softmax(h[b, i] @ weight.T, dim=-1)[y])
        return torch.stack(terms).mean()

    expected = 0.3 * (depth_ce(hidden[0], 1) + depth_ce(hidden[1], 2)) / 2
    torch.testing.assert_close(loss, expected)
    got = torch.autograd.grad(loss, [weight, *hidden])
    want = torch.autograd.grad(expected, [weight, *hidden])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_pretrain_and_sft_losses_add_the_weighted_mtp_loss():
    torch.manual_seed(0)
    model = Transformer(preset("debug-mla", vocab_size=100, mtp_loss_weight=0.5))
    ids = torch.randint(0, 100, (2, 16))
    labels = torch.randint(0, 100, (2, 16))
    loss, metrics = cross_entropy(model, {"input_ids": ids, "labels": labels})
    with torch.no_grad():
        logits = model(ids).logits
        main = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        mtp = model(ids, return_hidden=True, mtp=True).mtp_hidden[0] @ model.lm_head.weight.T  # [2, 15, V]
        extra = F.cross_entropy(mtp.flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(loss.detach(), main + 0.5 * extra, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(float(metrics["mtp"]), 0.5 * extra.item(), atol=1e-5, rtol=1e-5)
    doc_ids = torch.tensor([[0] * 10 + [1] * 6, [0] * 16])
    loss, metrics = sft_loss(model, {"input_ids": ids, "labels": labels, "doc_ids": doc_ids})
    assert "mtp" in metrics and torch.isfinite(loss)


def _trained_model(steps: int = 60) -> Transformer:
    """debug-mla trained on rows where each token is the previous one + 3 (mod 64): easy for both heads."""
    torch.manual_seed(0)
    model = Transformer(preset("debug-mla", vocab_size=64, mtp_loss_weight=1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        start = torch.randint(0, 64, (8, 1))
        row = (start + 3 * torch.arange(33)) % 64
        loss, _ = cross_entropy(model, {"input_ids": row[:, :-1], "labels": row[:, 1:]})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


GREEDY = SamplingConfig(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0)


@pytest.mark.parametrize("trained", [False, True])
def test_speculative_decoding_yields_greedy_tokens(trained):
    torch.manual_seed(0)
    model = _trained_model() if trained else Transformer(preset("debug-mla", vocab_size=64)).eval()
    stop = 20 if trained else 11  # trained: reached from the second prompt (1, 4, ..., 16, 19, 22, ... mod 64)
    for prompt, stops in [([5, 8, 11], ()), ([1, 4, 7], (stop + 2,))]:
        stats: dict[str, int] = {}
        got = list(generate_speculative(model, prompt, GREEDY.max_new_tokens, stops, stats))
        assert got == list(generate(model, prompt, GREEDY, stop_ids=stops))
        assert stats["accepted"] <= stats["drafted"] and stats["steps"] >= 1
        if trained and not stops:
            assert len(got) == 16
            assert stats["accepted"] / stats["drafted"] > 0.5  # the MTP head learned the pattern
            assert stats["steps"] < 12  # fewer forwards than tokens
        if trained and stops:
            assert len(got) < 16  # stopped at the stop token, drafted or not
    if not trained:
        near_end = [i % 64 for i in range(500)]  # the context end (512) cuts the reply, as generate() does
        assert list(generate_speculative(model, near_end, 16)) == list(generate(model, near_end, GREEDY))


def test_speculative_decoding_refuses_models_it_cannot_serve():
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        list(generate_speculative(Transformer(preset("debug", vocab_size=64)), [1, 2], 5))
    cfg = preset("debug-mla", full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=2,
                 linear_key_head_dim=16, linear_value_head_dim=16)  # fmt: skip
    with pytest.raises(ValueError, match="gated DeltaNet"):
        list(generate_speculative(types.SimpleNamespace(config=cfg), [1, 2], 5))  # type: ignore[arg-type]


def test_checkpoint_round_trips_an_mla_mtp_model(tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("debug-mla", vocab_size=100)).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.e_score_correction_bias.uniform_(-0.3, 0.3)
    loaded = checkpoint.load_model(checkpoint.save(tmp_path / "run", 1, model)).eval()
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and any(k.startswith("model.mtp.0.block.") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        a, b = model(ids, return_hidden=True, mtp=True), loaded(ids, return_hidden=True, mtp=True)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.mtp_hidden[0], b.mtp_hidden[0])


def test_generate_cli_speculative(tmp_path, tokenizer_dir, capsys):
    from nanomind.generate import main
    from nanomind.tokenizer import Tokenizer

    vocab = Tokenizer.load(tokenizer_dir).vocab_size
    ckpt = checkpoint.save(tmp_path / "run", 1, Transformer(preset("debug-mla", vocab_size=vocab)),
                           tokenizer_dir=tokenizer_dir)  # fmt: skip
    main(["--ckpt", str(ckpt), "--prompt", "the", "--max-new-tokens", "8", "--speculative", "--ignore-eos"])
    err = capsys.readouterr().err
    assert "greedily" in err and "drafts accepted" in err
    plain = Transformer(preset("debug", vocab_size=vocab))
    ckpt = checkpoint.save(tmp_path / "plain", 1, plain, tokenizer_dir=tokenizer_dir)
    with pytest.raises(ValueError, match="MTP"):
        main(["--ckpt", str(ckpt), "--speculative"])
