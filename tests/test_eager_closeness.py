"""As close to the eager trajectory as torch's own fused kernels (issue 11, section 2), measured in one run.

The eager trajectory is torch.optim.SGD / AdamW / Adam with foreach=False (one ATen op per formula line;
lion-pytorch's Lion for Lion). Each case runs three optimizers on the same params, grads and hyperparameters:
the eager oracle, torch's fused CPU kernel (fused=True; none exists for Lion) and fusedopt's CPU kernel, with
a torch OneCycleLR attached to torch's optimizers and the same scheduler baked into a table for ours (or a
plain lr). After N steps it counts, per implementation, the fraction of elements (params; params and states)
that differ bitwise from the eager run. The claim tested: fusedopt's fraction <= torch fused's fraction, both
measured here on this machine; nothing is compared with a stored figure.

Why ours can be as close as that: rules.h rounds where torch's eager CPU ops round (fused multiply-adds where
torch's add(alpha=), lerp and addcmul fuse; see its header), and computes beta**step as Python does up to the
last bit (a correctly rounded power). SGD is then bit for bit eager. What remains for Adam(W) is eager's sqrt,
which is not correctly rounded on torch's CPU (test_adam_is_eager_up_to_eagers_sqrt: with that one op swapped
for a correctly rounded one, torch.optim's own step and ours agree bit for bit); for Lion, a sign at an exact
tie (none in these inputs).

Tolerances: none for the fractions (ours <= torch fused's, both measured in the same run) but for
PARAM_SLACK_ELEMENTS (below, with its reason). One intra-op thread (see one_thread).

Run it as a script to print the table of fractions: python tests/test_eager_closeness.py
"""

from __future__ import annotations

import functools
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import fusedopt  # noqa: E402
from fusedopt import schedules  # noqa: E402

# Sizes: a scalar, sizes below one AVX-512 vector (the scalar tails of torch's kernels and ours), odd sizes
# with a body and a tail, an empty tensor. About 6,700 elements: enough that a 0.1% effect shows as several
# elements, small enough for 300 steps in well under a second per optimizer.
SHAPES = [(), (1,), (3,), (7,), (0,), (97,), (33, 31), (1025,), (4099,)]

# (torch class, fusedopt class, options, per-group overrides, steps)
CASES = {
    "sgd-plain": ("SGD", "FusedSGD", dict(lr=1e-2), dict(lr=3e-3), 300),
    "sgd-momentum-dampening": ("SGD", "FusedSGD", dict(lr=1e-2, momentum=0.9, dampening=0.1), dict(lr=3e-3), 300),
    "sgd-nesterov-wd": ("SGD", "FusedSGD", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2),
                        dict(lr=3e-3, weight_decay=1e-3), 300),
    "sgd-maximize": ("SGD", "FusedSGD", dict(lr=1e-2, momentum=0.8, maximize=True), dict(lr=3e-3), 300),
    "adamw": ("AdamW", "FusedAdamW", dict(lr=1e-3, weight_decay=1e-2), dict(lr=3e-4, weight_decay=0.1), 100),
    "adamw-amsgrad-maximize": ("AdamW", "FusedAdamW", dict(lr=1e-3, weight_decay=1e-2, amsgrad=True, maximize=True),
                               dict(lr=3e-4), 100),
    "adam-l2": ("Adam", "FusedAdam", dict(lr=1e-3, weight_decay=1e-2), dict(lr=3e-4, weight_decay=0.1), 100),
    "adam-l2-amsgrad": ("Adam", "FusedAdam", dict(lr=1e-3, weight_decay=1e-1, amsgrad=True), dict(lr=3e-4), 100),
}
SCHEDULES = ["constant_lr", "one_cycle_table"]
DTYPES = [torch.float32, torch.float64]


