"""Multi-process training on CPU (gloo) against single-process runs of the same global batches: DDP and FSDP2,
pretraining and SFT, and resuming at another number of processes. Two processes run every job in one spawn.

The 2-process runs take 2 rows per rank, the 1-process runs 4 rows: the same global batch, and the loss is a
global token-weighted mean, so losses agree to float rounding (fp32, summation order)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_texts, write_jsonl

from nanomind import checkpoint
from nanomind.conversations import ChatBatches, load_chat
from nanomind.data import PackedBatches, PrepareConfig, TokenShards, prepare
from nanomind.model import Transformer, preset
from nanomind.rewards import REWARDS
from nanomind.tokenizer import Tokenizer
from nanomind.train import grpo, pretrain, sft

STEPS, SAVE_AT, TOL = 6, 3, 1e-5


def _pretrain(root: Path, out: str, **kw) -> pretrain.PretrainConfig:
    """2 rows per micro-batch unless kw says otherwise; evaluation takes 8 rows (in batches of batch_size)."""
    kw.setdefault("eval_batches", 8 // kw.get("batch_size", 2))
    base = dict(data=[str(root / "data")], preset="debug", out=str(root / out), steps=STEPS, batch_size=2,
                seq_len=32, dtype="fp32", eval_every=SAVE_AT, save_every=SAVE_AT, keep_last=0,
                warmup_steps=2, lr=3e-3, tensorboard=False, log_every=1)  # fmt: skip
    return pretrain.PretrainConfig(**{**base, **kw})


def _sft(root: Path, out: str, **kw) -> sft.SFTConfig:
    kw.setdefault("eval_batches", 8 // kw.get("batch_size", 2))
    base = dict(init=str(root / "base"), data=[str(root / "chat.jsonl")], out=str(root / out), steps=4,
                batch_size=2, seq_len=64, lr=3e-3, dtype="fp32", eval_every=2, save_every=0,
                warmup_steps=1, tensorboard=False, val_fraction=0.1, log_every=1)  # fmt: skip
    return sft.SFTConfig(**{**base, **kw})


def _grpo(root: Path, out: str, **kw) -> grpo.GRPOConfig:
    """2 prompts x 4 samples per process (4 prompts in one process); updates_per_batch 2 so the ratio moves."""
    base = dict(init=str(root / "base"), data=[str(root / "prompts.jsonl")], reward="length_chars",
                out=str(root / out), steps=4, batch_size=2, group_size=4, max_new_tokens=8, seq_len=64, lr=3e-3,
                updates_per_batch=2, dtype="fp32", eval_every=0, eval_prompts=0, tensorboard=False,
                samples_every=0, log_every=1)  # fmt: skip
    return grpo.GRPOConfig(**{**base, **kw})


def _length_chars(completion: str, answer: str | None) -> float:
    return len(completion) / 40


REWARDS["length_chars"] = _length_chars  # spawned processes import this module, so they see it too


def _run(cfg: pretrain.PretrainConfig | sft.SFTConfig | grpo.GRPOConfig) -> dict:
    stage = pretrain if isinstance(cfg, pretrain.PretrainConfig) else grpo if isinstance(cfg, grpo.GRPOConfig) else sft
    result = stage.run(cfg)
    return {"losses": result.losses, "evals": result.evals, "metrics": result.metrics}


def _worker(rank: int, world: int, port: int, jobs: dict, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    results = {name: _run(cfg) for name, cfg in jobs.items()}
    if rank == 0:
        Path(result_file).write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resume_from(root: Path, run: str, out: str) -> str:
    """A fresh run directory holding only `run`'s step-SAVE_AT checkpoint."""
    src = checkpoint.step_dirs(root / run)[0]
    assert src.name == f"step_{SAVE_AT:07d}"
    shutil.copytree(src, root / out / src.name)
    return out


