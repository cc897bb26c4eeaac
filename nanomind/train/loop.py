"""The one training loop. A stage supplies batches, a loss function and an evaluation; the loop owns the rest:
gradient accumulation, mixed precision, clipping, the LR schedule, logging, checkpoints and resuming.

Runs as is under `torchrun` too (backend nccl on CUDA, gloo on CPU). Each rank reads its own rows of every global
batch (the batch source takes rank/world_size and keeps a cursor in the global stream, so a run resumes on any
number of processes). Gradients are averaged by DDP, or with `--fsdp` parameters, gradients and optimizer state
are sharded by FSDP2 (`fully_shard`, one unit per block and one for the root); either way the micro-steps of a
gradient accumulation skip the all-reduce until the last one. Only rank 0 logs, evaluates (every rank under
FSDP, which needs all of them for a forward) and writes checkpoints, which are always consolidated: full weights
and the full optimizer state keyed by parameter name, so they load the same with or without FSDP at any size.
"""

from __future__ import annotations

import atexit
import ctypes
import inspect
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
    fsdp: bool = arg(False, "under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP")

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
        if self.fsdp and self.lora_rank:
            raise ValueError("--fsdp with --lora-rank: LoRA trains few parameters, so sharding buys little; "
                             "drop --fsdp (DDP is the default under torchrun)")  # fmt: skip


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # train loss of every step run in this call
    grad_norms: list[float] = field(default_factory=list)  # global gradient norm before clipping, per step
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", "val_loss", "val_bpb", ...}
    moe_load: list[float] = field(default_factory=list)  # MoE models: worst expert max/min load ratio per step
    metrics: list[dict[str, float]] = field(default_factory=list)  # the stage's own metrics per step (see train)
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
    """(rank, world_size); initialises the process group when launched by torchrun (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT and LOCAL_RANK in the environment): nccl for CUDA tensors, gloo for CPU ones."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process
        dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def rank0_first(fn: Callable[[], Any]) -> Any:
    """fn() run by rank 0 alone (work that writes files, such as preparing data), its result sent to every rank."""
    rank, world = dist_env()
    box = [fn() if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(box, src=0)  # the other ranks wait here until rank 0 is done
    return box[0]


def distribute(model: Transformer, cfg: TrainConfig, world: int, device: torch.device) -> torch.nn.Module:
    """The module to call for training: `model` itself (one process, or FSDP2, which shards it in place: each
    block is one unit, gathered for its forward and backward, and the root holds the embeddings, final norm
    and tied lm_head), or a DDP wrapper around it. FSDP2 does not broadcast weights: every rank must build the
    same initial weights (the stages seed before building the model, or load a checkpoint)."""
    if world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise ValueError(f"--fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is {torch.__version__}") from None
        mesh = init_device_mesh(device.type, (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    # no buffer broadcast before every forward: the RoPE tables are the same everywhere (and large), and MoE
    # keeps its load counts per rank and its biases in step itself (model/moe.py). Newer torch renamed the flag.
    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    )
    # MTP modules get no gradient in the stages that do not train them (DPO, distillation, RL): let DDP skip them
    unused = bool(model.config.num_nextn_predict_layers)
    return ddp(model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=unused,
               **{no_sync: False})  # fmt: skip


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded model on rank 0, on the CPU (empty elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _rekey(state: dict[str, Any], key: list[str] | dict[str, int]) -> dict[str, Any]:
    """A torch.optim state dict with its parameter references (numbers or names) mapped through `key`."""
    groups = [{**g, "params": [key[k] for k in g["params"]]} for g in state["param_groups"]]
    return {"state": {key[k]: v for k, v in state["state"].items()}, "param_groups": groups}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name, so that it loads with or without FSDP at any world size.
    Sharded, every rank must call this (the state is gathered; rank 0 receives it, on the CPU)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return _rekey(optimizer.state_dict(), _param_names(model, optimizer))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         sharded: bool) -> None:  # fmt: skip
    """Load a state from optimizer_state() (sharded: each rank keeps its slice), or from a checkpoint written
    before the name keys, whose parameters are numbered in optimizer order as torch.optim saves them."""
    names = _param_names(model, optimizer)
    numbered = any(isinstance(k, int) for g in state["param_groups"] for k in g["params"])
    if not sharded:
        optimizer.load_state_dict(state if numbered else _rekey(state, {n: i for i, n in enumerate(names)}))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = _rekey(state, names) if numbered else state
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to max_norm; returns the norm before clipping (over all shards under FSDP)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # a DTensor under FSDP


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
    step, state = 0, None
    if cfg.resume and checkpoint.step_dirs(cfg.out):
        ckpt = checkpoint.resolve(cfg.out)
        checkpoint.load_weights(model, ckpt)  # full weights on every rank, before FSDP shards them
        state = checkpoint.load_train_state(ckpt)
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

    sharded = cfg.fsdp and world > 1
    if cfg.fsdp and world == 1 and master:
        print("--fsdp: a single process has nothing to shard; training without it")
    wrapped = distribute(model, cfg, world, device)
    optimizer = make_optimizer(model, cfg, device)  # after sharding: FSDP's optimizer holds the local shards
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"], sharded)
    if cfg.compile:
        wrapped = torch.compile(wrapped)

    writer = _tensorboard(cfg) if master else None
    flops_per_token = model.config.flops_per_token(cfg.seq_len)
    peak = measure_peak_flops(device, cfg.dtype) if master else 0.0
    result = TrainResult(step=step)
    info = {**(info or {}), "train_config": asdict(cfg)}

    saved_at = evaluated_at = -1

    def save() -> Path | None:
        nonlocal saved_at
        if saved_at == step or not (master or sharded):
            return result.checkpoint  # already written at this step, or not this rank's job
        saved_at = step
        weights = full_weights(model) if sharded else None  # consolidated: gathered from every rank to rank 0
        optim = optimizer_state(model, optimizer, sharded)
        if not master:
            return None
        state = {"step": step, "optimizer": optim, "data": batches.state_dict(), "rng": rng_state(device)}
        return checkpoint.save(cfg.out, step, model, tokenizer_dir, state, cfg.keep_last, info, weights)

    def evaluate() -> None:
        nonlocal evaluated_at
        if eval_fn is None or evaluated_at == step or not (master or sharded):
            return  # a sharded model needs every rank for a forward; the others run it and drop the result
        evaluated_at = step
        model.eval()
        with torch.no_grad(), autocast(device, cfg.dtype):
            metrics = {"step": step, **eval_fn(model)}
        model.train()
        if not master:
            return
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
            if world > 1:  # the global mean over all ranks' targets; DDP/FSDP then average, hence the / world
                t = torch.tensor(total_w, device=device, dtype=torch.float64)
                dist.all_reduce(t)
                total_w = t.item() / world
            step_loss = step_tokens = 0.0
            extra: dict[str, float] = {}  # the loss_fn's other metrics, averaged over the micro-batches
            for i, batch in enumerate(micro):
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                last = i == len(micro) - 1  # gradients are reduced across ranks in the last micro-step only
                if sharded:
                    model.set_requires_gradient_sync(last)  # type: ignore[operator]
                sync = wrapped.no_sync() if world > 1 and not sharded and not last else nullcontext()  # type: ignore[operator]
                with sync, autocast(device, cfg.dtype):
                    loss, metrics = loss_fn(wrapped, batch)
                scaled = loss * (weights[i] / total_w)
                scaled.backward()
                step_loss += scaled.item()
                step_tokens += metrics.get("tokens", batch["input_ids"].numel())
                for k, v in metrics.items():
                    if k != "tokens":
                        extra[k] = extra.get(k, 0.0) + float(v) / len(micro)
            grad_norm = clip_grad_norm(model, cfg.grad_clip) if cfg.grad_clip > 0 else 0.0
            out_of_time = bool(cfg.max_minutes) and (time.perf_counter() - t_start) / 60 >= cfg.max_minutes
            stop = _stop_requested or out_of_time
            if world > 1:  # one all-reduce: the global loss and tokens, and whether any rank must stop (all
                # ranks leave at the same step, or the others hang in the next collective)
                # ranks of one stage report the same metric names, so their means travel in the same tensor
                names = sorted(extra)
                t = torch.tensor([step_loss, step_tokens, float(stop), *(extra[k] for k in names)], device=device,
                                 dtype=torch.float64)  # fmt: skip
                dist.all_reduce(t)
                step_loss, step_tokens, stop = t[0].item() / world, t[1].item(), bool(t[2].item())
                extra = {k: t[3 + i].item() / world for i, k in enumerate(names)}
            tokens_since_log += int(step_tokens)
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
            result.metrics.append(extra)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                tok_s = tokens_since_log / (now - t_log)
                mfu = tok_s * flops_per_token / peak / world if peak else 0.0
                moe = {"aux": f"{moe_stats['moe_aux_loss']:.3f}",
                       "load": f"{moe_stats.get('moe_load_max_min', 0):.2f}"} if experts else {}  # fmt: skip
                stage = {k: f"{v:.4g}" for k, v in extra.items()}
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}",
                                tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}", **moe, **stage)  # fmt: skip
                if writer:
                    for k, v in {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
                                 "mfu": mfu, **extra}.items():  # fmt: skip
                        writer.add_scalar(f"train/{k}", v, step)
                    for k, v in (moe_stats if experts else {}).items():
                        writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
                t_log, tokens_since_log = now, 0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                evaluate()
                t_log, tokens_since_log = time.perf_counter(), 0  # keep evaluation time out of tokens/s
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                result.checkpoint = save()
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
