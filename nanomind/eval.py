"""Evaluation: loss, perplexity and bits per byte of a checkpoint on jsonl text, plus what every evaluation
shares (the options, reading records, batched scoring of variable-length requests, the results files).

    nanomind eval ppl --ckpt runs/pt --data ../shared/data/pretrain/zh_wiki_paragraphs.jsonl --limit 500

A `{"text"}` record is scored as pretraining sees documents: `<|endoftext|>` + its tokens + `<|endoftext|>`
(prepare ends every document with one, so one also precedes the next), every token after the first a target.
A `{"conversations"}` record is rendered with the chat template; `--targets assistant` scores only the assistant
turns (what SFT trains on). A document with more than --seq-len targets is cut into consecutive windows scored
independently (no overlap, so a window's first tokens see less context, as in training).
Bits per byte = total nats / ln 2 / UTF-8 bytes of the targets (special tokens count 0 bytes): it does not depend
on the tokenizer, so models with different tokenizers compare.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanomind import checkpoint
from nanomind.config import arg, to_dict
from nanomind.device import autocast, resolve_device
from nanomind.jsonl import BadLines, read_objects, sha256
from nanomind.model import Transformer
from nanomind.tokenizer import Tokenizer


@dataclass
class EvalConfig:
    ckpt: str = arg(help="checkpoint directory (or a run directory: its newest checkpoint)")
    data: list[str] = arg(help="jsonl files to evaluate on")
    tokenizer: str = arg("", "tokenizer directory (empty: the checkpoint's tokenizer/)")
    out: str = arg("runs/eval", "directory for the results: NAME.TASK.json and NAME.TASK.md")
    name: str = arg("", "label of this model in results and comparisons (empty: RUN-stepN from the checkpoint)")
    limit: int = arg(0, "evaluate a random sample of this many records, drawn with --seed (0 = all)")
    seed: int = arg(0, "seed of the --limit sample (and of few-shot fill-ins)")
    batch_tokens: int = arg(8192, "padded tokens per forward pass; requests are grouped by length")
    device: str = arg("auto", "cpu, cuda, cuda:N, mps or auto")
    dtype: str = arg("bf16", "compute precision: bf16 autocast (as training evaluates) or fp32",
                     choices=["bf16", "fp32"])  # fmt: skip

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data: give at least one jsonl file")
        for path in self.data:
            if not Path(path).is_file():
                raise ValueError(f"--data: file not found: {path}")
        if self.limit < 0 or self.batch_tokens < 1:
            raise ValueError("--limit must be >= 0 and --batch-tokens >= 1")


@dataclass
class PplConfig(EvalConfig):
    seq_len: int = arg(0, "targets per window (0 = the model's max_position_embeddings)")
    targets: str = arg("all", "which tokens of conversations to score", choices=["all", "assistant"])


def sample(items: list, limit: int, seed: int) -> list:
    """A seeded random subset of `limit` items in their original order (all of them when limit is 0)."""
    if not limit or limit >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that rows of a batch have similar lengths (little padding); a batch
    holds at most batch_tokens padded tokens, and at least one row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _padded(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] right-padded with zeros, and lengths [B]. Attention is causal, so a real position never sees
    the padding after it: its logits equal those of the row run alone, whatever the padding holds."""
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros((len(seqs), int(lengths.max())), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
    return ids.to(device), lengths.to(device)


@torch.inference_mode()
def last_logits(
    model: Transformer, seqs: list[list[int]], token_ids: list[int], batch_tokens: int, dtype: str = "fp32",
    desc: str = "",
) -> torch.Tensor:  # fmt: skip
    """float32 [N, len(token_ids)]: the logits of `token_ids` after the last token of each sequence."""
    device = next(model.parameters()).device
    out = torch.empty(len(seqs), len(token_ids))
    pick = torch.tensor(token_ids, device=device)
    with tqdm(total=len(seqs), desc=desc, unit="q", disable=None) as bar:
        for batch in length_batches([len(s) for s in seqs], batch_tokens):
            ids, lengths = _padded([seqs[i] for i in batch], device)
            with autocast(device, dtype):
                hidden = model(ids, return_hidden=True).hidden  # [B, T, C]
            last = hidden[torch.arange(len(batch), device=device), lengths - 1].float()  # [B, C]
            # the head in fp32 even under bf16: a few logits per row cost nothing, and bf16 would create ties
            with torch.autocast(device.type, enabled=False):
                out[batch] = model.lm_head(last)[:, pick].float().cpu()
            bar.update(len(batch))
    return out


@torch.inference_mode()
def target_nats(
    model: Transformer, seqs: list[list[int]], masks: list[list[bool]], batch_tokens: int, dtype: str = "fp32",
    desc: str = "", unit: str = "seq",
) -> list[float]:  # fmt: skip
    """Summed negative log-likelihood (nats) of each sequence's tokens seq[t] given seq[:t], over the t >= 1
    where mask[t] is True. The head runs only at the positions that predict a counted token."""
    device = next(model.parameters()).device
    out = [0.0] * len(seqs)
    with tqdm(total=len(seqs), desc=desc, unit=unit, disable=None) as bar:
        for batch in length_batches([len(s) - 1 for s in seqs], batch_tokens):
            full, _ = _padded([seqs[i] for i in batch], device)  # [B, T + 1]
            counted = _padded([[int(m) for m in masks[i]] for i in batch], device)[0][:, 1:].bool()  # [B, T]
            ids, labels = full[:, :-1], full[:, 1:]  # the last token of a row is only a target
            with autocast(device, dtype):
                hidden = model(ids, return_hidden=True).hidden[counted]  # [N, C]
                # the head in chunks: N x vocab logits at once would need gigabytes for large vocabularies
                nats = torch.cat([F.cross_entropy(model.lm_head(h).float(), y, reduction="none")
                                  for h, y in zip(hidden.split(2048), labels[counted].split(2048))])  # fmt: skip
            rows = torch.arange(len(batch), device=device)[:, None].expand_as(counted)[counted]
            per_row = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, nats.double())
            for i, value in zip(batch, per_row.tolist()):
                out[i] = value
            bar.update(len(batch))
    return out


