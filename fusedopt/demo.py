"""`make demo` / `python -m fusedopt.demo`: train the same MLP on scikit-learn's digits twice, side by side.

    A: torch.optim.AdamW            + LambdaLR(linear warmup, cosine decay)   (a Python scheduler per step)
    B: fusedopt.FusedAdamW(schedule=warmup_cosine(...))                       (the schedule read on the device)

Both start from the same weights and see the same batches; the demo prints both loss curves, the largest
parameter difference at the end, and the time per optimizer step (scheduler included) of each.

Needs scikit-learn for the data set (pip install "fusedopt[demo]"); without it the demo says so and exits 1.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch
from torch import nn

import fusedopt
from fusedopt import schedules
from fusedopt._extras import MissingDependency, require


def load_digits():
    """The 1,797 8x8 digit images as (x float32 (1797, 64) in [0, 1], y int64 (1797,)). Raises MissingDependency
    (an ImportError with the pip command) without scikit-learn."""
    data = require("sklearn.datasets", "python -m fusedopt.demo (the digits data set)").load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 10))


def warmup_cosine_factor(total: int, warmup: int):
    """The LambdaLR equivalent of schedules.warmup_cosine(total, warmup)."""

    def factor(t: int) -> float:
        if t < warmup:
            return t / warmup
        progress = min(1.0, (t - warmup) / (total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def train(model, x, y, steps, batch, make_optimizer, seed):
    opt, sched = make_optimizer(model)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    losses, step_seconds = [], []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        start = time.perf_counter()
        opt.step()
        if sched is not None:
            sched.step()
        step_seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, step_seconds


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedopt.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    try:
        x, y = load_digits()
    except MissingDependency as e:
        print(f"fusedopt.demo: {e}", file=sys.stderr)
        return 1
    model_a = make_model(args.hidden)
    model_b = copy.deepcopy(model_a)
    n_params = sum(p.numel() for p in model_a.parameters())
    print(f"scikit-learn digits: {x.shape[0]} images, MLP 64-{args.hidden}-{args.hidden}-10 ({n_params:,} params), "
          f"{args.steps} steps of batch {args.batch}, lr {args.lr}, warmup {args.warmup} + cosine; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def torch_adamw(model):
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine_factor(args.steps, args.warmup))

    def fused_adamw(model):
        table = schedules.warmup_cosine(args.steps, warmup_steps=args.warmup)
        return fusedopt.FusedAdamW(model.parameters(), lr=args.lr, schedule=table), None

    losses_a, secs_a = train(model_a, x, y, args.steps, args.batch, torch_adamw, args.seed)
    losses_b, secs_b = train(model_b, x, y, args.steps, args.batch, fused_adamw, args.seed)

    print(f"\n{'step':>6} | {'torch AdamW + LambdaLR':>24} | {'FusedAdamW + warmup_cosine':>26}")
    every = max(1, args.steps // 16)
    for t in list(range(0, args.steps, every)) + [args.steps - 1]:
        print(f"{t:>6} | {losses_a[t]:>24.6f} | {losses_b[t]:>26.6f}")

    max_diff = max((a - b).abs().max().item() for a, b in zip(model_a.parameters(), model_b.parameters()))
    max_param = max(a.abs().max().item() for a in model_a.parameters())
    print(f"\nlargest parameter difference after {args.steps} steps: {max_diff:.3e} "
          f"(largest parameter {max_param:.3f})")
    print(f"train accuracy: torch {accuracy(model_a, x, y):.4f}, fusedopt {accuracy(model_b, x, y):.4f}")

    # the first steps allocate state; the median of the rest is the steady-state cost
    ms_a = 1e3 * sorted(secs_a[5:])[len(secs_a[5:]) // 2]
    ms_b = 1e3 * sorted(secs_b[5:])[len(secs_b[5:]) // 2]
    print(f"optimizer step (median, scheduler included): torch {ms_a:.3f} ms, fusedopt {ms_b:.3f} ms "
          f"-> {ms_a / ms_b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
