"""`python -m fusedopt.bench`: time optimizer steps on parameter lists shaped like real models.

Every contender updates the same parameter list, in interleaved rounds (round r times every contender once,
in a rotating order), so that the ratios between contenders are measured side by side under the same machine
conditions. The first steps (state creation) are warm-up and are not timed.

Models (``--models``; ``--quick`` scales every one down, uses one thread and 3 repetitions, so that the whole run
takes well under a minute on a small, busy CI machine):

    gpt2-small     GPT-2 124M: wte, wpe, 12 blocks (ln, c_attn, c_proj, ln, c_fc, c_proj), ln_f: 148 tensors
    gpt2-medium    GPT-2 350M: the same with d=1024 and 24 blocks: 292 tensors
    resnet50       ResNet-50 (torchvision layout): 161 tensors, 25.6M params, 4-D conv weights
    small-tensors  10,000 tensors of 1..4096 elements (log-uniform, seed 0): ~4.9M params; per-tensor overhead

Contenders: every fusedopt backend usable for the device (``fusedopt[cpu]``, ``fusedopt[cuda]``,
``fusedopt[triton]``) and every peer present: torch.optim for-loop (``foreach=False``), foreach and fused
(AdamW, SGD), lion-pytorch (Lion), apex FusedAdam / FusedSGD, DeepSpeed FusedAdam / FusedLion (CUDA) or
DeepSpeedCPUAdam / DeepSpeedCPULion (CPU; JIT-built with ninja on first use, about 45 s), bitsandbytes' and
torchao's 8-bit optimizers and torchao's bf16 stochastic-rounding AdamW (see the dtypes) when they import. A peer
that is missing is listed with the reason, not an error. Kinds: fusedopt, peers (the same precision setting; the
best of them is "the best peer") and references (another state precision, marked "(ref)": the baselines that the
small-state targets name).

Scenarios (``--scenarios``):

    step   the bare ``optimizer.step()``
    full   the step as users write it. Peers: ``clip_grad_norm_(params, 1.0)`` + ``step()`` +
           ``scheduler.step()`` (LambdaLR reading the same warmup-cosine factors); fusedopt:
           ``max_grad_norm=1.0`` + ``schedule=warmup_cosine(...)`` (norm and schedule on the device).
    graph  (CUDA only) the bare step captured once in a ``torch.cuda.CUDAGraph`` (warmed up on a side stream
           first) and replayed; torch AdamW gets ``capturable=True``.

Dtypes (``--dtype``: precision settings; ``small-state`` = the issue-13 four: 8bit, bf16-states, bf16, bf16-sr):

    float32      float32 params, grads and states.
    bf16-master  bfloat16 params and grads with float32 master weights and states. fusedopt does it in one pass
                 (``master_weights=True``). Peers do torch's nearest equivalent: the optimizer on float32 master
                 params, ``torch._foreach_copy_`` of the bf16 grads into float32 master grads before the step and
                 of the master params into the bf16 model after it ("+master"). "(fp32 grads)" is the same without
                 the grad copy, as when a backward hook accumulates straight into float32 grads.
    bf16         bfloat16 params, grads and states, no master copy (round-to-nearest: updates under half a bf16
                 ulp of the param are lost). Peers: torch.optim and lion-pytorch on the bf16 params,
                 DeepSpeedCPUAdam / CPULion with float32 states and with ``fp32_optimizer_states=False``.
    bf16-sr      the same with stochastic rounding (``stochastic_rounding=True``). Peer: torchao's AdamW with
                 ``bf16_stochastic_round=True``; reference: fusedopt without it ("no SR").
    bf16-states  float32 params and grads, bfloat16 states (``state_precision="bf16"``).
    8bit         float32 params and grads, blockwise 8-bit states (``state_precision="8bit"``). Peers:
                 bitsandbytes AdamW8bit / Lion8bit / SGD8bit (whose kernels ignore nesterov), torchao AdamW8bit
                 and AdamW4bit. References (float32 states, never the "best peer"): torch fused, DeepSpeedCPUAdam
                 / CPULion, fusedopt ("fp32 states"); the issue-13 targets name them.

Optimizer state ("state B/param"): the bytes of the storages of the tensors in each optimizer's ``state``
(moments, 8-bit codes, absmax, quantization maps, master copies, step counters; a storage shared by several
params counted once; torchao's quantized tensor subclasses opened into their inner tensors), measured after the
warm-up steps, per model parameter; a peer's float32 master params (bf16-master) count too. The group title gives
the bytes model's figure for comparison.

Bytes-per-parameter model (the traffic a step must move at least; ``effective GB/s = bytes x params/s``):

    rule (float32)                reads               writes          bytes/param
    AdamW                         p, g, m, v          p, m, v         7 x 4 = 28
    AdamW amsgrad                 + v_max             + v_max         36      (not benchmarked)
    SGD with momentum / Nesterov  p, g, buf           p, buf          5 x 4 = 20
    SGD without momentum          p, g                p               3 x 4 = 12  (not benchmarked)
    Lion                          p, g, m             p, m            5 x 4 = 20

    bf16-master (bf16 p and g, float32 master w and states): the bf16 param is *not read* (the master copy is
    the value that is updated); it is only written, rounded from the new master.
    AdamW                         g(2), w, m, v       w, m, v, p(2)   2 + 3x4 + 3x4 + 2 = 28
    SGD momentum / Lion           g(2), w, buf        w, buf, p(2)    2 + 2x4 + 2x4 + 2 = 20
    SGD without momentum          g(2), w             w, p(2)         12
    torch's equivalent moves more: + grad copy (read 2, write 4) + param copy (read 4, write 2) = +12, i.e.
    40 B/param for AdamW, 32 for SGD momentum and Lion: the one-pass step can be at most 40/28 = 1.43x (AdamW)
    faster when both run at the memory bandwidth; 34/28 = 1.21x against the "(fp32 grads)" variant.

    full step: + one read of the grads (the global norm): 32 B/param for float32 AdamW, 30 for bf16-master.
    clip_grad_norm_ also rescales the grads in place (one more read and write of g), which a fused clip avoids;
    that is work the fused step saves, so it is not counted as useful traffic.

    Small state (per parameter, float32 params unless named):
    rule           bf16 (no master)       bf16-states               8bit
    AdamW          g(2) p(2+2) m,v(4+4) 14  g4 p8 m,v 2x(2+2) = 20  g4 p8 m,v 2x(1+1) + absmax 2x(4+4)/256 = 16.06
    SGD mom. / Lion g(2) p(4) buf(4)  10   g4 p8 buf(4)      = 16    g4 p8 buf(1+1) + absmax (4+4)/256 = 14.03
    bf16-sr moves the bytes of bf16 (its random bits are computed from a hash, not loaded). Under 8bit, tensors
    under 4,096 elements keep float32 states, so a model's figure is the mix of its tensors (10,000 small tensors:
    the float32 figure).

Memory bandwidth ("bw" line, "% bw"): in the same run, as one more contender in the same rounds, an in-place
stream over flat buffers with the rule's reads and writes (same dtypes): each write-only array is a copy_ from a
read-only one of its dtype, each remaining read-only array is added into a read-write one (``w.add_(g)``), the
other read-write arrays are scaled in place (``m.mul_(1.0)``), the norm read is a ``sum``. Every element of every
buffer is touched exactly as often as the rule touches it, in place (a copy into a fresh array would add page
faults and understate the limit). Buffers hold min(model params, 2^26) elements. In --quick mode the buffers
fit in the caches, so "% bw" means little there. "% bw" above 100%: the reference is torch's in-place ops, one
per pair of arrays; a fused pass over 3-4 arrays keeps more memory streams in flight than such an op, so it can
move its bytes faster than the reference (a measured bound for torch-op streams, not the hardware's peak).

Statistics: per contender, ``reps`` timed repetitions of ``inner`` steps (``inner`` chosen so a repetition
lasts about --min-rep-seconds); median, quartiles and min/max of the per-step time. Ratios: median step time
of the best peer over that of the contender; the headline also gives the median and quartiles of the per-round
ratios (paired rounds). Slow contenders get fewer repetitions (at least 3) so that one (model, rule) group
stays within --budget seconds per contender.

Threads: on a machine shared with other jobs, every parallel region (torch's: one or more per tensor and op;
fusedopt's: one per param group) can stall for a scheduler time slice when a worker thread is descheduled. That
penalizes the contenders with many regions and inflates ratios; ``--threads 1`` measures without that effect.

Targets (the CPU ones of the project's benchmark issue, e.g. FusedAdamW >= 1.0x torch fused) are judged only
where they are meant to hold: on CPU, at the full-size shapes. A --quick run reports their ratios, not judged.

Output: results.json (every figure), results.md (the headline, the targets and a table per group),
results.png (params/s per model and contender with the bandwidth reference; needs matplotlib, pip install
"fusedopt[bench]": without it the run carries on and says so) in --out, by default a new temporary folder
for --quick and a new folder fusedopt-bench-<date>-<device>[-N] in the current folder otherwise. On the console:
a short summary (the ratio of the best fusedopt backend to the best peer per group and model, where the targets
stand), with --verbose also each group's table as it finishes; a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

import fusedopt
from fusedopt import backends
from fusedopt._extras import MissingDependency, install_hint
from fusedopt.bench.contenders import HYPER, MAX_NORM, all_contenders, stream_contender
from fusedopt.bench.models import MODEL_NAMES, model_shapes, numel_of
from fusedopt.bench.report import (HEADER, evaluate_targets, group_rows, group_title, headline, summary,
                                   text_table, write_json, write_markdown)
from fusedopt.bench.timing import Options, Progress, run_group
from fusedopt.bench.traffic import DTYPES, RULES, SCENARIOS, SMALL_STATE_DTYPES, bytes_model_table


def _load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def _split(value: str, allowed: Sequence[str], what: str) -> List[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    if items == ["all"]:
        return list(allowed)
    bad = [x for x in items if x not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fusedopt.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma list of {', '.join(MODEL_NAMES)} or 'all' (default: all; on CPU without --quick "
                        f"all but gpt2-medium, whose for-loop / foreach steps take seconds each)")
    p.add_argument("--quick", action="store_true", help="scaled-down shapes and few repetitions (CI-sized)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--rules", default="adamw,sgd,lion", help="comma list of adamw, sgd, lion")
    p.add_argument("--dtype", default="float32,bf16-master",
                   help=f"comma list of {', '.join(DTYPES)}; 'small-state' for {','.join(SMALL_STATE_DTYPES)}; "
                        f"'all' (default: float32,bf16-master)")
    p.add_argument("--scenarios", default=None,
                   help="comma list of step, full, graph (default: step,full (+graph on CUDA) for float32; "
                        "step (+graph) for the other dtypes)")
    p.add_argument("--contenders", default=None,
                   help="comma list of substrings; only contenders whose name contains one are run (the "
                        "bandwidth stream always runs)")
    p.add_argument("--fusedopt-backends", default=None,
                   help="comma list of fusedopt backends to time (default: every one usable for the device)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per contender (default 5; quick 3)")
    p.add_argument("--min-rep-seconds", type=float, default=None,
                   help="steps per repetition are chosen so a repetition lasts about this long (default 0.2; quick 0.01)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per contender and group; slower contenders get fewer repetitions, never < 3 "
                        "(default 12; quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's; 1 with --quick, so that a busy CI runner does not "
                        "stall every parallel region of every contender)")
    p.add_argument("--out", default=None, metavar="FOLDER",
                   help="output folder, created if needed (default: a new temporary folder with --quick, else a new "
                        "folder fusedopt-bench-<date>-<device>[-N] in the current folder)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: start no new (model, rule, dtype, scenario) group after this long; the groups left "
                        "out are listed under meta.skipped (for a bounded run, e.g. make gpu-check)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print each group's table (every contender) on the console as it finishes")
    return p.parse_args(argv)


def output_folder(out: Optional[str], date: str, device: str, quick: bool) -> str:
    """--out (created if missing), else a fresh folder: a temporary one for --quick (a smoke run leaves nothing
    in the current folder), fusedopt-bench-<date>-<device> (-2, -3, ... if taken) in the current folder
    otherwise. Raises OSError when it cannot be created or written (checked before anything is timed)."""
    if out is None and quick:
        return tempfile.mkdtemp(prefix=f"fusedopt-bench-{date}-{device}-quick-")
    if out is None:
        base = out = f"fusedopt-bench-{date}-{device}"
        n = 2
        while os.path.exists(out):
            out, n = f"{base}-{n}", n + 1
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"no permission to write in {out}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fusedopt.bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    try:
        if args.models is None:
            models = ([m for m in MODEL_NAMES if m != "gpt2-medium"] if device.type == "cpu" and not args.quick
                      else list(MODEL_NAMES))
        else:
            models = _split(args.models, MODEL_NAMES, "model")
        rules = _split(args.rules, RULES, "rule")
        dtypes = _split(args.dtype.replace("small-state", ",".join(SMALL_STATE_DTYPES)), DTYPES, "dtype")
        scenarios = None if args.scenarios is None else _split(args.scenarios, SCENARIOS, "scenario")
        fo_backends = None if args.fusedopt_backends is None else _split(args.fusedopt_backends, ("cpu", "cuda", "triton"),
                                                                         "fusedopt backend")
    except argparse.ArgumentTypeError as e:
        print(f"fusedopt.bench: {e}", file=sys.stderr)
        return 2
    opts = Options(reps=args.reps or (3 if args.quick else 5),
                   min_rep_seconds=args.min_rep_seconds if args.min_rep_seconds is not None else (0.01 if args.quick else 0.2),
                   budget=args.budget if args.budget is not None else (1.0 if args.quick else 12.0),
                   warmup=1 if args.quick else 2)
    date = _dt.date.today().isoformat()
    try:  # before the run, not after minutes of timing
        out_dir = output_folder(args.out, date, device.type, args.quick)
    except OSError as e:
        print(f"fusedopt.bench: cannot write the results to {args.out}: {e}", file=sys.stderr)
        return 2
    # torch's thread count is process-wide: changed only once every argument is known to be good
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)

    skipped: Dict[str, str] = {}
    contenders = all_contenders(device, skipped, fo_backends)
    if args.contenders:
        wanted = [w.strip() for w in args.contenders.split(",") if w.strip()]
        contenders = [c for c in contenders if any(w in c.name for w in wanted)]
    contenders.append(stream_contender())

    def scenarios_for(dtype: str) -> List[str]:
        if scenarios is not None:
            chosen = list(scenarios)
        else:
            chosen = ["step", "full"] if dtype == "float32" else ["step"]
            if device.type == "cuda":
                chosen.append("graph")
        if device.type != "cuda" and "graph" in chosen:
            skipped["graph scenario"] = "CUDA only"
            chosen.remove("graph")
        return chosen

    plan = [(m, r, d, s) for d in dtypes for m in models for r in rules for s in scenarios_for(d)]
    shapes = {m: model_shapes(m, args.quick) for m in models}
    progress = Progress(len(plan), enabled=not args.no_progress)
    started = time.perf_counter()
    results: List[dict] = []

    def log(msg: str) -> None:
        if progress.tty and progress.enabled:
            sys.stderr.write("\n")
        print(msg, file=sys.stderr, flush=True)

    print(f"fusedopt.bench on {device_name(device)}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"models {', '.join(models)}{' (quick shapes)' if args.quick else ''}; {len(plan)} groups", flush=True)
    if skipped:
        print("not measured: " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())), flush=True)
    group_seconds = {}
    for i, (model, rule, dtype, scenario) in enumerate(plan):
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            skipped["time limit"] = (f"--time-limit {args.time_limit:g} s reached; not run: "
                                     + ", ".join(" ".join(g) for g in plan[i:]))
            break
        t0 = time.perf_counter()
        entries = run_group(model, shapes[model], rule, dtype, scenario, device, contenders, opts, progress, i, log)
        results += entries
        group_seconds[f"{model} {rule} {dtype} {scenario}"] = round(time.perf_counter() - t0, 2)
        progress.update(i + 1, f"{model} {rule} {dtype} {scenario} done")
        if entries and args.verbose:
            if progress.tty and progress.enabled:
                sys.stderr.write("\n")
            print(f"\n{group_title(entries[0])}\n{text_table(HEADER, group_rows(entries))}", flush=True)
    progress.finish()
    elapsed = time.perf_counter() - started

    data = dict(
        meta=dict(date=date, device=device.type, device_name=device_name(device), torch=torch.__version__,
                  fusedopt=fusedopt.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                  quick=args.quick, command="python -m fusedopt.bench " + " ".join(sys.argv[1:] if argv is None else argv),
                  models={m: dict(numel=numel_of(shapes[m]), num_tensors=len(shapes[m])) for m in models},
                  rules=rules, dtypes=dtypes, options=opts.__dict__, hyperparameters=HYPER, max_grad_norm=MAX_NORM,
                  skipped=skipped, backends={k: v[0] for k, v in backends.available().items()},
                  elapsed_s=elapsed, group_seconds=group_seconds, load_average=_load_average()),
        bytes_model=bytes_model_table(),
        results=results,
    )
    data["headline"] = headline(results)
    data["targets"] = evaluate_targets(results, device, quick=args.quick)

    json_path = os.path.join(out_dir, "results.json")
    write_json(json_path, data)
    md_path = os.path.join(out_dir, "results.md")
    write_markdown(md_path, data)
    written = ["results.json", "results.md"]
    print(f"\n{summary(data)}", flush=True)
    if not args.no_plot:
        from fusedopt.plot import plot_benchmark

        png_path = os.path.join(out_dir, "results.png")
        try:
            plot_benchmark(data, png_path)
            written.append("results.png")
        except MissingDependency:  # the tables and files above are the result; the plot is extra
            print(f"\nfusedopt.bench: no results.png: matplotlib is not installed. Install it with "
                  f"{install_hint('matplotlib', 'bench')}; then draw it with: python -m fusedopt.plot --bench "
                  f"{json_path} --out {png_path}", file=sys.stderr)
    print(f"\nwrote {', '.join(written)} to {out_dir} ({elapsed:.0f} s of timing)")
    return 0
