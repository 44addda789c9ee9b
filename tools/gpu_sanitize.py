#!/usr/bin/env python3
"""A short workload for compute-sanitizer (memcheck, racecheck): every update rule on every backend that runs
on the device, over sizes that hit every tail, misaligned views and more than one launch.

    compute-sanitizer --tool memcheck  python3 tools/gpu_sanitize.py
    compute-sanitizer --tool racecheck python3 tools/gpu_sanitize.py
    python3 tools/gpu_sanitize.py --backends triton      (no sanitizer: compiles the Triton kernels, e.g. to
                                                         warm Triton's cache while the CUDA extension builds)
    python3 tools/gpu_sanitize.py --device cpu --small   (the same calls on CPU: the CPU op, and Triton under
                                                         TRITON_INTERPRET=1; what CI runs to keep this script
                                                         working)

What each backend is given, per rule (AdamW with amsgrad, SGD with Nesterov momentum, Lion) and per dtype
(float32, bfloat16 with float32 master weights, float16, float64), in one op call per step:
  * sizes 0, 1, 3, 97, 1025, 4099, 65537 and 2 * 65536 + 3: empty tensors, tails shorter than a vector, than
    a block, than a CUDA chunk (65,536 elements) and than a Triton row (4,096), tensors of several chunks;
  * a copy of the list at storage offset 1 (every address misaligned: the scalar paths);
  * 40 more small tensors, so that the CUDA address table (at most ~37 AdamW tensors per launch) fills and
    a second launch carries on; with AdamW on the CUDA backend 520 step counters, more than one step-kernel
    launch (508 per launch);
  * the controls on: schedule tables read past their end, grad_scale, found_inf (0, then 1), clip_coef;
  * then one FusedAdamW.step() with max_grad_norm (the norm and the clip coefficient on the device), and two
    8-bit-state FusedAdamW / FusedLion steps on bf16 params with stochastic rounding.
Memory is allocated without PyTorch's caching allocator under compute-sanitizer (PYTORCH_NO_CUDA_MEMORY_CACHING=1,
which `make gpu-check` sets): every tensor is its own allocation, so an access past its end is an error.
Prints one line per backend and exits 0 when every call ran.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SIZES = [0, 1, 3, 97, 1025, 4099, 65537, 2 * 65536 + 3]
SMALL_SIZES = [0, 1, 3, 97, 1025, 2049]  # --small (CPU, interpreter): one masked block, two Triton rows
SMALL_DTYPES = ("float32", "bf16-master")
EXTRA_TENSORS = 40
STEP_COUNTERS = 520
DTYPES = ("float32", "bf16-master", "float16", "float64")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="gpu_sanitize.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--backends", default=None, help="comma list of cuda, triton, cpu (default: every one usable)")
    p.add_argument("--small", action="store_true", help="small sizes and few tensors (for the interpreter)")
    return p.parse_args(argv)


def tensors(torch, sizes, dtype, device, offset, seed):
    """Tensors of `sizes`, each a view at `offset` elements into its own allocation, filled with randn."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        base = torch.empty(n + offset, dtype=dtype, device=device)
        view = base[offset:]
        view.copy_(torch.randn(n, generator=g).to(dtype))
        out.append(view)
    return out


