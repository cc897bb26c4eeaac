"""Reinforcement learning on prompts with the GRPO family: sample a group of answers per prompt, score them, and
push up the answers that beat their group's mean, with a KL term to the frozen starting model.

    nanomind grpo --init runs/sft --data prompts.jsonl --reward numeric,format_boxed:0.2 --out runs/grpo
    nanomind grpo --init runs/sft --data prompts.jsonl --reward model:runs/rm        # a trained reward model

Prompts are jsonl: {"prompt": "text"} (one user turn) or {"messages": [...]} ending with a user turn, plus an
optional "answer" that rule rewards compare with (rewards.py lists them; a spec sums them with weights).

Each optimizer step: --batch-size prompts per process, --group-size samples each, drawn by the continuous-batching
engine at --temperature with no top-k / top-p, so that the log-probs the losses compare (train/logprobs.py, at the
same temperature) are those of the distribution the tokens came from. Rewards become advantages within each group
(rl_losses.group_advantages); the loss is --loss grpo, dr_grpo or cispo. --updates-per-batch > 1 takes several
optimizer steps on one batch of samples (the GRPO paper's mu), where the importance ratio and its clipping matter;
with 1 (the default) the behaviour policy is the current one and the ratio is exactly 1.

Logged per step (progress bar and TensorBoard): reward (mean), reward_std (within groups), kl, clip_frac,
resp_len. Every --samples-every rollouts, the first prompt's group is appended to OUT/rollouts.jsonl. Held-out
prompts (--eval-data, or every Nth prompt) are answered greedily and with one sample at --temperature at every
evaluation: val_reward, val_reward_sampled.

Under torchrun each process samples its own prompts and the gradients are averaged by DDP through the wrapped
model; --fsdp is refused (generation needs whole weights on every process). A resumed run starts a fresh rollout
batch at the saved data position.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanomind import checkpoint
from nanomind.config import arg
from nanomind.conversations import ROLES, Epochs
from nanomind.device import autocast, resolve_device
from nanomind.engine import Engine, Request
from nanomind.generate import SamplingConfig
from nanomind.jsonl import BadLines, read_objects
from nanomind.model import Transformer
from nanomind.rewards import parse_reward_spec
from nanomind.tokenizer import Tokenizer, render_chat
from nanomind.train.logprobs import token_logps
from nanomind.train.loop import TrainConfig, TrainResult, dist_env, train
from nanomind.train.reward_model import scores
from nanomind.train.rl_losses import cispo_loss, dr_grpo_loss, group_advantages, grpo_loss
from nanomind.train.sft import load_init

LOSSES = ("grpo", "dr_grpo", "cispo")


@dataclass(kw_only=True)
class GRPOConfig(TrainConfig):
    init: str = arg(help="chat checkpoint to improve (usually an SFT run); also the frozen KL reference")
    data: list[str] = arg(help='prompt jsonl files: {"prompt": text} or {"messages": [...]}, optional "answer"')
    reward: str = arg("numeric", "reward spec: rule names with weights (rewards.py), and/or model:CKPT")
    out: str = arg("runs/grpo", "run directory: checkpoints, TensorBoard logs, rollouts.jsonl")
    eval_data: list[str] = arg([], "held-out prompt files (default: every Nth prompt of --data, --val-fraction)")
    val_fraction: float = arg(0.05, "prompts held out when --eval-data is not given")
    eval_prompts: int = arg(64, "held-out prompts answered at each evaluation")
    batch_size: int = arg(8, "prompts per micro-batch (per process); each is sampled --group-size times")
    group_size: int = arg(8, "samples per prompt (G): advantages compare each with its group")
    max_new_tokens: int = arg(64, "answer length limit")
    temperature: float = arg(1.0, "sampling temperature of the rollouts (> 0); the losses use the same")
    loss: str = arg("grpo", "policy loss", choices=list(LOSSES))
    clip_eps: float = arg(0.2, "PPO clip range of the ratio (CISPO: the upper bound of its weight)")
    kl_beta: float = arg(0.04, "weight of the KL(policy || reference) term")
    updates_per_batch: int = arg(1, "optimizer steps on each batch of samples (mu); > 1 makes clipping matter")
    enable_thinking: bool = arg(True, "render prompts with the thinking switch on (off: an empty think block)")
    samples_every: int = arg(10, "append the first group of every Nth rollout to OUT/rollouts.jsonl (0 = never)")
    seq_len: int = arg(512, "prompt + answer tokens at most; longer prompts are skipped")
    lr: float = arg(1e-5, "peak learning rate")
    warmup_steps: int = arg(0, "linear warm-up steps")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    eval_every: int = arg(20, "evaluate every N steps (0 = only at the end)")
    save_every: int = arg(100, "write a checkpoint every N steps (0 = only at the end)")
    log_every: int = arg(1, "update the progress bar / TensorBoard every N steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 for RL sampling, got {self.temperature}")
        if self.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 (advantages compare samples of one prompt), got "
                             f"{self.group_size}")  # fmt: skip
        if self.updates_per_batch < 1 or self.max_new_tokens < 1 or self.eval_prompts < 0:
            raise ValueError("--updates-per-batch and --max-new-tokens must be >= 1, --eval-prompts >= 0")
        if self.max_new_tokens >= self.seq_len:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens} leaves no room for a prompt in --seq-len "
                             f"{self.seq_len}")  # fmt: skip
        if not 0 <= self.val_fraction < 0.5:
            raise ValueError(f"--val-fraction must be in [0, 0.5), got {self.val_fraction}")
        if self.fsdp:
            raise ValueError("--fsdp: rollouts need the whole weights on every process; use DDP (the default)")


@dataclass
class Prompt:
    messages: list[dict]
    ids: list[int]
    answer: str | None


def parse_prompt(record: dict) -> tuple[list[dict] | None, str]:
    """(messages ending with a user turn, "") or (None, reason)."""
    if isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        messages = record.get("messages", record.get("conversations"))
        if not isinstance(messages, list) or not messages:
            return None, "needs a 'prompt' string or a non-empty 'messages' list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return None, f"message {i} needs a role in {sorted(ROLES)} and a string content"
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        return None, "the last message must be a non-empty user turn"
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        return None, "'answer' must be a string or a number"
    return messages, ""


def load_prompts(files: list[str], tok: Tokenizer, max_tokens: int, enable_thinking: bool) -> list[Prompt]:
    """Prompts of at most max_tokens tokens; malformed records are skipped and reported with file and line."""
    prompts, bad, long = [], BadLines(), 0
    for path in files:
        for line_no, record in read_objects(path, bad):
            messages, reason = parse_prompt(record)
            if messages is None:
                bad.add(path, line_no, reason)
                continue
            text, _ = render_chat(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
            ids = tok.encode_prompt(text)
            if len(ids) > max_tokens:
                long += 1
                continue
            answer = record.get("answer")
            prompts.append(Prompt(messages, ids, None if answer is None else str(answer)))
    if bad.total:
        print(bad.summary())
    if long:
        print(f"skipped {long} prompt(s) longer than {max_tokens} tokens (--seq-len minus --max-new-tokens)")
    if not prompts:
        raise ValueError(f"{', '.join(files)}: no usable prompt")
    return prompts


RewardFn = Callable[[list[Prompt], list[str]], list[float]]


def make_reward(spec: str, device: torch.device) -> RewardFn:
    """The reward of each (prompt, completion text): the rule rewards of the spec (rewards.py, given the prompt's
    answer) plus, for each `model:CKPT[:weight]` item, a reward model's score of the whole conversation."""
    rules, models = [], []
    for item in (s.strip() for s in spec.split(",")):
        if not item.startswith("model:"):
            rules.append(item)
            continue
        path, _, weight = item[len("model:") :].rpartition(":")
        try:
            path, w = (path, float(weight)) if path else (item[len("model:") :], 1.0)
        except ValueError:
            path, w = item[len("model:") :], 1.0
        model = checkpoint.load_model(path, device).eval()
        if not hasattr(model, "score"):
            raise ValueError(f"--reward {item}: {path} is not a reward model (train one with nanomind reward train)")
        models.append((model, Tokenizer.load(checkpoint.tokenizer_dir(path)), w))
    rule = parse_reward_spec(",".join(rules)) if rules else None

    @torch.no_grad()
    def reward(prompts: list[Prompt], completions: list[str]) -> list[float]:
        total = [rule(c, p.answer) if rule else 0.0 for p, c in zip(prompts, completions, strict=True)]
        for model, tok, w in models:
            limit = model.config.max_position_embeddings
            rows = [tok.encode(render_chat([*p.messages, {"role": "assistant", "content": c}])[0])[:limit]
                    for p, c in zip(prompts, completions, strict=True)]  # fmt: skip
            for i in range(0, len(rows), 16):
                chunk = rows[i : i + 16]
                ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
                for r, row in enumerate(chunk):
                    ids[r, : len(row)] = torch.tensor(row)
                last = torch.tensor([len(r) - 1 for r in chunk])
                for j, s in enumerate(scores(model, ids.to(device), last.to(device)).tolist()):
                    total[i + j] += w * s
        return total

    return reward


