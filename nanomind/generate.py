"""Sampling and the one streaming generator (token ids in, token ids out, one at a time, with a KV cache).

nanomind generate --ckpt runs/pretrain --prompt "Once upon a time" --max-new-tokens 200
"""

from __future__ import annotations

import sys
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch

from nanomind.config import arg
from nanomind.model import Transformer


@dataclass
class SamplingConfig:
    max_new_tokens: int = arg(200, "tokens to generate at most")
    temperature: float = arg(0.8, "softmax temperature; 0 = greedy")
    top_k: int = arg(50, "sample among the k most likely tokens (0 = all)")
    top_p: float = arg(0.95, "nucleus sampling: the smallest set of tokens whose probability reaches p (1 = off)")
    repetition_penalty: float = arg(1.1, "divide the logits of tokens already seen by this (CTRL style; 1 = off)")
    frequency_penalty: float = arg(0.0, "subtract this times a token's count in the reply so far (OpenAI style)")
    presence_penalty: float = arg(0.0, "subtract this from tokens that occur in the reply so far (OpenAI style)")
    seed: int = arg(0, "random seed for sampling")
    ignore_eos: bool = arg(False, "keep generating past stop tokens (for benchmarks)")

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 0 or self.top_k < 0:
            raise ValueError("--max-new-tokens and --top-k must be >= 0")
        if not (-2 <= self.frequency_penalty <= 2 and -2 <= self.presence_penalty <= 2):
            raise ValueError("--frequency-penalty and --presence-penalty must be in [-2, 2]")


def settings_key(s: SamplingConfig) -> tuple:
    """The settings sample() depends on (requests with equal keys can be sampled as one batch)."""
    return (s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.frequency_penalty, s.presence_penalty)


def sample(
    logits: torch.Tensor, s: SamplingConfig, seen: torch.Tensor | None, noise: torch.Tensor, counts=None
) -> torch.Tensor:
    """Token ids [...] from logits [..., V] (one row, or a batch of rows sharing settings `s`). `seen` [..., V]
    bool marks the tokens the repetition penalty applies to (prompt and reply); `counts` [..., V] float counts the
    reply's tokens, for the frequency / presence penalties; `noise` [..., >=K] holds Exp(1) draws: argmax(p / noise)
    picks token i with probability p_i (the exponential race, the same distribution as multinomial), which needs no
    generator inside the function, so it can be compiled."""
    logits = logits.float()
    if seen is not None and s.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if counts is not None and (s.frequency_penalty or s.presence_penalty):
        logits = logits - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).float()
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        values, index = torch.topk(logits, s.top_k, dim=-1)  # sorted, largest first
    else:
        values, index = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    if s.top_p < 1.0:
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= s.top_p, 0.0)
    choice = (probs / noise[..., : probs.shape[-1]]).argmax(-1, keepdim=True)
    return index.gather(-1, choice).squeeze(-1)


def _step_fn(model: Transformer, s: SamplingConfig, static: bool):
    """(ids [1, 1], cache, positions [1], seen, noise, counts) -> next token id (0-d): one forward step plus
    sampling, which also marks the token in `seen` and `counts`."""

    def step(ids, cache, positions, seen, noise, counts):
        logits = model(ids, cache, last_only=True, positions=positions if static else None).logits[0, -1]
        tok = sample(logits, s, seen, noise, counts)
        seen.index_fill_(0, tok.view(1), True)
        counts.index_add_(0, tok.view(1), torch.ones(1, device=counts.device))
        return tok

    return step


def _compiled_step(model: Transformer, s: SamplingConfig):
    """The step compiled with fixed shapes (the whole cache is attended to with a mask), so one graph serves
    every step; kept on the model (so it goes when the model goes) per sampling settings."""
    steps = model.__dict__.setdefault("_compiled_decode_steps", {})
    key = settings_key(s)
    if key not in steps:
        # on CPU, inductor's autotuned matrix-vector kernels beat its defaults (bf16: 2.55 vs 2.8 ms per token)
        mode = "max-autotune-no-cudagraphs" if next(model.parameters()).device.type == "cpu" else None
        steps[key] = torch.compile(_step_fn(model, s, static=True), dynamic=False, fullgraph=True, mode=mode)
    return steps[key]


