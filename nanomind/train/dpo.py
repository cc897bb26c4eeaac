"""Direct preference optimisation (DPO, arXiv 2305.18290) on preference pairs, through the one training loop.

    nanomind dpo --init runs/sft --data pairs.jsonl --out runs/dpo --steps 200 --beta 0.1

A record is {"chosen": [msgs], "rejected": [msgs]}: two whole conversations that share every turn but the final
assistant one. The shared turns are rendered once with the chat template and its generation prompt, and each
final answer (with its <|im_end|>) is tokenised after them, so chosen and rejected see the same prompt tokens and
the loss falls on the final answer only. The reference is the --init model itself: before training, the log-
probabilities of every pair's answers are computed once with it, so no second copy is kept and no step pays
for a reference forward. Held-out pairs give the reward accuracy (share of pairs whose chosen reward is higher)
and the mean reward margin (chosen minus rejected).

Deviations from TRL's DPOTrainer: answers that do not fit --seq-len after their prompt are cut at the end
(counted), and pairs whose prompt alone takes more than half of --seq-len are dropped (counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from nanomind import checkpoint
from nanomind.config import arg
from nanomind.conversations import Epochs, _check
from nanomind.device import autocast, resolve_device
from nanomind.jsonl import BadLines, read_objects
from nanomind.tokenizer import Tokenizer, render_chat
from nanomind.train.logprobs import token_logps
from nanomind.train.loop import TrainConfig, TrainResult, dist_env, train
from nanomind.train.losses import dpo_loss
from nanomind.train.sft import load_init


@dataclass(kw_only=True)
class DPOConfig(TrainConfig):
    init: str = arg(help="checkpoint to align (usually an SFT run); also the frozen reference")
    data: list[str] = arg(help='preference jsonl files: {"chosen": [messages], "rejected": [messages]}')
    out: str = arg("runs/dpo", "run directory: checkpoints (step_*/) and TensorBoard logs (tb/)")
    beta: float = arg(0.1, "DPO temperature: how far the policy may move from the reference")
    batch_size: int = arg(8, "pairs per micro-batch (each pair is two rows)")
    seq_len: int = arg(512, "tokens per row: prompt + answer")
    lr: float = arg(1e-5, "peak learning rate")
    warmup_steps: int = arg(10, "linear warm-up steps")
    eval_every: int = arg(50, "evaluate every N steps (0 = only at the end)")
    val_fraction: float = arg(0.05, "pairs held out for reward accuracy and margin (every Nth one)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0 <= self.val_fraction < 0.5:
            raise ValueError(f"--val-fraction must be in [0, 0.5), got {self.val_fraction}")


@dataclass
class Pairs:
    """Encoded pairs: the shared prompt ids and the two answers' ids; `ref` [n, 2] the reference log-probs."""

    prompts: list[np.ndarray] = field(default_factory=list)
    chosen: list[np.ndarray] = field(default_factory=list)
    rejected: list[np.ndarray] = field(default_factory=list)
    ref: np.ndarray | None = None
    truncated: int = 0
    dropped: int = 0
    bad: BadLines = field(default_factory=BadLines)

    def __len__(self) -> int:
        return len(self.prompts)

    def length(self, i: int) -> int:
        """Tokens of the longer row of pair i."""
        return len(self.prompts[i]) + max(len(self.chosen[i]), len(self.rejected[i]))

    def subset(self, index: list[int]) -> Pairs:
        ref = None if self.ref is None else self.ref[index]
        return Pairs([self.prompts[i] for i in index], [self.chosen[i] for i in index],
                     [self.rejected[i] for i in index], ref)  # fmt: skip

    def summary(self) -> str:
        lines = [f"{len(self)} pairs, {self.truncated} with an answer cut to fit, {self.dropped} dropped as too long"]
        return "\n".join(lines + ([self.bad.summary()] if self.bad.total else []))