@pytest.fixture(scope="module")
def runs(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("distributed")
    corpus = write_jsonl(root / "corpus.jsonl", make_texts(300, seed=2))
    prepare(PrepareConfig(data=[str(corpus)], tokenizer=str(tokenizer_dir), out=str(root / "data"), val_fraction=0.05))
    torch.manual_seed(0)
    checkpoint.save(root / "base", 0, Transformer(preset("debug", vocab_size=400)), tokenizer_dir)
    texts = make_texts(120, seed=8)
    lines = [json.dumps({"conversations": [{"role": "user", "content": t[:50]},
                                           {"role": "assistant", "content": "Sure: " + t[: 10 + len(t) % 40]}]})
             for t in texts]  # fmt: skip
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    prompts = [json.dumps({"prompt": t[:40]}) for t in make_texts(24, seed=9)]
    (root / "prompts.jsonl").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    one = {"pt": _run(_pretrain(root, "pt_1", batch_size=4)), "sft": _run(_sft(root, "sft_1", batch_size=4)),
           "grpo": _run(_grpo(root, "grpo_1", batch_size=4))}  # fmt: skip
    jobs = {
        "pt_ddp": _pretrain(root, "pt_ddp"),
        "pt_fsdp": _pretrain(root, "pt_fsdp", fsdp=True),
        "pt_fsdp_resumed_from_1": _pretrain(root, _resume_from(root, "pt_1", "pt_1_to_2"), fsdp=True, resume=True),
        "sft_ddp": _sft(root, "sft_ddp"),
        "sft_fsdp_accum": _sft(root, "sft_fsdp", fsdp=True, grad_accum=2, batch_size=1),
        "grpo_ddp": _grpo(root, "grpo_ddp"),
    }
    mp.spawn(_worker, args=(2, _free_port(), jobs, str(root / "two.json")), nprocs=2)
    two = json.loads((root / "two.json").read_text())
    for run in ("pt_ddp", "pt_fsdp"):  # a run saved at 2 processes resumes at 1 (the batch doubled)
        one[f"{run}_resumed_at_1"] = _run(_pretrain(root, _resume_from(root, run, f"{run}_to_1"), batch_size=4,
                                                    resume=True))  # fmt: skip
    return root, {**one, **two}


def _close(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (a, b)
    diff = float(np.max(np.abs(np.subtract(a, b))))
    assert diff <= TOL, (diff, a, b)
    return diff


def _val(result: dict) -> list[float]:
    return [e["val_loss"] for e in result["evals"]]


def test_two_processes_pretrain_like_one_with_the_same_global_batch(runs):
    _, r = runs
    _close(r["pt_ddp"]["losses"], r["pt"]["losses"])
    _close(_val(r["pt_ddp"]), _val(r["pt"]))
    assert r["pt"]["losses"][-1] < r["pt"]["losses"][0]  # it learns: the comparison is not between two constants


def test_two_processes_sft_like_one_with_the_same_global_batch(runs):
    """SFT rows hold different numbers of trained tokens: the loss is their global mean, not a mean of means."""
    _, r = runs
    _close(r["sft_ddp"]["losses"], r["sft"]["losses"])
    _close(_val(r["sft_ddp"]), _val(r["sft"]))


def test_two_processes_grpo_like_one_with_the_same_prompts(runs):
    """Each process samples its own prompts (seeded per prompt), the gradients meet in DDP's all-reduce: the same
    answers are drawn (equal rewards) and the losses agree. Not to 1e-5: Adam's first steps move every weight by
    about lr whatever its gradient's size, so float noise in near-zero gradients grows to ~1e-5 in the loss."""
    _, r = runs
    one, two = r["grpo"]["metrics"], r["grpo_ddp"]["metrics"]
    assert [m["reward"] for m in two] == pytest.approx([m["reward"] for m in one], abs=1e-6)
    diff = np.abs(np.subtract(r["grpo_ddp"]["losses"], r["grpo"]["losses"]))
    assert diff[0] <= TOL and diff.max() <= 1e-4, diff
    for key in ("kl", "clip_frac"):
        assert np.allclose([m[key] for m in two], [m[key] for m in one], atol=2e-3), key
    assert max(m["clip_frac"] for m in one) > 0  # the second update on a batch moved the ratio


def test_fsdp_matches_ddp_and_writes_the_same_consolidated_checkpoint(runs):
    root, r = runs
    _close(r["pt_fsdp"]["losses"], r["pt_ddp"]["losses"])
    _close(_val(r["pt_fsdp"]), _val(r["pt_ddp"]))
    # with gradient accumulation (no all-reduce before the last micro-step): 1 row x 2 micro-steps per rank
    _close(r["sft_fsdp_accum"]["losses"], r["sft_ddp"]["losses"])
    a = checkpoint.load_model(root / "pt_ddp").state_dict()
    b = checkpoint.load_model(root / "pt_fsdp").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOL, rtol=0)


def test_resume_at_another_number_of_processes_continues_the_loss_curve(runs):
    _, r = runs
    for run in ("pt_ddp", "pt_fsdp"):  # saved by 2 processes (DDP, FSDP), resumed by 1
        _close(r[f"{run}_resumed_at_1"]["losses"], r[run]["losses"][SAVE_AT:])
    _close(r["pt_fsdp_resumed_from_1"]["losses"], r["pt"]["losses"][SAVE_AT:])  # saved by 1, resumed by 2 (FSDP)


def test_ranks_read_disjoint_slices_of_one_global_stream(runs, tokenizer_dir):
    """Rank r's batch is rows r::world of the global batch; the cursor counts global rows, whatever the world."""
    root, _ = runs
    shards = TokenShards(root / "data", "train")
    whole = PackedBatches(shards, 6, 32, seed=5)
    parts = [PackedBatches(shards, 2, 32, seed=5, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        rows, got = whole.next()["input_ids"], [p.next()["input_ids"] for p in parts]
        assert all(torch.equal(got[r], rows[r::3]) for r in range(3))
        assert all(p.state_dict() == whole.state_dict() for p in parts)
    data = load_chat([str(root / "chat.jsonl")], Tokenizer.load(tokenizer_dir), 64)
    whole_chat = ChatBatches(data, 4, 64, seed=5)
    chat_parts = [ChatBatches(data, 2, 64, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        b, got = whole_chat.next(), [p.next() for p in chat_parts]
        for r in range(2):
            w = got[r]["input_ids"].shape[1]
            assert torch.equal(got[r]["labels"], b["labels"][r::2, :w]) and (b["labels"][r::2, w:] == -100).all()
        assert sum(int(g["n_targets"]) for g in got) == int(b["n_targets"])
        assert all(p.state_dict() == whole_chat.state_dict() for p in chat_parts)
