"""The one training loop. A stage supplies batches, a loss function and an evaluation; the loop owns the rest:
gradient accumulation, mixed precision, clipping, the LR schedule, logging, checkpoints and resuming.

Runs as is under `torchrun` too: each rank reads its own rows (the batch source takes rank/world_size),
gradients are averaged by DDP, and only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanomind import checkpoint
from nanomind.config import arg
from nanomind.device import autocast
from nanomind.model import Transformer
from nanomind.model.lora import TARGETS, apply_lora, lora_layers, merge_lora
from nanomind.model.moe import load_stats, moe_layers

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]


class BatchSource(Protocol):
    def next(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    out: str = arg("runs/run", "run directory: checkpoints (step_*/) and TensorBoard logs (tb/)")
    steps: int = arg(1000, "optimizer steps in total")
    batch_size: int = arg(16, "rows per micro-batch (per process)")
    seq_len: int = arg(256, "tokens per row")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    lr: float = arg(1e-3, "peak learning rate")
    min_lr_ratio: float = arg(0.1, "the cosine schedule ends at lr * min_lr_ratio")
    warmup_steps: int = arg(50, "linear warm-up steps")
    weight_decay: float = arg(0.1, "AdamW weight decay (never applied to norms, biases or embeddings)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = off)")
    dtype: str = arg("bf16", "compute precision: bf16 autocast or fp32", choices=["bf16", "fp32"])
    device: str = arg("auto", "cpu, cuda, cuda:N, mps or auto")
    compile: bool = arg(False, "torch.compile the model")
    eval_every: int = arg(100, "evaluate every N steps (0 = only at the end)")
    eval_batches: int = arg(20, "validation batches per evaluation")
    save_every: int = arg(500, "write a checkpoint every N steps (0 = only at the end)")
    keep_last: int = arg(3, "keep the newest K checkpoints (0 = all)")
    resume: bool = arg(False, "continue from the newest checkpoint in --out")
    seed: int = arg(1337, "seed for init and data order")
    log_every: int = arg(10, "update the progress bar / TensorBoard every N steps")
    max_minutes: float = arg(0.0, "stop (with a checkpoint) after this many minutes (0 = no limit)")
    tensorboard: bool = arg(True, "write TensorBoard logs to OUT/tb")
    lora_rank: int = arg(0, "train LoRA adapters of this rank instead of the weights (0 = full training)")
    lora_alpha: float = arg(16.0, "LoRA scale: the adapter's output is multiplied by alpha / rank")
    lora_targets: list[str] = arg(list(TARGETS), "layers that get adapters (comma- or space-separated)")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        self.lora_targets = [t for item in self.lora_targets for t in item.split(",") if t]
        unknown = sorted(set(self.lora_targets) - set(TARGETS))
        if self.lora_rank < 0 or unknown or not self.lora_targets:
            raise ValueError(f"--lora-rank must be >= 0 and --lora-targets a subset of {','.join(TARGETS)}; "
                             f"got rank {self.lora_rank}, unknown targets {unknown}")  # fmt: skip


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # train loss of every step run in this call
    grad_norms: list[float] = field(default_factory=list)  # global gradient norm before clipping, per step
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", "val_loss", "val_bpb", ...}
    moe_load: list[float] = field(default_factory=list)  # MoE models: worst expert max/min load ratio per step
    checkpoint: Path | None = None
    interrupted: bool = False


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine down to lr * min_lr_ratio at the last step (steps - 1)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)  # 1.0 at the last step
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on matrices only: norms, biases and embeddings are left alone."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def dist_env() -> tuple[int, int]:
    """(rank, world_size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    A training step frees and re-allocates the same multi-MB activation buffers every time; by default glibc
    hands large blocks back to the kernel, so each step page-faults them in again (measured: ~10-20% of a CPU
    step for a 30M model). Allocations up to the 32 MiB cap stay on the heap and the heap is never trimmed.
    No effect outside glibc (macOS, musl) or on GPU memory.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: its allocator already behaves differently


_stop_requested = False


def request_stop(*_: Any) -> None:
    """Finish the current step, write a checkpoint and return (Ctrl-C, SIGTERM). A second Ctrl-C quits at once."""
    global _stop_requested
    if _stop_requested:
        raise KeyboardInterrupt
    _stop_requested = True


def measure_peak_flops(device: torch.device, dtype: str, seconds: float = 0.3) -> float:
    """Measured dense matmul FLOP/s of this device and precision: the denominator of MFU."""
    n = 1024 if device.type == "cpu" else 4096
    t = torch.bfloat16 if dtype == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)  # private: the training RNG stream must not move
    a = torch.randn(n, n, device=device, generator=g).to(t)
    b = torch.randn(n, n, device=device, generator=g).to(t)
    a @ b  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        sync()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def train(
    model: Transformer,
    cfg: TrainConfig,
    batches: BatchSource,
    loss_fn: LossFn,
    eval_fn: EvalFn | None = None,
    tokenizer_dir: str | Path | None = None,
    info: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` in place for cfg.steps optimizer steps (continuing from a checkpoint with cfg.resume)."""
    global _stop_requested
    _stop_requested = False
    rank, world = dist_env()
    master = rank == 0
    device = next(model.parameters()).device
    if device.type == "cpu":
        keep_freed_memory()
    if lora_layers(model):  # --init was a LoRA run: start from its base + adapter, folded into the weights
        merge_lora(model)
    if cfg.lora_rank:
        trainable = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        if master:
            print(f"LoRA rank {cfg.lora_rank} on {','.join(cfg.lora_targets)}: {trainable / 1e6:.3f}M trainable "
                  f"of {model.num_params() / 1e6:.2f}M parameters")  # fmt: skip
    optimizer = make_optimizer(model, cfg, device)
    step = 0
    if cfg.resume and checkpoint.step_dirs(cfg.out):
        ckpt = checkpoint.resolve(cfg.out)
        checkpoint.load_weights(model, ckpt)
        state = checkpoint.load_train_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"], device)
        step = state["step"]
        if master:
            print(f"resumed from {ckpt} at step {step}")
    elif cfg.resume and master:
        print(f"--resume: no checkpoint in {cfg.out} yet, starting from scratch")
    elif checkpoint.step_dirs(cfg.out):
        raise ValueError(f"{cfg.out} already holds checkpoints (newest: {checkpoint.step_dirs(cfg.out)[-1].name}); "
                         "pass --resume to continue that run, or choose another --out")  # fmt: skip

    wrapped: torch.nn.Module = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if cfg.compile:
        wrapped = torch.compile(wrapped)

    writer = _tensorboard(cfg) if master else None
    flops_per_token = model.config.flops_per_token(cfg.seq_len)
    peak = measure_peak_flops(device, cfg.dtype) if master else 0.0
    result = TrainResult(step=step)
    info = {**(info or {}), "train_config": asdict(cfg)}

    saved_at = -1

    def save() -> Path | None:
        nonlocal saved_at
        if not master or saved_at == step:
            return result.checkpoint  # already written at this step
        saved_at = step
        state = {"step": step, "optimizer": optimizer.state_dict(), "data": batches.state_dict(),
                 "rng": rng_state(device)}  # fmt: skip
        return checkpoint.save(cfg.out, step, model, tokenizer_dir, state, cfg.keep_last, info)

    def evaluate() -> None:
        if eval_fn is None or not master or (result.evals and result.evals[-1]["step"] == step):
            return
        model.eval()
        with torch.no_grad(), autocast(device, cfg.dtype):
            metrics = {"step": step, **eval_fn(model)}
        model.train()
        result.evals.append(metrics)
        bar.write(
            "step {step:>6}  ".format(**metrics) + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step")
        )
        if writer:
            for k, v in metrics.items():
                if k != "step":
                    writer.add_scalar(f"val/{k}", v, step)

    old_handlers = _install_signal_handlers()
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, dynamic_ncols=True, desc="train")
    t_start = t_log = time.perf_counter()
    tokens_since_log = 0
    model.train()
    try:
        if step == 0 and cfg.eval_every:
            evaluate()  # the starting point of the validation curve
            t_log = time.perf_counter()
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [batches.next() for _ in range(cfg.grad_accum)]
            weights = [float(b["n_targets"]) if "n_targets" in b else 1.0 for b in micro]
            total_w = sum(weights)
            if world > 1:  # the global mean over all ranks' targets; DDP then averages, hence the * world below
                t = torch.tensor(total_w, device=device)
                dist.all_reduce(t)
                total_w = t.item() / world
            step_loss = 0.0
            for i, batch in enumerate(micro):
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                sync = wrapped.no_sync() if world > 1 and i < len(micro) - 1 else nullcontext()  # type: ignore[operator]
                with sync, autocast(device, cfg.dtype):
                    loss, metrics = loss_fn(wrapped, batch)
                scaled = loss * (weights[i] / total_w)
                scaled.backward()
                step_loss += scaled.item()
                tokens_since_log += int(metrics.get("tokens", batch["input_ids"].numel())) * world
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item() if cfg.grad_clip > 0 else 0.0
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            experts = moe_layers(model)
            if experts:  # expert load of this step, then aux-loss-free bias balancing (model/moe.py)
                moe_stats = load_stats(model)
                moe_stats["moe_aux_loss"] = sum(m.aux_loss.item() for m in experts if m.aux_loss is not None)
                for m in experts:
                    m.after_step()
                result.moe_load.append(moe_stats.get("moe_load_max_min", float("nan")))
            step += 1
            result.step = step
            result.losses.append(step_loss)
            result.grad_norms.append(grad_norm)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                tok_s = tokens_since_log / (now - t_log)
                mfu = tok_s * flops_per_token / peak / world if peak else 0.0
                extra = {"aux": f"{moe_stats['moe_aux_loss']:.3f}",
                         "load": f"{moe_stats.get('moe_load_max_min', 0):.2f}"} if experts else {}  # fmt: skip
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}",
                                tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}", **extra)  # fmt: skip
                if writer:
                    for k, v in {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
                                 "mfu": mfu}.items():  # fmt: skip
                        writer.add_scalar(f"train/{k}", v, step)
                    for k, v in (moe_stats if experts else {}).items():
                        writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
                t_log, tokens_since_log = now, 0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                evaluate()
                t_log, tokens_since_log = time.perf_counter(), 0  # keep evaluation time out of tokens/s
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                result.checkpoint = save()
            out_of_time = bool(cfg.max_minutes) and (time.perf_counter() - t_start) / 60 >= cfg.max_minutes
            stop = _stop_requested or out_of_time
            if world > 1:  # every rank must leave at the same step, or the others hang in the next all-reduce
                flag = torch.tensor(int(stop), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                result.interrupted = not out_of_time
                if master:
                    why = f"--max-minutes {cfg.max_minutes} reached" if out_of_time else "stop requested"
                    bar.write(f"{why}: saving a checkpoint at step {step}")
                break
        evaluate()
        result.checkpoint = save()
    finally:
        bar.close()
        _restore_signal_handlers(old_handlers)
        if writer:
            writer.close()
    return result


def _tensorboard(cfg: TrainConfig):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed (pip install 'nanomind[logging]'); not writing TensorBoard logs")
        return None
    return SummaryWriter(str(Path(cfg.out) / "tb"))


def _install_signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # signals can only be handled in the main thread; leave them alone
    return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(old: dict[int, Any]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)
