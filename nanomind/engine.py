"""Continuous batching: many requests share each decoding step, joining and leaving between steps.

The engine owns a KV cache of `max_batch` rows. A new request is prefilled into a free row; every step then runs
one forward over the rows of all running requests (each at its own position, with its own sampling settings,
random generator and repetition state) and samples one token for each. A finished or cancelled request gives its
row back at once, and the last running request moves into it, so the running rows are always 0..n-1 and a step
works on views of the cache, never on copies.

The sampling is generate.py's `sample`, with the same random draws per request, so a request alone in the engine
yields the same tokens as `generate()` with the same settings (a test checks it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from nanomind.generate import SamplingConfig, sample, settings_key
from nanomind.model import Transformer

# on_token(token, finish): called on the engine's thread with each new token (finish None), then once with
# token None and finish "stop" (a stop id came), "length" (max_new_tokens or the context) or "cancelled".
Callback = Callable[[int | None, str | None], None]


@dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: SamplingConfig
    on_token: Callback
    stop_ids: Collection[int] = ()
    cancelled: bool = False  # set from any thread; the engine drops the request before its next step
    finish: str | None = None  # why it ended, once it has
    # engine state
    slot: int = -1
    pos: int = 0  # position of the next token to feed (= tokens in the cache)
    limit: int = 0  # the request ends when pos reaches this
    token: int = -1  # the last sampled token, fed at the next step
    generated: int = 0
    state: dict = field(default_factory=dict)

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Runs requests from any thread: `submit(request)`; tokens arrive through the request's callback."""

    def __init__(self, model: Transformer, max_batch: int = 32, max_len: int | None = None):
        self.model = model.eval()
        self.max_len = min(max_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(max_batch, self.max_len)
        self.running: list[Request] = []  # running[i].slot == i
        self.waiting: queue.Queue[Request | None] = queue.Queue()
        self.steps = 0  # decoding steps taken (for tests and metrics)
        self._thread: threading.Thread | None = None
        self._stop = False

    # ---- public, thread-safe ----
    def submit(self, request: Request) -> Request:
        if not request.prompt:
            raise ValueError("the prompt must contain at least one token")
        if len(request.prompt) >= self.max_len:
            raise ValueError(f"the prompt is {len(request.prompt)} tokens; this model reads {self.max_len - 1} "
                             "at most before its reply")  # fmt: skip
        self.waiting.put(request)
        return request

    def start(self) -> Engine:
        """Run the loop on a background thread."""
        self._thread = threading.Thread(target=self.run, name="nanomind-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self.waiting.put(None)
        if self._thread is not None:
            self._thread.join()

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Serve requests until stop() is called or `until()` returns True (checked at least every 0.5 s)."""
        while not self._stop and not until():
            if not self.running:  # idle: sleep until a request comes
                try:
                    item = self.waiting.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is None:
                    continue
                self.waiting.put(item)
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free rows (prefill), then one decoding step for every running request."""
        self._drop_finished()  # rows of requests cancelled since the last step
        while len(self.running) < self.max_batch:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                self._prefill(request)
        self._drop_finished()
        if self.running:
            self._decode()
            self._drop_finished()

    def _prefill(self, r: Request) -> None:
        if r.cancelled or r.sampling.max_new_tokens == 0:
            return self._finish(r, "cancelled" if r.cancelled else "length")
        r.slot = len(self.running)
        self.running.append(r)
        s, vocab = r.sampling, self.model.config.vocab_size
        r.limit = min(len(r.prompt) + s.max_new_tokens, self.max_len)
        r.pos = len(r.prompt)
        gen = torch.Generator(device=self.device).manual_seed(s.seed)
        seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        seen[torch.tensor(r.prompt, device=self.device)] = True
        noise = torch.empty(s.top_k if 0 < s.top_k < vocab else vocab, device=self.device)
        r.state = {"gen": gen, "seen": seen, "counts": torch.zeros(vocab, device=self.device), "noise": noise,
                   "stops": set() if s.ignore_eos else set(r.stop_ids)}  # fmt: skip
        ids = torch.tensor([r.prompt], device=self.device)
        logits = self.model(ids, self.cache.view(slice(r.slot, r.slot + 1), len(r.prompt)), last_only=True).logits
        self._accept(r, logits[0, -1])

    def _decode(self) -> None:
        n = len(self.running)
        ids = torch.tensor([[r.token] for r in self.running], device=self.device)
        positions = torch.tensor([[r.pos] for r in self.running], device=self.device)
        keys = max(r.pos for r in self.running) + 1
        logits = self.model(ids, self.cache.view(slice(0, n), keys), last_only=True, positions=positions).logits
        self.steps += 1
        groups: dict[tuple, list[int]] = {}  # rows with the same settings are sampled together
        for i, r in enumerate(self.running):
            groups.setdefault(settings_key(r.sampling), []).append(i)
        tokens = [0] * n
        for rows in groups.values():
            group = [self.running[i] for i in rows]
            st = [r.state for r in group]
            noise = torch.stack([s["noise"].exponential_(generator=s["gen"]) for s in st])
            seen, counts = torch.stack([s["seen"] for s in st]), torch.stack([s["counts"] for s in st])
            for i, t in zip(rows, sample(logits[rows, -1], group[0].sampling, seen, noise, counts).tolist()):
                tokens[i] = t
        for r, t in zip(list(self.running), tokens, strict=True):
            r.pos += 1
            self._deliver(r, t)

    def _accept(self, r: Request, logits: torch.Tensor) -> None:
        """Sample the request's next token from its logits [V] and deliver it."""
        st = r.state
        tok = sample(logits, r.sampling, st["seen"], st["noise"].exponential_(generator=st["gen"]), st["counts"])
        self._deliver(r, int(tok))

    def _deliver(self, r: Request, t: int) -> None:
        """Hand the request its new token (or finish it at a stop token or its length limit)."""
        st = r.state
        st["seen"][t] = True
        st["counts"][t] += 1
        if t in st["stops"]:
            return self._finish(r, "stop")
        r.token, r.generated = t, r.generated + 1
        r.on_token(t, None)
        if r.pos + 1 >= r.limit:  # no room to feed this token back: the reply is complete
            self._finish(r, "length")

    def _finish(self, r: Request, reason: str) -> None:
        r.finish = reason
        r.on_token(None, reason)

    def _drop_finished(self) -> None:
        """Free the rows of finished or cancelled requests; the last running request moves into each freed row."""
        i = 0
        while i < len(self.running):
            r = self.running[i]
            if r.finish is None and not r.cancelled:
                i += 1
                continue
            if r.finish is None:  # cancelled by its client (e.g. a closed connection)
                self._finish(r, "cancelled")
            last = self.running.pop()
            if last is not r:
                self.cache.copy_row(last.slot, i, last.pos)  # the moved request's cache into the freed row
                last.slot = i
                self.running[i] = last
            r.slot, r.state = -1, {}
