"""Time `nanomind data clean` + `data mix` on a corpus, and build the raw baseline for the training comparison.

    python benchmarks/data_pipeline.py [--data a.jsonl ...] [--out runs/data_pipeline] [--weights natural|sqrt]

Default data: ../shared/data/pretrain/*.jsonl. Writes OUT/clean (cleaned files + report), OUT/mix.toml and OUT/mix
(train.jsonl, heldout.jsonl, manifest.json), and OUT/raw: the raw concatenation minus every document whose cleaned
text is held out (train.jsonl), and those held-out documents in their raw form (heldout.jsonl), so that both
training sets are measured on the same documents and neither has seen them. `--weights natural` weighs each source
by its cleaned size (the mix is then a deduplicated shuffle of everything); `sqrt` by the square root of it,
the usual temperature-0.5 rebalancing that raises small sources and lowers large ones.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

from common import emit, header

from nanomind.corpus.clean import CleanConfig, Cleaner, clean
from nanomind.corpus.formats import write_jsonl
from nanomind.corpus.mix import MixConfig, is_held_out, mix
from nanomind.jsonl import read_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def raw_baseline(cfg: CleanConfig, heldout: Path, out: Path, fraction: float) -> dict:
    """OUT/train.jsonl: raw documents whose cleaned text is not held out; OUT/heldout.jsonl: the held-out ones,
    raw, each once, in the order of the mix's heldout.jsonl."""
    wanted = {json.loads(line)["text"] for line in heldout.open()}
    cleaner, raw_held, train_docs = Cleaner(CleanConfig(**{**vars(cfg), "dedup": False, "near_dedup": False})), {}, 0
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "wb") as fh:
        for path in cfg.data:
            for _, raw in read_jsonl(path):
                text = cleaner.transform(raw)
                if is_held_out({"text": text}, fraction):
                    if text in wanted:
                        raw_held.setdefault(text, raw)
                else:
                    write_jsonl(fh, {"text": raw})
                    train_docs += 1
    order = [json.loads(line)["text"] for line in heldout.open()]
    with open(out / "heldout.jsonl", "wb") as fh:
        for text in order:
            write_jsonl(fh, {"text": raw_held[text]})
    return {"train_docs": train_docs, "heldout_docs": len(order)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=sorted(str(f) for f in (SHARED / "pretrain").glob("*.jsonl")))
    p.add_argument("--out", default="runs/data_pipeline")
    p.add_argument("--weights", choices=["natural", "sqrt"], default="natural")
    p.add_argument("--held-out", type=float, default=0.01)
    args = p.parse_args()
    if not args.data:
        raise SystemExit(f"no data: {SHARED / 'pretrain'} has no jsonl files; pass --data")
    header("data_pipeline")
    out = Path(args.out)
    cfg = CleanConfig(data=args.data, out=str(out / "clean"))
    t0 = time.perf_counter()
    report = clean(cfg)
    t_clean = time.perf_counter() - t0
    names = [f["name"] for f in report["files"]]
    sizes = [f["kept_bytes"] for f in report["files"]]
    weights = [s / 1e6 if args.weights == "natural" else (s / 1e6) ** 0.5 for s in sizes]
    spec = out / f"mix_{args.weights}.toml"
    spec.write_text(f"seed = 0\nheld_out = {args.held_out}\n" + "".join(
        f'[[source]]\npath = "clean/{n}"\nweight = {w:.6f}\n' for n, w in zip(names, weights)))  # fmt: skip
    t0 = time.perf_counter()
    manifest = mix(MixConfig(spec=str(spec), out=str(out / f"mix_{args.weights}"), held_out=args.held_out,
                             source=[{"path": f"clean/{n}", "weight": w} for n, w in zip(names, weights)]))  # fmt: skip
    t_mix = time.perf_counter() - t0
    with contextlib.redirect_stdout(io.StringIO()):
        raw = raw_baseline(cfg, out / f"mix_{args.weights}" / "heldout.jsonl", out / "raw", args.held_out)
    print(f"raw baseline: {raw['train_docs']} train docs, {raw['heldout_docs']} held-out docs in {out / 'raw'}")
    print(f"clean {t_clean:.1f}s + mix {t_mix:.1f}s = {t_clean + t_mix:.1f}s")
    emit({
        "clean_seconds": round(t_clean, 1), "mix_seconds": round(t_mix, 1), "docs_read": report["records"],
        "removed": {k: v["docs"] for k, v in report["removed"].items()}, "kept": report["kept"],
        "mix_train_docs": manifest["outputs"]["train.jsonl"]["docs"],
        "mix_train_bytes": manifest["outputs"]["train.jsonl"]["bytes"],
        "heldout_docs": manifest["outputs"]["heldout.jsonl"]["docs"], "raw_train_docs": raw["train_docs"],
    })  # fmt: skip


if __name__ == "__main__":
    main()
