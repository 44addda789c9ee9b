"""`python -m fusedopt.check`: a self-test of this installation, for users and bug reports.

    python -m fusedopt.check            a PASS/FAIL table, then what to paste into a bug report
    python -m fusedopt.check --json     the same as one JSON object

For each device (the CPU and every visible GPU) and each fusedopt backend that runs there (cpu on the CPU;
cuda and triton on a GPU; triton on the CPU too under TRITON_INTERPRET=1), it runs a few steps of FusedAdamW,
FusedSGD (Nesterov momentum) and FusedLion on a handful of tensors (odd sizes, an empty one) against the
reference: torch.optim.AdamW / SGD (single-tensor, foreach=False) and lion_pytorch.Lion when installed (else
the Lion update as lion-pytorch writes it, in float64, here: see `_lion_reference`). On every GPU, for each
backend, it also captures one training step in a CUDA graph after torch's recipe (warm-up on a side stream,
zero_grad(set_to_none=True)) and checks that three replays do what three eager steps do (normwise 1e-6: the
same kernels on the same data, but cuBLAS may pick another algorithm on the capture stream; a replay that
read stale grads or an lr table at a stale step would be off by orders of magnitude more).

Tolerance: the kernels compute in float32 what the references compute in float32 (float64 for Lion's
fallback), so after STEPS steps params agree to a few float32 ulps of their scale: normwise 1e-5 (about 80
ulps). Lion's sign() can flip at an exact tie: at most 0.1% of the elements may differ, each by at most
2 lr per step. Exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Callable, Dict, List, Optional

import torch

STEPS = 5
SIZES = [(1,), (7,), (0,), (33, 31), (4099,)]
TOLERANCE = 1e-5
RULES = ("adamw", "sgd", "lion")
OPTIONS = {
    "adamw": dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
    "sgd": dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "lion": dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
}


def _lion_reference(params: List[torch.Tensor], options: dict):
    """The Lion update of lion-pytorch (weight decay, then p -= lr * sign(beta1 * m + (1 - beta1) * g), then
    m = beta2 * m + (1 - beta2) * g; sign(0) == 0), in float64, for when lion-pytorch is not installed."""
    lr, (beta1, beta2), wd = options["lr"], options["betas"], options["weight_decay"]
    moments = [torch.zeros_like(p, dtype=torch.float64) for p in params]

    class Reference:
        def step(self):
            for p, m in zip(params, moments):
                g = p.grad.double()
                w = p.double() * (1 - lr * wd)
                w = w - lr * torch.sign(beta1 * m + (1 - beta1) * g)
                m.mul_(beta2).add_((1 - beta2) * g)
                p.copy_(w.to(p.dtype))

    return Reference()


def reference(rule: str, params: List[torch.Tensor]):
    """(the reference optimizer over `params`, its name)."""
    options = OPTIONS[rule]
    if rule == "adamw":
        return torch.optim.AdamW(params, foreach=False, **options), "torch.optim.AdamW"
    if rule == "sgd":
        return torch.optim.SGD(params, foreach=False, **options), "torch.optim.SGD"
    try:
        from lion_pytorch import Lion

        return Lion(params, **options), "lion_pytorch.Lion"
    except ImportError:
        return _lion_reference(params, options), "Lion reference (lion-pytorch not installed)"


def _ours(rule: str, params, backend: str, **kw):
    import fusedopt

    cls = {"adamw": fusedopt.FusedAdamW, "sgd": fusedopt.FusedSGD, "lion": fusedopt.FusedLion}[rule]
    return cls(params, backend=backend, **OPTIONS[rule], **kw)


def _normwise(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.numel() == 0:
        return 0.0
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def check_parity(rule: str, backend: str, device: torch.device) -> str:
    """STEPS steps of ours on `device` against the reference on the CPU; returns a detail string, raises
    AssertionError on a mismatch."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in SIZES]
    ours_p = [p.clone().to(device) for p in start]
    ref_p = [p.clone() for p in start]
    ours = _ours(rule, ours_p, backend)
    ref, ref_name = reference(rule, ref_p)
    for _ in range(STEPS):
        for p, q in zip(ours_p, ref_p):
            g = torch.randn(q.shape, generator=gen)
            p.grad = g.to(device)
            q.grad = g.clone()
        ours.step()
        ref.step()
    worst = 0.0
    for i, (p, q) in enumerate(zip(ours_p, ref_p)):
        if rule == "lion":
            if q.numel() == 0:
                continue
            a, b = p.detach().double().cpu(), q.detach().double()
            diff = (a - b).abs()
            off = int((diff > TOLERANCE * max(float(b.abs().max()), 1e-30)).sum())
            assert off <= max(1, q.numel() // 1000), f"param {i}: {off} of {q.numel()} elements differ"
            bound = 2 * OPTIONS[rule]["lr"] * STEPS * 1.01
            assert float(diff.max()) <= bound, f"param {i}: differs by {float(diff.max()):.2e} > 2 lr per step"
            continue
        err = _normwise(p, q)
        worst = max(worst, err)
        assert err <= TOLERANCE, f"param {i}: normwise error {err:.2e} > {TOLERANCE:g} against {ref_name}"
    return f"{STEPS} steps vs {ref_name}" + ("" if rule == "lion" else f", worst normwise error {worst:.1e}")


def check_graph(backend: str, device: torch.device) -> str:
    """torch's whole-network capture recipe with FusedAdamW (schedule table, clipping): three replays against
    three eager steps."""
    from fusedopt import schedules

    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(device)
        opt = _ours("adamw", model.parameters(), backend, max_grad_norm=1.0, schedule=schedules.warmup_cosine(20, 2))
        runs.append((model, opt, torch.zeros(16, 32, device=device), torch.zeros(16, 4, device=device)))

    def feed(x, y, t):
        g = torch.Generator().manual_seed(100 + t)
        x.copy_(torch.randn(x.shape, generator=g))
        y.copy_(torch.randn(y.shape, generator=g))

    def iteration(model, opt, x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()

    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for t in range(3):
                for model, opt, x, y in runs:
                    feed(x, y, t)
                    opt.zero_grad(set_to_none=True)
                    iteration(model, opt, x, y)
        torch.cuda.current_stream().wait_stream(side)
        model, opt, x, y = runs[1]
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            iteration(model, opt, x, y)
        for t in range(3, 6):
            feed(x, y, t)
            graph.replay()
            m0, o0, x0, y0 = runs[0]
            feed(x0, y0, t)
            o0.zero_grad(set_to_none=True)
            iteration(m0, o0, x0, y0)
        torch.cuda.synchronize()
    worst = 0.0
    for i, (p, q) in enumerate(zip(runs[1][0].parameters(), runs[0][0].parameters())):
        worst = max(worst, _normwise(p, q))
        assert worst <= 1e-6, f"param {i}: the replays differ from the eager steps (normwise {worst:.1e})"
    steps = int(runs[1][1].param_groups[0]["schedule_step"])
    assert steps == 6, f"the schedule counter is {steps} after 3 eager steps and 3 replays, expected 6"
    return f"warm-up, capture, 3 replays vs 3 eager steps: worst normwise difference {worst:.1e}"


def plan(devices: Optional[List[str]] = None, names: Optional[List[str]] = None) -> List[tuple]:
    """(device, backend, available, why not) to check: `names` (default all) where they can run."""
    from fusedopt import backends

    available = backends.available()
    if devices is None:
        devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    pairs = []
    for name in devices:
        device = torch.device(name)
        for backend in names or ("cpu", "cuda", "triton"):
            ok, why = available[backend]
            if device.type == "cpu" and backend == "cuda":
                continue
            if device.type == "cuda" and backend == "cpu":
                continue
            if device.type == "cpu" and backend == "triton" and not backends.triton_interpreted():
                continue  # Triton on CPU tensors is for testing (TRITON_INTERPRET=1), not a failure here
            pairs.append((device, backend, ok, why))
    return pairs


def run(devices: Optional[List[str]] = None, names: Optional[List[str]] = None) -> List[Dict[str, str]]:
    """One row per (device, backend, check): device, backend, check, result (PASS / FAIL), detail."""
    rows = []
    for device, backend, ok, why in plan(devices, names):
        checks: List[tuple] = [(rule, lambda r=rule: check_parity(r, backend, device)) for rule in RULES]
        if device.type == "cuda":
            checks.append(("cuda-graph", lambda: check_graph(backend, device)))
        for name, fn in checks:
            row = dict(device=str(device), backend=backend, check=name)
            if not ok:
                row.update(result="FAIL", detail=f"backend not available: {why}")
            else:
                try:
                    row.update(result="PASS", detail=fn())
                except Exception as e:  # every failure is reported in the table, none stops the others
                    last = traceback.extract_tb(e.__traceback__)[-1]
                    first = (str(e).strip().splitlines() or [""])[0]
                    row.update(result="FAIL", detail=f"{type(e).__name__}: {first} ({os.path.basename(last.filename)}:"
                                                     f"{last.lineno})")
            rows.append(row)
    return rows


def environment() -> dict:
    """What to paste into a bug report: `python -m fusedopt.info --json`, and the Triton version."""
    from fusedopt import info

    data = info.collect()
    try:
        import triton

        data["triton"] = triton.__version__
    except Exception as e:  # not installed, or broken
        data["triton"] = f"not importable ({type(e).__name__}: {e})"
    return data


def _table(rows: List[Dict[str, str]]) -> str:
    cols = ["device", "backend", "check", "result", "detail"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) if rows else len(c) for c in cols[:-1]}
    out = ["  ".join(c.ljust(widths[c]) for c in cols[:-1]) + "  detail"]
    for r in rows:
        out.append("  ".join(r[c].ljust(widths[c]) for c in cols[:-1]) + "  " + r["detail"])
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedopt.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--device", action="append", default=None,
                   help="a device to check (repeatable; default: cpu and every visible GPU)")
    p.add_argument("--backend", action="append", default=None, choices=("cpu", "cuda", "triton"),
                   help="a backend to check (repeatable; default: every one that runs on the device)")
    args = p.parse_args(argv)
    rows = run(args.device, args.backend)
    failed = [r for r in rows if r["result"] != "PASS"]
    env = environment()
    if args.json:
        print(json.dumps(dict(rows=rows, failed=len(failed), environment=env), indent=2, default=str))
    else:
        print(_table(rows))
        print()
        from fusedopt import info

        print("Paste into a bug report (with the table above):")
        print(info.report(env))
        print(f"triton    {env['triton']}")
        for r in failed:
            print(f"FAIL {r['device']} {r['backend']} {r['check']}: {r['detail']}")
        print(f"fusedopt.check: {len(rows) - len(failed)} of {len(rows)} checks passed"
              + (f", {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
