"""What `nanomind data clean` removed: documents and bytes per filter and per file, with examples."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from nanomind.jsonl import BadLines

FILTERS = ("bad_record", "length", "letter_ratio", "script", "exact_dup", "near_dup")


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def preview(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


@dataclass
class FileStats:
    path: str
    name: str
    records: int = 0  # usable records read (bad ones are in `removed["bad_record"]`)
    bytes_in: int = 0  # UTF-8 bytes of their text as read
    normalized: int = 0  # records whose text normalisation changed
    kept: int = 0
    kept_bytes: int = 0
    removed: dict[str, list[int]] = field(default_factory=lambda: {f: [0, 0] for f in FILTERS})  # [docs, bytes]

    def seen(self, raw: str, text: str) -> None:
        self.records += 1
        self.bytes_in += _nbytes(raw)
        self.normalized += raw != text

    def keep(self, text: str) -> None:
        self.kept += 1
        self.kept_bytes += _nbytes(text)

    def bad_records(self, bad: BadLines) -> None:
        self.removed["bad_record"][0] += bad.total


class CleanReport:
    def __init__(self, examples: int = 3) -> None:
        self.files: list[FileStats] = []
        self.keep_examples = examples
        self.examples: dict[str, list[dict]] = {f: [] for f in FILTERS}
        self.bad = BadLines(keep=examples)

    def file(self, path: str, name: str) -> FileStats:
        self.files.append(FileStats(path, name))
        return self.files[-1]

    def removed(self, stats: FileStats, name: str, text: str, where: str, detail: str) -> None:
        stats.removed[name][0] += 1
        stats.removed[name][1] += _nbytes(text)
        if len(self.examples[name]) < self.keep_examples:
            self.examples[name].append({"where": where, "detail": detail, "text": preview(text)})

    def add_bad(self, bad: BadLines) -> None:
        for reason, n in bad.counts.items():
            self.bad.counts[reason] = self.bad.counts.get(reason, 0) + n
        for example in bad.examples:
            if len(self.examples["bad_record"]) < self.keep_examples:
                where, _, reason = example.rpartition(": ")
                self.examples["bad_record"].append({"where": where, "detail": reason, "text": ""})

    def to_dict(self, cfg: object, seconds: float) -> dict:
        totals = {f: {"docs": 0, "bytes": 0} for f in FILTERS}
        for s in self.files:
            for f, (docs, nbytes) in s.removed.items():
                totals[f]["docs"] += docs
                totals[f]["bytes"] += nbytes
        return {
            "config": dataclasses.asdict(cfg),  # type: ignore[call-overload]
            "seconds": round(seconds, 2),
            "records": sum(s.records for s in self.files) + totals["bad_record"]["docs"],
            "bytes_in": sum(s.bytes_in for s in self.files),
            "normalized": sum(s.normalized for s in self.files),
            "removed": totals,
            "bad_record_reasons": self.bad.counts,
            "kept": sum(s.kept for s in self.files),
            "kept_bytes": sum(s.kept_bytes for s in self.files),
            "files": [dataclasses.asdict(s) for s in self.files],
            "examples": self.examples,
        }

    @staticmethod
    def table(result: dict) -> list[str]:
        records, mb = result["records"], result["bytes_in"] / 1e6
        rows = ["| step | documents | % of documents | MB of text |", "| --- | ---: | ---: | ---: |"]
        rows.append(f"| read | {records} | 100.0 | {mb:.2f} |")
        for name, r in result["removed"].items():
            share = 100 * r["docs"] / max(records, 1)
            rows.append(f"| - {name} | {r['docs']} | {share:.1f} | {r['bytes'] / 1e6:.2f} |")
        kept = result["kept"]
        rows.append(f"| **kept** | {kept} | {100 * kept / max(records, 1):.1f} | {result['kept_bytes'] / 1e6:.2f} |")
        return rows

    def markdown(self, result: dict) -> str:
        lines = ["# data clean report", "", f"{result['seconds']} s; {result['normalized']} documents changed by "
                 "normalisation. Bytes of removed documents are counted after normalisation.", ""]  # fmt: skip
        lines += self.table(result)
        lines += ["", "## per file", "", "| file | read | " + " | ".join(FILTERS) + " | kept | kept MB |",
                  "| --- " * (len(FILTERS) + 4) + "|"]  # fmt: skip
        for s in result["files"]:
            cells = " | ".join(str(s["removed"][f][0]) for f in FILTERS)
            read = s["records"] + s["removed"]["bad_record"][0]
            lines.append(f"| {Path(s['path']).name} | {read} | {cells} | {s['kept']} | {s['kept_bytes'] / 1e6:.2f} |")
        lines += ["", "## examples", ""]
        for name, examples in result["examples"].items():
            for e in examples:
                lines.append(f"- **{name}** `{e['where']}` ({e['detail']}): {e['text']}")
        return "\n".join(lines) + "\n"

    def summary(self, result: dict, out: Path) -> str:
        lines = [f"cleaned into {out} in {result['seconds']:.1f}s", *self.table(result)]
        for name, examples in result["examples"].items():
            for e in examples[:2]:
                lines.append(f"  {name}: {e['where']} ({e['detail']}) {preview(e['text'], 60)}")
        lines.append(f"report: {out / 'report.md'}")
        return "\n".join(lines)
