"""README claims that no other test covered, each against an independent oracle (torch.optim, torch's and
Hugging Face's schedulers, torch.amp.GradScaler). The distributed claims (DTensor on a mesh with a replicated
dimension, the inf-norm on an empty local shard, DTensor with Triton and master weights) are in
tests/test_distributed.py.

Tolerances: float32 params against torch.optim, normwise 1e-6 (the parity suite's bound: the kernels and torch's
CPU ops differ by an ulp in a few fused multiply-adds per step); schedule values rel 1e-12 (float64 products of
the same factors); resumed runs bit for bit (the same kernels on the same inputs).
"""

from __future__ import annotations

import io
import math
import os
import warnings

import pytest
import torch

import fusedopt
from conftest import usable_backends
from fusedopt import schedules
from oracles import assert_close_normwise, schedule_trace

# the backends that take CPU tensors here (the claims are about the optimizer classes; GPU runs are gpu tests')
BACKENDS = [b for b in usable_backends() if b == "cpu" or (b == "triton" and os.environ.get("TRITON_INTERPRET") == "1")]
SHAPES = [(0,), (), (5,), (13, 11), (97,)]
PAST_END_WARNING = "fusedopt: the schedule table"


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def make_grads(step, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + step + 1)
    return [torch.randn(s, generator=g) for s in SHAPES]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def assert_params_close(ours, ref, what, tol=1e-6):
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close_normwise(a, b, tol, f"{what} param {i}")


def hf_cosine(warmup, total):
    from transformers import get_cosine_schedule_with_warmup

    return lambda opt: get_cosine_schedule_with_warmup(opt, warmup, total)