def _params(dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


@functools.lru_cache(maxsize=8)  # (dtype, steps): 2 x 3
def _grads(dtype, steps):
    """The grads of every step (the same for every optimizer of a case), ~5% exact zeros."""
    gen = torch.Generator().manual_seed(1000)
    out = []
    for _ in range(steps):
        gs = []
        for s in SHAPES:
            g = torch.randn(s, generator=gen, dtype=torch.float64)
            g = g * (torch.rand(s, generator=gen, dtype=torch.float64) > 0.05)
            gs.append(g.to(dtype))
        out.append(gs)
    return out


def _groups(params, overrides):
    return [{"params": params[0::2]}, dict(overrides, params=params[1::2])]


def _one_cycle(torch_name, options, steps):
    # Adam's betas[0] is cycled; SGD's momentum only where SGD has momentum (else plain SGD stays plain)
    cycle_momentum = torch_name != "SGD" or options.get("momentum", 0.0) != 0.0

    def factory(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=steps, cycle_momentum=cycle_momentum)

    return factory


def _lion_factory(params, **kw):
    from lion_pytorch import Lion

    return Lion(params, **kw)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: torch's fused CPU kernels open a parallel region per tensor and step, which on a
    loaded 2-core machine costs ~60x the work itself (measured: 8.5 s vs 0.13 s for 300 SGD steps). The
    bitwise results do not depend on it: every element's arithmetic is the same in any chunk."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _trajectory(opt, params):
    """(params flattened, params and states flattened): what the optimizer hands back to the user."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    states = [opt.state[p][k].reshape(-1) for p in params for k in STATE_KEYS
              if isinstance(opt.state.get(p, {}).get(k), torch.Tensor)]
    return flat, torch.cat([flat] + states)


def _fraction_differing(x, eager):
    return int((~((x == eager) | (x.isnan() & eager.isnan()))).sum()) / eager.numel()


def _contenders(case: str, schedule: str) -> dict:
    """{name: (make(params) -> optimizer, the torch scheduler factory to attach or None)} for the eager oracle,
    torch's fused kernel and fusedopt (which gets the same scheduler baked into a table)."""
    torch_name, ours_name, options, overrides, steps = CASES[case]
    factory = _one_cycle(torch_name, options, steps) if schedule == "one_cycle_table" else None
    torch_cls = getattr(torch.optim, torch_name)
    table = None if factory is None else schedules.from_lr_scheduler(factory, steps + 1)
    return {
        "eager": (lambda ps: torch_cls(_groups(ps, overrides), foreach=False, **options), factory),
        "torch_fused": (lambda ps: torch_cls(_groups(ps, overrides), fused=True, **options), factory),
        "fusedopt": (lambda ps: getattr(fusedopt, ours_name)(_groups(ps, overrides), backend="cpu", **options,
                                                             schedule=table), None),
    }


def _run(make, factory, dtype: torch.dtype, steps: int):
    """N steps of one optimizer from the common start with the common grads; returns _trajectory()."""
    ps = [p.clone() for p in _params(dtype)]
    opt = make(ps)
    sched = factory(opt) if factory is not None else None
    for grads in _grads(dtype, steps):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        if sched is not None:
            sched.step()
    return _trajectory(opt, ps)


def run_case(case: str, dtype: torch.dtype, schedule: str) -> dict:
    """Runs the eager oracle, torch fused and fusedopt; returns {name: (fraction of param elements, fraction
    of param and state elements) that differ bitwise from eager}."""
    steps = CASES[case][-1]
    runs = {name: _run(make, factory, dtype, steps) for name, (make, factory) in _contenders(case, schedule).items()}
    eager = runs.pop("eager")
    return {name: tuple(_fraction_differing(x, e) for x, e in zip(xs, eager)) for name, xs in runs.items()}


# Where eager Adam(W) and the fused kernels part ways (see test_adam_is_eager_up_to_eagers_sqrt), whether a
# param's last bit still matches eager's after later steps is a coin flip for each fused kernel; measured
# here, fusedopt and torch fused agree on the param fraction within one element either way. Two elements
# (0.03% of the params) of slack on the params alone; none on params and states.
PARAM_SLACK_ELEMENTS = 2


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_at_least_as_close_to_eager_as_torch_fused(case, dtype, schedule):
    """Measured over the params and the states (exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer): ours
    differs from eager in no more elements than torch fused. SGD (every option): bit for bit eager, params
    and momentum buffers (where torch's CPU kernels fuse add(alpha=), i.e. with AVX2 or AVX-512). Adam(W):
    the params alone are dominated by one op neither fused kernel follows, eager's sqrt (see
    test_adam_is_eager_up_to_eagers_sqrt), so there the param fraction may exceed torch fused's by
    PARAM_SLACK_ELEMENTS; the states are where the kernels' own roundings show."""
    fractions = run_case(case, dtype, schedule)
    (ours_params, ours), (fused_params, fused) = fractions["fusedopt"], fractions["torch_fused"]
    what = (f"{case} {dtype} {schedule}: fusedopt differs from eager in {ours:.4%} of the param and state "
            f"elements ({ours_params:.4%} of the params), torch fused in {fused:.4%} ({fused_params:.4%})")
    assert ours <= fused, what
    assert ours_params <= fused_params + PARAM_SLACK_ELEMENTS / sum(math.prod(s) for s in SHAPES), what
    if CASES[case][0] == "SGD" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert ours == 0, what


def _correctly_rounded_sqrt(self):
    """Tensor.sqrt correctly rounded (numpy's sqrt is IEEE's, per element), same dtype and shape."""
    return torch.from_numpy(np.asarray(np.sqrt(self.detach().cpu().numpy()))).reshape(self.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] != "SGD"])
