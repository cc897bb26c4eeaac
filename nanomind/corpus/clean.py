"""`nanomind data clean`: normalise, filter and deduplicate text, with a report of what each filter removed.

    nanomind data clean --data ../shared/data/pretrain/*.jsonl --out runs/clean
    nanomind data clean --data zh.parquet --t2s --scripts han --min-chars 50 --out runs/clean

Each input becomes OUT/NAME.jsonl of {"text": ...} records; OUT/report.json and OUT/report.md list, per filter and
per file, the documents and bytes removed with a few examples (file:line). The steps, in order:
  1. normalise: Unicode NFKC (full-width letters and digits, ligatures, compatibility ideographs -> plain forms),
     keeping Chinese full-width punctuation unless --no-keep-cjk-punct; --t2s converts traditional Chinese to
     simplified (opencc)
  2. length: fewer than --min-chars or more than --max-chars characters
  3. letter ratio: letters and digits (any script) below --min-letter-ratio of the non-space characters
     (tables, symbol runs, markup)
  4. script: the main script (most letters) not in --scripts (han, latin, cyrillic, kana, hangul, arabic, greek, ...)
  5. exact duplicates, then 6. near duplicates (MinHash LSH), across all inputs: the first occurrence, in the order
     of --data, is kept
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nanomind.config import arg, parse
from nanomind.corpus import require
from nanomind.corpus.dedup import ExactDedup, NearDedup
from nanomind.corpus.formats import FORMATS, TXT_SPLITS, read_texts, write_jsonl
from nanomind.corpus.report import CleanReport
from nanomind.jsonl import BadLines

# Code point ranges per script; a text's main script is the one with the most characters in these ranges.
SCRIPTS = {
    "han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f",
    "latin": "A-Za-z\u00c0-\u024f\u1e00-\u1eff",
    "cyrillic": "\u0400-\u052f",
    "greek": "\u0370-\u03ff",
    "kana": "\u3040-\u30ff\u31f0-\u31ff",
    "hangul": "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f",
    "arabic": "\u0600-\u06ff\u0750-\u077f",
    "devanagari": "\u0900-\u097f",
    "thai": "\u0e00-\u0e7f",
}
_SCRIPT_RES = {name: re.compile(f"[{chars}]") for name, chars in SCRIPTS.items()}
_ALNUM = re.compile(r"[^\W_]")  # letters and digits of any script
_SPACE = re.compile(r"\s")
# Chinese punctuation that NFKC would turn into ASCII ("，" -> ","), which changes how Chinese text reads.
_CJK_PUNCT = re.compile("([，！？：；（）～…])")


@dataclass
class CleanConfig:
    data: list[str] = arg(help="input files (.jsonl, .parquet, .csv, .tsv, .txt); duplicates keep the first")
    out: str = arg(help="output directory: one NAME.jsonl per input, report.json, report.md")
    text_field: str = arg("", "field holding the text (empty: text, content, document, ... whichever is present)")
    format: str = arg("auto", "input format (auto: from the file suffix)", choices=list(FORMATS))
    txt_split: str = arg("blank", "plain text documents: paragraphs, lines, or whole files", choices=list(TXT_SPLITS))
    normalize: str = arg("nfkc", "Unicode normalisation", choices=["nfkc", "nfc", "none"])
    keep_cjk_punct: bool = arg(True, "keep Chinese full-width punctuation (，！？：；（）～…) that NFKC makes ASCII")
    t2s: bool = arg(False, "convert traditional Chinese to simplified (needs opencc)")
    min_chars: int = arg(10, "drop documents with fewer characters")
    max_chars: int = arg(0, "drop documents with more characters (0 = no limit)")
    min_letter_ratio: float = arg(0.5, "drop documents whose letters and digits are below this share of non-space")
    scripts: list[str] = arg([], f"keep only documents whose main script is one of these ({', '.join(SCRIPTS)})")
    dedup: bool = arg(True, "remove exact duplicates (after normalisation, whitespace collapsed)")
    near_dedup: bool = arg(True, "remove near duplicates with MinHash LSH (needs datasketch)")
    threshold: float = arg(0.8, "near duplicates: estimated Jaccard similarity of character n-grams")
    ngram: int = arg(5, "near duplicates: characters per n-gram")
    num_perm: int = arg(128, "near duplicates: MinHash permutations (more: sharper estimates, slower)")
    examples: int = arg(3, "examples per filter in the report")

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data: give at least one input file")
        if self.min_chars < 0 or self.max_chars < 0 or (self.max_chars and self.max_chars < self.min_chars):
            raise ValueError(f"need 0 <= --min-chars <= --max-chars (or 0), got {self.min_chars}, {self.max_chars}")
        if not 0.0 <= self.min_letter_ratio <= 1.0 or not 0.0 < self.threshold <= 1.0:
            raise ValueError("--min-letter-ratio must be in [0, 1] and --threshold in (0, 1]")
        unknown = sorted(set(self.scripts) - set(SCRIPTS))
        if unknown:
            raise ValueError(f"--scripts: unknown {unknown}; known: {', '.join(SCRIPTS)}")
        if self.ngram < 1 or self.num_perm < 2:
            raise ValueError(f"need --ngram >= 1 and --num-perm >= 2, got {self.ngram}, {self.num_perm}")


def normalize(text: str, form: str = "nfkc", keep_cjk_punct: bool = True) -> str:
    if form == "none":
        return text
    if form == "nfc" or not keep_cjk_punct:
        return unicodedata.normalize(form.upper(), text)
    parts = _CJK_PUNCT.split(text)  # odd items are the kept punctuation
    parts[::2] = [unicodedata.normalize("NFKC", p) for p in parts[::2]]
    return "".join(parts)


def letter_ratio(text: str) -> float:
    """Letters and digits of any script over non-space characters (1.0 for an all-space text)."""
    non_space = len(_SPACE.sub("", text))
    return (len(text) - len(_ALNUM.sub("", text))) / non_space if non_space else 1.0


def main_script(text: str) -> str:
    """The script with the most characters in `text`, or "none" when it has no letter of a known script."""
    counts = {name: len(text) - len(pattern.sub("", text)) for name, pattern in _SCRIPT_RES.items()}
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] else "none"


class Cleaner:
    """Applies the filters in order to one text at a time; returns (filter name, detail) when it removes it."""

    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        self.t2s = require("opencc", "opencc", "--t2s").OpenCC("t2s").convert if cfg.t2s else None
        self.exact = ExactDedup() if cfg.dedup else None
        self.near = NearDedup(cfg.threshold, cfg.num_perm, cfg.ngram) if cfg.near_dedup else None

    def transform(self, text: str) -> str:
        text = normalize(text, self.cfg.normalize, self.cfg.keep_cjk_punct)
        if self.t2s is not None:
            text = self.t2s(text)
        return text.strip()

    def verdict(self, text: str, where: str) -> tuple[str, str] | None:
        cfg, n = self.cfg, len(text)
        if n < cfg.min_chars or (cfg.max_chars and n > cfg.max_chars):
            return "length", f"{n} chars"
        if (ratio := letter_ratio(text)) < cfg.min_letter_ratio:
            return "letter_ratio", f"letter ratio {ratio:.2f}"
        if cfg.scripts and (script := main_script(text)) not in cfg.scripts:
            return "script", f"main script {script}"
        if self.exact is not None and (first := self.exact.check(text, where)) is not None:
            return "exact_dup", f"same as {first}"
        if self.near is not None and (hit := self.near.check(text, where)) is not None:
            return "near_dup", f"~{hit[1]:.2f} similar to {hit[0]}"
        return None


def _outputs(cfg: CleanConfig) -> list[str]:
    names = [Path(p).stem + ".jsonl" for p in cfg.data]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"--data {cfg.data[names.index(name)]} and {cfg.data[i]} would both write {name}")
    return names


def clean(cfg: CleanConfig) -> dict:
    """Clean cfg.data into cfg.out; returns the report dict (also written to OUT/report.json)."""
    for path in cfg.data:
        if not Path(path).is_file():
            raise ValueError(f"--data: file not found: {path}")
    names, out = _outputs(cfg), Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise ValueError(f"--out {out} exists and is not a `data clean` output; remove it or choose another")
    cleaner, report = Cleaner(cfg), CleanReport(cfg.examples)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"  # renamed at the end: a crash leaves no half output
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        total = sum(Path(p).stat().st_size for p in cfg.data)
        with tqdm(total=total, unit="B", unit_scale=True, disable=None, desc="clean") as bar:
            for path, name in zip(cfg.data, names):
                bad, stats = BadLines(), report.file(path, name)
                with open(tmp / name, "wb") as fh:
                    for pos, raw in read_texts(path, bad, cfg.text_field, cfg.format, cfg.txt_split, bar.update):
                        text = cleaner.transform(raw)
                        stats.seen(raw, text)
                        where = f"{path}:{pos}"
                        verdict = cleaner.verdict(text, where)
                        if verdict is None:
                            write_jsonl(fh, {"text": text})
                            stats.keep(text)
                        else:
                            report.removed(stats, verdict[0], text, where, verdict[1])
                stats.bad_records(bad)
                report.add_bad(bad)
        result = report.to_dict(cfg, time.perf_counter() - start)
        (tmp / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        (tmp / "report.md").write_text(report.markdown(result))
        if out.exists():
            shutil.rmtree(out)  # checked above that it is an earlier clean output
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(report.summary(result, out))
    return result


def main(argv: list[str] | None = None) -> None:
    clean(parse(CleanConfig, argv, "nanomind data clean", "Normalise, filter and deduplicate text, with a report."))
