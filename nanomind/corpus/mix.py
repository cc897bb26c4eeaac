"""`nanomind data mix`: weighted, deterministic mixing of jsonl sources into train / held-out files and a manifest.

    nanomind data mix --spec mix.toml --out runs/mix

    # mix.toml (flat keys as flags, `--seed 1` on the command line overrides them; paths relative to this file)
    seed = 0
    held_out = 0.01     # share of each source's documents kept out of train.jsonl, chosen by content hash
    unit = "bytes"      # weights are shares of text bytes (or of "docs")
    total = 0           # size of train.jsonl in units (0: the largest mix that repeats no source)
    [[source]]
    path = "../clean/zh_wiki_paragraphs.jsonl"
    weight = 2
    [[source]]
    path = "../clean/zh_poetry_tang_regular.jsonl"
    weight = 1

Source i gets weight_i / sum(weights) of `total`: its documents are taken in a seeded random order, in full passes
(a source smaller than its share repeats, one larger is subsampled), until its share is met to the nearest
document; then all taken documents are shuffled together. Records are copied verbatim, so pretrain, SFT and DPO
jsonl all mix; "bytes" counts the UTF-8 bytes of every string in a record. A document is held out when the hash of
its content falls below `held_out`, independent of seed and weights: every mix of the same sources holds out the
same documents, and exact duplicates are never split between train and held-out. OUT/manifest.json records each
source's path, sha256, weight, documents and bytes taken, and the outputs' sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanomind.config import arg, parse
from nanomind.jsonl import BadLines, sha256

UNITS = ("bytes", "docs")


@dataclass
class MixConfig:
    spec: str = arg(help="TOML file with [[source]] tables (path, weight) and any of the flags below")
    out: str = arg(help="output directory: train.jsonl, heldout.jsonl, manifest.json")
    seed: int = arg(0, "seed of the sampling and of the order of train.jsonl")
    held_out: float = arg(0.01, "share of each source's documents held out (by content hash, not by seed)")
    unit: str = arg("bytes", "what weights and --total measure: text bytes or documents", choices=list(UNITS))
    total: int = arg(0, "size of train.jsonl in units (0 = the largest mix that repeats no source)")
    source: list[dict] = arg([], "sources, from the spec: [[source]] path = ..., weight = ...", cli=False)

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError(f"{self.spec}: no [[source]] tables; each needs path = '...' and weight = <number>")
        for i, src in enumerate(self.source, 1):
            unknown = sorted(set(src) - {"path", "weight", "name"})
            weight = src.get("weight")
            if unknown or not isinstance(src.get("path"), str):
                raise ValueError(f"{self.spec}: source {i} needs a string path (and weight, name); got {sorted(src)}")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
                raise ValueError(f"{self.spec}: source {i} ({src['path']}): weight must be a number > 0, got {weight}")
        if not 0.0 <= self.held_out < 1.0 or self.total < 0:
            raise ValueError(f"need 0 <= held_out < 1 and total >= 0, got {self.held_out} and {self.total}")


def content_bytes(value: object) -> int:
    """UTF-8 bytes of all strings in a JSON value: the size of a record's text, whatever its layout or escaping."""
    if isinstance(value, str):
        return len(value.encode("utf-8", errors="surrogatepass"))
    if isinstance(value, dict):
        return sum(content_bytes(v) for v in value.values())
    if isinstance(value, list):
        return sum(content_bytes(v) for v in value)
    return 0


def is_held_out(record: dict, fraction: float) -> bool:
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(canonical, digest_size=8).digest(), "big") < fraction * 2**64


class Source:
    """One input scanned once: where each usable line starts, its size, and whether it is held out."""

    def __init__(self, path: Path, weight: float, name: str, held_out: float, bar: tqdm) -> None:
        self.path, self.weight, self.name = path, float(weight), name
        self.bad = BadLines()
        offsets, lengths, sizes, held = array("q"), array("q"), array("q"), array("b")
        offset = 0
        with open(path, "rb") as fh:
            for line_no, line in enumerate(fh, 1):
                bar.update(len(line))
                try:
                    record = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    self.bad.add(str(path), line_no, "blank line" if not line.strip() else "invalid JSON")
                    record = None
                if isinstance(record, dict):
                    offsets.append(offset)
                    lengths.append(len(line))
                    sizes.append(content_bytes(record))
                    held.append(is_held_out(record, held_out))
                elif record is not None:
                    self.bad.add(str(path), line_no, "not a JSON object")
                offset += len(line)
        if not offsets:
            raise ValueError(f"{path}: no usable record (need one JSON object per line)")
        self.offsets, self.lengths = np.frombuffer(offsets, np.int64), np.frombuffer(lengths, np.int64)
        self.sizes, self.held = np.frombuffer(sizes, np.int64), np.frombuffer(held, np.int8).astype(bool)
        self.train = np.flatnonzero(~self.held)
        if not len(self.train):
            raise ValueError(f"{path}: every document is held out; lower held_out")

    def units(self, docs: np.ndarray, unit: str) -> np.ndarray:
        return self.sizes[docs] if unit == "bytes" else np.ones(len(docs), np.int64)

    def take(self, quota: float, unit: str, rng: np.random.Generator) -> np.ndarray:
        """Train documents in seeded random passes until `quota` units, rounded to the nearest document."""
        available = self.units(self.train, unit).sum()
        passes = max(1, math.ceil(quota / available) + 1)
        order = np.concatenate([rng.permutation(self.train) for _ in range(passes)])
        cum = np.cumsum(self.units(order, unit))
        k = int(np.searchsorted(cum, quota))  # docs [0, k) stay below the quota, doc k reaches it
        if k < len(order) and cum[k] - quota <= quota - (cum[k - 1] if k else 0):
            k += 1
        return order[:k]


