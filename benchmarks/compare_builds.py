"""A/B timing of two builds of fusedopt's CPU kernels (fusedopt/_C*.so), for changes to the kernels themselves.

    python benchmarks/compare_builds.py OLD.so NEW.so [--rounds 5] [--params 16] [--threads 1]

Each measurement runs in a fresh subprocess that loads one build with torch.ops.load_library (not the
installed fusedopt) and times the bare update ops (torch.ops.fusedopt.adamw_ / sgd_ / lion_) on a list of
tensors shaped like transformer layers (--params million elements in total: beyond the caches, so the step
is bound by memory as on a real model). Each measurement is the fastest of 15 steps (interference from other
work on a shared machine only ever adds time), and the builds alternate, A B A B ..., so that slow phases hit
both alike; the report gives, per rule and dtype, the median over rounds of the per-round ratio old / new
(> 1: the new build is faster) and the spread of those ratios. Only arguments that every
build since the first op schemas accepts are passed (positionally).

    --cases small-state   the issue-13 cases instead: 8-bit states on float32 params (tensors under 4,096
                          elements keep float32 states, as the optimizers do), and bfloat16 params without master
                          weights with bfloat16 states, rounded to nearest and stochastically (bf16-sr). These
                          pass the small-state arguments by name, so both builds need the small-state schemas.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CASES = [  # (rule, param dtype, master weights)
    ("adamw", "float32", False), ("adamw", "float64", False), ("adamw", "bfloat16", True),
    ("sgd", "float32", False), ("sgd", "float64", False), ("sgd", "bfloat16", True),
    ("lion", "float32", False), ("lion", "bfloat16", True),
]

SMALL_STATE_CASES = [  # (rule, precision)
    ("adamw", "8bit"), ("lion", "8bit"), ("sgd", "8bit"),
    ("adamw", "bf16"), ("lion", "bf16"), ("sgd", "bf16"),
    ("adamw", "bf16-sr"), ("lion", "bf16-sr"), ("sgd", "bf16-sr"),
]

CHILD = r"""
import json, sys, time
import torch
so, params_m, threads, cases = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
torch.set_num_threads(threads)
torch.ops.load_library(so)
ops = torch.ops.fusedopt
# transformer-like sizes: 768x3072 matrices, 768x768, vectors
unit = [768 * 3072, 3072 * 768, 768 * 768 * 4, 3072, 768, 768]
sizes, total = [], 0
while total < params_m * 1e6:
    for n in unit:
        sizes.append(n); total += n
out = {}
def small_state_call(rule, precision):
    # 8bit: float32 params, uint8 codes + one float32 absmax per 256 elements (float32 states under 4,096
    # elements); bf16 / bf16-sr: bfloat16 params, grads and states, no master copy
    g = torch.Generator().manual_seed(0)
    bf16 = precision != "8bit"
    dtype = torch.bfloat16 if bf16 else torch.float32
    ps = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    gs = [(torch.randn(n, generator=g) * 1e-2).to(dtype) for n in sizes]
    nstates = {"adamw": 2, "lion": 1, "sgd": 1}[rule]
    states, absmaxes = [], []
    for k in range(nstates):
        st, am = [], []
        for n in sizes:
            if not bf16 and n >= 4096:
                st.append(torch.full((n,), 0 if (rule == "adamw" and k == 1) else 127, dtype=torch.uint8))
                am.append(torch.zeros(n // 256))
            else:
                st.append(torch.zeros(n, dtype=dtype))
                am.append(torch.empty(0))
        states.append(st); absmaxes += am
    kw = {}
    if not bf16:
        kw["state_absmaxes"] = absmaxes + ([torch.empty(0) for _ in sizes] if rule == "adamw" else [])
    if precision == "bf16-sr":
        kw["rounding"] = [1234] + [v for i in range(len(sizes)) for v in (i, 0)]
        kw["rounding_step"] = torch.ones((), dtype=torch.int64)
    steps = [torch.zeros((), dtype=torch.int64) for _ in sizes]
    if rule == "adamw":
        return lambda: ops.adamw_(ps, gs, states[0], states[1], [], steps, [], 1e-3, 0.9, 0.999, 1e-8, 1e-2, False,
                                  False, None, None, None, None, None, None, **kw)
    if rule == "sgd":
        return lambda: ops.sgd_(ps, gs, states[0], [], 1e-2, 0.9, 0.1, 1e-4, False, False, False,
                                None, None, None, None, None, None, **kw)
    return lambda: ops.lion_(ps, gs, states[0], [], 1e-4, 0.9, 0.99, 0.1, None, None, None, None, None, None, **kw)

for case in cases:
    if len(case) == 2:
        call = small_state_call(*case)
        for _ in range(3):
            call()
        times = []
        for _ in range(15):
            t0 = time.perf_counter(); call(); times.append(time.perf_counter() - t0)
        out[f"{case[0]}/{case[1]}"] = min(times)
        continue
    rule, dtype_name, master = case
    dtype = getattr(torch, dtype_name)
    sdtype = torch.float32 if master else dtype
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    gs = [torch.randn(n, generator=g).to(dtype) * 1e-2 for n in sizes]
    ms = [p.float() for p in ps] if master else []
    st = [torch.zeros(n, dtype=sdtype) for n in sizes]
    st2 = [torch.rand(n, generator=g).to(sdtype) for n in sizes]
    steps = [torch.zeros((), dtype=torch.int64) for _ in sizes]
    if rule == "adamw":
        call = lambda: ops.adamw_(ps, gs, st, st2, [], steps, ms, 1e-3, 0.9, 0.999, 1e-8, 1e-2, False, False,
                                  None, None, None, None, None, None)
    elif rule == "sgd":
        call = lambda: ops.sgd_(ps, gs, st, ms, 1e-2, 0.9, 0.1, 1e-4, False, False, False,
                                None, None, None, None, None, None)
    else:
        call = lambda: ops.lion_(ps, gs, st, ms, 1e-4, 0.9, 0.99, 0.1, None, None, None, None, None, None)
    for _ in range(3):
        call()
    times = []
    for _ in range(15):
        t0 = time.perf_counter(); call(); times.append(time.perf_counter() - t0)
    out[f"{rule}/{dtype_name}{'+master' if master else ''}"] = min(times)
print(json.dumps(out))
"""


def measure(so: str, params_m: float, threads: int, cases: list) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, so, str(params_m), str(threads), json.dumps(cases)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--params", type=float, default=16.0, help="million elements in total (default 16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", choices=("default", "small-state"), default="default",
                    help="default: float32 / float64 / bf16+master; small-state: 8-bit, bf16 and bf16-sr (issue 13)")
    args = ap.parse_args()
    cases = SMALL_STATE_CASES if args.cases == "small-state" else CASES
    ratios: dict = {}
    old_ms: dict = {}
    new_ms: dict = {}
    for r in range(args.rounds):
        a = measure(args.old, args.params, args.threads, cases)
        b = measure(args.new, args.params, args.threads, cases)
        for k in a:
            ratios.setdefault(k, []).append(a[k] / b[k])
            old_ms.setdefault(k, []).append(a[k] * 1e3)
            new_ms.setdefault(k, []).append(b[k] * 1e3)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"{'case':<22} {'old ms':>8} {'new ms':>8} {'old/new':>8}  {'ratio range':>13}")
    for k, rs in ratios.items():
        print(f"{k:<22} {statistics.median(old_ms[k]):>8.2f} {statistics.median(new_ms[k]):>8.2f} "
              f"{statistics.median(rs):>8.3f}  {min(rs):>6.3f}-{max(rs):.3f}")


if __name__ == "__main__":
    main()
