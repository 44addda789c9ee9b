"""What a run reports: the headline (best fusedopt backend vs the best peer) and the CPU targets, the console
and Markdown tables, results.md and results.json."""

from __future__ import annotations

import json
import math
from typing import Dict, List, Optional

import torch

from fusedopt.bench.models import MODEL_NAMES
from fusedopt.bench.stats import paired_ratio


# ----------------------------------------------------------------------------------------------------------
# Headline and targets
# ----------------------------------------------------------------------------------------------------------

BEST = "best peer"
# The CPU targets of the issue: (rule, dtype, scenario, peer or BEST, minimum ratio, label).
CPU_TARGETS = [
    ("adamw", "float32", "step", "torch fused", 1.0, "FusedAdamW >= 1.0x torch fused AdamW"),
    ("adamw", "float32", "step", "torch foreach", 4.0, "FusedAdamW >= 4x torch foreach AdamW"),
    ("adamw", "float32", "full", BEST, 1.2, "AdamW full step >= 1.2x torch's fastest full step"),
    ("sgd", "float32", "full", BEST, 1.2, "SGD full step >= 1.2x torch's fastest full step"),
    ("lion", "float32", "full", BEST, 1.2, "Lion full step >= 1.2x the fastest peer full step"),
    ("sgd", "float32", "step", "torch fused", 1.0, "FusedSGD (Nesterov) >= 1.0x torch fused SGD"),
    ("lion", "float32", "step", "lion-pytorch", 4.0, "FusedLion >= 4x lion-pytorch"),
    ("adamw", "bf16-master", "step", "torch fused +master", 1.25,
     "bf16+master AdamW (one pass) >= 1.25x torch fused on fp32 master + grad and param copies"),
    ("adamw", "bf16-master", "step", BEST, 1.25,
     "bf16+master AdamW (one pass) >= 1.25x the best peer (incl. the fp32-grads variant)"),
]


def group_key(e: dict) -> tuple:
    return (e["model"], e["rule"], e["dtype"], e["scenario"])


def best_fusedopt(entries: List[dict]) -> Optional[dict]:
    ours = [e for e in entries if e["kind"] == "fusedopt" and e["status"] == "ok"]
    return min(ours, key=lambda e: e["median_s"]) if ours else None


def headline(results: List[dict]) -> List[dict]:
    groups: Dict[tuple, List[dict]] = {}
    for e in results:
        groups.setdefault(group_key(e), []).append(e)
    out = []
    for key, entries in groups.items():
        ours = best_fusedopt(entries)
        peers = [e for e in entries if e["kind"] == "peer" and e["status"] == "ok"]
        if ours is None or not peers:
            continue
        best = min(peers, key=lambda e: e["median_s"])
        pr = paired_ratio(ours, best)
        out.append(dict(model=key[0], rule=key[1], dtype=key[2], scenario=key[3], fusedopt=ours["contender"],
                        best_peer=best["contender"], ratio=pr["ratio"], round_q1=pr["round_q1"],
                        round_q3=pr["round_q3"], fusedopt_bw_fraction=ours.get("bw_fraction"),
                        best_peer_bw_fraction=best.get("bw_fraction")))
    return out


QUICK_NOT_JUDGED = ("not judged in --quick mode: the scaled-down shapes fit in the caches and are dominated by "
                    "per-call overheads; the targets are for the full-size models")


def evaluate_targets(results: List[dict], device: torch.device, quick: bool = False) -> List[dict]:
    """The CPU targets (CPU_TARGETS) for every model measured: the ratio of the best fusedopt backend to the
    named peer (or the best peer). A target is judged (``met`` True / False) only where it is meant to hold: on
    CPU, at the full-size shapes. With ``quick`` the rows carry the ratios with ``judged`` False and ``met`` None.
    Empty on other devices (the GPU targets are not encoded)."""
    if device.type != "cpu":
        return []
    groups: Dict[tuple, List[dict]] = {}
    for e in results:
        groups.setdefault(group_key(e), []).append(e)
    models = ordered_models(results)
    out = []
    for rule, dtype, scenario, peer, minimum, label in CPU_TARGETS:
        for model in models:
            entries = groups.get((model, rule, dtype, scenario))
            if not entries:
                continue
            ours = best_fusedopt(entries)
            peers = [e for e in entries if e["kind"] == "peer" and e["status"] == "ok"]
            if peer == BEST:
                other = min(peers, key=lambda e: e["median_s"]) if peers else None
            else:
                other = next((e for e in peers if e["contender"] == peer), None)
            if ours is None or other is None:
                continue
            pr = paired_ratio(ours, other)
            out.append(dict(target=label, model=model, rule=rule, dtype=dtype, scenario=scenario,
                            fusedopt=ours["contender"], peer=other["contender"], minimum=minimum,
                            ratio=pr["ratio"], round_q1=pr["round_q1"], round_q3=pr["round_q3"],
                            judged=not quick, met=None if quick else pr["ratio"] >= minimum))
    return out


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def group_rows(entries: List[dict]) -> List[List[str]]:
    rows = []
    for e in sorted(entries, key=lambda e: ({"fusedopt": 0, "peer": 1, "stream": 2}[e["kind"]],
                                            e.get("median_s", math.inf))):
        if e["status"] != "ok":
            rows.append([e["contender"], "error", "", "", "", "", "", "", e.get("error", "")[:60]])
            continue
        rows.append([
            e["contender"],
            _fmt_time(e["median_s"]),
            f"{_fmt_time(e['q1_s'])} - {_fmt_time(e['q3_s'])}",
            f"{e['steps_per_s']:.2f}",
            f"{e['params_per_s'] / 1e6:.0f}",
            f"{e['gb_per_s']:.1f}",
            _fmt_pct(e.get("bw_fraction")),
            _fmt_ratio(e.get("ratio_vs_best_peer")) if e["kind"] != "stream" else "",
            f"{e['reps']}x{e['inner']}",
        ])
    return rows


