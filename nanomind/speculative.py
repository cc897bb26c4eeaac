"""Greedy speculative decoding with the model's own multi-token prediction modules (arXiv 2412.19437, 2.2, 5.4.3).

nanomind generate --ckpt runs/pretrain --speculative --prompt "Once upon a time"

Each step the MTP modules draft D tokens (depth k proposes the token k + 1 places after the next one), and one
forward of the main model over [next token, drafts] checks them all: the drafts that equal the model's greedy choices
are kept, plus the model's own token after the last kept one, so a step yields 1 to D + 1 tokens and the output is
exactly greedy decoding's. Rejected positions are rolled back by moving the caches' write position back, which only
attention caches (GQA, MLA) allow; a model with gated DeltaNet layers (a recurrent state) is refused.

The MTP modules keep caches of their own: depth k at position i reads the main model's (or depth k - 1's) state at i
and the token at i + k + 1, so after each step the positions whose inputs were drafts are rolled back and recomputed
from the verified tokens at the next step.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch

from nanomind.model import Transformer


@torch.inference_mode()
def generate_speculative(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    stop_ids: Collection[int] = (),
    stats: dict[str, int] | None = None,
) -> Iterator[int]:
    """Yield the tokens greedy `generate()` yields (temperature 0, no penalties), drafting with the MTP modules.
    stats (optional) receives "steps" (verifying forwards), "drafted" and "accepted" (draft tokens)."""
    cfg = model.config
    if not cfg.num_nextn_predict_layers:
        raise ValueError("speculative decoding drafts with the MTP modules; this model has none "
                         "(num_nextn_predict_layers=0)")  # fmt: skip
    if any(cfg.is_linear_attention(i) for i in range(cfg.num_hidden_layers)):
        raise ValueError("speculative decoding rolls caches back after a rejected draft, which gated DeltaNet "
                         "layers (full_attention_interval > 0) cannot: their cache is a recurrent state")  # fmt: skip
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    stats = {} if stats is None else stats
    stats.update(steps=0, drafted=0, accepted=0)
    if max_new_tokens == 0:
        return
    D, limit = cfg.num_nextn_predict_layers, cfg.max_position_embeddings
    max_len = min(len(prompt) + max_new_tokens, limit)
    if len(prompt) >= max_len:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in a {max_len}-token context")
    budget = max_len - len(prompt)  # tokens to yield at most, as generate()
    room = min(max_len + D, limit)  # verifying writes up to D positions past the last yielded token
    device = next(model.parameters()).device
    cache, mtp_caches = model.new_cache(1, room), model.new_mtp_caches(1, room)
    assert cache.rewindable and all(c.rewindable for c in mtp_caches)
    # states per position: [0] the main model's final-norm output, [k + 1] MTP depth k's block output
    states = [torch.zeros(1, room, cfg.hidden_size, device=device, dtype=next(model.parameters()).dtype)
              for _ in range(D + 1)]  # fmt: skip
    stops = set(stop_ids)

    hidden = model(torch.tensor([prompt], device=device), cache, return_hidden=True).hidden  # [1, n, C]
    P = len(prompt)  # tokens in the main cache; seq[P] is the next token to feed
    states[0][:, :P] = hidden
    seq = [*prompt, int(model.lm_head(hidden[:, -1]).argmax(-1))]
    produced = 0
    while True:
        if seq[P] in stops:
            return
        yield seq[P]
        produced += 1
        if produced >= budget:
            return
        drafts: list[int] = []
        n_drafts = min(D, budget - produced, room - P - 1)
        for k in range(n_drafts):
            ahead = seq + drafts  # tokens, with this step's drafts after the verified ones
            c = mtp_caches[k]
            start = c.pos  # positions start..P-1 of depth k are not in its cache yet
            ids = torch.tensor([ahead[start + k + 1 : P + k + 1]], device=device)
            h, normed = model.mtp_step(k, states[k][:, start:P], ids, c)
            states[k + 1][:, start:P] = h
            drafts.append(int(model.lm_head(normed[:, -1]).argmax(-1)))
            c.pos = P - k  # positions from P - k on read a draft token (or a state that did): recompute later
        ids = torch.tensor([[seq[P], *drafts]], device=device)
        hidden = model(ids, cache, return_hidden=True).hidden  # [1, 1 + drafts, C] at positions P..
        greedy = model.lm_head(hidden[0]).argmax(-1).tolist()
        a = 0
        while a < len(drafts) and drafts[a] == greedy[a]:
            a += 1
        stats["steps"] += 1
        stats["drafted"] += len(drafts)
        stats["accepted"] += a
        states[0][:, P : P + a + 1] = hidden[:, : a + 1]
        cache.pos = P + a + 1  # roll back the rejected drafts
        for t in drafts[:a]:  # accepted drafts: yielded here, then the model's token after them
            if t in stops:
                return
            yield t
            produced += 1
            if produced >= budget:
                return
        seq += [*drafts[:a], greedy[a]]
        P += a + 1
