"""`python -m fusedopt.plot`: draw schedule tables (lr factor and momentum against step) or a benchmark result.

    python -m fusedopt.plot --schedules one_cycle,warmup_cosine --steps 1000 --out schedules.png
    python -m fusedopt.plot --bench benchmarks/results/2026-11-23-cpu/results.json --out results.png

Schedules are drawn on the same axes: the lr factor of each (solid, left axis; with ``--lr`` the absolute lr)
and its momentum / beta1 where the table carries one (dashed, right axis). Schedules are built by name with
arguments derived from ``--steps`` (warmup 10% of the steps unless ``--warmup``); see :func:`build_schedule`.

matplotlib is imported only when something is drawn (with the Agg backend: no display needed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Dict, List, Optional, Sequence, Union

from fusedopt import schedules

SCHEDULE_NAMES = ("constant", "linear_warmup", "warmup_cosine", "warmup_linear", "one_cycle", "step_decay",
                  "exponential", "polynomial", "warmup_stable_decay", "cosine_restarts")


def build_schedule(name: str, steps: int, warmup: Optional[int] = None) -> schedules.ScheduleTable:
    """A schedule of about ``steps`` steps by builder name, with typical arguments for a plot."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    w = max(0, min(steps // 10 if warmup is None else warmup, steps - 1))
    if name == "constant":
        return schedules.constant(steps)
    if name == "linear_warmup":
        return schedules.linear_warmup(w)  # holds its last entry (1) after the warmup
    if name == "warmup_cosine":
        return schedules.warmup_cosine(steps, w)
    if name == "warmup_linear":
        return schedules.warmup_linear(steps, w)
    if name == "one_cycle":
        return schedules.one_cycle(steps)
    if name == "step_decay":
        return schedules.step_decay(max(1, steps // 3), 0.1, total_steps=steps)
    if name == "exponential":
        return schedules.exponential(0.01 ** (1.0 / steps), steps)
    if name == "polynomial":
        return schedules.polynomial(steps, power=2.0)
    if name == "warmup_stable_decay":
        return schedules.warmup_stable_decay(steps, w, max(1, (steps - w) // 5))
    if name == "cosine_restarts":
        return schedules.cosine_restarts(max(1, steps // 4), 1, total_steps=steps)
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULE_NAMES)}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _values(table: schedules.ScheduleTable, steps: int, what: str) -> Optional[List[float]]:
    if what == "momentum" and table.momentum is None:
        return None
    at = table.lr_at if what == "lr" else table.momentum_at
    return [at(t) for t in range(steps)]


def plot_schedules(tables: Union[Sequence[str], Dict[str, schedules.ScheduleTable]], steps: int, path: Optional[str],
                   *, lr: float = 1.0, warmup: Optional[int] = None, title: Optional[str] = None):
    """Plot lr (x ``lr``) and momentum of each schedule for steps 0..steps-1 on one pair of axes.

    ``tables``: builder names (see :data:`SCHEDULE_NAMES`) or a ``{label: ScheduleTable}`` dict.
    Saves a PNG to ``path`` when given; returns the matplotlib figure.
    """
    if not isinstance(tables, dict):
        tables = {name: build_schedule(name, steps, warmup) for name in tables}
    if not tables:
        raise ValueError("no schedule to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    ax_m = None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x = list(range(steps))
    for i, (label, table) in enumerate(tables.items()):
        color = colors[i % len(colors)]
        ax.plot(x, [lr * v for v in _values(table, steps, "lr")], color=color, lw=1.8, label=f"{label}: lr")
        mom = _values(table, steps, "momentum")
        if mom is not None:
            if ax_m is None:
                ax_m = ax.twinx()
                ax_m.set_ylabel("momentum / beta1 (dashed)")
            ax_m.plot(x, mom, color=color, lw=1.4, ls="--", label=f"{label}: momentum")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("lr" if lr != 1.0 else "lr factor (x group lr)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ax_m is not None:
        h2, l2 = ax_m.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(title or f"fusedopt schedules over {steps} steps")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def plot_benchmark(data: Union[dict, str], path: Optional[str]):
    """Params/s against model size (log-log) per contender, one panel per (rule, dtype, scenario), with the
    measured bandwidth limit (stream GB/s / bytes per param) as a dashed line. ``data``: the dict that
    ``python -m fusedopt.bench`` writes to results.json, or that file's path."""
    if isinstance(data, str):
        with open(data) as f:
            data = json.load(f)
    results = [e for e in data["results"] if e.get("status") == "ok"]
    panels: Dict[tuple, List[dict]] = {}
    for e in results:
        panels.setdefault((e["rule"], e["dtype"], e["scenario"]), []).append(e)
    plt = _pyplot()
    n = max(len(panels), 1)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.6 * rows), squeeze=False)
    names = sorted({e["contender"] for e in results if e["kind"] != "stream"},
                   key=lambda c: (not c.startswith("fusedopt"), c))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of = {c: colors[i % len(colors)] for i, c in enumerate(names)}
    for ax, (key, entries) in zip(axes.flat, panels.items()):
        for contender in names:
            pts = sorted((e for e in entries if e["contender"] == contender), key=lambda e: e["numel"])
            if not pts:
                continue
            xs = [e["numel"] for e in pts]
            ys = [e["params_per_s"] for e in pts]
            lo = [e["numel"] / e["q3_s"] for e in pts]
            hi = [e["numel"] / e["q1_s"] for e in pts]
            err = [[max(y - a, 0) for y, a in zip(ys, lo)], [max(b - y, 0) for y, b in zip(ys, hi)]]
            ours = contender.startswith("fusedopt")
            ax.errorbar(xs, ys, yerr=err, marker="o" if ours else "s", ms=5, lw=2.2 if ours else 1.2,
                        capsize=3, color=color_of[contender], label=contender)
        bw = sorted((e for e in entries if e["kind"] == "stream"), key=lambda e: e["numel"])
        if bw:
            ax.plot([e["numel"] for e in bw], [e["gb_per_s"] * 1e9 / e["bytes_per_param"] for e in bw], "k--", lw=1.2,
                    marker="_", ms=16, label="memory bandwidth (stream)")  # the marker shows a one-model run
        ax.set_xscale("log")
        ax.set_yscale("log")
        models = sorted({(e["numel"], e["model"]) for e in entries})
        ax.set_xticks([m[0] for m in models])
        ax.set_xticklabels([f"{m[1]}\n{m[0] / 1e6:.1f}M" for m in models], fontsize=7)
        ax.minorticks_off()
        rule, dtype, scenario = key
        ax.set_title(f"{rule} {dtype} {scenario} ({entries[0]['bytes_per_param']} B/param)", fontsize=10)
        ax.set_ylabel("params / s")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    meta = data.get("meta", {})
    fig.suptitle(f"fusedopt.bench: {meta.get('device_name', '')} {meta.get('date', '')}"
                 f"{' (quick)' if meta.get('quick') else ''}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # leave the top 0.45 inch to the title
    if path:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedopt.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedules", default=None,
                   help=f"comma list of schedule builders: {', '.join(SCHEDULE_NAMES)}")
    p.add_argument("--steps", type=int, default=1000, help="steps to draw (and the schedules' length)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%% of --steps)")
    p.add_argument("--lr", type=float, default=1.0, help="peak lr: draw absolute lrs instead of factors")
    p.add_argument("--bench", default=None, help="a results.json of python -m fusedopt.bench to plot instead")
    p.add_argument("--out", required=True, help="PNG path")
    args = p.parse_args(argv)
    if (args.schedules is None) == (args.bench is None):
        p.error("give exactly one of --schedules or --bench")
    try:
        if args.bench:
            plot_benchmark(args.bench, args.out)
        else:
            names = [n.strip() for n in args.schedules.split(",") if n.strip()]
            plot_schedules(names, args.steps, args.out, lr=args.lr, warmup=args.warmup)
    except ValueError as e:
        print(f"fusedopt.plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