def _write(out: Path, sources: list[Source], picks: list[tuple[int, np.ndarray]], desc: str) -> dict:
    """Copy the picked lines, (source, doc index) pairs, to `out`; returns docs, units and sha256 written."""
    handles = [open(s.path, "rb") for s in sources]  # noqa: SIM115 - closed below, one per source
    h, docs, nbytes = hashlib.sha256(), 0, 0
    try:
        with open(out, "wb") as fh:
            for i, doc in tqdm(picks, desc=desc, unit="doc", disable=None):
                src = sources[i]
                handles[i].seek(src.offsets[doc])
                line = handles[i].read(src.lengths[doc])
                line = line if line.endswith(b"\n") else line + b"\n"
                fh.write(line)
                h.update(line)
                docs, nbytes = docs + 1, nbytes + int(src.sizes[doc])
    finally:
        for handle in handles:
            handle.close()
    return {"docs": docs, "bytes": nbytes, "sha256": h.hexdigest()}


def mix(cfg: MixConfig) -> dict:
    """Mix the spec's sources into cfg.out; returns the manifest (also written to OUT/manifest.json)."""
    root = Path(cfg.spec).parent
    paths = [Path(s["path"]) if Path(s["path"]).is_absolute() else root / s["path"] for s in cfg.source]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{cfg.spec}: source file not found: {path}")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ValueError(f"--out {out} exists and is not a `data mix` output; remove it or choose another")
    with tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, desc="scan", disable=None) as bar:
        names = [s.get("name") or p.stem for s, p in zip(cfg.source, paths)]
        sources = [Source(p, s["weight"], n, cfg.held_out, bar) for s, p, n in zip(cfg.source, paths, names)]
    shares = np.array([s.weight for s in sources]) / sum(s.weight for s in sources)
    available = np.array([s.units(s.train, cfg.unit).sum() for s in sources], dtype=np.float64)
    total = float(cfg.total or (available / shares).min())
    taken = [s.take(total * share, cfg.unit, np.random.default_rng([cfg.seed, i]))
             for i, (s, share) in enumerate(zip(sources, shares))]  # fmt: skip
    picks = [(i, doc) for i, docs in enumerate(taken) for doc in docs.tolist()]
    order = np.random.default_rng([cfg.seed, len(sources)]).permutation(len(picks))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"  # renamed at the end: a crash leaves no half output
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        train = _write(tmp / "train.jsonl", sources, [picks[j] for j in order.tolist()], "train")
        held = [(i, doc) for i, s in enumerate(sources) for doc in np.flatnonzero(s.held).tolist()]
        heldout = _write(tmp / "heldout.jsonl", sources, held, "held-out")
        manifest = _manifest(cfg, sources, shares, taken, total, {"train.jsonl": train, "heldout.jsonl": heldout})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            shutil.rmtree(out)  # checked above that it is an earlier mix output
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(summary(manifest, out))
    return manifest


def _manifest(cfg: MixConfig, sources: list[Source], shares: np.ndarray, taken: list, total: float, outputs: dict):
    grand = sum(int(s.units(t, cfg.unit).sum()) for s, t in zip(sources, taken))
    rows = []
    for s, share, docs in zip(sources, shares, taken):
        units, available = int(s.units(docs, cfg.unit).sum()), int(s.units(s.train, cfg.unit).sum())
        rows.append({
            "name": s.name, "path": str(s.path.resolve()), "sha256": sha256(s.path), "weight": s.weight,
            "share": round(float(share), 6), "realized_share": round(units / max(grand, 1), 6),
            "docs": len(s.offsets), "bad_lines": s.bad.counts, "held_out_docs": int(s.held.sum()),
            f"train_{cfg.unit}_available": available, "docs_taken": len(docs), f"{cfg.unit}_taken": units,
            "passes": round(units / available, 4),
        })  # fmt: skip
    spec = {"path": str(Path(cfg.spec).resolve()), "sha256": sha256(cfg.spec)}
    return {
        "format": "nanomind-mix", "version": 1, "spec": spec, "seed": cfg.seed, "unit": cfg.unit,
        "held_out": cfg.held_out, "total": round(total), "sources": rows, "outputs": outputs,
    }  # fmt: skip


def summary(manifest: dict, out: Path) -> str:
    unit = manifest["unit"]
    lines = [f"mixed into {out}: train {manifest['outputs']['train.jsonl']['docs']} docs, held-out "
             f"{manifest['outputs']['heldout.jsonl']['docs']} docs", f"{'source':<32} {'weight':>8} {'share':>7} "
             f"{'got':>7} {'docs':>8} {unit:>12} {'passes':>7}"]  # fmt: skip
    for s in manifest["sources"]:
        lines.append(f"{s['name'][:32]:<32} {s['weight']:>8g} {s['share']:>7.2%} {s['realized_share']:>7.2%} "
                     f"{s['docs_taken']:>8} {s[f'{unit}_taken']:>12} {s['passes']:>7.2f}")  # fmt: skip
    for s in manifest["sources"]:
        bad = sum(s["bad_lines"].values())
        if bad:
            lines.append(f"{s['path']}: skipped {bad} bad line(s): {s['bad_lines']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(argv or [])
    # The spec is also the --config file: its flat keys fill the flags (which override it), [[source]] the sources.
    if "--spec" in argv[:-1]:
        argv = ["--config", argv[argv.index("--spec") + 1], *argv]
    mix(parse(MixConfig, argv, "nanomind data mix", "Mix jsonl sources by weight into train / held-out files."))
