"""Results of `nanomind eval` as Markdown tables, and several runs side by side with a bar chart.

    nanomind eval compare runs/eval/a.cmmlu_test.letter-0shot.json runs/eval/b.cmmlu_test.letter-0shot.json \
        --out runs/eval/compare

Writes OUT/compare.md (the table, also printed) and OUT/compare.png (per-row bars; needs matplotlib:
pip install 'nanomind[plot]'). Results of one kind compare: multiple-choice accuracy or bits per byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanomind.config import arg

KINDS = {"choice": "accuracy", "ppl": "bpb"}  # results kind -> the metric tables and charts show


def fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.4f}"


def describe(result: dict[str, Any]) -> str:
    """One line: what was evaluated, on what, how."""
    data = ", ".join(Path(f["path"]).name for f in result["data"])
    ck = result["checkpoint"]
    how = f"{result['method']}, {result['shots']}-shot" if result["kind"] == "choice" else f"{result['targets']} tokens"
    limit = f", random {result['limit']} (seed {result['seed']})" if result.get("limit") else ""
    return f"**{result['name']}** on {data}{limit} · {how} · {result['dtype']} · `{ck['path']}` (step {ck['step']})"


def markdown(result: dict[str, Any]) -> str:
    """The table of one results dict (nanomind eval choice / ppl)."""
    lines = [describe(result), ""]
    if result["kind"] == "choice":
        o, pct = result["overall"], lambda v: fmt("accuracy", v)
        lines += ["| subject | n | accuracy | chance |", "| --- | ---: | ---: | ---: |"]
        lines.append(f"| **overall** | {o['n']} | **{pct(o['accuracy'])}** | {pct(o['chance'])} |")
        lines.append(f"| mean of {len(result['rows'])} subjects | | {pct(o['macro_accuracy'])} | |")
        lines += [f"| {k} | {r['n']} | {pct(r['accuracy'])} | {pct(r['chance'])} |" for k, r in result["rows"].items()]
        share = lambda d: ", ".join(f"{k} {pct(v)}" for k, v in d.items() if v)
        lines += ["", f"letters picked: {share(o['picked'])} (answers: {share(o['answers'])})"]
    else:
        lines += ["| data | docs | tokens | loss | perplexity | bits/byte |", "| --- |" + " ---: |" * 5]
        for name, r in [("**overall**", result["overall"]), *result["rows"].items()]:
            lines.append(f"| {name} | {r['docs']} | {r['tokens']:,} | {r['loss']:.4f} | {r['ppl']:.2f} | "
                         f"{fmt('bpb', r['bpb'])} |")  # fmt: skip
    return "\n".join(lines)


def load_result(path: str) -> dict[str, Any]:
    try:
        result = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"results file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(result, dict) or result.get("kind") not in KINDS or "rows" not in result:
        raise ValueError(f"{path}: not a results file of nanomind eval (no 'kind' / 'rows')")
    return result


def labels(results: list[dict[str, Any]]) -> list[str]:
    """Column names: the run names, with the method and shots added where the runs differ in them."""
    out = [r["name"] for r in results]
    if results[0]["kind"] == "choice" and len({(r["method"], r["shots"]) for r in results}) > 1:
        out = [f"{r['name']} {r['method']} {r['shots']}-shot" for r in results]
    seen: dict[str, int] = {}
    for i, name in enumerate(out):  # the same label twice: number them
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            out[i] = f"{name} ({seen[name]})"
    return out


def table(results: list[dict[str, Any]]) -> tuple[list[str], list[str], list[list[float | None]], list[float | None]]:
    """(column labels, row names, values [row][column], chance per row) with the overall row first; a row
    missing from a run is None there."""
    names = ["overall"] + list(dict.fromkeys(k for r in results for k in r["rows"]))
    metric = KINDS[results[0]["kind"]]
    values, chance = [], []
    for name in names:
        cells = [(r["overall"] if name == "overall" else r["rows"].get(name)) for r in results]
        values.append([c[metric] if c else None for c in cells])
        chance.append(next((c["chance"] for c in cells if c and "chance" in c), None))
    return labels(results), names, values, chance


def compare_markdown(results: list[dict[str, Any]]) -> str:
    kind = results[0]["kind"]
    metric = KINDS[kind]
    cols, names, values, chance = table(results)
    delta = len(results) == 2
    head = ["subject" if kind == "choice" else "data", *cols] + (["Δ"] if delta else [])
    head += ["chance"] if kind == "choice" else []
    lines = [f"{metric} ({'higher' if kind == 'choice' else 'lower'} is better)", "",
             "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]  # fmt: skip
    for name, row, ch in zip(names, values, chance):
        cells = [f"**{name}**" if name == "overall" else name, *(fmt(metric, v) for v in row)]
        if delta:
            d = None if None in row else row[1] - row[0]  # type: ignore[operator]
            cells.append("-" if d is None else (f"{100 * d:+.1f}" if kind == "choice" else f"{d:+.4f}"))
        if kind == "choice":
            cells.append(fmt(metric, ch))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"- {lab}: {describe(r)}" for lab, r in zip(cols, results))]
    return "\n".join(lines)


def check_comparable(results: list[dict[str, Any]], paths: list[str]) -> list[str]:
    """Raise for mixed kinds; return warnings for runs on different data."""
    kinds = {r["kind"] for r in results}
    if len(kinds) > 1:
        raise ValueError(f"cannot compare results of different kinds ({sorted(kinds)}): {paths}")
    data = {tuple(sorted(f["sha256"] for f in r["data"])) + (r.get("limit"), r.get("seed")) for r in results}
    if len(data) > 1:
        return ["note: the runs were evaluated on different data (files, --limit or --seed differ)"]
    return []


def positional(argv: list[str] | None, flag: str) -> list[str]:
    """Leading positional arguments are values of `flag` (`compare a.json b.json` = `compare --results a.json
    b.json`): the config-derived parser knows flags only."""
    argv = list(argv or [])
    return [flag, *argv] if argv and not argv[0].startswith("-") else argv


@dataclass
class CompareConfig:
    results: list[str] = arg(help="results files written by nanomind eval (also accepted as positional arguments)")
    out: str = arg("runs/eval/compare", "directory for compare.md and compare.png")
    chart: bool = arg(True, "write the PNG bar chart (needs matplotlib: pip install 'nanomind[plot]')")


def compare(cfg: CompareConfig) -> str:
    results = [load_result(p) for p in cfg.results]
    for warning in check_comparable(results, cfg.results):
        print(warning)
    text = compare_markdown(results)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n")
    if cfg.chart:
        from nanomind.plot import bar_chart

        cols, names, values, chance = table(results)
        bar_chart(cols, names, values, chance, KINDS[results[0]["kind"]], out / "compare.png")
    return text


def main(argv: list[str] | None = None) -> None:
    from nanomind.config import parse

    cfg = parse(CompareConfig, positional(argv, "--results"), "nanomind eval compare", __doc__.splitlines()[0])
    print(compare(cfg))
    print(f"written: {Path(cfg.out) / 'compare.md'}" + (f", {Path(cfg.out) / 'compare.png'}" if cfg.chart else ""))
