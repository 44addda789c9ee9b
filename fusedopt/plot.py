"""python -m fusedopt.plot: draw schedule tables (lr factor and momentum against step) or a benchmark result.

    python -m fusedopt.plot --schedules one_cycle,warmup_cosine --steps 1000 --out schedules.png
    python -m fusedopt.plot --bench benchmarks/results/2026-11-23-cpu/results.json --out results.png

Schedules are drawn on the same axes: the lr factor of each (solid, left axis; with --lr the absolute lr)
and its momentum / beta1 where the table carries one (dashed, right axis). Each schedule is built by its
builder's name with arguments derived from --steps (warmup: 10% of the steps unless --warmup is given).

A benchmark result (the results.json that python -m fusedopt.bench writes) is drawn as params/s per model and
contender, one panel per rule, dtype and scenario, with the memory-bandwidth reference measured in the same run.

Needs matplotlib (pip install "fusedopt[plot]"); it is imported only when something is drawn, with the Agg
backend (no display needed). Exit status: 0 drawn, 1 matplotlib missing or the file could not be written,
2 bad arguments or an unreadable --bench file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Union

from fusedopt import schedules
from fusedopt._extras import MissingDependency, require

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
    """matplotlib.pyplot on the Agg backend; MissingDependency (an ImportError saying what to pip install)
    when matplotlib is not installed."""
    matplotlib = require("matplotlib", "drawing plots (fusedopt.plot)")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "drawing plots (fusedopt.plot)")


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

    Raises:
        ValueError: an unknown builder name, ``steps`` < 2, or no schedule.
        fusedopt._extras.MissingDependency: matplotlib is not installed (an ImportError).
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


BANDWIDTH_LABEL = "memory bandwidth reference (in-place stream, same bytes)"
BANDWIDTH_NOTE = ("Dashed black: the params/s that torch's own in-place ops reach when they move the same bytes per param "
                  "as the rule (one op per pair of arrays), timed in the same rounds.\nA fused pass over 3-4 arrays keeps "
                  "more memory streams in flight than a two-array op, so it can run above this line (\"% bw\" > 100%).")


# Contenders python -m fusedopt.bench knows, in the order their colors are handed out, so that a contender has
# the same color in every figure (others get the colors left, in name order).
KNOWN_CONTENDERS = ("fusedopt[cpu]", "fusedopt[cuda]", "fusedopt[triton]", "torch for-loop", "torch foreach",
                    "torch fused", "torch for-loop +master", "torch foreach +master", "torch fused +master",
                    "torch fused +master (fp32 grads)", "lion-pytorch", "lion-pytorch +master", "lion-pytorch triton",
                    "lion-pytorch triton +master", "apex", "apex +master", "DeepSpeed FusedAdam",
                    "DeepSpeed FusedAdam +master", "DeepSpeedCPUAdam", "DeepSpeedCPUAdam +master",
                    # the small-state groups (issue 13)
                    "bnb AdamW8bit", "bnb Lion8bit", "bnb SGD8bit", "torchao AdamW8bit", "torchao AdamW4bit",
                    "torchao AdamW bf16 SR", "DeepSpeedCPULion", "DeepSpeed FusedLion", "fusedopt[cpu] fp32 states",
                    "fusedopt[cpu] no SR", "torch fused (fp32 states)", "DeepSpeedCPUAdam (fp32 states)",
                    "DeepSpeedCPUAdam (bf16 states)", "DeepSpeedCPULion (fp32 states)",
                    "DeepSpeedCPULion (bf16 states)")


def _colors(names: List[str], palette: Sequence) -> Dict[str, object]:
    known = {c: i for i, c in enumerate(KNOWN_CONTENDERS)}
    others = sorted(c for c in names if c not in known)
    index = {c: known[c] if c in known else len(KNOWN_CONTENDERS) + others.index(c) for c in names}
    return {c: palette[index[c] % len(palette)] for c in names}


def _count(n: int) -> str:
    """124439808 -> '124.4M', 4500 -> '4.5k'."""
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _ordered_models(entries: List[dict]) -> List[tuple]:
    """(numel, model) of the models in ``entries``, smallest first."""
    return sorted({(e["numel"], e["model"]) for e in entries})


def plot_benchmark(data: Union[dict, str], path: Optional[str]):
    """Params/s of each contender for each model (a categorical axis: the models are separate lists of tensors,
    not points on a size scale), one panel per (rule, dtype, scenario), with the bandwidth reference of each
    model (stream GB/s / bytes per param) as a dashed black bar across its slot.

    Args:
        data: the dict that ``python -m fusedopt.bench`` writes to results.json, or that file's path.
        path: where to save the figure (PNG, or any format matplotlib knows by the extension); None: not saved.

    Returns the matplotlib figure. Error bars: the interquartile range of the per-step time, as params/s.

    Raises:
        OSError / ValueError: ``data`` is a path that cannot be read or is not JSON.
        KeyError: the dict has no "results".
        fusedopt._extras.MissingDependency: matplotlib is not installed (an ImportError).
    """
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
    names = sorted({e["contender"] for e in results if e["kind"] != "stream"},
                   key=lambda c: (not c.startswith("fusedopt"), c))
    color_of = _colors(names, plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors)
    legend_rows = math.ceil((len(names) + 1) / 4)
    legend_inches = 0.3 * legend_rows + 0.8  # the shared legend and the bandwidth note under the panels
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.3 * rows + legend_inches), squeeze=False)
    handles: Dict[str, object] = {}
    for ax, (key, entries) in zip(axes.flat, panels.items()):
        models = _ordered_models(entries)
        slot = {m[1]: i for i, m in enumerate(models)}
        here = [c for c in names if any(e["contender"] == c for e in entries)]
        width = 0.8 / max(len(here), 1)
        for j, contender in enumerate(here):
            pts = [e for e in entries if e["contender"] == contender]
            xs = [slot[e["model"]] - 0.4 + width * (j + 0.5) for e in pts]
            ys = [e["params_per_s"] for e in pts]
            lo = [e["numel"] / e["q3_s"] for e in pts]
            hi = [e["numel"] / e["q1_s"] for e in pts]
            err = [[max(y - a, 0) for y, a in zip(ys, lo)], [max(b - y, 0) for y, b in zip(ys, hi)]]
            ours = contender.startswith("fusedopt")
            handles[contender] = ax.errorbar(xs, ys, yerr=err, fmt="o" if ours else "s", ms=8 if ours else 6,
                                             capsize=2, color=color_of[contender], label=contender,
                                             markeredgecolor="black" if ours else color_of[contender])
        for e in entries:
            if e["kind"] == "stream":
                i = slot[e["model"]]
                (handles[BANDWIDTH_LABEL],) = ax.plot([i - 0.45, i + 0.45], [e["gb_per_s"] * 1e9 / e["bytes_per_param"]] * 2,
                                                      "k--", lw=1.6, label=BANDWIDTH_LABEL)
        ax.set_yscale("log")
        ax.set_xlim(-0.5, len(models) - 0.5)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([f"{m[1]}\n({_count(m[0])} params)" for m in models], fontsize=9)
        for i in range(1, len(models)):
            ax.axvline(i - 0.5, color="0.85", lw=0.8)  # separate the models' slots
        rule, dtype, scenario = key
        ax.set_title(f"{rule} {dtype} {scenario} ({entries[0]['bytes_per_param']} B/param)", fontsize=11)
        ax.set_xlabel("model (parameter list)", fontsize=9)
        ax.set_ylabel("params / s (log scale; higher is faster)", fontsize=9)
        ax.grid(alpha=0.3, which="both", axis="y")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    order = [c for c in names if c in handles] + ([BANDWIDTH_LABEL] if BANDWIDTH_LABEL in handles else [])
    bottom = legend_inches / fig.get_figheight()
    if order:
        fig.legend([handles[c] for c in order], order, loc="lower center", ncol=min(4, len(order)), fontsize=10,
                   frameon=False, bbox_to_anchor=(0.5, 0.5 / fig.get_figheight()))
    if BANDWIDTH_LABEL in handles:
        fig.text(0.5, 0.1 / fig.get_figheight(), BANDWIDTH_NOTE, ha="center", va="bottom", fontsize=9,
                 color="0.25")
    meta = data.get("meta", {})
    fig.suptitle(f"fusedopt.bench: {meta.get('device_name', '')} {meta.get('date', '')}"
                 f"{' (quick: scaled-down shapes)' if meta.get('quick') else ''}", fontsize=12)
    # leave the top 0.45 inch to the title and the bottom to the legend and the note
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.45 / fig.get_figheight()))
    if path:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def _writable(path: str) -> Optional[str]:
    """Why ``path`` cannot be written (its folder is missing or read-only), or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"cannot write {path}: the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"cannot write {path}: no permission to write in {folder}"
    if os.path.isdir(path):
        return f"cannot write {path}: it is a folder"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedopt.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedules", default=None, metavar="NAMES",
                   help=f"comma list of schedule builders: {', '.join(SCHEDULE_NAMES)}")
    p.add_argument("--steps", type=int, default=1000, metavar="N", help="steps to draw (and the schedules' length)")
    p.add_argument("--warmup", type=int, default=None, metavar="N", help="warmup steps (default 10%% of --steps)")
    p.add_argument("--lr", type=float, default=1.0, metavar="LR", help="peak lr: draw absolute lrs instead of factors")
    p.add_argument("--bench", default=None, metavar="RESULTS_JSON", help="a results.json of python -m fusedopt.bench to plot instead")
    p.add_argument("--out", required=True, metavar="PATH", help="the image to write (PNG; the extension picks the format)")
    args = p.parse_args(argv)
    if (args.schedules is None) == (args.bench is None):
        p.error("give exactly one of --schedules or --bench")
    problem = _writable(args.out)
    if problem:
        print(f"fusedopt.plot: {problem}", file=sys.stderr)
        return 1
    try:
        if args.bench:
            try:
                with open(args.bench) as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                print(f"fusedopt.plot: cannot read --bench {args.bench}: {e}", file=sys.stderr)
                return 2
            if not isinstance(data, dict) or "results" not in data:
                print(f"fusedopt.plot: --bench {args.bench} is not a results.json of python -m fusedopt.bench "
                      f"(no \"results\")", file=sys.stderr)
                return 2
            plot_benchmark(data, args.out)
        else:
            names = [n.strip() for n in args.schedules.split(",") if n.strip()]
            plot_schedules(names, args.steps, args.out, lr=args.lr, warmup=args.warmup)
    except MissingDependency as e:
        print(f"fusedopt.plot: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # an unknown schedule, too few steps, an image format matplotlib does not know
        print(f"fusedopt.plot: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk is full, the file is locked, ...
        print(f"fusedopt.plot: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