def test_adam_is_eager_up_to_eagers_sqrt(case, dtype, monkeypatch):
    """What remains between fusedopt's Adam(W) and eager: torch's CPU sqrt (MKL's vectorized sqrt here) is
    one ulp away from the correctly rounded square root for ~20% of float32 and ~1.4% of float64 inputs; the
    fused kernels (ours and torch's) take the correctly rounded one. Run torch.optim's own single-tensor step
    with Tensor.sqrt swapped for a correctly rounded one (the only change; bias_correction2 ** 0.5 is Python's)
    under the OneCycleLR table: then fusedopt is bit for bit that run, params and states. And without the
    swap eager differs, so the swap is what closes the gap (and it was called)."""
    make_eager, factory = _contenders(case, "one_cycle_table")["eager"]
    make_ours, _ = _contenders(case, "one_cycle_table")["fusedopt"]
    steps = CASES[case][-1]
    _, ours = _run(make_ours, None, dtype, steps)
    _, eager = _run(make_eager, factory, dtype, steps)
    calls = []

    def sqrt(self):
        calls.append(1)
        return _correctly_rounded_sqrt(self)

    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt)
    _, eager_exact_sqrt = _run(make_eager, factory, dtype, steps)
    monkeypatch.undo()
    assert len(calls) == steps * len(SHAPES), "eager's step did not call Tensor.sqrt once per param and step"
    differ = int((ours != eager_exact_sqrt).sum())
    assert differ == 0, f"{case} {dtype}: {differ} of {ours.numel()} elements differ from eager with a correctly " \
                        f"rounded sqrt"
    assert not torch.equal(ours, eager)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_lion_matches_lion_pytorch_bitwise(dtype):
    """lion-pytorch has no fused kernel to compare with; its ops are all reproduced with their roundings
    (two fused multiply-adds), so the params must agree bit for bit, unless a blend lands exactly on 0 in one
    and not the other, which these inputs do not produce."""
    base = _params(dtype)
    runs = []
    for make in (lambda ps: _lion_factory(_groups(ps, dict(lr=3e-5)), lr=1e-4, weight_decay=0.1),
                 lambda ps: fusedopt.FusedLion(_groups(ps, dict(lr=3e-5)), lr=1e-4, weight_decay=0.1,
                                               backend="cpu")):
        ps = [p.clone() for p in base]
        opt = make(ps)
        for grads in _grads(dtype, 200):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        runs.append(torch.cat([p.detach().reshape(-1) for p in ps]))
    differ = int((runs[0] != runs[1]).sum())
    assert differ == 0, f"{differ} of {runs[0].numel()} Lion elements differ from lion-pytorch"


if __name__ == "__main__":  # the table for the notes: fraction of elements differing from eager
    torch.set_num_threads(1)  # as the tests run (see one_thread)
    print(f"{'case':<24} {'dtype':<8} {'schedule':<16} {'params: fusedopt':>17} {'torch fused':>12}   "
          f"{'params+states: fusedopt':>24} {'torch fused':>12}")
    for case in CASES:
        for dtype in DTYPES:
            for schedule in SCHEDULES:
                f = run_case(case, dtype, schedule)
                print(f"{case:<24} {str(dtype).replace('torch.', ''):<8} {schedule:<16} {f['fusedopt'][0]:>17.3%} "
                      f"{f['torch_fused'][0]:>12.3%}   {f['fusedopt'][1]:>24.3%} {f['torch_fused'][1]:>12.3%}",
                      flush=True)