@torch.no_grad()
def sample_groups(
    model: Transformer, prompts: list[list[int]], group_size: int, max_new_tokens: int, temperature: float,
    stop_id: int, seeds: list[int],
) -> list[list[int]]:  # fmt: skip
    """group_size completions per prompt (prompt-major: completions of prompt i are rows i*G .. i*G+G-1), drawn by
    the continuous-batching engine at `temperature` over the whole vocabulary; sample g of prompt i is seeded by
    seeds[i] * group_size + g alone, so it does not depend on what else shares the batch. A completion that
    stopped ends with stop_id; one cut by max_new_tokens does not. Temperature 0 gives greedy answers."""
    was_training = model.training
    device = next(model.parameters()).device
    n = len(prompts) * group_size
    engine = Engine(model, max_batch=min(n, 64), max_len=max(map(len, prompts)) + max_new_tokens)
    out: list[list[int]] = [[] for _ in range(n)]
    finished = [0]

    def collect(row: int):
        def on_token(token: int | None, finish: str | None) -> None:
            if token is not None:
                out[row].append(token)
            elif finish is not None:
                if finish == "stop":
                    out[row].append(stop_id)
                finished[0] += 1

        return on_token

    for i, prompt in enumerate(prompts):
        for g in range(group_size):
            row = i * group_size + g
            s = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                               repetition_penalty=1.0, seed=seeds[i] * group_size + g)  # fmt: skip
            engine.submit(Request(prompt, s, collect(row), stop_ids=(stop_id,)))
    with torch.autocast(device.type, enabled=False):  # the engine's cache holds the weights' dtype
        engine.run(until=lambda: finished[0] == n)
    model.train(was_training)
    return out