def encode_pair(tok: Tokenizer, record: dict) -> tuple[list[int], list[int], list[int]] | str:
    """(prompt ids, chosen answer ids, rejected answer ids), or the reason the record is unusable."""
    sides = []
    for key in ("chosen", "rejected"):
        messages, reason = _check({"conversations": record.get(key)}, {})
        if messages is None:
            return f"{key}: {reason}"
        if messages[-1]["role"] != "assistant":
            return f"{key}: the last turn must be the assistant's answer"
        sides.append(messages)
    if sides[0][:-1] != sides[1][:-1]:
        return "chosen and rejected differ before their final turn"
    prompt_text, _ = render_chat(sides[0][:-1], add_generation_prompt=True)
    answers = []
    for messages in sides:
        text, spans = render_chat(messages)
        start, end = spans[-1]
        assert text[:start] == prompt_text, "the prompt must render the same on both sides"
        answers.append(tok.encode(text[start:end]))
    return tok.encode(prompt_text), answers[0], answers[1]


def load_pairs(files: list[str], tok: Tokenizer, seq_len: int) -> Pairs:
    data = Pairs()
    for path in files:
        before = len(data) + data.dropped
        for line_no, record in read_objects(path, data.bad):
            encoded = encode_pair(tok, record)
            if isinstance(encoded, str):
                data.bad.add(path, line_no, encoded)
                continue
            prompt, chosen, rejected = encoded
            if len(prompt) > seq_len // 2:
                data.dropped += 1
                continue
            room = seq_len - len(prompt)
            data.truncated += len(chosen) > room or len(rejected) > room
            data.prompts.append(np.asarray(prompt, dtype=np.int64))
            data.chosen.append(np.asarray(chosen[:room], dtype=np.int64))
            data.rejected.append(np.asarray(rejected[:room], dtype=np.int64))
        if len(data) + data.dropped == before:
            raise ValueError(f"{path}: no usable preference pair\n{data.bad.summary()}")
    return data


def split(data: Pairs, val_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of training and held-out pairs: every Nth pair is held out (deterministic)."""
    every = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
    val = [i for i in range(len(data)) if every and i % every == every - 1]
    held = set(val)
    return [i for i in range(len(data)) if i not in held], val


def held_out(data: Pairs, val_fraction: float, batch_size: int, eval_batches: int) -> tuple[list[int], list[list[int]]]:
    """(training pair indices, the held-out pairs evaluated: at most eval_batches batches of similar length)."""
    train_index, val_index = split(data, val_fraction)
    return train_index, length_batches(data, val_index, batch_size)[:eval_batches]


def make_batch(data: Pairs, pairs: list[int], seq_len: int) -> dict[str, torch.Tensor]:
    """2B rows (the B chosen rows, then the B rejected rows), right-padded to the longest rounded up to 16.
    labels are -100 except where the next token belongs to the answer; ref_logps [2B] in the same order."""
    rows = [(data.prompts[i], data.chosen[i]) for i in pairs] + [(data.prompts[i], data.rejected[i]) for i in pairs]
    width = min(seq_len, -(-max(len(p) + len(a) for p, a in rows) // 16) * 16)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[r, :n] = torch.from_numpy(np.concatenate([prompt, answer]))
        labels[r, len(prompt) - 1 : n - 1] = torch.from_numpy(answer)
    batch = {"input_ids": ids, "labels": labels, "tokens": torch.tensor(sum(len(p) + len(a) for p, a in rows))}
    if data.ref is not None:
        batch["ref_logps"] = torch.from_numpy(np.concatenate([data.ref[pairs, 0], data.ref[pairs, 1]])).float()
    return batch


def length_batches(data: Pairs, index: list[int], batch_size: int) -> list[list[int]]:
    """`index` cut into batches of pairs of similar length (for passes where order does not matter)."""
    order = sorted(index, key=lambda i: (-data.length(i), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class PairBatches:
    """Endless DPO batches (the loop's BatchSource): the pairs in the order of conversations.Epochs, pairs of
    similar length grouped so that a batch pads little."""

    def __init__(self, data: Pairs, index: list[int], batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):  # fmt: skip
        if not index:
            raise ValueError("no preference pairs to train on")
        self.data, self.index, self.batch_size, self.seq_len, self.seed = data, index, batch_size, seq_len, seed
        lengths = np.array([data.length(i) for i in index])
        self.epochs = Epochs(lengths, batch_size, seed, True, "pairs", rank, world_size, grad_accum)

    def next(self) -> dict[str, torch.Tensor]:
        return make_batch(self.data, [self.index[i] for i in self.epochs.take()], self.seq_len)

    def state_dict(self) -> dict:
        return self.epochs.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.epochs.load_state_dict(state)


def sequence_logps(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([R] each row's summed log-probability of its labelled tokens, the MoE balance loss or None); ids, labels
    [R, T]."""
    logps, aux = token_logps(model, ids, labels)
    return logps.sum(1), aux


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, data: Pairs, batches: list[list[int]], seq_len: int, dtype: str
) -> np.ndarray:
    """[n, 2] the reference's log-probs of each pair's chosen and rejected answer: one forward per pair, ever."""
    device = next(model.parameters()).device
    ref = np.zeros((len(data), 2))
    was_training = model.training
    model.eval()
    with autocast(device, dtype):
        for pairs in batches:
            b = make_batch(data, pairs, seq_len)
            logps, _ = sequence_logps(model, b["input_ids"].to(device), b["labels"].to(device))
            logps = logps.cpu().double().numpy()
            ref[pairs, 0], ref[pairs, 1] = logps[: len(pairs)], logps[len(pairs) :]
    model.train(was_training)
    return ref


def make_loss_fn(beta: float):
    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        (logps, aux), ref = sequence_logps(model, batch["input_ids"], batch["labels"]), batch["ref_logps"]
        half = len(logps) // 2
        loss, _, _ = dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], beta)
        if aux is not None:  # MoE load balancing
            loss = loss + aux
        return loss, {"tokens": int(batch["tokens"])}

    return loss_fn


