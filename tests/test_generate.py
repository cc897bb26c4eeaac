"""The streaming generator against a full recompute, and the sampling rules against hand-computed values."""

import torch

from nanomind.generate import SamplingConfig, generate, sample
from nanomind.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, qk_norm=True)  # fmt: skip


def test_greedy_generation_equals_argmax_of_full_recompute():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    prompt = [3, 1, 4, 1, 5]
    s = SamplingConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
    got = list(generate(model, prompt, s))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt) :]


def test_compiled_static_decoding_equals_eager():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    s = SamplingConfig(max_new_tokens=20, temperature=0.9, top_k=0, top_p=1.0, seed=3)
    assert list(generate(model, [3, 1, 4], s, compile=True)) == list(generate(model, [3, 1, 4], s))


def test_stop_tokens_and_context_end():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    s = SamplingConfig(max_new_tokens=200, temperature=0, repetition_penalty=1.0)
    free = list(generate(model, [1, 2], s))
    assert len(free) == CFG.max_position_embeddings - 2  # stops at the end of the context
    stop = free[3]
    first = free.index(stop)
    assert list(generate(model, [1, 2], s, stop_ids=[stop])) == free[:first]
    ignored = list(generate(model, [1, 2], SamplingConfig(max_new_tokens=10, temperature=0, repetition_penalty=1.0,
                                                          ignore_eos=True), stop_ids=[stop]))  # fmt: skip
    assert ignored == free[:10]


def exp_noise(n: int, seed: int) -> torch.Tensor:
    return torch.empty(n).exponential_(generator=torch.Generator().manual_seed(seed))


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([2.0, 1.9, -1.0, -1.05])
    seen = torch.tensor([True, False, True, False])
    s = SamplingConfig(temperature=0, repetition_penalty=1.5)
    # 2.0 / 1.5 = 1.33 < 1.9, so token 1 wins; -1.0 * 1.5 = -1.5 < -1.05
    assert sample(logits, s, seen, exp_noise(4, 0)) == 1
    assert sample(logits, SamplingConfig(temperature=0, repetition_penalty=1.0), seen, exp_noise(4, 0)) == 0
    no_pos = torch.tensor([-1.0, -1.05, -3.0])
    assert sample(no_pos, s, torch.tensor([True, False, False]), exp_noise(3, 0)) == 1


def test_top_k_top_p_and_seed():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    draws = lambda s, n=400: [int(sample(logits, s, None, exp_noise(4, i))) for i in range(n)]  # noqa: E731
    assert set(draws(SamplingConfig(temperature=1.0, top_k=1, top_p=1.0))) == {0}
    assert set(draws(SamplingConfig(temperature=1.0, top_k=0, top_p=0.75))) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert set(draws(SamplingConfig(temperature=1.0, top_k=3, top_p=1.0))) == {0, 1, 2}
    s = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0)
    counts = draws(s, 4000)
    for token, p in enumerate([0.5, 0.3, 0.15, 0.05]):  # the exponential race samples the softmax distribution
        assert abs(counts.count(token) / 4000 - p) < 0.03
    g = lambda seed: list(generate(Transformer(CFG).eval(), [1], SamplingConfig(max_new_tokens=8, seed=seed)))  # noqa: E731
    torch.manual_seed(0)
    a = g(7)
    torch.manual_seed(0)
    assert g(7) == a
