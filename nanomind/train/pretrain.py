"""Pretraining: next-token prediction on packed rows of exactly seq_len tokens (no padding).

    nanomind pretrain --preset minimind-26m --data corpus.jsonl --out runs/pt --steps 2000

`--data` is a directory made by `nanomind prepare`, or jsonl files, which are prepared into OUT/data first
(with --tokenizer, or a tokenizer trained on them into OUT/tokenizer).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nanomind import checkpoint
from nanomind.config import arg
from nanomind.data import PackedBatches, PrepareConfig, TokenShards, eval_batches, prepare
from nanomind.device import resolve_device
from nanomind.model import PRESETS, Transformer, describe_presets, preset
from nanomind.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from nanomind.train.loop import TrainConfig, TrainResult, dist_env, rank0_first, train, unwrap
from nanomind.train.losses import linear_cross_entropy, mtp_loss


@dataclass
class PretrainConfig(TrainConfig):
    data: list[str] = arg([], 'a prepared directory (nanomind prepare) or {"text"} jsonl files')
    preset: str = arg("tiny", "model size; parameters at vocab 6400: " + describe_presets(), choices=sorted(PRESETS))
    tokenizer: str = arg("", "tokenizer directory for jsonl --data (default: train one into OUT/tokenizer)")
    vocab_size: int = arg(6400, "vocabulary of the tokenizer trained when --tokenizer is not given")
    init: str = arg("", "checkpoint to start from instead of random weights")
    out: str = arg("runs/pretrain", "run directory: checkpoints (step_*/) and TensorBoard logs (tb/)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise ValueError("--data is required: a prepared directory or one or more jsonl files")


def cross_entropy(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token loss over all positions; labels [B, T] are the inputs shifted by one. Models with MTP
    modules add their weighted loss (logged as "mtp")."""
    out = model(batch["input_ids"], return_hidden=True, mtp=True)  # hidden [B, T, C]
    head = unwrap(model).lm_head.weight
    loss = linear_cross_entropy(out.hidden.flatten(0, 1), head, batch["labels"].flatten())
    metrics: dict[str, float] = {"tokens": batch["labels"].numel()}
    if out.mtp_hidden:  # multi-token prediction (model/mtp.py)
        mtp = mtp_loss(out.mtp_hidden, head, batch["labels"], unwrap(model).config.mtp_loss_weight)
        loss = loss + mtp
        metrics["mtp"] = mtp.detach()
    if out.aux_loss is not None:  # MoE load balancing
        loss = loss + out.aux_loss
    return loss, metrics


def make_eval_fn(val: TokenShards, token_bytes: torch.Tensor, batch_size: int, seq_len: int, max_batches: int):
    """Validation loss (nats/token) and bits per byte = total nats / ln 2 / total UTF-8 bytes of the targets.
    Bytes come from each target token's byte length, so bpb is comparable across tokenizers."""
    fixed = eval_batches(val, batch_size, seq_len, max_batches)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        nats = count = nbytes = 0.0
        for b in fixed:
            ids, labels = b["input_ids"].to(device), b["labels"].to(device)
            logits = model(ids).logits.float()
            nats += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            count += labels.numel()
            nbytes += token_bytes.to(device)[labels].sum().item()
        return {"val_loss": nats / count, "val_bpb": nats / math.log(2) / max(nbytes, 1.0)}

    return evaluate


def ensure_prepared(cfg: PretrainConfig) -> Path:
    """The prepared data directory for cfg.data (preparing jsonl inputs into OUT/data when needed)."""
    if len(cfg.data) == 1 and Path(cfg.data[0]).is_dir():
        return Path(cfg.data[0])
    out = Path(cfg.out)
    prepared = out / "data"
    if (prepared / "meta.json").is_file():
        meta = json.loads((prepared / "meta.json").read_text())
        earlier = sorted(str(Path(i["path"]).resolve()) for i in meta["inputs"])
        if earlier != sorted(str(Path(d).resolve()) for d in cfg.data):
            raise ValueError(f"{prepared} was prepared from {earlier}, not from --data {cfg.data}; "
                             "use another --out or delete it")  # fmt: skip
        print(f"using the data prepared earlier in {prepared}")
        return prepared
    tok_dir = cfg.tokenizer
    if not tok_dir:
        tok_dir = str(out / "tokenizer")
        if not (Path(tok_dir) / "tokenizer.json").is_file():
            print(f"training a {cfg.vocab_size}-token tokenizer into {tok_dir}")
            train_tokenizer(TokenizerTrainConfig(data=cfg.data, vocab_size=cfg.vocab_size, out=tok_dir))
    prepare(PrepareConfig(data=cfg.data, tokenizer=tok_dir, out=str(prepared)))
    return prepared


