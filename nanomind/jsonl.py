"""Reading jsonl inputs: one JSON object per line; malformed lines are skipped, counted and reported with
their file and line number, and nothing is read into memory at once."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BadLines:
    """Malformed jsonl lines: a count per reason, and the first few as `file:line: reason`."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    keep: int = 5

    def add(self, path: str, line_no: int, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{path}:{line_no}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items()))
        return "\n".join([f"skipped {self.total} bad line(s): {reasons}", *(f"  {e}" for e in self.examples)])


def _check_line(line: bytes, field: str) -> tuple[str | None, str]:
    """(text, "") for a usable jsonl line, else (None, reason)."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        return None, "invalid UTF-8"
    except ValueError:
        return None, "blank line" if not line.strip() else "invalid JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    return check_text(record, field)


def check_text(record: dict, field: str) -> tuple[str | None, str]:
    """(text, "") when record[field] is a usable string, else (None, reason) for the bad-record report."""
    if field not in record:
        return None, f"missing {field!r}"
    text = record[field]
    if not isinstance(text, str):
        return None, f"{field!r} is not a string"
    if not text.strip():
        return None, f"empty {field!r}"
    try:
        text.encode("utf-8")  # a "\ud800" escape parses but the encoder cannot take it
    except UnicodeEncodeError:
        return None, f"{field!r} has a lone surrogate"
    return text, ""


def read_jsonl(
    path: str, field: str = "text", report: BadLines | None = None, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) for each usable line; count the others in `report`. Streams."""
    report = report if report is not None else BadLines()
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, 1):
            if progress is not None:
                progress(len(line))
            text, reason = _check_line(line, field)
            if text is None:
                report.add(path, line_no, reason)
            else:
                yield line_no, text


def read_objects(path: str, report: BadLines) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each line holding a JSON object; the others are counted in `report`."""
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, 1):
            try:
                record = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                report.add(path, line_no, "blank line" if not line.strip() else "invalid JSON")
                continue
            if isinstance(record, dict):
                yield line_no, record
            else:
                report.add(path, line_no, "not a JSON object")


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces (inputs are recorded with their hash in results and meta.json)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