@torch.inference_mode()
def generate(
    model: Transformer, prompt: list[int], s: SamplingConfig, stop_ids: Collection[int] = (), compile: bool = False
) -> Iterator[int]:
    """Yield new token ids one by one; stops at a stop id (not yielded), max_new_tokens or the context end.
    compile: decode with a torch.compile'd step (the first call compiles for a while; later ones are faster)."""
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    if s.max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    limit = model.config.max_position_embeddings
    max_len = min(len(prompt) + s.max_new_tokens, limit)
    if len(prompt) >= max_len:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in a {max_len}-token context")
    gen = torch.Generator(device=device).manual_seed(s.seed)
    vocab = model.config.vocab_size
    # compiled steps are specialised to the cache length: round it up so that most calls share one graph
    cache = model.new_cache(1, min(-(-max_len // 256) * 256, limit) if compile else max_len)
    step = _compiled_step(model, s) if compile else _step_fn(model, s, static=False)
    seen = torch.zeros(vocab, dtype=torch.bool, device=device)
    seen[torch.tensor(prompt, device=device)] = True
    counts = torch.zeros(vocab, device=device)
    # Exp(1) draws for the sampling race: as many as there are candidates (top-k of them, else the vocabulary)
    noise = torch.empty(s.top_k if 0 < s.top_k < vocab else vocab, device=device)
    logits = model(torch.tensor([prompt], device=device), cache, last_only=True).logits[0, -1]
    tok = sample(logits, s, seen, noise.exponential_(generator=gen), counts)
    seen[tok] = True
    counts[tok] += 1
    stops = set() if s.ignore_eos else set(stop_ids)
    positions = torch.tensor([len(prompt)], device=device)
    for pos in range(len(prompt), max_len):
        tok_id = int(tok)
        if tok_id in stops:
            return
        yield tok_id
        if pos + 1 >= max_len:
            return
        tok = step(tok.view(1, 1), cache, positions, seen, noise.exponential_(generator=gen), counts)
        positions += 1
        if compile:
            cache.pos = pos + 1  # the static path leaves position bookkeeping to the caller


@dataclass(kw_only=True)
class GenerateConfig(SamplingConfig):
    ckpt: str = arg(help="checkpoint directory (or a run directory: its newest checkpoint)")
    prompt: str = arg("", "text to continue (empty: start from <|endoftext|>)")
    device: str = arg("auto", "cpu, cuda, mps or auto")
    dtype: str = arg("fp32", "weights precision for inference", choices=["fp32", "bf16"])
    compile: bool = arg(False, "torch.compile the decoding step (slow first call, faster decoding)")
    speculative: bool = arg(False, "greedy speculative decoding drafting with the model's MTP modules")


def main(argv: list[str] | None = None) -> None:
    from nanomind import checkpoint
    from nanomind.config import parse
    from nanomind.device import resolve_device
    from nanomind.tokenizer import StreamDecoder, Tokenizer

    cfg = parse(GenerateConfig, argv, "nanomind generate", __doc__.splitlines()[0])
    tok = Tokenizer.load(checkpoint.tokenizer_dir(cfg.ckpt))
    model = checkpoint.load_model(cfg.ckpt, resolve_device(cfg.device)).eval()
    if cfg.dtype == "bf16":
        model.to(torch.bfloat16)
    prompt = tok.encode(cfg.prompt) if cfg.prompt else [tok.eos_id]
    decoder = StreamDecoder(tok)
    sys.stdout.write(cfg.prompt)
    stops, stats = (tok.eos_id, tok.im_end_id), {}
    if cfg.speculative:
        from nanomind.speculative import generate_speculative

        if not model.config.num_nextn_predict_layers:
            raise ValueError(f"--speculative drafts with MTP modules and {cfg.ckpt} has none "
                             "(num_nextn_predict_layers=0)")  # fmt: skip
        if cfg.temperature or cfg.repetition_penalty != 1 or cfg.frequency_penalty or cfg.presence_penalty:
            print("--speculative decodes greedily: temperature and penalties are ignored", file=sys.stderr)
        tokens = generate_speculative(model, prompt, cfg.max_new_tokens, () if cfg.ignore_eos else stops, stats)
    else:
        tokens = generate(model, prompt, cfg, stop_ids=stops, compile=cfg.compile)
    n, t0 = 0, time.perf_counter()
    for token in tokens:
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
        n += 1
    sys.stdout.write(decoder.flush() + "\n")
    dt = time.perf_counter() - t0
    extra = ""
    if stats.get("drafted"):
        extra = (f", {stats['accepted'] / stats['drafted']:.1%} of {stats['drafted']} drafts accepted, "
                 f"{n / max(stats['steps'], 1):.2f} tokens per forward")  # fmt: skip
    print(f"[{n} tokens, {n / dt:.1f} tokens/s{extra}]", file=sys.stderr)
