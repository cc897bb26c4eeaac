"""Chat data for SFT: conversation jsonl -> (ids, trained-token mask) -> rows packed without cross-talk.

A record is {"conversations": [{"role": "system"|"user"|"assistant", "content": ..., "reasoning_content"?: ...}]}.
Packing puts several whole conversations in a row of seq_len tokens (best-fit decreasing, so little is wasted);
`doc_ids` tell the model where each starts, and it attends within a conversation only (model/transformer.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from nanomind.config import arg
from nanomind.jsonl import BadLines, read_objects
from nanomind.tokenizer import Tokenizer

ROLES = {"system", "user", "assistant"}


def _check(record: dict, placeholders: dict[str, str]) -> tuple[list[dict] | None, str]:
    """(messages, "") for a usable record, else (None, reason). Fills {{name}}-style placeholders."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None, "missing or empty 'conversations' list"
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("role") not in ROLES or not isinstance(t.get("content"), str):
            return None, f"turn {i} needs a role in {sorted(ROLES)} and a string content"
        m = {"role": t["role"], "content": t["content"]}
        if isinstance(t.get("reasoning_content"), str) and t["reasoning_content"] and t["role"] == "assistant":
            m["reasoning_content"] = t["reasoning_content"]
        for key, value in placeholders.items():
            for k in ("content", "reasoning_content"):
                if k in m:
                    m[k] = m[k].replace("{{" + key + "}}", value)
        messages.append(m)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None, "no assistant turn with content"
    return messages, ""


def read_conversations(
    path: str, report: BadLines, placeholders: dict[str, str] | None = None
) -> Iterator[tuple[int, list[dict]]]:
    """Yield (line number, messages) for each usable record; count and report the others. Streams."""
    for line_no, record in read_objects(path, report):
        messages, reason = _check(record, placeholders or {})
        if messages is None:
            report.add(path, line_no, reason)
        else:
            yield line_no, messages


@dataclass
class ChatData:
    """Encoded conversations: ids and trained masks, plus what was cut or left out."""

    ids: list[np.ndarray] = field(default_factory=list)
    trained: list[np.ndarray] = field(default_factory=list)
    truncated: int = 0  # cut at a turn boundary to fit
    dropped: int = 0  # even the first exchange did not fit
    bad: BadLines = field(default_factory=BadLines)

    def summary(self) -> str:
        lines = [f"{len(self.ids)} conversations, {sum(len(i) for i in self.ids):,} tokens, "
                 f"{sum(int(t.sum()) for t in self.trained):,} trained; {self.truncated} truncated at a turn, "
                 f"{self.dropped} dropped as too long"]  # fmt: skip
        if self.bad.total:
            lines.append(self.bad.summary())
        return "\n".join(lines)


def _fit(tok: Tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[bool], bool] | None:
    """Encode; when too long, keep the longest prefix that ends with an assistant turn and fits."""
    ids, trained = tok.encode_chat(messages)
    if len(ids) <= max_len:
        return ids, trained, False
    for end in range(len(messages) - 1, 0, -1):
        last = messages[end - 1]
        if last["role"] == "assistant" and (last["content"].strip() or last.get("reasoning_content")):
            ids, trained = tok.encode_chat(messages[:end])
            if len(ids) <= max_len:
                return ids, trained, True
    return None


def load_chat(files: list[str], tok: Tokenizer, max_len: int, placeholders: dict[str, str] | None = None) -> ChatData:
    """Read and encode every conversation of `files`; over-long ones are truncated at a turn boundary or dropped."""
    data = ChatData()
    for path in files:
        before, dropped_before = len(data.ids), data.dropped
        for _, messages in read_conversations(path, data.bad, placeholders):
            fitted = _fit(tok, messages, max_len)
            if fitted is None:
                data.dropped += 1
                continue
            ids, trained, cut = fitted
            data.truncated += cut
            data.ids.append(np.asarray(ids, dtype=np.int64))
            data.trained.append(np.asarray(trained, dtype=bool))
        if len(data.ids) == before and data.dropped == dropped_before:
            raise ValueError(f"{path}: no usable conversation\n{data.bad.summary()}")
    return data


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each item (longest first) goes to the open row with the least room that still fits
    it. Returns rows as lists of item indices; every item appears exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free positions, row index)
    for i in order:
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k < len(room):
            free, r = room.pop(k)
        else:
            free, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if free - lengths[i] > 0:
            bisect.insort(room, (free - lengths[i], r))
    return rows