# ----------------------------------------------------------------------------------------------------------
# Closures and step hooks ("subclass torch.optim.Optimizer (... closures, step hooks ...)")
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_and_step_hooks_as_torch(backend):
    """step(closure) evaluates the closure with grad enabled (inside step's no_grad) and returns its loss; the
    pre- and post-hooks registered with register_step_pre_hook / register_step_post_hook run once per step,
    in torch's order, and a pre-hook that rescales the grads (on the steps called without a closure, where the
    grads exist before the step) changes the update exactly as it does torch's."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    runs = {}
    for name, make in (("ours", lambda ps: fusedopt.FusedAdamW(ps, lr=1e-2, weight_decay=0.1, backend=backend)),
                       ("torch", lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False))):
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 3)
        opt = make(model.parameters())
        calls = []

        def pre(o, args, kwargs):
            calls.append("pre")
            if len(args) == 1:  # step() without a closure: the grads are there already
                for p in model.parameters():
                    p.grad.mul_(0.5)

        def post(o, args, kwargs):
            calls.append("post")

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)
        losses = []

        def closure():
            assert torch.is_grad_enabled()
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            calls.append("closure")
            return loss

        for t in range(6):
            if t % 2 == 0:
                loss = opt.step(closure)
                assert isinstance(loss, torch.Tensor)
                losses.append(float(loss.detach()))
            else:
                closure()
                assert opt.step() is None
        runs[name] = (list(model.parameters()), losses, calls)
    (ours_p, ours_l, ours_c), (ref_p, ref_l, ref_c) = runs["ours"], runs["torch"]
    assert ours_c == ref_c  # torch's order: pre-hook, then step (which calls the closure), then post-hook
    assert ours_c[:6] == ["pre", "closure", "post", "closure", "pre", "post"] and len(ours_c) == 18
    assert ours_l == pytest.approx(ref_l, rel=1e-6)
    assert_params_close([p.detach() for p in ours_p], [p.detach() for p in ref_p], "closure run")


# ----------------------------------------------------------------------------------------------------------
# Past the end of a table: the last entry holds, with one warning
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["linear_warmup_vs_linearlr", "warmup_linear_vs_hf"])
def test_past_the_end_holds_the_last_entry_with_one_warning(case, backend):
    """A table shorter than the run: exactly one warning (at the first step that reads past the end, naming
    the table's length), and the steps after it use the last entry: the oracle's scheduler is stepped while the
    table has entries and then left alone, so it holds the value of the table's last step (a table has one
    entry per step of a total_steps run: warmup_linear(8, 2) holds step 7's lr, where HF's schedule would go on
    to 0 at step 8; LinearLR holds end_factor by itself)."""
    steps = 14
    if case == "linear_warmup_vs_linearlr":
        table = schedules.linear_warmup(5, start_factor=0.2)  # 6 entries
        make_sched = lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=5)  # noqa: E731
    else:
        from transformers import get_linear_schedule_with_warmup

        table = schedules.warmup_linear(8, 2)  # 8 entries
        make_sched = lambda o: get_linear_schedule_with_warmup(o, 2, 8)  # noqa: E731
    base = make_params()
    ours_p, ref_p = [p.clone() for p in base], [p.clone() for p in base]
    ours = fusedopt.FusedAdamW(ours_p, lr=1e-2, weight_decay=0.1, schedule=table, backend=backend)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1, foreach=False)
    sched = make_sched(ref)
    seen = []
    for t in range(steps):
        assert ours.get_last_lr() == pytest.approx(sched.get_last_lr(), rel=1e-12, abs=0), f"step {t}"
        grads = make_grads(t)
        set_grads(ours_p, grads)
        set_grads(ref_p, grads)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours.step()
        seen += [(t, str(w.message)) for w in caught if PAST_END_WARNING in str(w.message)]
        ref.step()
        if t + 1 < len(table):
            sched.step()
    assert len(seen) == 1, seen
    t, message = seen[0]
    assert t == len(table) and f"has {len(table)} entries" in message
    assert_params_close(ours_p, ref_p, f"{case} past the end")


# ----------------------------------------------------------------------------------------------------------
# add_param_group in the middle of a schedule
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["adamw", "sgd"])
def test_add_param_group_mid_schedule(rule, backend):
    """A group added after k steps joins the schedule at step k with its own lr as the base (initial_lr).
    Oracle: the torch optimizer holding that group from the start with no grads for its params until step k
    (torch leaves such params and their state alone), the schedule a LambdaLR from HF's cosine over all groups."""
    steps, k, total = 12, 5, 12
    table = schedules.warmup_cosine(total, 3)
    base = make_params()
    first, second = [0, 2, 4], [1, 3]
    ours_p, ref_p = [p.clone() for p in base], [p.clone() for p in base]
    if rule == "adamw":
        ours = fusedopt.FusedAdamW([ours_p[i] for i in first], lr=1e-2, weight_decay=0.1, schedule=table,
                                   backend=backend)
        ref = torch.optim.AdamW([{"params": [ref_p[i] for i in first]},
                                 {"params": [ref_p[i] for i in second], "lr": 3e-3, "weight_decay": 0.0}],
                                lr=1e-2, weight_decay=0.1, foreach=False)
    else:
        ours = fusedopt.FusedSGD([ours_p[i] for i in first], lr=1e-2, momentum=0.9, nesterov=True, schedule=table,
                                 backend=backend)
        ref = torch.optim.SGD([{"params": [ref_p[i] for i in first]},
                               {"params": [ref_p[i] for i in second], "lr": 3e-3, "momentum": 0.8}],
                              lr=1e-2, momentum=0.9, nesterov=True, foreach=False)
    sched = hf_cosine(3, total)(ref)
    for t in range(steps):
        if t == k:
            extra = {"lr": 3e-3, "weight_decay": 0.0} if rule == "adamw" else {"lr": 3e-3, "momentum": 0.8}
            ours.add_param_group({"params": [ours_p[i] for i in second], **extra})
            assert ours.param_groups[1]["initial_lr"] == 3e-3
            assert int(ours.param_groups[1]["schedule_step"]) == k
        live = first if t < k else first + second
        assert ours.get_last_lr() == pytest.approx(sched.get_last_lr()[:len(ours.param_groups)], rel=1e-12)
        grads = make_grads(t)
        for i in live:
            ours_p[i].grad = grads[i].clone()
            ref_p[i].grad = grads[i].clone()
        ours.step()
        ref.step()
        sched.step()
    assert [int(g["schedule_step"]) for g in ours.param_groups] == [steps, steps]
    assert_params_close(ours_p, ref_p, f"{rule} with a group added at step {k}")
    if rule == "adamw":
        assert [int(ours.state[ours_p[i]]["step"]) for i in second] == [steps - k] * len(second)