def make_eval_fn(data: Pairs, batches: list[list[int]], seq_len: int, beta: float):
    """DPO loss, reward accuracy and mean reward margin on held-out pairs (fixed batches, the reference's own)."""
    if not batches:
        return None
    fixed = [make_batch(data, pairs, seq_len) for pairs in batches]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        losses, correct, margins, n = 0.0, 0.0, 0.0, 0
        for b in fixed:
            logps = sequence_logps(model, b["input_ids"].to(device), b["labels"].to(device))[0]
            ref, half = b["ref_logps"].to(device), len(logps) // 2
            loss, chosen, rejected = dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], beta)
            losses += loss.item() * half
            correct += (chosen > rejected).sum().item()
            margins += (chosen - rejected).sum().item()
            n += half
        return {"val_loss": losses / n, "reward_acc": correct / n, "reward_margin": margins / n}

    return evaluate


def run(cfg: DPOConfig) -> TrainResult:
    rank, world = dist_env()
    device = resolve_device(cfg.device)
    tok_dir = checkpoint.tokenizer_dir(cfg.init)
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(cfg.seed)
    model = load_init(cfg.init, cfg.seq_len, device)
    data = load_pairs(cfg.data, tok, cfg.seq_len)
    train_index, val_batches = held_out(data, cfg.val_fraction, cfg.batch_size, cfg.eval_batches)
    # one reference pass over the training pairs and the evaluated held-out pairs (in the evaluation's batches)
    ref_batches = length_batches(data, train_index, cfg.batch_size) + val_batches
    data.ref = reference_logps(model, data, ref_batches, cfg.seq_len, cfg.dtype)
    if rank == 0:
        print(data.summary())
        print(f"{len(train_index)} train / {sum(map(len, val_batches))} evaluated held-out pairs; "
              "reference log-probs computed once")  # fmt: skip
        print(f"model: {cfg.init}, {model.num_params() / 1e6:.2f}M parameters, device {device}, {cfg.dtype}")
    batches = PairBatches(data, train_index, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world, cfg.grad_accum)
    eval_fn = make_eval_fn(data, val_batches, cfg.seq_len, cfg.beta)
    return train(model, cfg, batches, make_loss_fn(cfg.beta), eval_fn, tokenizer_dir=tok_dir,
                 info={"stage": "dpo", "init": str(cfg.init), "data": cfg.data, "beta": cfg.beta})  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from nanomind.config import parse

    cfg = parse(DPOConfig, argv, "nanomind dpo", __doc__.splitlines()[0])
    result = run(cfg)
    if dist_env()[0] != 0:
        return  # under torchrun, rank 0 reports
    print(f"finished at step {result.step}; checkpoint: {result.checkpoint}")
    if result.evals:
        e = result.evals[-1]
        acc, margin, loss = e["reward_acc"], e["reward_margin"], e["val_loss"]
        print(f"held-out pairs: reward accuracy {acc:.1%}, reward margin {margin:.4f}, DPO loss {loss:.4f}")
