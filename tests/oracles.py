"""Independent reference implementations and comparison helpers shared by the parity tests.

The oracles are torch.optim.AdamW / Adam / SGD in their single-tensor form (foreach=False) and lion-pytorch's Lion:
none of them shares code with fusedopt.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence

import torch

import fusedopt
from fusedopt import schedules

from conftest import require_lion


def Lion(*args, **kwargs):  # lion-pytorch's Lion, or a skip (a failure where it is expected: CI, a GPU)
    return require_lion()(*args, **kwargs)


# Shapes that exercise the corners of the kernels: empty, scalar, tiny, odd, and longer than one CPU work
# item (32 Ki elements) so chunk boundaries are crossed.
SHAPES = [(0,), (2, 0), (), (1,), (3,), (97,), (33, 31), (1025,), (40_000,)]
# Params whose grads arrive non-contiguous (a transposed view), as they do after some layout changes.
TRANSPOSED_GRAD = {(33, 31)}

RULE_CLASSES = {
    "adamw": (fusedopt.FusedAdamW, lambda params, **kw: torch.optim.AdamW(params, foreach=False, **kw)),
    "adam": (fusedopt.FusedAdam, lambda params, **kw: torch.optim.Adam(params, foreach=False, **kw)),
    "sgd": (fusedopt.FusedSGD, lambda params, **kw: torch.optim.SGD(params, foreach=False, **kw)),
    "lion": (fusedopt.FusedLion, lambda params, **kw: Lion(params, **kw)),
}


def make_params(dtype: torch.dtype, seed: int = 0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float32).to(dtype) for s in SHAPES]


def make_grads(params: Sequence[torch.Tensor], step: int, seed: int = 0) -> List[torch.Tensor]:
    """Deterministic grads for a step, with some exact zeros (Lion's sign(0)) and a non-contiguous one."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    out = []
    for p in params:
        if tuple(p.shape) in TRANSPOSED_GRAD:
            grad = torch.randn(tuple(reversed(p.shape)), generator=g).t()
        else:
            grad = torch.randn(p.shape, generator=g)
        grad = grad * (torch.rand(p.shape, generator=g) > 0.05)  # ~5% exact zeros
        out.append(grad.to(p.dtype))
    return out


def split_groups(params: Sequence[torch.Tensor], group_options: Sequence[dict]) -> List[dict]:
    """Spreads params round-robin over the groups described by group_options."""
    groups = [dict(opts, params=[]) for opts in group_options]
    for i, p in enumerate(params):
        groups[i % len(groups)]["params"].append(p)
    return groups


def run_pair(rule: str, dtype: torch.dtype, options: dict, group_options: Sequence[dict],
             scheduler_factory: Callable, steps: int, *, backend: str = "cpu", oracle_dtype=None,
             fused_kwargs=None, seed: int = 0):
    """Runs the oracle with a torch scheduler attached and ours with the same scheduler baked into a table.
    Returns (ours_params, oracle_params, ours_opt, oracle_opt); oracle_opt.lr_history[g] lists group g's lr
    at every step."""
    ours_cls, oracle_factory = RULE_CLASSES[rule]
    base = make_params(dtype, seed)
    oracle_dtype = oracle_dtype or dtype
    ours_params = [p.clone().requires_grad_() for p in base]
    oracle_params = [p.clone().to(oracle_dtype).requires_grad_() for p in base]
    oracle = oracle_factory(split_groups(oracle_params, group_options), **options)
    sched = scheduler_factory(oracle)
    # steps + 1 entries: the last is the lr the oracle holds after its final scheduler.step()
    table = schedules.from_lr_scheduler(scheduler_factory, total_steps=steps + 1)
    ours = ours_cls(split_groups(ours_params, group_options), **options, schedule=table, backend=backend,
                    **(fused_kwargs or {}))
    oracle.lr_history = [[] for _ in oracle.param_groups]  # the lr of every step, per group
    for t in range(steps):
        grads = make_grads(base, t, seed)
        for p, g in zip(ours_params, grads):
            p.grad = g.clone()
        for p, g in zip(oracle_params, grads):
            p.grad = g.to(oracle_dtype)
        for history, group in zip(oracle.lr_history, oracle.param_groups):
            history.append(float(group["lr"]))
        ours.step()
        oracle.step()
        sched.step()
    return ours_params, oracle_params, ours, oracle


def normwise_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|: relative to the tensor's scale, so elements that pass near
    zero (every param of a long run does) do not turn an ulp into a huge elementwise ratio."""
    if expected.numel() == 0:
        return 0.0
    a = actual.detach().double()
    e = expected.detach().double()
    scale = e.abs().max().item()
    return (a - e).abs().max().item() / max(scale, 1e-30)


def describe_worst(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a = actual.detach().double().reshape(-1)
    e = expected.detach().double().reshape(-1)
    if a.numel() == 0:
        return "empty"
    diff = (a - e).abs()
    i = int(torch.nan_to_num(diff, nan=math.inf).argmax())
    nan_mismatch = int((a.isnan() != e.isnan()).sum())
    return f"worst index {i}: actual {a[i].item()!r} expected {e[i].item()!r}; NaN mismatches: {nan_mismatch}"


def assert_close_normwise(actual, expected, tol: float, what: str) -> None:
    err = normwise_error(actual, expected)
    assert err <= tol, f"{what}: normwise error {err:.3e} > {tol:.1e} ({describe_worst(actual, expected)})"


def state_pairs(rule: str, ours, oracle, ours_params, oracle_params):
    """(name, our state tensor, oracle state tensor) for every param and state key the rule has."""
    keys = {"adamw": ["exp_avg", "exp_avg_sq"], "adam": ["exp_avg", "exp_avg_sq"], "sgd": ["momentum_buffer"],
            "lion": ["exp_avg"]}[rule]
    for i, (p, q) in enumerate(zip(ours_params, oracle_params)):
        for k in keys:
            a = ours.state[p].get(k)
            b = oracle.state[q].get(k) if q in oracle.state else None
            if a is None and b is None:
                continue
            yield f"param {i} {k}", a, b


# torch schedulers used as oracles, as factories (optimizer -> scheduler)
def warmup_cosine_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def factor(t: int) -> float:
        if t < warmup:
            return t / warmup
        progress = min(1.0, (t - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def scheduler_factories(steps: int) -> Dict[str, Callable]:
    lr_sched = torch.optim.lr_scheduler
    return {
        "lambda_warmup_cosine": lambda opt: lr_sched.LambdaLR(opt, warmup_cosine_lambda(steps, steps // 10)),
        "one_cycle_momentum": lambda opt: lr_sched.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps, cycle_momentum=True,
            base_momentum=0.85, max_momentum=0.95),
        "sequential_linear_cosine": lambda opt: lr_sched.SequentialLR(
            opt, [lr_sched.LinearLR(opt, start_factor=0.1, total_iters=steps // 5),
                  lr_sched.CosineAnnealingLR(opt, T_max=steps - steps // 5, eta_min=1e-5)],
            milestones=[steps // 5]),
    }


def schedule_trace(make_scheduler: Callable, n: int, lr: float = 1.0, momentum: float = 0.9):
    """What a torch / Hugging Face scheduler sets for optimizer steps 0..n-1, read from a torch.optim.SGD's
    param group as a training loop sees it (scheduler stepped after each optimizer step).
    Returns (lrs, momenta), lists of floats."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=momentum)
    sched = make_scheduler(opt)
    lrs, moms = [], []
    for _ in range(n):
        lrs.append(float(opt.param_groups[0]["lr"]))
        moms.append(float(opt.param_groups[0]["momentum"]))
        opt.step()
        sched.step()
    return lrs, moms


def torch_amp_clip_step(scaler, opt, params, grads, max_norm: float):
    """One step of the eager AMP recipe with torch's own code: the grads scaled by scaler.scale(), then
    scaler.unscale_(opt), torch.nn.utils.clip_grad_norm_(params, max_norm), scaler.step(opt), scaler.update().
    Returns what a fused op needs to make the same step from the scaled grads: (scaled grads, the scale as a
    float32 one-element tensor, the clip coefficient clip_grad_norm_ applied as a float32 one-element tensor,
    read back through torch.nn.utils.clip_grads_with_norm_ on a grad of ones)."""
    scale = torch.tensor([scaler.get_scale()], dtype=torch.float32)
    scaled = [scaler.scale(g.clone()) for g in grads]
    for p, g in zip(params, scaled):
        p.grad = g.clone()
    scaler.unscale_(opt)
    total = torch.nn.utils.clip_grad_norm_([p for p in params if p.numel()], max_norm)
    probe = torch.zeros(1, requires_grad=True)
    probe.grad = torch.ones(1)
    torch.nn.utils.clip_grads_with_norm_([probe], max_norm, total)
    scaler.step(opt)
    scaler.update()
    return scaled, scale, probe.grad.clone(), float(total)