# ----------------------------------------------------------------------------------------------------------
# Resume with a GradScaler-skipped step before the save, on every backend
# ----------------------------------------------------------------------------------------------------------
def _amp_run(backend, steps, inf_steps, *, save_at=None, resume_from=None):
    """FusedAdamW + warmup_cosine + max_grad_norm driven by torch.amp.GradScaler, float32 params (the scaler
    scales the loss, finds injected infs and skips those steps). Returns (model, opt, checkpoint or None)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = fusedopt.FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0,
                              schedule=schedules.warmup_cosine(12, 3), backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    start, ckpt = 0, None
    if resume_from is not None:
        loaded = torch.load(io.BytesIO(resume_from), weights_only=True)
        model.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["opt"])
        scaler.load_state_dict(loaded["scaler"])
        start = loaded["t"]
    gen = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, 6, generator=gen), torch.randn(4, 2, generator=gen)) for _ in range(steps)]
    for t in range(start, steps):
        opt.zero_grad(set_to_none=True)
        x, y = data[t]
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if t in inf_steps:
            model[0].weight.grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
        if save_at is not None and t + 1 == save_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                        "t": t + 1}, buf)
            ckpt = buf.getvalue()
    return model, opt, ckpt


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_after_a_grad_scaler_skip_is_bit_identical(backend):
    """A checkpoint taken after GradScaler skipped a step (so the schedule counter is one behind the step
    count) resumes to the uninterrupted trajectory bit for bit, on every backend; the restored schedule
    position is the number of steps taken, and its lr is HF's cosine at that position."""
    steps, save_at, inf_steps = 10, 5, {2}
    model_a, opt_a, ckpt = _amp_run(backend, steps, inf_steps, save_at=save_at)
    model_b, opt_b, _ = _amp_run(backend, save_at, set())  # a fresh optimizer to load into
    loaded = torch.load(io.BytesIO(ckpt), weights_only=True)
    opt_b.load_state_dict(loaded["opt"])
    taken = save_at - len(inf_steps)
    assert opt_b.schedule_step == taken and int(opt_b.param_groups[0]["schedule_step"]) == taken
    hf_lrs, _ = schedule_trace(hf_cosine(3, 12), taken + 1, lr=1e-2)
    assert opt_b.get_last_lr() == pytest.approx([hf_lrs[taken]], rel=1e-12)
    model_c, opt_c, _ = _amp_run(backend, steps, inf_steps, resume_from=ckpt)
    for (name, a), c in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(a, c), name
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        for key, value in opt_a.state[pa].items():
            assert torch.equal(value, opt_c.state[pc][key]), key
    assert opt_c.schedule_step == opt_a.schedule_step == steps - len(inf_steps)
    assert int(opt_c.param_groups[0]["schedule_step"]) == steps - len(inf_steps)


# ----------------------------------------------------------------------------------------------------------
# A torch.optim.SGD checkpoint (no per-param step) into a table schedule
# ----------------------------------------------------------------------------------------------------------
def test_torch_sgd_checkpoint_into_a_table_schedule():
    """torch.optim.SGD keeps no per-param 'step', so its checkpoint cannot say where the schedule was: loading
    it into FusedSGD(schedule=...) warns, keeps the momentum buffers and restarts the schedule at step 0. The
    run that follows is torch.optim.SGD from the same checkpoint with HF's cosine schedule started afresh."""
    table = schedules.warmup_cosine(12, 3)
    base = make_params()
    torch_p = [p.clone() for p in base]
    src = torch.optim.SGD(torch_p, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-3, foreach=False)
    src_sched = hf_cosine(3, 12)(src)
    for t in range(6):
        set_grads(torch_p, make_grads(t))
        src.step()
        src_sched.step()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)

    ours_p = [p.detach().clone() for p in torch_p]
    ours = fusedopt.FusedSGD(ours_p, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-3, schedule=table)
    with pytest.warns(UserWarning, match="no schedule counter and no per-param 'step'.*restarts at step 0"):
        ours.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert ours.schedule_step == 0 and int(ours.param_groups[0]["schedule_step"]) == 0

    ref_p = [p.detach().clone() for p in torch_p]
    ref = torch.optim.SGD(ref_p, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-3, foreach=False)
    ref.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    ref.param_groups[0]["lr"] = 1e-2  # the checkpoint holds the scheduled lr; the restarted schedule's base
    ref_sched = hf_cosine(3, 12)(ref)
    for t in range(6, 12):
        assert ours.get_last_lr() == pytest.approx(ref_sched.get_last_lr(), rel=1e-12)
        grads = make_grads(t)
        set_grads(ours_p, grads)
        set_grads(ref_p, grads)
        ours.step()
        ref.step()
        ref_sched.step()
    assert_params_close(ours_p, ref_p, "from a torch.optim.SGD checkpoint")
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                   rtol=1e-6, atol=1e-6)


