"""One pass per step: fused gradient clipping, GradScaler unscale + inf/NaN skip, and fp32 master weights,
each against the eager recipe users write today, on every backend that runs here (the C++ CPU kernels, the
Triton kernels under the Triton interpreter; on a GPU the CUDA kernels and the compiled Triton kernels, marked
`gpu`). The oracles run on the CPU; ours on the backend's device (conftest.backend_device)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import backend_device, usable_backends
from oracles import RULE_CLASSES, assert_close_normwise, scheduler_factories, split_groups
from fusedopt import schedules

BACKENDS = usable_backends()
# Small shapes: the Triton interpreter executes every program in Python. Still: empty, scalar, odd sizes.
SHAPES = [(0,), (), (1,), (5,), (97,), (13, 11), (300,)]
OPTIONS = {
    "adamw": dict(lr=1e-2, weight_decay=0.05),
    "sgd": dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "lion": dict(lr=1e-3, weight_decay=0.1),
}
GROUPS = [{}, {"lr": 5e-3}]


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    # a per-step scale spanning 4 decades, so the clip is active on some steps and inactive on others
    scale = 10 ** (4 * torch.rand((), generator=g).item() - 2.5)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype) for p in params]


def _count_or_close(rule, ours, theirs, tol, what):
    if rule == "lion":  # sign(): count elements that differ (see test_parity); none may differ by more
        total = sum(b.numel() for b in theirs)
        differ = sum(int(((a - b).abs() > tol * max(b.abs().max().item(), 1e-30)).sum()) for a, b in zip(ours, theirs)
                     if b.numel())
        assert differ <= max(2, total // 1000), f"{what}: {differ} of {total} elements differ"
        return
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close_normwise(a, b, tol, f"{what} param {i}")


def _run_clipped(rule, backend, steps, norm_type=2.0, schedule=None):
    """Trains our optimizer with max_grad_norm=1 beside the oracle with clip_grad_norm_ + step (and the named
    torch scheduler, baked into a table for ours), checking every step that the norms agree (rtol 1e-6) and
    that our grads are left as they were. Returns (ours params, oracle params, number of clipped steps).
    The oracle clips the non-empty params: empty ones add nothing to any norm, and torch's inf-norm cannot
    reduce an empty tensor."""
    max_norm = 1.0
    ours_cls, oracle_factory = RULE_CLASSES[rule]
    base = _params()
    dev = backend_device(backend)
    ours_p = [p.clone().to(dev) for p in base]
    oracle_p = [p.clone() for p in base]
    oracle = oracle_factory(split_groups(oracle_p, GROUPS), **OPTIONS[rule])
    table = sched = None
    if schedule is not None:
        factory = scheduler_factories(steps)[schedule]
        sched = factory(oracle)
        table = schedules.from_lr_scheduler(factory, steps)
    ours = ours_cls(split_groups(ours_p, GROUPS), **OPTIONS[rule], backend=backend, max_grad_norm=max_norm,
                    norm_type=norm_type, schedule=table)
    clipped_steps = 0
    for t in range(steps):
        grads = _grads(base, t)
        for p, q, g in zip(ours_p, oracle_p, grads):
            p.grad = g.clone().to(dev)
            q.grad = g.clone()
        total = torch.nn.utils.clip_grad_norm_([q for q in oracle_p if q.numel()], max_norm, norm_type=norm_type)
        clipped_steps += int(total > max_norm)
        oracle.step()
        if sched is not None:
            sched.step()
        ours.step()
        assert ours.last_grad_norm is not None
        torch.testing.assert_close(ours.last_grad_norm.cpu(), total, rtol=1e-6, atol=0)
        for p, g in zip(ours_p, grads):
            assert torch.equal(p.grad.cpu(), g), "grads must not be rewritten"
    return [p.cpu() for p in ours_p], oracle_p, clipped_steps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_clipping_matches_clip_grad_norm(rule, backend):
    """max_grad_norm in the step == clip_grad_norm_ + step, over 300 steps driven by a OneCycleLR schedule.
    float32, normwise 1e-6: the norm is the same quantity (on CPU fusedopt::grad_norm sums in float64, torch
    sums per-tensor float32 norms: they differ by torch's rounding, ~1e-7 here), the coefficient comes from the
    same formula, and the kernel multiplies each grad by it as _foreach_mul_ does."""
    ours_p, oracle_p, clipped_steps = _run_clipped(rule, backend, 300, schedule="one_cycle_momentum")
    assert 50 < clipped_steps < 250, "the test must exercise both clipped and unclipped steps"
    _count_or_close(rule, ours_p, oracle_p, 1e-6, f"{rule}/{backend} clipped")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [1.0, math.inf])
def test_clipping_by_other_norms_with_empty_params(norm_type, backend):
    """L1 and inf norms, over params that include empty ones, 40 steps (same checks as above)."""
    ours_p, oracle_p, _ = _run_clipped("adamw", backend, 40, norm_type=norm_type)
    _count_or_close("adamw", ours_p, oracle_p, 1e-6, f"adamw/{backend} clipped by the {norm_type}-norm")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_grad_scaler_unscales_clips_and_skips(rule, backend):
    """float16 autocast training with torch.amp.GradScaler, an inf or NaN injected into a grad on chosen steps.
    Oracle: scaler.unscale_ + clip_grad_norm_ + scaler.step + scaler.update, and its scheduler stepped the way
    torch users skip the scheduler on the steps GradScaler skipped: only when scaler.update() did not lower the
    scale (the skip is read from GradScaler itself, not from the test's list of bad steps; the README says
    fusedopt's schedule does not advance on a skipped step). Ours: scaler.step(opt) + scaler.update, with
    max_grad_norm: unscale, clip and skip happen inside the step."""
    steps, inf_steps = 60, {3, 17, 18, 40}
    ours_cls, oracle_factory = RULE_CLASSES[rule]
    dev = backend_device(backend)
    model_o, model_f = _mlp(), _mlp().to(dev)
    factory = scheduler_factories(steps)["lambda_warmup_cosine"]
    opt_o = oracle_factory(model_o.parameters(), **OPTIONS[rule])
    sched_o = factory(opt_o)
    opt_f = ours_cls(model_f.parameters(), **OPTIONS[rule], backend=backend, max_grad_norm=0.5,
                     schedule=schedules.from_lr_scheduler(factory, steps))
    scaler_o = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=5)
    scaler_f = torch.amp.GradScaler(dev.type, init_scale=2.0 ** 12, growth_interval=5)
    gen = torch.Generator().manual_seed(0)
    taken = 0
    for t in range(steps):
        x = torch.randn(8, 16, generator=gen)
        y = torch.randn(8, 4, generator=gen)
        # The grads come from the oracle's model and are copied, still scaled, to ours: an fp16 forward would
        # amplify last-bit param differences into fp16-ulp grad differences and hide what is being compared.
        opt_o.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model_o(x).float(), y)
        scaler_o.scale(loss).backward()
        scaler_f.scale(loss.to(dev))  # what makes a GradScaler take part in an iteration (it sets up its scale)
        if t in inf_steps:
            next(model_o.parameters()).grad.view(-1)[t % 7] = math.inf if t % 2 else math.nan
        assert scaler_f.get_scale() == scaler_o.get_scale()
        for p_f, p_o in zip(model_f.parameters(), model_o.parameters()):
            p_f.grad = p_o.grad.clone().to(dev)
        before = [p.detach().clone() for p in model_f.parameters()]
        before_step = int(opt_f.param_groups[0]["schedule_step"])

        scaler_o.unscale_(opt_o)
        torch.nn.utils.clip_grad_norm_(model_o.parameters(), 0.5)
        scale_before = scaler_o.get_scale()
        scaler_o.step(opt_o)
        scaler_o.update()
        skipped_by_torch = scaler_o.get_scale() < scale_before
        if not skipped_by_torch:
            sched_o.step()
        assert skipped_by_torch == (t in inf_steps)

        scaler_f.step(opt_f)
        scaler_f.update()
        assert scaler_f.get_scale() == scaler_o.get_scale()
        if t in inf_steps:
            assert all(torch.equal(a, b) for a, b in zip(before, model_f.parameters())), "skipped step changed params"
            assert int(opt_f.param_groups[0]["schedule_step"]) == before_step, "skipped step advanced the schedule"
        else:
            taken += 1
    assert int(opt_f.param_groups[0]["schedule_step"]) == taken == steps - len(inf_steps)
    if dev.type == "cpu":  # on a GPU the host mirror cannot see skipped steps without a sync (README)
        assert opt_f.get_last_lr() == pytest.approx([g["lr"] for g in opt_o.param_groups], rel=1e-12)
    # float32 params, grads unscaled by a power of two (exact): as close as the plain parity runs.
    _count_or_close(rule, [p.cpu() for p in model_f.parameters()], list(model_o.parameters()), 1e-6,
                    f"{rule}/{backend} amp")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_master_weights_track_float32_oracle(rule, dtype, backend):
    """Low-precision params with master_weights=True: the float32 master copy follows the float32 oracle
    (started from the same values, fed the same low-precision grads) to float32 precision (normwise 1e-6),
    and each param is its master copy rounded to the param dtype."""
    steps = 100
    ours_cls, oracle_factory = RULE_CLASSES[rule]
    base = _params(dtype)
    dev = backend_device(backend)
    ours_p = [p.clone().to(dev) for p in base]
    oracle_p = [p.float() for p in base]
    factory = scheduler_factories(steps)["lambda_warmup_cosine"]
    oracle = oracle_factory(split_groups(oracle_p, GROUPS), **OPTIONS[rule])
    sched = factory(oracle)
    ours = ours_cls(split_groups(ours_p, GROUPS), **OPTIONS[rule], backend=backend, master_weights=True,
                    schedule=schedules.from_lr_scheduler(factory, steps))
    for t in range(steps):
        grads = _grads(base, t)
        for p, q, g in zip(ours_p, oracle_p, grads):
            p.grad = g.clone().to(dev)
            q.grad = g.float()
        oracle.step()
        sched.step()
        ours.step()
    masters = [ours.state[p]["master_param"] for p in ours_p]
    for p, m in zip(ours_p, masters):
        assert m.dtype == torch.float32
        assert torch.equal(p, m.to(dtype)), "param must be its master copy rounded"
        for key in ours.state[p]:
            if key != "step":
                assert ours.state[p][key].dtype == torch.float32, f"state {key} must be float32"
    _count_or_close(rule, [m.cpu() for m in masters], oracle_p, 1e-6, f"{rule}/{dtype}/{backend} master")


def test_master_weights_on_float32_params_is_a_no_op():
    """Documented choice: master_weights=True on float32 params is accepted and changes nothing."""
    p1, p2 = torch.randn(10), torch.randn(10)
    p2.copy_(p1)
    a = RULE_CLASSES["adamw"][0]([p1], master_weights=True, backend="cpu")
    b = RULE_CLASSES["adamw"][0]([p2], backend="cpu")
    for _ in range(5):
        g = torch.randn(10)
        p1.grad, p2.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(p1, p2)
    assert "master_param" not in a.state[p1]