def run_rule(torch, impl, rule, dtype_name, device, sizes, extra, counters):
    """Three op calls (found_inf 0, 0, 1) on aligned and misaligned lists; returns the number of calls."""
    master = dtype_name == "bf16-master"
    dtype = {"float32": torch.float32, "bf16-master": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}[dtype_name]
    state_dtype = torch.float32 if master else dtype
    lr_table = torch.linspace(1e-3, 1e-4, 2, dtype=torch.float64, device=device)
    mom_table = torch.linspace(0.9, 0.8, 2, dtype=torch.float64, device=device)
    step = torch.zeros((), dtype=torch.int64, device=device)
    grad_scale = torch.full((1,), 4.0, device=device)
    found_inf = torch.zeros(1, device=device)
    clip = torch.full((1,), 0.5, device=device)
    calls = 0
    for offset in (0, 1):
        all_sizes = sizes + [5 + k for k in range(extra)]
        params = tensors(torch, all_sizes, dtype, device, offset, 1)
        grads = tensors(torch, all_sizes, dtype, device, offset, 2)
        masters = [p.float().clone() for p in params] if master else []
        states = [[torch.zeros(p.shape, dtype=state_dtype, device=device) for p in params] for _ in range(3)]
        steps = [torch.zeros((), dtype=torch.int64, device=device) for _ in params]
        for t in range(3):
            found_inf.fill_(1.0 if t == 2 else 0.0)
            ctl = (lr_table, mom_table, step, grad_scale, found_inf, clip)
            if rule == "adamw":
                impl(params, grads, states[0], states[1], states[2], steps, masters, 1e-3, 0.9, 0.999, 1e-8, 0.01,
                     True, False, *ctl)
            elif rule == "sgd":
                impl(params, grads, states[0], masters, 1e-2, 0.9, 0.0, 1e-4, True, False, t == 0, *ctl)
            else:
                impl(params, grads, states[0], masters, 1e-4, 0.9, 0.99, 0.1, *ctl)
            step.add_(3)  # past the tables' end from the second call on
            calls += 1
    if rule == "adamw" and counters:
        # many step counters: more than one launch of the CUDA step kernel
        params = tensors(torch, [2] * counters, dtype, device, 0, 3)
        grads = tensors(torch, [2] * counters, dtype, device, 0, 4)
        zeros = [[torch.zeros(2, dtype=state_dtype, device=device) for _ in params] for _ in range(2)]
        steps = [torch.zeros((), dtype=torch.int64, device=device) for _ in params]
        masters = [p.float().clone() for p in params] if master else []
        impl(params, grads, zeros[0], zeros[1], [], steps, masters, 1e-3, 0.9, 0.999, 1e-8, 0.01, False, False,
             None, None, None, None, None, None)
        calls += 1
    return calls


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import fusedopt
    from fusedopt import backends

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA GPU", file=sys.stderr)
        return 2
    usable = [n for n in ("cpu", "cuda", "triton") if backends.available()[n][0]
              and (n == "triton" or (n == "cpu") == (device.type == "cpu"))]
    names = [n for n in (args.backends.split(",") if args.backends else usable) if n]
    sizes = SMALL_SIZES if args.small else SIZES
    extra = 4 if args.small else EXTRA_TENSORS
    counters = 0 if args.small else STEP_COUNTERS
    failed = False
    for name in names:
        if name not in usable:
            print(f"gpu_sanitize: backend {name}: not usable on {device} ({backends.available()[name][1]})")
            failed = True
            continue
        backend = backends.resolve(name, device)
        start, calls = time.perf_counter(), 0
        for rule in ("adamw", "sgd", "lion"):
            for dtype_name in (SMALL_DTYPES if args.small else DTYPES):
                calls += run_rule(torch, getattr(backend, rule + "_"), rule, dtype_name, device, sizes, extra,
                                  counters)
        model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.Tanh(), torch.nn.Linear(65, 3)).to(device)
        opt = fusedopt.FusedAdamW(model.parameters(), backend=name, max_grad_norm=1.0)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(7, 33, device=device)).square().sum().backward()
            opt.step()
            calls += 1
        # small states (issue 13): 8-bit states (the CUDA kernels' shared-memory absmax reduction between
        # barriers, for racecheck) and stochastically rounded bf16 params, on a weight of 4,753 elements
        # (quantized, a partial last block) next to float32-state biases
        small = torch.nn.Linear(97, 49).to(device=device, dtype=torch.bfloat16)
        for cls in (fusedopt.FusedAdamW, fusedopt.FusedLion):
            small_opt = cls(small.parameters(), backend=name, state_precision="8bit", stochastic_rounding=True)
            for _ in range(2):
                small_opt.zero_grad(set_to_none=True)
                small(torch.randn(5, 97, device=device, dtype=torch.bfloat16)).float().square().sum().backward()
                small_opt.step()
                calls += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        finite = all(bool(torch.isfinite(p).all()) for p in [*model.parameters(), *small.parameters()])
        print(f"gpu_sanitize: backend {name} on {device}: {calls} calls in {time.perf_counter() - start:.1f} s"
              f"{'' if finite else ' (NON-FINITE PARAMS)'}", flush=True)
        failed |= not finite
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