def load(cfg: EvalConfig) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """The model (eval mode, on cfg.device), its tokenizer, and what identifies the checkpoint in results."""
    path = checkpoint.resolve(cfg.ckpt)
    tok = Tokenizer.load(cfg.tokenizer or checkpoint.tokenizer_dir(path))
    model = checkpoint.load_model(path, resolve_device(cfg.device)).eval()
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size}")
    step = json.loads((path / "config.json").read_text()).get("nanomind", {}).get("step")
    info = {"path": str(path), "step": step, "sha256": sha256(path / "model.safetensors")}
    run = path.parent.name if path.name.startswith("step_") else path.name
    info["name"] = cfg.name or (f"{run}-step{step}" if step is not None else run)
    return model, tok, info


def header(kind: str, cfg: EvalConfig, ckpt: dict[str, Any], files: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields every results file starts with: what was evaluated, on what, and how."""
    ckpt = dict(ckpt)
    return {"kind": kind, "name": ckpt.pop("name"), "checkpoint": ckpt, "data": files, "seed": cfg.seed,
            "limit": cfg.limit, "dtype": cfg.dtype, "config": to_dict(cfg), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip


def write_results(result: dict[str, Any], out: str, task: str) -> Path:
    """OUT/NAME.TASK.json and the Markdown table beside it (.md); returns the JSON path."""
    from nanomind.report import markdown

    path = Path(out) / f"{result['name']}.{task}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    path.with_suffix(".md").write_text(markdown(result) + "\n")
    return path


def _document(record: dict[str, Any], tok: Tokenizer, targets: str) -> tuple[list[int], list[bool]] | str:
    """(ids, counted) of one record with the surrounding end-of-text tokens, or the reason it is unusable."""
    if isinstance(record.get("text"), str):
        if not record["text"].strip():
            return "empty 'text'"
        try:
            ids = tok.encode(record["text"])
        except UnicodeEncodeError:
            return "'text' has a lone surrogate"
        return [tok.eos_id, *ids, tok.eos_id], [True] * (len(ids) + 2)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "no 'text' string or 'conversations' list"
    if not all(isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
               for t in turns):  # fmt: skip
        return "a turn without string 'role' and 'content'"
    if targets == "assistant" and not any(t["role"] == "assistant" for t in turns):
        return "no assistant turn"
    ids, trained = tok.encode_chat(turns)  # the chat template's ids; trained: assistant turns, as SFT sees them
    counted = trained if targets == "assistant" else [True] * len(ids)
    return [tok.eos_id, *ids], [False, *counted]


def perplexity(cfg: PplConfig) -> dict[str, Any]:
    """Evaluate, print the table, write the results; returns the results dict."""
    model, tok, ckpt = load(cfg)
    seq_len = cfg.seq_len or model.config.max_position_embeddings
    if not 1 <= seq_len <= model.config.max_position_embeddings:
        raise ValueError(f"--seq-len must be in [1, {model.config.max_position_embeddings}], got {cfg.seq_len}")
    token_bytes = tok.token_bytes()
    files, rows, t0 = [], {}, time.perf_counter()
    for path in cfg.data:
        bad = BadLines()
        docs = []
        for line_no, record in read_objects(path, bad):
            doc = _document(record, tok, cfg.targets)
            if isinstance(doc, str):
                bad.add(path, line_no, doc)
            else:
                docs.append(doc)
        if bad.total:
            print(bad.summary())
        if not docs:
            raise ValueError(f"{path}: no usable record (need {{'text': ...}} or {{'conversations': [...]}} lines)")
        docs = sample(docs, cfg.limit, cfg.seed)
        seqs, masks = [], []
        for ids, counted in docs:  # windows of seq_len targets: ids[s : s + seq_len + 1]
            for s in range(0, len(ids) - 1, seq_len):
                if any(counted[s + 1 : s + seq_len + 1]):
                    seqs.append(ids[s : s + seq_len + 1])
                    masks.append(counted[s : s + seq_len + 1])
        nats = sum(target_nats(model, seqs, masks, cfg.batch_tokens, cfg.dtype, desc=Path(path).name, unit="win"))
        n_tokens = sum(sum(m[1:]) for m in masks)
        n_bytes = sum(int(token_bytes[t]) for s, m in zip(seqs, masks) for t, c in zip(s[1:], m[1:]) if c)
        rows[Path(path).name] = _ppl_row(nats, n_tokens, n_bytes, len(docs))
        files.append({"path": path, "sha256": sha256(path), "records": len(docs), "skipped": bad.total})
    total = {k: sum(r[k] for r in rows.values()) for k in ("nats", "tokens", "bytes", "docs")}
    result = header("ppl", cfg, ckpt, files)
    result |= {"metric": "bpb", "targets": cfg.targets, "seq_len": seq_len, "rows": rows,
               "overall": _ppl_row(total["nats"], total["tokens"], total["bytes"], total["docs"]),
               "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    return result


def _ppl_row(nats: float, tokens: int, n_bytes: int, docs: int) -> dict[str, Any]:
    loss = nats / max(tokens, 1)
    bpb = nats / math.log(2) / n_bytes if n_bytes else float("nan")
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": bpb, "nats": nats, "tokens": tokens,
            "bytes": n_bytes, "docs": docs}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from nanomind.config import parse
    from nanomind.report import markdown

    cfg = parse(PplConfig, argv, "nanomind eval ppl", __doc__.splitlines()[0])
    result = perplexity(cfg)
    print(markdown(result))
    print(f"results: {write_results(result, cfg.out, 'ppl')}")
