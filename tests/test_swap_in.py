"""Plain swap-in: fusedopt optimizers with schedule=None driven by a torch LR scheduler, as torch.optim's are.

Each case builds the same two-group problem twice, attaches the same torch scheduler to a torch.optim
optimizer (foreach=False: the single-tensor path that fusedopt mirrors) and to the fusedopt one, feeds both
the same precomputed gradients for >= 300 steps, and compares after every step:

* the hyperparameters the scheduler wrote into each group (lr, and momentum / betas for OneCycleLR):
  exactly -- the same scheduler code on the same Python floats;
* params and optimizer states: float32, rtol=1e-6, atol=1e-6. fusedopt computes each step's scalars
  (1 - lr*wd, lr / bias_correction1, sqrt(bias_correction2), 1 - momentum, ...) in double and rounds them
  to float once, as torch does on this path, so a scheduled lr / momentum enters both updates as the same
  float. The remaining difference is fused multiply-add: torch's vectorized CPU kernels compute
  ``a + alpha * b`` (add with alpha, addcmul, addcdiv) with a single rounding, fusedopt's kernels are built
  with -ffp-contract=off and round twice -- at most one ulp per operation and step, which stays at a few
  ulps (~2e-7 absolute on O(1) values) over the whole run instead of drifting. rtol=1e-6 is ~8 ulps;
  atol=1e-6 covers elements passing near zero, where a one-ulp difference of a larger intermediate is a
  large relative one. A scheduled value that is read at the wrong step, or ignored (e.g. OneCycleLR's
  momentum not reaching the kernel), shows up at 1e-4 or more within a few steps.
"""

import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

from fusedopt import FusedAdam, FusedAdamW, FusedLion, FusedSGD

from conftest import require_lion


def Lion(*args, **kwargs):  # lion-pytorch's Lion, or a skip (a failure where it is expected: CI, a GPU)
    return require_lion()(*args, **kwargs)


RTOL = 1e-6
ATOL = 1e-6
N_STEPS = 300
SHAPES = [(12, 6), (6,), (4, 5)]


def make_params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def _grads():
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(*s, generator=g) for s in SHAPES] for _ in range(N_STEPS)]


GRADS = _grads()


def groups(params, lr):
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr * 0.5}]


# A metric that improves for 100 steps, then stalls (with a little noise below ReduceLROnPlateau's
# threshold): the scheduler cuts the lr several times during the plateau.
def metric(t):
    return max(1.0 - t / 100.0, 0.0) + 1e-9 * (t % 3)


# ----------------------------------------------------------------------------------------------------------
# optimizers: (torch factory, fusedopt factory, state keys, momentum key written by the scheduler)
# ----------------------------------------------------------------------------------------------------------
OPTS = {
    "sgd": (
        lambda ps: torch.optim.SGD(groups(ps, 0.05), lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False),
        lambda ps: FusedSGD(groups(ps, 0.05), lr=0.05, momentum=0.9, weight_decay=1e-3),
        ("momentum_buffer",), "momentum"),
    "sgd_nesterov": (
        lambda ps: torch.optim.SGD(groups(ps, 0.05), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                   foreach=False),
        lambda ps: FusedSGD(groups(ps, 0.05), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        ("momentum_buffer",), "momentum"),
    "adamw": (
        lambda ps: torch.optim.AdamW(groups(ps, 1e-2), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
                                     foreach=False),
        lambda ps: FusedAdamW(groups(ps, 1e-2), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
        ("exp_avg", "exp_avg_sq"), "betas"),
    "adamw_amsgrad": (
        lambda ps: torch.optim.AdamW(groups(ps, 1e-2), lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False),
        lambda ps: FusedAdamW(groups(ps, 1e-2), lr=1e-2, weight_decay=0.1, amsgrad=True),
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), "betas"),
    "adam_l2": (  # torch.optim.Adam's L2 decay (added to the gradient)
        lambda ps: torch.optim.Adam(groups(ps, 1e-2), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=False),
        lambda ps: FusedAdam(groups(ps, 1e-2), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
        ("exp_avg", "exp_avg_sq"), "betas"),
    "lion": (  # lion-pytorch's Lion is the reference for FusedLion
        lambda ps: Lion(groups(ps, 1e-3), lr=1e-3, weight_decay=0.1),
        lambda ps: FusedLion(groups(ps, 1e-3), lr=1e-3, weight_decay=0.1),
        ("exp_avg",), "betas"),
}

# scheduler name -> (factory(opt), step(sched, t))
SCHEDULERS = {
    "one_cycle": (
        lambda opt: L.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=N_STEPS,
                                 pct_start=0.3, cycle_momentum=True, base_momentum=0.85, max_momentum=0.95),
        lambda sched, t: sched.step()),
    "one_cycle_three_phase_linear": (
        lambda opt: L.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=N_STEPS,
                                 three_phase=True, anneal_strategy="linear", cycle_momentum=True),
        lambda sched, t: sched.step()),
    "plateau": (
        lambda opt: L.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=10, threshold=1e-4,
                                        cooldown=5, min_lr=[1e-5, 1e-6]),
        lambda sched, t: sched.step(metric(t))),
    "lambda_per_group": (
        lambda opt: L.LambdaLR(opt, [lambda t: min(1.0, (t + 1) / 30) * 0.99 ** t,
                                     lambda t: 1.0 / (1.0 + 0.01 * t)]),
        lambda sched, t: sched.step()),
}

