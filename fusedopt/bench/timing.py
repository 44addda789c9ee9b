"""Timing one (model, rule, dtype, scenario) group: every contender in interleaved rounds, after warm-up (and
CUDA-graph capture for the graph scenario), with a progress bar; the derived figures (GB/s, % bw, ratios)."""

from __future__ import annotations

import gc
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, List

import torch

from fusedopt.bench.contenders import Contender, NotApplicable, Setup, Unavailable, display_name, state_bytes
from fusedopt.bench.models import numel_of
from fusedopt.bench.stats import summarize
from fusedopt.bench.traffic import STREAM_CAP, bytes_per_param, param_dtype, state_bytes_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_graph(step: Callable[[], None], device: torch.device, warmup: int = 3) -> Callable[[], None]:
    """Warm `step` up on a side stream (state allocation happens there), capture one step, return replay."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    _sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    _sync(device)
    return graph.replay


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - start) / n


class Progress:
    """A plain-text progress bar on stderr (one line rewritten in place on a terminal, sparse lines otherwise)."""

    def __init__(self, total: float, enabled: bool = True, stream=None):
        self.total = max(total, 1e-9)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_line = 0.0

    def update(self, done: float, label: str) -> None:
        if not self.enabled:
            return
        frac = min(max(done / self.total, 0.0), 1.0)
        width = 30
        filled = int(round(frac * width))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {100 * frac:5.1f}% {time.perf_counter() - self.start:6.1f}s "
                f"{label}")
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            self.stream.flush()
        elif now - self._last_line > 5.0 or frac >= 1.0:
            self._last_line = now
            self.stream.write(line + "\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class Options:
    reps: int = 5
    min_rep_seconds: float = 0.2
    budget: float = 12.0  # seconds per contender and group, at most (never fewer than 3 repetitions)
    warmup: int = 2


def make_params(shapes, device: torch.device, dtype: str, seed: int = 0) -> List[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pdt = param_dtype(dtype)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=pdt)
        p.grad = (torch.randn(shape, generator=gen) * 1e-2).to(device=device, dtype=pdt)
        params.append(p)
    return params


def run_group(model: str, shapes, rule: str, dtype: str, scenario: str, device: torch.device,
              contenders: List[Contender], opts: Options, progress: Progress, done_before: float,
              log: Callable[[str], None]) -> List[dict]:
    """Time every contender on one (model, rule, dtype, scenario) in interleaved rounds."""
    params = make_params(shapes, device, dtype)
    numel = numel_of(shapes)
    setup = Setup(params, device, rule, dtype, scenario)
    bpp = bytes_per_param(rule, dtype, "full" if scenario == "full" else "step", shapes)
    label = f"{model} {rule} {dtype} {scenario}"
    results: List[dict] = []
    live = []  # (contender, display name, step fn, est seconds per step)
    measured = {}  # display name -> figures taken after warm-up (state bytes, the stream's bytes per element)
    base = dict(model=model, numel=numel, num_tensors=len(shapes), rule=rule, dtype=dtype, scenario=scenario,
                bytes_per_param=bpp, state_bytes_model=state_bytes_model(rule, dtype, shapes))
    for c in contenders:
        name = c.name if c.kind == "stream" else display_name(c, dtype)
        if not name:
            continue
        progress.update(done_before, f"{label}: setting up {name}")
        try:
            step = c.build(setup)
            opt = getattr(step, "optimizer", None)
            extra = dict(state_extra=getattr(step, "extra_state_bytes", 0),
                         stream_bytes=getattr(step, "bytes_per_element", None))
            if scenario == "graph":
                step = capture_graph(step, device)
            t = time_steps(step, 1, device)  # first step: state creation
            if opts.warmup > 1 and t < opts.budget / 4:  # a slow contender is warm after one step
                t = time_steps(step, opts.warmup - 1, device)
            if opt is not None:  # the state as the optimizer holds it after its first steps
                measured[name] = dict(state_bytes_per_param=round((state_bytes(opt) + extra["state_extra"]) / numel, 4))
            if extra["stream_bytes"] is not None:
                measured[name] = dict(stream_bytes_per_element=extra["stream_bytes"])
            live.append((c, name, step, t))
        except NotApplicable:
            continue
        except Unavailable as e:
            results.append(dict(base, contender=name, kind=c.kind, status="skipped", reason=str(e)))
        except Exception as e:  # noqa: BLE001 - one failing contender must not end the benchmark
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"  {label}: {name} failed: {msg}")
            if os.environ.get("FUSEDOPT_BENCH_DEBUG"):
                traceback.print_exc()
            results.append(dict(base, contender=name, kind=c.kind, status="error", error=msg))

    plans = []
    for c, name, step, t in live:
        inner = max(1, int(math.ceil(opts.min_rep_seconds / max(t, 1e-9))))
        reps = opts.reps
        per_rep = t * inner
        if per_rep * reps > opts.budget:
            reps = max(3, min(reps, int(opts.budget // max(per_rep, 1e-9))))
        plans.append([c, name, step, inner, reps, []])
    rounds = max((p[4] for p in plans), default=0)
    for r in range(rounds):
        progress.update(done_before + r / max(rounds, 1), f"{label}: round {r + 1}/{rounds}")
        order = plans[r % len(plans):] + plans[:r % len(plans)] if plans else []
        for plan in order:
            c, name, step, inner, reps, times = plan
            if r < reps:
                times.append(time_steps(step, inner, device))
    for c, name, step, inner, reps, times in plans:
        stats = summarize(times)
        entry = dict(base, contender=name, kind=c.kind, status="ok", reps=len(times), inner=inner, times_s=times,
                     **stats, **measured.get(name, {}))
        steps_per_s = 1.0 / stats["median_s"]
        entry["steps_per_s"] = steps_per_s
        if c.kind == "stream":
            stream_numel = min(numel, STREAM_CAP)
            entry["stream_numel"] = stream_numel
            moved = entry.get("stream_bytes_per_element", bpp)  # the model's bytes, up to rounding of the split
            entry["gb_per_s"] = moved * stream_numel / stats["median_s"] / 1e9
            entry["params_per_s"] = stream_numel / stats["median_s"]
        else:
            entry["params_per_s"] = numel * steps_per_s
            entry["gb_per_s"] = bpp * numel * steps_per_s / 1e9
        results.append(entry)
    del live, plans, setup, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # derived figures: fraction of the measured bandwidth, ratios against the best peer
    ok = [e for e in results if e["status"] == "ok"]
    stream = next((e for e in ok if e["kind"] == "stream"), None)
    peers = [e for e in ok if e["kind"] == "peer"]
    best_peer = min(peers, key=lambda e: e["median_s"]) if peers else None
    for e in ok:
        e["bw_fraction"] = e["gb_per_s"] / stream["gb_per_s"] if stream else None
        if best_peer is not None and e["kind"] != "stream":
            e["best_peer"] = best_peer["contender"]
            e["ratio_vs_best_peer"] = best_peer["median_s"] / e["median_s"]
        else:
            e["best_peer"] = None
            e["ratio_vs_best_peer"] = None
    return results