def test_resuming_elsewhere_as_the_load_warning_says():
    """The load warning's advice (a torch SGD checkpoint has no per-param step), followed: `opt.schedule_step = k`
    moves the host mirror and the device counters together, so get_last_lr() and the kernels agree (here 6)."""
    table = schedules.warmup_cosine(12, 3)
    p = make_params()[2]
    src = torch.optim.SGD([p.clone()], lr=1e-2, momentum=0.9, foreach=False)
    src.param_groups[0]["params"][0].grad = torch.ones(5)
    src.step()
    ours = fusedopt.FusedSGD([p.clone()], lr=1e-2, momentum=0.9, schedule=table)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours.load_state_dict(src.state_dict())
    assert any("set opt.schedule_step = k" in str(w.message) for w in caught), [str(w.message) for w in caught]
    ours.schedule_step = 6
    hf_lrs, _ = schedule_trace(hf_cosine(3, 12), 7, lr=1e-2)
    assert ours.get_last_lr() == pytest.approx([hf_lrs[6]], rel=1e-12)
    assert int(ours.param_groups[0]["schedule_step"]) == 6 and ours.schedule_step == 6


# ----------------------------------------------------------------------------------------------------------
# SGD's documented first-step divergence under GradScaler
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_sgd_first_step_skipped_by_grad_scaler(dampening, backend):
    """README: when GradScaler skips a param's very first step, FusedSGD's next step starts the momentum buffer
    at (1 - dampening) * g where torch.optim.SGD starts it at g (torch never ran the skipped step, FusedSGD
    created a zero buffer for it). Oracle for FusedSGD: torch.optim.SGD whose buffer is preset to zeros (torch
    then computes momentum * 0 + (1 - dampening) * g); with dampening 0 that is also plain torch.optim.SGD
    under the same GradScaler."""
    base = make_params()
    ours_p, torch_p, zero_p = ([p.clone() for p in base] for _ in range(3))
    kw = dict(lr=1e-2, momentum=0.9, dampening=dampening, weight_decay=1e-3)
    ours = fusedopt.FusedSGD(ours_p, **kw, backend=backend)
    plain = torch.optim.SGD(torch_p, **kw, foreach=False)
    zero_buf = torch.optim.SGD(zero_p, **kw, foreach=False)
    for p in zero_p:
        zero_buf.state[p]["momentum_buffer"] = torch.zeros_like(p)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 4) for _ in range(2)]
    for t in range(5):
        grads = make_grads(t)
        for scaler, opt, ps in zip(scalers, (ours, plain), (ours_p, torch_p)):
            set_grads(ps, [scaler.scale(g) for g in grads])
            if t == 0:
                ps[3].grad[0, 0] = math.inf  # GradScaler skips the very first step
            scaler.step(opt)
            scaler.update()
        if t > 0:  # the zero-buffer oracle never sees the skipped step
            set_grads(zero_p, grads)
            zero_buf.step()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0 ** 3
    assert_params_close(ours_p, zero_p, "FusedSGD vs SGD with a zero first buffer")
    if dampening == 0.0:
        assert_params_close(ours_p, torch_p, "FusedSGD vs torch.optim.SGD under GradScaler")
    else:  # the documented difference: (1 - dampening) * g instead of g at the first taken step
        assert max((a - b).abs().max().item() for a, b in zip(ours_p, torch_p) if a.numel()) > 1e-4
