"""Load test of `nanomind serve`: 1, 8 and 32 concurrent streaming clients against a real server process.

The server runs `minimind3-30m` (random init: speed does not depend on the weights) with a 6400-token tokenizer
trained on the shared tokenizer corpus; every request streams exactly --max-tokens tokens (ignore_eos). Prints
aggregate output tokens/s, time to first token p50/p95 and the per-token latency p50 for each concurrency.
Target: at 32 clients, aggregate tokens/s >= 8x the single-client figure, every request completed.

    python benchmarks/serve_load.py [--clients 1 8 32] [--requests-per-client 2] [--max-tokens 64] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import emit, header

from nanomind import checkpoint
from nanomind.model import Transformer, preset
from nanomind.tokenizer import TokenizerTrainConfig, train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
QUESTIONS = ["Tell me about the sea.", "What is a tokenizer?", "Write a short poem about rain.", "How do birds fly?"]


async def one_request(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8, "seed": i,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    stamps, tokens, done = [], 0, False
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "tokens": tokens, "done": done,
            "per_token": (stamps[-1] - stamps[0]) / max(tokens - 1, 1) if stamps else float("nan")}  # fmt: skip


async def load(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def worker(w: int) -> list[dict]:
            return [await one_request(client, url, w * per_client + k, max_tokens) for k in range(per_client)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    return {"clients": clients, "requests": len(results), "completed": sum(r["done"] for r in results),
            "tokens": sum(r["tokens"] for r in results), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": statistics.median(ttft), "ttft_p95": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
            "per_token_p50": statistics.median(r["per_token"] for r in results)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--preset", default="minimind3-30m")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default: train one on the shared corpus)")
    args = p.parse_args()
    header(f"serve load, {args.preset}, {args.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = args.tokenizer or str(Path(tmp) / "tok")
        if not args.tokenizer:
            corpus = SHARED / "tokenizer" / "tokenizer_corpus.jsonl"
            train_tokenizer(TokenizerTrainConfig(data=[str(corpus)], vocab_size=6400, out=tok_dir))
        torch.manual_seed(0)
        ckpt = checkpoint.save(Path(tmp) / "model", 0, Transformer(preset(args.preset)), tok_dir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "nanomind", "serve", "--ckpt", str(ckpt), "--port", str(port),
               "--max-batch", str(max(args.clients)), "--dtype", args.dtype, "--device", "cpu"]  # fmt: skip
        server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            asyncio.run(load(url, 1, 1, 8))  # warm-up
            rows = [asyncio.run(load(url, c, args.requests_per_client, args.max_tokens)) for c in args.clients]
        finally:
            server.terminate()
            server.wait(30)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        print(f"{r['clients']:>3} clients: {r['completed']}/{r['requests']} completed, {r['tokens_per_s']:8.1f} "
              f"tokens/s aggregate ({r['tokens_per_s'] / base:4.1f}x), TTFT p50 {r['ttft_p50'] * 1000:6.0f} ms "
              f"p95 {r['ttft_p95'] * 1000:6.0f} ms, per-token p50 {r['per_token_p50'] * 1000:5.1f} ms")  # fmt: skip
    emit({"benchmark": "serve_load", "preset": args.preset, "dtype": args.dtype, "max_tokens": args.max_tokens,
          "rows": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]})  # fmt: skip


if __name__ == "__main__":
    main()
