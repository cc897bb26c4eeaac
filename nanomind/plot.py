"""PNG charts: training curves of runs (`nanomind plot`) and the bar chart of `nanomind eval compare`.

    nanomind plot runs/pt                                    # -> runs/pt/curves.png
    nanomind plot runs/a runs/b --out docs/curves.png       # several runs on the same axes

Curves come from the TensorBoard logs a training run writes to RUN/tb (train/loss every --log-every steps,
val/val_loss and val/val_bpb at every evaluation). matplotlib is imported only here, inside the functions, so
the core install does not need it (pip install 'nanomind[plot]'); TensorBoard logs need 'nanomind[logging]'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nanomind.config import arg

Series = dict[str, list[tuple[int, float]]]  # tag -> (step, value), steps ascending


def _figure(width: float, height: float):
    """A matplotlib Figure drawn off-screen (no pyplot, so no GUI backend and no global state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("charts need matplotlib: pip install 'nanomind[plot]' (or --no-chart)") from None
    return Figure(figsize=(width, height), layout="constrained")


def bar_chart(
    cols: list[str], rows: list[str], values: list[list[float | None]], chance: list[float | None], metric: str,
    path: str | Path,
) -> None:  # fmt: skip
    """Horizontal grouped bars: one group per row (top to bottom), one bar per column; chance as a black tick."""
    scale = 100.0 if metric == "accuracy" else 1.0
    group = 0.8
    fig = _figure(8.0, 0.9 + len(rows) * (0.1 + 0.13 * len(cols)))
    ax = fig.subplots()
    h = group / len(cols)
    for j, col in enumerate(cols):
        ys = [i - group / 2 + h * (j + 0.5) for i in range(len(rows))]
        xs = [(v[j] or 0.0) * scale for v in values]
        bars = ax.barh(ys, xs, height=h * 0.9, label=col, color=f"C{j}")
        ax.bar_label(bars, ["" if v[j] is None else f"{v[j] * scale:.{1 if scale > 1 else 2}f}" for v in values],
                     padding=2, fontsize=7)  # fmt: skip
    ticks = [(i, c * scale) for i, c in enumerate(chance) if c is not None]
    if ticks:
        ax.scatter([c for _, c in ticks], [i for i, _ in ticks], marker="|", s=400 * group, color="black",
                   zorder=3, label="chance")  # fmt: skip
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first row (overall) on top
    ax.set_xlabel("accuracy (%)" if metric == "accuracy" else "bits per byte (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(cols) + 1, 3), frameon=False, fontsize=9)
    fig.savefig(path, dpi=80)


def read_scalars(run_dir: str | Path) -> Series:
    """Every scalar of a run's TensorBoard logs (RUN/tb, or RUN itself when it holds the event files).
    A step logged twice (a run resumed from an earlier checkpoint) keeps its last value."""
    run = Path(run_dir)
    tb = run / "tb" if (run / "tb").is_dir() else run
    if not any(tb.glob("events.out.tfevents.*")):
        raise ValueError(f"{run}: no TensorBoard logs in {tb} (runs write them with --tensorboard, the default)")
    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
    except ImportError:
        raise ValueError("reading training logs needs tensorboard: pip install 'nanomind[logging]'") from None
    acc = ea.EventAccumulator(str(tb), size_guidance={ea.SCALARS: 0})  # 0 = keep every point
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        out[tag] = sorted(by_step.items())
    return out


def smoothed(values: list[float], weight: float) -> list[float]:
    """TensorBoard's exponential moving average, debiased so that the first points are not pulled to zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight else v)
    return out


def curves_chart(runs: dict[str, Series], path: str | Path, smooth: float = 0.6) -> None:
    """Loss (train, smoothed, and validation) and validation bits per byte against the step."""
    panels = [("loss (nats/token)", ["train/loss", "val/val_loss"]), ("validation bits per byte", ["val/val_bpb"])]
    panels = [(t, tags) for t, tags in panels if any(tag in s for s in runs.values() for tag in tags)]
    if not panels:
        raise ValueError(f"no train/loss or val/* scalars in the logs of {', '.join(runs)}")
    fig = _figure(5.0 * len(panels), 3.6)
    for ax, (title, tags) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for j, (name, series) in enumerate(runs.items()):
            for tag in tags:
                if tag not in series:
                    continue
                steps, values = zip(*series[tag])
                label = (f"{name} " if len(runs) > 1 else "") + ("train" if tag == "train/loss" else "validation")
                if tag == "train/loss":
                    if smooth:  # the raw curve faintly behind the smoothed one, as TensorBoard draws it
                        ax.plot(steps, values, color=f"C{j}", alpha=0.2, linewidth=0.8)
                    ax.plot(steps, smoothed(list(values), smooth), color=f"C{j}", label=label)
                else:
                    ax.plot(steps, values, "--o" if tag == "val/val_loss" else "-o", color=f"C{j}", markersize=3,
                            label=label)  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.savefig(path, dpi=80)


@dataclass
class PlotConfig:
    runs: list[str] = arg(help="run directories with TensorBoard logs in tb/ (also accepted as positional arguments)")
    out: str = arg("", "PNG file to write (empty: RUN/curves.png for one run; needed for several)")
    smooth: float = arg(0.6, "exponential smoothing of the train loss, as TensorBoard's slider (0 = none)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.smooth < 1.0:
            raise ValueError(f"--smooth must be in [0, 1), got {self.smooth}")
        if len(self.runs) > 1 and not self.out:
            raise ValueError("--out FILE.png is needed when plotting several runs")


def main(argv: list[str] | None = None) -> None:
    from nanomind.config import parse
    from nanomind.report import positional

    cfg = parse(PlotConfig, positional(argv, "--runs"), "nanomind plot", __doc__.splitlines()[0])
    runs: dict[str, Series] = {}
    for run in cfg.runs:
        name = Path(run).resolve().name
        runs[name if name not in runs else str(run)] = read_scalars(run)
    out = cfg.out or str(Path(cfg.runs[0]) / "curves.png")
    curves_chart(runs, out, cfg.smooth)
    print(f"written: {out}")