CASES = [
    ("sgd", "one_cycle"),
    ("sgd_nesterov", "one_cycle"),
    ("adamw", "one_cycle"),
    ("adamw", "one_cycle_three_phase_linear"),
    ("sgd", "plateau"),
    ("adamw_amsgrad", "plateau"),
    ("sgd_nesterov", "lambda_per_group"),
    ("adamw", "lambda_per_group"),
    ("lion", "lambda_per_group"),
    ("lion", "plateau"),
]


def hyper(opt, key):
    return [(g["lr"], g[key]) for g in opt.param_groups]


def compare(step, ref_params, ref, params, opt, keys):
    for i, (a, b) in enumerate(zip(ref_params, params)):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"step {step}, param {i}: {m}")
        for key in keys:
            torch.testing.assert_close(opt.state[b][key], ref.state[a][key], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"step {step}, param {i}, {key}: {m}")


@pytest.mark.parametrize("opt_name,sched_name", CASES, ids=[f"{o}-{s}" for o, s in CASES])
def test_torch_scheduler_on_fused_matches_torch(opt_name, sched_name):
    make_ref, make_fused, keys, mom_key = OPTS[opt_name]
    make_sched, step_sched = SCHEDULERS[sched_name]
    ref_params, params = make_params(), make_params()
    ref, opt = make_ref(ref_params), make_fused(params)
    with warnings.catch_warnings():
        # a wrong step order (or an optimizer.step the scheduler cannot see) would warn here
        warnings.simplefilter("error", UserWarning)
        ref_sched, sched = make_sched(ref), make_sched(opt)
        assert hyper(opt, mom_key) == hyper(ref, mom_key)
        seen = set()
        for t in range(N_STEPS):
            for p, q, g in zip(ref_params, params, GRADS[t]):
                p.grad = g.clone()
                q.grad = g.clone()
            ref.step()
            opt.step()
            if t + 1 < N_STEPS or sched_name not in ("one_cycle", "one_cycle_three_phase_linear"):
                step_sched(ref_sched, t)  # (OneCycleLR raises past total_steps)
                step_sched(sched, t)
            assert hyper(opt, mom_key) == hyper(ref, mom_key), f"step {t}"
            assert opt.get_last_lr() == [g["lr"] for g in opt.param_groups]
            seen.add(tuple(lr for lr, _ in hyper(opt, mom_key)))
            if t % 50 == 49 or t == N_STEPS - 1:
                compare(t, ref_params, ref, params, opt, keys)
    assert len(seen) > 3, "the scheduler never changed the lr: the test would prove nothing"
    if sched_name.startswith("one_cycle"):
        momenta = {m[0] if isinstance(m, tuple) else m for g in ref.param_groups for m in [g[mom_key]]}
        assert momenta, "no momentum"
    # the params moved: comparing two frozen models would pass trivially
    assert any(not torch.equal(p.detach(), q) for p, q in zip(params, make_params()))


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_one_cycle_momentum_reaches_the_kernel(opt_name):
    """OneCycleLR writes momentum / betas[0] into the groups every step; a fused optimizer that cached them
    at construction would still match torch's lr but not its params. Guard that the comparison above can
    tell: a run whose momentum is held fixed ends measurably far from the cycled one."""
    make_ref, make_fused, _, mom_key = OPTS[opt_name]
    make_sched, _ = SCHEDULERS["one_cycle"]
    cycled, fixed = make_params(), make_params()
    opt_c, opt_f = make_fused(cycled), make_fused(fixed)
    sched_c = make_sched(opt_c)
    sched_f = L.OneCycleLR(opt_f, max_lr=[g["lr"] for g in opt_f.param_groups], total_steps=N_STEPS,
                           pct_start=0.3, cycle_momentum=False)
    for t in range(50):
        for p, q, g in zip(cycled, fixed, GRADS[t]):
            p.grad = g.clone()
            q.grad = g.clone()
        opt_c.step()
        opt_f.step()
        sched_c.step()
        sched_f.step()
    assert [g["lr"] for g in opt_c.param_groups] == [g["lr"] for g in opt_f.param_groups]
    diff = max((p - q).abs().max().item() for p, q in zip(cycled, fixed))
    assert diff > 100 * ATOL, diff


@pytest.mark.parametrize("opt_name", ["sgd_nesterov", "adamw", "lion"])
def test_tensor_lr_written_in_place_matches_torch(opt_name):
    """A one-element tensor lr (what capturable training loops use, and what the kernels read on the device as
    a one-entry table without a step counter), changed in place every step, against torch.optim /
    lion-pytorch given the same tensor."""
    make_ref, make_fused, _, _ = OPTS[opt_name]
    ref_params, params = make_params(), make_params()
    ref, fused = make_ref(ref_params), make_fused(params)
    lrs = []
    for opt in (ref, fused):
        for group in opt.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64)
            lrs.append(group["lr"])
    for t in range(100):
        for lr in lrs:
            lr.mul_(0.98)  # a decay the optimizers only see through the tensor
        for p, q, g in zip(params, ref_params, GRADS[t]):
            p.grad = g.clone()
            q.grad = g.clone()
        ref.step()
        fused.step()
    for i, (p, q) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=lambda m: f"param {i}: {m}")
    assert any(not torch.equal(p.detach(), q) for p, q in zip(params, make_params()))