HEADER = ["contender", "median/step", "IQR", "steps/s", "Mparams/s", "GB/s", "% bw", "vs best peer", "reps"]


def text_table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x).replace("|", "/") for x in row) + " |" for row in rows]
    return "\n".join(lines)


def group_title(e: dict) -> str:
    return (f"{e['model']} ({e['numel'] / 1e6:.1f}M params, {e['num_tensors']} tensors) - {e['rule']} "
            f"{e['dtype']} {e['scenario']} ({e['bytes_per_param']} B/param)")


def headline_rows(head: List[dict]) -> List[List[str]]:
    return [[h["model"], h["rule"], h["dtype"], h["scenario"], h["fusedopt"], h["best_peer"],
             f"{h['ratio']:.2f}x", f"{h['round_q1']:.2f} - {h['round_q3']:.2f}", _fmt_pct(h["fusedopt_bw_fraction"]),
             _fmt_pct(h["best_peer_bw_fraction"])] for h in head]


HEADLINE_HEADER = ["model", "rule", "dtype", "scenario", "fusedopt", "best peer", "ratio", "per-round IQR",
                   "fusedopt % bw", "peer % bw"]
TARGET_HEADER = ["target", "model", "vs", "ratio", "per-round IQR", "met"]


def target_rows(targets: List[dict]) -> List[List[str]]:
    return [[t["target"], t["model"], t["peer"], f"{t['ratio']:.2f}x (>= {t['minimum']}x)",
             f"{t['round_q1']:.2f} - {t['round_q3']:.2f}",
             "not judged (quick)" if t["met"] is None else ("yes" if t["met"] else "NO")] for t in targets]


def ordered_models(results: List[dict]) -> List[str]:
    return sorted({e["model"] for e in results}, key=lambda m: MODEL_NAMES.index(m) if m in MODEL_NAMES else 99)


def summary(data: dict) -> str:
    """The console summary: one row per (rule, dtype, scenario), one column per model, each cell the ratio of
    the best fusedopt backend to the best peer; then where the targets stand. The per-contender tables are in
    results.md (and on the console with --verbose)."""
    head = data["headline"]
    models = ordered_models(head)
    cells: Dict[tuple, Dict[str, str]] = {}
    for h in head:
        cells.setdefault((h["rule"], h["dtype"], h["scenario"]), {})[h["model"]] = f"{h['ratio']:.2f}x"
    rows = [[" ".join(key)] + [row.get(m, "-") for m in models] for key, row in cells.items()]
    lines = ["Best fusedopt backend vs the best peer (median step time of the peer / of fusedopt; > 1: fusedopt "
             "faster)", text_table(["rule dtype scenario"] + models, rows)]
    targets = data["targets"]
    if targets and all(t["met"] is None for t in targets):
        lines += ["", f"Targets: {QUICK_NOT_JUDGED}."]
    elif targets:
        missed = [t for t in targets if t["met"] is False]
        lines += ["", f"Targets: {len(targets) - len(missed)} of {len(targets)} met" + ("; missed:" if missed else "")]
        lines += [f"  {t['target']} on {t['model']}: {t['ratio']:.2f}x (per-round IQR {t['round_q1']:.2f} - "
                  f"{t['round_q3']:.2f})" for t in missed]
    return "\n".join(lines)


def write_markdown(path: str, data: dict) -> None:
    meta = data["meta"]
    lines = [f"# fusedopt benchmark - {meta['device_name']} ({meta['date']})", ""]
    lines.append(f"torch {meta['torch']}, fusedopt {meta['fusedopt']}, {meta['threads']} threads, "
                 f"{'quick mode (scaled-down shapes)' if meta['quick'] else 'full-size shapes'}; "
                 f"command: `{meta['command']}`")
    lines.append("")
    if meta.get("skipped"):
        lines.append("Not measured: " + "; ".join(f"{k}: {v}" for k, v in sorted(meta["skipped"].items())))
        lines.append("")
    lines += ["## Headline: best fusedopt backend vs the best peer", "",
              "Ratio = median step time of the best peer / median step time of fusedopt (> 1: fusedopt faster); "
              "per-round IQR = quartiles of the ratios of paired rounds.", "",
              md_table(HEADLINE_HEADER, headline_rows(data["headline"])), ""]
    if data["targets"]:
        lines += ["## Targets", ""]
        if any(t["met"] is None for t in data["targets"]):
            lines += [f"Ratios only, {QUICK_NOT_JUDGED}.", ""]
        lines += [md_table(TARGET_HEADER, target_rows(data["targets"])), ""]
    lines += ["## All measurements", "",
              "Median / IQR of the time per step over the repetitions (reps x steps per repetition); GB/s from the "
              "bytes-per-parameter model (see `python -m fusedopt.bench --help`); % bw: against the in-place stream "
              "with the same reads and writes, measured in the same rounds. Above 100%: the reference is torch's own "
              "in-place ops, one per pair of arrays, and a fused pass over 3-4 arrays keeps more memory streams in "
              "flight than such an op, so it can beat it.", ""]
    groups: Dict[tuple, List[dict]] = {}
    for e in data["results"]:
        groups.setdefault(group_key(e), []).append(e)
    for key, entries in groups.items():
        lines += [f"### {group_title(entries[0])}", "", md_table(HEADER, group_rows(entries)), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
