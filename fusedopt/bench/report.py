"""What a run reports: the headline (best fusedopt backend vs the best peer) and the CPU targets, the console
and Markdown tables, results.md and results.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from fusedopt.bench.models import MODEL_NAMES
from fusedopt.bench.stats import paired_ratio


# ----------------------------------------------------------------------------------------------------------
# Headline and targets
# ----------------------------------------------------------------------------------------------------------

BEST = "best peer"
# the issue-13 targets are stated for GPT-2-small shapes (and hold for larger ones)
GPT2 = ("gpt2-small", "gpt2-medium")


@dataclass(frozen=True)
class Target:
    """One CPU target of the project's benchmark issues, judged on one group (rule, dtype, scenario).

    measure "ratio": the median step time of ``versus`` over that of the best fusedopt backend, >= minimum.
        ``versus`` is a contender name, BEST (the fastest peer) or a name with "{fusedopt}" standing for the best
        fusedopt backend's name (e.g. "{fusedopt} fp32 states": the same backend's float32-state reference).
    measure "bw": the best fusedopt backend's fraction of the in-place stream's bandwidth, >= minimum.
    measure "state": the state bytes per param that fusedopt's optimizer holds (measured from its state
        tensors), <= maximum.
    ``models``: where it is judged (None: every model measured)."""

    rule: str
    dtype: str
    scenario: str
    label: str
    measure: str = "ratio"
    versus: Optional[str] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    models: Optional[Tuple[str, ...]] = None


CPU_TARGETS = [
    Target("adamw", "float32", "step", "FusedAdamW >= 1.0x torch fused AdamW", versus="torch fused", minimum=1.0),
    Target("adamw", "float32", "step", "FusedAdamW >= 4x torch foreach AdamW", versus="torch foreach", minimum=4.0),
    Target("adamw", "float32", "full", "AdamW full step >= 1.2x torch's fastest full step", versus=BEST, minimum=1.2),
    Target("sgd", "float32", "full", "SGD full step >= 1.2x torch's fastest full step", versus=BEST, minimum=1.2),
    Target("lion", "float32", "full", "Lion full step >= 1.2x the fastest peer full step", versus=BEST, minimum=1.2),
    Target("sgd", "float32", "step", "FusedSGD (Nesterov) >= 1.0x torch fused SGD", versus="torch fused", minimum=1.0),
    Target("lion", "float32", "step", "FusedLion >= 4x lion-pytorch", versus="lion-pytorch", minimum=4.0),
    Target("adamw", "bf16-master", "step",
           "bf16+master AdamW (one pass) >= 1.25x torch fused on fp32 master + grad and param copies",
           versus="torch fused +master", minimum=1.25),
    Target("adamw", "bf16-master", "step",
           "bf16+master AdamW (one pass) >= 1.25x the best peer (incl. the fp32-grads variant)", versus=BEST,
           minimum=1.25),
    # issue 13: small optimizer state
    Target("adamw", "8bit", "step", "8-bit AdamW >= 1.5x torch fused fp32 AdamW", versus="torch fused (fp32 states)",
           minimum=1.5, models=GPT2),
    Target("adamw", "8bit", "step", "8-bit AdamW >= 20x bitsandbytes AdamW8bit", versus="bnb AdamW8bit",
           minimum=20.0, models=GPT2),
    Target("adamw", "8bit", "step", "8-bit AdamW >= 20x torchao AdamW8bit", versus="torchao AdamW8bit",
           minimum=20.0, models=GPT2),
    Target("lion", "8bit", "step", "8-bit Lion >= 1.3x fusedopt fp32 Lion", versus="{fusedopt} fp32 states",
           minimum=1.3, models=GPT2),
    Target("adamw", "8bit", "step", "8-bit AdamW state <= 2.05 B/param", measure="state", maximum=2.05, models=GPT2),
    Target("lion", "8bit", "step", "8-bit Lion state <= 1.05 B/param", measure="state", maximum=1.05, models=GPT2),
    Target("sgd", "8bit", "step", "8-bit SGD momentum state <= 1.05 B/param", measure="state", maximum=1.05,
           models=GPT2),
] + [Target(rule, "bf16", "step", f"bf16 params without master weights, {rule}: >= 90% of the in-place stream",
            measure="bw", minimum=0.9, models=GPT2) for rule in ("adamw", "sgd", "lion")]


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


def _not_measured(entries: List[dict], what: str) -> str:
    why = next((e.get("reason") or e.get("error") for e in entries
                if e["kind"] == "fusedopt" and e["status"] != "ok"), None)
    return f"not measured: {why}" if why else f"not measured: {what} not in this run"


def _judge_one(t: Target, model: str, entries: List[dict], quick: bool) -> dict:
    row = dict(target=t.label, model=model, rule=t.rule, dtype=t.dtype, scenario=t.scenario, measure=t.measure,
               minimum=t.minimum, maximum=t.maximum, peer=None, fusedopt=None, value=None, ratio=None,
               round_q1=None, round_q3=None, judged=False, met=None, note="")
    ours = best_fusedopt(entries)
    if ours is None:
        row["note"] = _not_measured(entries, "fusedopt")
        return row
    row["fusedopt"] = ours["contender"]
    if t.measure == "ratio":
        others = [e for e in entries if e["status"] == "ok" and e["kind"] in ("peer", "reference")]
        if t.versus == BEST:
            peers = [e for e in others if e["kind"] == "peer"]
            other = min(peers, key=lambda e: e["median_s"]) if peers else None
            wanted = "a peer"
        else:
            wanted = t.versus.format(fusedopt=ours["contender"])
            other = next((e for e in others if e["contender"] == wanted), None)
        if other is None:
            row["note"] = f"not measured: {wanted} not in this run"
            return row
        pr = paired_ratio(ours, other)
        row.update(peer=other["contender"], value=pr["ratio"], ratio=pr["ratio"], round_q1=pr["round_q1"],
                   round_q3=pr["round_q3"])
        ok = pr["ratio"] >= t.minimum
    elif t.measure == "bw":
        if ours.get("bw_fraction") is None:
            row["note"] = "not measured: no bandwidth stream in this run"
            return row
        row.update(peer="bandwidth (stream)", value=ours["bw_fraction"])
        ok = ours["bw_fraction"] >= t.minimum
    else:
        if ours.get("state_bytes_per_param") is None:
            row["note"] = "not measured: the optimizer's state was not readable"
            return row
        row.update(value=ours["state_bytes_per_param"])
        ok = ours["state_bytes_per_param"] <= t.maximum
    row.update(judged=not quick, met=None if quick else ok)
    return row


def evaluate_targets(results: List[dict], device: torch.device, quick: bool = False) -> List[dict]:
    """The CPU targets (CPU_TARGETS) for every model measured (and named in the target's ``models``): the ratio
    of the best fusedopt backend to the named contender, its fraction of the bandwidth, or its state bytes per
    param. A target is judged (``met`` True / False) only where it is meant to hold: on CPU, at the full-size
    shapes. With ``quick`` the rows carry the figures with ``judged`` False and ``met`` None; a group that ran
    without the figure (fusedopt's contender skipped, e.g. a feature this build lacks, or the named peer absent)
    gives a row with ``met`` None and the reason in ``note``. Empty on other devices (the GPU targets are not
    encoded)."""
    if device.type != "cpu":
        return []
    groups: Dict[tuple, List[dict]] = {}
    for e in results:
        groups.setdefault(group_key(e), []).append(e)
    models = ordered_models(results)
    out = []
    for t in CPU_TARGETS:
        for model in models:
            entries = groups.get((model, t.rule, t.dtype, t.scenario))
            if not entries or (t.models is not None and model not in t.models):
                continue
            out.append(_judge_one(t, model, entries, quick))
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


def _fmt_bytes(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


KIND_ORDER = {"fusedopt": 0, "peer": 1, "reference": 2, "stream": 3}


def group_rows(entries: List[dict]) -> List[List[str]]:
    rows = []
    for e in sorted(entries, key=lambda e: (e["status"] != "ok", KIND_ORDER.get(e["kind"], 9),
                                            e.get("median_s", math.inf))):
        if e["status"] == "skipped":
            rows.append([e["contender"], "skipped", "", "", "", "", "", "", "", e.get("reason", "")[:90]])
            continue
        if e["status"] != "ok":
            rows.append([e["contender"], "error", "", "", "", "", "", "", "", e.get("error", "")[:90]])
            continue
        rows.append([
            e["contender"] + (" (ref)" if e["kind"] == "reference" else ""),
            _fmt_time(e["median_s"]),
            f"{_fmt_time(e['q1_s'])} - {_fmt_time(e['q3_s'])}",
            f"{e['steps_per_s']:.2f}",
            f"{e['params_per_s'] / 1e6:.0f}",
            f"{e['gb_per_s']:.1f}",
            _fmt_pct(e.get("bw_fraction")),
            _fmt_ratio(e.get("ratio_vs_best_peer")) if e["kind"] != "stream" else "",
            _fmt_bytes(e.get("state_bytes_per_param")),
            f"{e['reps']}x{e['inner']}",
        ])
    return rows


HEADER = ["contender", "median/step", "IQR", "steps/s", "Mparams/s", "GB/s", "% bw", "vs best peer", "state B/param",
          "reps"]


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
    state = f", state {e['state_bytes_model']:g} B/param" if e.get("state_bytes_model") is not None else ""
    return (f"{e['model']} ({e['numel'] / 1e6:.1f}M params, {e['num_tensors']} tensors) - {e['rule']} "
            f"{e['dtype']} {e['scenario']} ({e['bytes_per_param']:g} B/param moved{state})")


def headline_rows(head: List[dict]) -> List[List[str]]:
    return [[h["model"], h["rule"], h["dtype"], h["scenario"], h["fusedopt"], h["best_peer"],
             f"{h['ratio']:.2f}x", f"{h['round_q1']:.2f} - {h['round_q3']:.2f}", _fmt_pct(h["fusedopt_bw_fraction"]),
             _fmt_pct(h["best_peer_bw_fraction"])] for h in head]


HEADLINE_HEADER = ["model", "rule", "dtype", "scenario", "fusedopt", "best peer", "ratio", "per-round IQR",
                   "fusedopt % bw", "peer % bw"]
TARGET_HEADER = ["target", "model", "vs", "value", "per-round IQR", "met"]


def _target_value(t: dict) -> str:
    if t["value"] is None:
        return "-"
    if t["measure"] == "ratio":
        return f"{t['value']:.2f}x (>= {t['minimum']:g}x)"
    if t["measure"] == "bw":
        return f"{100 * t['value']:.0f}% (>= {100 * t['minimum']:.0f}%)"
    return f"{t['value']:.3f} B/param (<= {t['maximum']:g})"


def _target_met(t: dict) -> str:
    if t["note"]:
        return t["note"]
    if t["met"] is None:
        return "not judged (quick)"
    return "yes" if t["met"] else "NO"


def target_rows(targets: List[dict]) -> List[List[str]]:
    return [[t["target"], t["model"], t["peer"] or "-", _target_value(t),
             "-" if t["round_q1"] is None else f"{t['round_q1']:.2f} - {t['round_q3']:.2f}", _target_met(t)]
            for t in targets]


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
    measured = [t for t in targets if not t["note"]]
    pending = [t for t in targets if t["note"]]
    if measured and all(t["met"] is None for t in measured):
        lines += ["", f"Targets: {QUICK_NOT_JUDGED}."]
    elif measured:
        missed = [t for t in measured if t["met"] is False]
        lines += ["", f"Targets: {len(measured) - len(missed)} of {len(measured)} met" + ("; missed:" if missed else "")]
        lines += [f"  {t['target']} on {t['model']}: {_target_value(t)}"
                  + (f" (per-round IQR {t['round_q1']:.2f} - {t['round_q3']:.2f})" if t["round_q1"] is not None else "")
                  for t in missed]
    if pending:
        reasons = sorted({t["note"] for t in pending})
        lines += ["", f"Targets not measured in this run: {len(pending)} ({'; '.join(r[len('not measured: '):] for r in reasons)[:300]})"]
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
        if data["meta"].get("quick"):
            lines += [f"Figures only, {QUICK_NOT_JUDGED}.", ""]
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