def answer_texts(tok: Tokenizer, completions: list[list[int]]) -> list[str]:
    """The text of each completion, without the closing <|im_end|> of one that stopped."""
    return [tok.decode(c[:-1] if c and c[-1] == tok.im_end_id else c) for c in completions]


def make_rows(prompts: list[list[int]], completions: list[list[int]], group_size: int) -> dict[str, torch.Tensor]:
    """Right-padded rows prompt + completion (widths rounded up to 16), labels -100 except on completion tokens
    (labels[t] is the token at t + 1)."""
    rows = [(prompts[i // group_size], c) for i, c in enumerate(completions)]
    width = -(-max(len(p) + len(c) for p, c in rows) // 16) * 16
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (p, c) in enumerate(rows):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        labels[r, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(c)
    return {"input_ids": ids, "labels": labels}


class Rollouts:
    """The GRPO BatchSource: each optimizer step's grad_accum micro-batches are sampled from the current policy
    at once, scored, and handed out updates_per_batch times over. A micro-batch holds the rows, advantages [B],
    the reference's (and with updates_per_batch > 1 the sampling policy's) per-token log-probs [B, T], and the
    reward statistics the loss reports."""

    def __init__(self, cfg: GRPOConfig, policy: Transformer, ref: Transformer, prompts: list[Prompt],
                 reward: RewardFn, tok: Tokenizer, rank: int = 0, world: int = 1):  # fmt: skip
        self.cfg, self.policy, self.ref, self.prompts, self.reward, self.tok = cfg, policy, ref, prompts, reward, tok
        self.rank = rank
        self.epochs = Epochs(np.ones(len(prompts)), cfg.batch_size, cfg.seed, False, "prompts", rank, world,
                             cfg.grad_accum)  # fmt: skip
        self.rolled = 0  # micro-batches sampled so far on this process (seeds the sampling)
        self.pending: list[dict[str, torch.Tensor]] = []
        self.device = next(policy.parameters()).device
        self.samples = Path(cfg.out) / "rollouts.jsonl"

    def next(self) -> dict[str, torch.Tensor]:
        if not self.pending:
            fresh = [self.roll() for _ in range(self.cfg.grad_accum)]
            self.pending = fresh * self.cfg.updates_per_batch
        return self.pending.pop(0)

    def roll(self) -> dict[str, torch.Tensor]:
        cfg, G = self.cfg, self.cfg.group_size
        items = self.epochs.take()
        chosen = [self.prompts[i] for i in items]
        # seeded by prompt and round, so a run samples the same answers whatever the number of processes
        seeds = [(cfg.seed * 7919 + self.rolled) * len(self.prompts) + i for i in items]
        completions = sample_groups(self.policy, [p.ids for p in chosen], G, cfg.max_new_tokens, cfg.temperature,
                                    self.tok.im_end_id, seeds)  # fmt: skip
        texts = answer_texts(self.tok, completions)
        rewards = torch.tensor(self.reward([chosen[i // G] for i in range(len(texts))], texts)).view(-1, G)
        batch = make_rows([p.ids for p in chosen], completions, G)
        batch["advantages"] = group_advantages(rewards, normalise_std=cfg.loss != "dr_grpo").flatten()
        with torch.no_grad(), autocast(self.device, cfg.dtype):
            ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
            batch["ref_logps"] = token_logps(self.ref, ids, labels, cfg.temperature)[0].float().cpu()
            if cfg.updates_per_batch > 1:  # the sampling policy's log-probs, before the first update moves it
                batch["old_logps"] = token_logps(self.policy, ids, labels, cfg.temperature)[0].float().cpu()
        batch["reward_mean"] = rewards.mean()
        batch["reward_std"] = rewards.std(dim=1).mean()
        batch["resp_len"] = torch.tensor(float(np.mean([len(c) for c in completions])))
        batch["tokens"] = torch.tensor(sum(len(p.ids) * G for p in chosen) + sum(map(len, completions)))
        if self.rank == 0 and cfg.samples_every and self.rolled % cfg.samples_every == 0:
            self.samples.parent.mkdir(parents=True, exist_ok=True)
            group = [{"text": texts[g], "reward": rewards[0, g].item()} for g in range(G)]
            record = {"rollout": self.rolled, "messages": chosen[0].messages, "answer": chosen[0].answer,
                      "completions": group}  # fmt: skip
            with open(self.samples, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.rolled += 1
        return batch

    def state_dict(self) -> dict:
        return {**self.epochs.state_dict(), "rolled": self.rolled}

    def load_state_dict(self, state: dict) -> None:
        self.epochs.load_state_dict(state)
        self.rolled, self.pending = state["rolled"], []


def make_loss_fn(cfg: GRPOConfig):
    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        logp, aux = token_logps(model, batch["input_ids"], labels, cfg.temperature)
        old = batch["old_logps"] if "old_logps" in batch else logp.detach()
        mask, ref, adv = labels != -100, batch["ref_logps"], batch["advantages"]
        if cfg.loss == "grpo":
            loss, m = grpo_loss(logp, old, ref, adv, mask, cfg.clip_eps, cfg.kl_beta)
        elif cfg.loss == "dr_grpo":
            loss, m = dr_grpo_loss(logp, old, ref, adv, mask, cfg.max_new_tokens, cfg.clip_eps, cfg.kl_beta)
        else:
            loss, m = cispo_loss(logp, old, ref, adv, mask, cfg.clip_eps, cfg.kl_beta)
        if aux is not None:  # MoE load balancing
            loss = loss + aux
        return loss, {"tokens": int(batch["tokens"]), "reward": batch["reward_mean"].item(),
                      "reward_std": batch["reward_std"].item(), "kl": m["kl"].item(),
                      "clip_frac": m["clip_fraction"].item(), "resp_len": batch["resp_len"].item()}  # fmt: skip

    return loss_fn


def evaluate_prompts(model: Transformer, prompts: list[Prompt], reward: RewardFn, tok: Tokenizer,
                     max_new_tokens: int, temperature: float, seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """(mean reward, mean answer tokens) of one answer per prompt: greedy at temperature 0, else one sample."""
    seeds = [seed * len(prompts) + i for i in range(len(prompts))]
    completions = sample_groups(model, [p.ids for p in prompts], 1, max_new_tokens, temperature, tok.im_end_id, seeds)
    texts = answer_texts(tok, completions)
    return float(np.mean(reward(prompts, texts))), float(np.mean([len(c) for c in completions]))


def make_eval_fn(cfg: GRPOConfig, prompts: list[Prompt], reward: RewardFn, tok: Tokenizer):
    if not prompts:
        return None

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        greedy, length = evaluate_prompts(model, prompts, reward, tok, cfg.max_new_tokens, 0.0)
        sampled, _ = evaluate_prompts(model, prompts, reward, tok, cfg.max_new_tokens, cfg.temperature, cfg.seed)
        return {"val_reward": greedy, "val_reward_sampled": sampled, "val_resp_len": length}

    return evaluate


def run(cfg: GRPOConfig) -> TrainResult:
    rank, world = dist_env()
    device = resolve_device(cfg.device)
    tok_dir = checkpoint.tokenizer_dir(cfg.init)
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(cfg.seed)
    model = load_init(cfg.init, cfg.seq_len, device)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    reward = make_reward(cfg.reward, device)
    max_prompt = cfg.seq_len - cfg.max_new_tokens
    prompts = load_prompts(cfg.data, tok, max_prompt, cfg.enable_thinking)
    if cfg.eval_data:
        held = load_prompts(cfg.eval_data, tok, max_prompt, cfg.enable_thinking)
    else:
        every = max(2, round(1 / cfg.val_fraction)) if cfg.val_fraction > 0 else 0
        held = [p for i, p in enumerate(prompts) if every and i % every == every - 1]
        prompts = [p for i, p in enumerate(prompts) if not (every and i % every == every - 1)]
    held = held[: cfg.eval_prompts]
    if rank == 0:
        print(f"{len(prompts)} training prompts, {len(held)} held-out; reward: {cfg.reward}; loss {cfg.loss}, "
              f"{cfg.batch_size} prompts x {cfg.group_size} samples per micro-batch and process")  # fmt: skip
        print(f"model: {cfg.init}, {model.num_params() / 1e6:.2f}M parameters, device {device}, {cfg.dtype}")
    batches = Rollouts(cfg, model, ref, prompts, reward, tok, rank, world)
    info = {"stage": "grpo", "init": str(cfg.init), "data": cfg.data, "reward": cfg.reward, "loss": cfg.loss}
    return train(model, cfg, batches, make_loss_fn(cfg), make_eval_fn(cfg, held, reward, tok), tok_dir, info)


def main(argv: list[str] | None = None) -> None:
    from nanomind.config import parse

    cfg = parse(GRPOConfig, argv, "nanomind grpo", __doc__.splitlines()[0])
    result = run(cfg)
    if dist_env()[0] != 0:
        return
    print(f"finished at step {result.step}; checkpoint: {result.checkpoint}")
    if result.evals:
        first, last = result.evals[0], result.evals[-1]
        print(f"held-out mean reward (greedy): {first['val_reward']:.3f} at step {first['step']} -> "
              f"{last['val_reward']:.3f} at step {last['step']}; sampled at T={cfg.temperature}: "
              f"{first['val_reward_sampled']:.3f} -> {last['val_reward_sampled']:.3f}")  # fmt: skip