def make_row(data: ChatData, items: list[int], seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input ids, labels, doc ids) [seq_len] for conversations `items` laid end to end; the tail is padding
    (doc id -1, no labels). A label is the next token of the same conversation when that token is trained."""
    ids = np.zeros(seq_len, dtype=np.int64)
    labels = np.full(seq_len, -100, dtype=np.int64)
    docs = np.full(seq_len, -1, dtype=np.int64)
    n = 0
    for d, i in enumerate(items):
        x, t = data.ids[i], data.trained[i]
        ids[n : n + len(x)] = x
        labels[n : n + len(x) - 1] = np.where(t[1:], x[1:], -100)
        docs[n : n + len(x)] = d
        n += len(x)
    return ids, labels, docs


GROUP_BATCHES = 16  # batches whose rows are sorted by length together (see ChatBatches)
ROUND_TO = 16  # a trimmed batch keeps a multiple of this many positions (friendlier matrix shapes)


class Epochs:
    """The batch order SFT and DPO share. Each epoch visits every item once in an order seeded by (seed, epoch);
    each take() returns this rank's share of the next world_size * batch_size items (a global micro-batch): items
    r::world_size for rank r. The cursor counts global items, so a run resumes on any number of processes.
    grouped: the items of each run of GROUP_BATCHES optimizer steps (world_size * batch_size * grad_accum items
    each) are sorted by length, so similar lengths share a batch; the order depends on the items per optimizer
    step only, not on how they are split into processes and micro-steps."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, grouped: bool, what: str,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):  # fmt: skip
        self.lengths, self.batch_size, self.seed, self.grouped, self.what = lengths, batch_size, seed, grouped, what
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] = (-1, np.arange(0))

    def order(self, epoch: int) -> np.ndarray:
        """The items of `epoch` in visiting order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
        if not self.grouped:
            return order
        size = GROUP_BATCHES * self.batch_size * self.world_size * self.grad_accum
        return np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")]
                               for g in np.split(order, range(size, len(order), size))])  # fmt: skip

    def take(self) -> list[int]:
        chosen = []
        for k in range(self.world_size * self.batch_size):
            if self._order[0] != self.epoch:
                self._order = (self.epoch, self.order(self.epoch))
            if k % self.world_size == self.rank:
                chosen.append(int(self._order[1][self.position]))
            self.position += 1
            if self.position == len(self.lengths):
                self.epoch, self.position = self.epoch + 1, 0
        return chosen

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, self.what: len(self.lengths)}

    def load_state_dict(self, state: dict) -> None:
        if state[self.what] != len(self.lengths):
            raise ValueError(f"cannot resume: the data cursor has {state[self.what]} {self.what}, this data "
                             f"{len(self.lengths)}")  # fmt: skip
        self.epoch, self.position = state["epoch"], state["position"]


class ChatBatches:
    """Endless SFT batches (the loop's BatchSource). packed: rows of several conversations with doc_ids; not
    packed: one conversation per row, padded to seq_len (the way minimind does it; kept for comparison).

    The rows come in the order of `Epochs` (grouped by length when packed), and every packed batch is cut to its
    longest row, so rows that could not be filled (conversations longer than half a row cannot share one) cost
    little padding."""

    def __init__(self, data: ChatData, batch_size: int, seq_len: int, seed: int, packed: bool = True,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):  # fmt: skip
        lengths = [len(i) for i in data.ids]
        if not lengths:
            raise ValueError("no conversations to train on")
        self.rows = pack(lengths, seq_len) if packed else [[i] for i in range(len(lengths))]
        self.row_len = np.array([sum(lengths[i] for i in r) for r in self.rows])
        self.data, self.batch_size, self.seq_len, self.seed, self.packed = data, batch_size, seq_len, seed, packed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.epochs = Epochs(self.row_len, batch_size, seed, packed, "rows", rank, world_size, grad_accum)

    def order(self, epoch: int) -> np.ndarray:
        """The rows of `epoch` in visiting order."""
        return self.epochs.order(epoch)

    def width(self, rows: np.ndarray) -> int:
        """Positions a batch of these rows computes: seq_len padded, else its longest row rounded up."""
        if not self.packed:
            return self.seq_len
        return min(self.seq_len, -(-int(self.row_len[rows].max()) // ROUND_TO) * ROUND_TO)

    def fill(self) -> float:
        """Fraction of computed positions (summed over one epoch's batches on every rank) that hold conversation
        tokens: 1 - padding waste."""
        order, step, computed = self.order(0), self.batch_size * self.world_size, 0
        for start in range(0, len(order), step):
            for r in range(self.world_size):
                rows = order[start + r : start + step : self.world_size]
                computed += len(rows) * self.width(rows) if len(rows) else 0
        return int(self.row_len.sum()) / computed

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        width = self.width(np.asarray(rows))
        parts = [make_row(self.data, self.rows[r], self.seq_len) for r in rows]
        ids, labels, docs = (torch.from_numpy(np.stack(p)[:, :width]) for p in zip(*parts, strict=True))
        out = {"input_ids": ids, "labels": labels, "n_targets": (labels != -100).sum()}
        if self.packed:
            out["doc_ids"] = docs
        return out

    def next(self) -> dict[str, torch.Tensor]:
        return self.batch(self.epochs.take())

    def state_dict(self) -> dict:
        return self.epochs.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.epochs.load_state_dict(state)


@dataclass
class InspectConfig:
    data: list[str] = arg([], "conversation jsonl files")
    tokenizer: str = arg("", "tokenizer (or checkpoint) directory")
    index: int = arg(0, "which usable conversation to show (0 = the first)")
    count: int = arg(1, "how many conversations to show")
    seq_len: int = arg(512, "row length, for the truncation SFT would apply")
    color: bool = arg(True, "highlight trained tokens in color on a terminal")
    name: str = arg("nanomind", "fills {{name}} placeholders, as nanomind sft does")
    author: str = arg("the nanomind project", "fills {{author}} placeholders, as nanomind sft does")


def show(tok: Tokenizer, ids: np.ndarray, trained: np.ndarray, color: bool) -> str:
    """The rendered conversation with the tokens SFT trains on marked: green on a terminal, else in ⟦ ⟧."""
    on, off = ("\x1b[42m\x1b[30m", "\x1b[0m") if color else ("⟦", "⟧")
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and trained[j] == trained[i]:
            j += 1
        text = tok.decode(ids[i:j].tolist())
        out.append(on + text + off if trained[i] else text)
        i = j
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    """nanomind inspect sft: print conversations as the model sees them, trained tokens highlighted."""
    import sys
    from pathlib import Path

    from nanomind.config import parse

    cfg = parse(InspectConfig, argv, "nanomind inspect sft", "Show the SFT loss mask of conversations.")
    if not cfg.data or not cfg.tokenizer:
        raise ValueError("give --data and --tokenizer")
    from nanomind import checkpoint

    plain = (Path(cfg.tokenizer) / "tokenizer.json").is_file()
    tok = Tokenizer.load(cfg.tokenizer if plain else checkpoint.tokenizer_dir(cfg.tokenizer))
    data = load_chat(cfg.data, tok, cfg.seq_len, {"name": cfg.name, "author": cfg.author})
    color = cfg.color and sys.stdout.isatty()
    for k in range(cfg.index, min(cfg.index + cfg.count, len(data.ids))):
        ids, trained = data.ids[k], data.trained[k]
        print(f"--- conversation {k}: {len(ids)} tokens, {int(trained.sum())} trained ---")
        print(show(tok, ids, trained, color))
    print(data.summary())