def run(cfg: PretrainConfig) -> TrainResult:
    data_dir = rank0_first(lambda: ensure_prepared(cfg))  # under torchrun the tokenizer and shards are made once
    tok_dir = data_dir / "tokenizer"
    tok = Tokenizer.load(tok_dir)
    rank, world = dist_env()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.init:
        model = checkpoint.load_model(cfg.init)
        if model.config.vocab_size != tok.vocab_size:
            raise ValueError(f"--init {cfg.init} has vocab {model.config.vocab_size}, the data's tokenizer "
                             f"{tok.vocab_size}")  # fmt: skip
    else:
        model = Transformer(preset(cfg.preset, vocab_size=tok.vocab_size))
    model.to(device)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")  # fmt: skip
    if rank == 0:
        n = model.num_params()
        if model.config.num_experts:
            n_active = model.config.num_params(active=True)
            print(f"mixture of experts: {model.config.num_experts} experts, top-{model.config.num_experts_per_tok}, "
                  f"{n_active / 1e6:.2f}M of the {n / 1e6:.2f}M parameters active per token")  # fmt: skip
        print(f"model: {cfg.preset if not cfg.init else cfg.init}, {n / 1e6:.2f}M parameters "
              f"({model.config.num_params(embeddings=False) / 1e6:.2f}M without embeddings), device {device}, "
              f"{cfg.dtype}, {cfg.batch_size * cfg.seq_len * cfg.grad_accum * world:,} tokens per step")  # fmt: skip
        if model.config.attention == "mla":
            b = model.config.kv_cache_bytes_per_token()
            print(f"multi-head latent attention: {b['cache']:,} cache bytes per token in bf16 "
                  f"(GQA with {model.config.num_key_value_heads} kv heads: {b['gqa']:,})")  # fmt: skip
        if model.config.full_attention_interval:
            c = model.config
            linear = sum(c.is_linear_attention(i) for i in range(c.num_hidden_layers))
            print(f"hybrid: {linear} of {c.num_hidden_layers} layers gated DeltaNet; cache in bf16 "
                  f"{c.kv_cache_bytes_per_token()['cache']:,} bytes per token (full-attention layers) + "
                  f"{c.linear_state_bytes():,} bytes of fixed state per sequence")  # fmt: skip
        if model.config.num_nextn_predict_layers:
            print(f"multi-token prediction: {model.config.num_nextn_predict_layers} module(s), loss weight "
                  f"{model.config.mtp_loss_weight}")  # fmt: skip
    train_shards = TokenShards(data_dir, "train")
    batches = PackedBatches(train_shards, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
    eval_fn = make_eval_fn(TokenShards(data_dir, "val"), torch.tensor(tok.token_bytes()), cfg.batch_size,
                           cfg.seq_len, cfg.eval_batches)  # fmt: skip
    return train(model, cfg, batches, cross_entropy, eval_fn, tokenizer_dir=tok_dir,
                 info={"stage": "pretrain", "preset": cfg.preset, "data": str(data_dir)})  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from nanomind.config import parse

    cfg = parse(PretrainConfig, argv, "nanomind pretrain", __doc__.splitlines()[0])
    result = run(cfg)
    if dist_env()[0] != 0:
        return  # under torchrun, rank 0 reports
    print(f"finished at step {result.step}; checkpoint: {result.checkpoint}")
    if result.evals:
        last = result.evals[-1]
        print(f"validation: loss {last['val_loss']:.4f}, bits/byte {last['val_bpb']:.4f}")
