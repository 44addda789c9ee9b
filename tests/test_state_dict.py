"""Checkpoints: state_dict round trips with torch.optim / lion-pytorch, and exact resume with schedule tables.

Tolerances against torch (float32, rtol=1e-6, atol=1e-6)
    The scalars of every step (1 - lr*wd, lr / bias_correction1, sqrt(bias_correction2), 1 - beta, ...) are
    computed in double and rounded to float once, exactly as torch does when it hands a Python float to a
    float32 tensor op on its single-tensor (foreach=False) path; the element-wise operations come in torch's
    order with torch's roundings (fused multiply-adds where torch's CPU add(alpha=), lerp and addcmul fuse).
    What still differs: torch's CPU sqrt is one ulp off the correctly rounded square root for ~20% of float32
    inputs (AdamW's denominator), ours is correctly rounded. That is at most one ulp per step on the affected
    elements, not a drift: a few ulps after 100 steps. rtol=1e-6 (~8 ulps) covers it; atol=1e-6 covers
    elements that pass close to zero, where a 1-ulp absolute difference of a larger intermediate is a large
    *relative* one. A wrong
    scalar (e.g. lr rounded to float before the division by the bias correction, a bias correction off by
    one step, or a lost momentum buffer) shows up at 1e-4 .. 1e-1 and fails.

    Lion rounds as lion-pytorch does, so it agrees to the bit unless a sign flips at a tie; the same
    tolerance is used.

Resume (fusedopt -> fusedopt) is compared bit for bit (torch.equal): the same kernels on the same inputs.
"""

import copy
import io
import math
import warnings

import pytest
import torch

from fusedopt import FusedAdam, FusedAdamW, FusedLion, FusedSGD, schedules
from fusedopt.schedules import ScheduleTable
from oracles import schedule_trace


def hf_cosine_lrs(base_lr, warmup, total, n):
    """The lrs of steps 0..n-1 under transformers' get_cosine_schedule_with_warmup (what warmup_cosine mirrors)."""
    from transformers import get_cosine_schedule_with_warmup

    return schedule_trace(lambda o: get_cosine_schedule_with_warmup(o, warmup, total), n, lr=base_lr)[0]

from conftest import require_lion


def Lion(*args, **kwargs):  # lion-pytorch's Lion, or a skip (a failure where it is expected: CI, a GPU)
    return require_lion()(*args, **kwargs)


RTOL = 1e-6
ATOL = 1e-6
SHAPES = [(16, 8), (8,), (5, 3, 2), (7,)]
N_STEPS = 50  # before and after the switch


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in SHAPES]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def make_grads(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=g).to(dtype) for s in SHAPES] for _ in range(n)]


GRADS = make_grads(2 * N_STEPS)


def groups(params, lr, wd):
    # two groups with different hyperparameters, so a mix-up between groups shows
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr * 0.5, "weight_decay": wd * 2}]


def run(opt, params, grads, sched=None):
    for gl in grads:
        for p, g in zip(params, gl):
            p.grad = g.clone()
        opt.step()
        if sched is not None:
            sched.step()


def through_bytes(obj):
    """What a checkpoint does: serialize now (so later in-place updates do not leak in) and load back."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# name -> (torch-side factory, fusedopt factory, state keys)
PAIRS = {
    "adamw": (
        lambda ps: torch.optim.AdamW(groups(ps, 1e-2, 0.1), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
                                     foreach=False),
        lambda ps: FusedAdamW(groups(ps, 1e-2, 0.1), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
        ("exp_avg", "exp_avg_sq"),
    ),
    "adamw_amsgrad": (
        lambda ps: torch.optim.AdamW(groups(ps, 1e-2, 0.1), lr=1e-2, weight_decay=0.1, amsgrad=True,
                                     foreach=False),
        lambda ps: FusedAdamW(groups(ps, 1e-2, 0.1), lr=1e-2, weight_decay=0.1, amsgrad=True),
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    ),
    "adam": (  # L2 weight decay (torch.optim.Adam's default)
        lambda ps: torch.optim.Adam(groups(ps, 1e-2, 0.1), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
                                    foreach=False),
        lambda ps: FusedAdam(groups(ps, 1e-2, 0.1), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
        ("exp_avg", "exp_avg_sq"),
    ),
    "adam_decoupled_amsgrad_maximize": (
        lambda ps: torch.optim.Adam(groups(ps, 1e-2, 0.1), lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True,
                                    decoupled_weight_decay=True, foreach=False),
        lambda ps: FusedAdam(groups(ps, 1e-2, 0.1), lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True,
                             decoupled_weight_decay=True),
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    ),
    "sgd_momentum": (
        lambda ps: torch.optim.SGD(groups(ps, 1e-2, 1e-2), lr=1e-2, momentum=0.9, dampening=0.1,
                                   weight_decay=1e-2, foreach=False),
        lambda ps: FusedSGD(groups(ps, 1e-2, 1e-2), lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-2),
        ("momentum_buffer",),
    ),
    "sgd_nesterov": (
        lambda ps: torch.optim.SGD(groups(ps, 1e-2, 1e-2), lr=1e-2, momentum=0.9, nesterov=True,
                                   weight_decay=1e-2, foreach=False),
        lambda ps: FusedSGD(groups(ps, 1e-2, 1e-2), lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2),
        ("momentum_buffer",),
    ),
    "lion": (
        lambda ps: Lion(groups(ps, 1e-3, 0.1), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        lambda ps: FusedLion(groups(ps, 1e-3, 0.1), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        ("exp_avg",),
    ),
    "lion_decoupled": (
        lambda ps: Lion(groups(ps, 1e-3, 1e-4), lr=1e-3, weight_decay=1e-4, decoupled_weight_decay=True),
        lambda ps: FusedLion(groups(ps, 1e-3, 1e-4), lr=1e-3, weight_decay=1e-4, decoupled_weight_decay=True),
        ("exp_avg",),
    ),
}


def force_single_tensor(opt):
    # a state_dict from fusedopt has no 'foreach'; torch then picks its default (False for CPU tensors
    # anyway): pin the single-tensor path, the one fusedopt mirrors
    if isinstance(opt, (torch.optim.Adam, torch.optim.SGD)):  # torch.optim.AdamW subclasses Adam
        for g in opt.param_groups:
            g["foreach"] = False


def assert_match(params_a, opt_a, params_b, opt_b, keys, same_group_lr=True):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=RTOL, atol=ATOL, msg=lambda m: f"param {i}: {m}")
        for key in keys:
            sa, sb = opt_a.state[a][key], opt_b.state[b][key]
            assert sa.dtype == sb.dtype == torch.float32, key
            torch.testing.assert_close(sa, sb, rtol=RTOL, atol=ATOL, msg=lambda m: f"param {i} {key}: {m}")
        if "step" in opt_a.state[a] and "step" in opt_b.state[b]:
            assert int(opt_a.state[a]["step"]) == int(opt_b.state[b]["step"])
    if same_group_lr:
        for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
            assert ga["lr"] == gb["lr"]


@pytest.mark.parametrize("pair", PAIRS)
def test_reference_to_fused_mid_training(pair):
    make_ref, make_fused, keys = PAIRS[pair]
    ref_params = make_params()
    ref = make_ref(ref_params)
    run(ref, ref_params, GRADS[:N_STEPS])

    fused_params = clone_params(ref_params)
    fused = make_fused(fused_params)
    fused.load_state_dict(through_bytes(ref.state_dict()))
    for p in fused_params:
        state = fused.state[p]
        assert set(keys) <= set(state)
        if "step" in state:  # torch keeps a float32 step; fusedopt's kernels count in int64
            assert state["step"].dtype == torch.int64 and int(state["step"]) == N_STEPS
    assert_match(ref_params, ref, fused_params, fused, keys)  # identical right after the load

    run(ref, ref_params, GRADS[N_STEPS:])
    run(fused, fused_params, GRADS[N_STEPS:])
    assert_match(ref_params, ref, fused_params, fused, keys)


@pytest.mark.parametrize("pair", PAIRS)
def test_fused_to_reference_mid_training(pair):
    make_ref, make_fused, keys = PAIRS[pair]
    fused_params = make_params()
    fused = make_fused(fused_params)
    run(fused, fused_params, GRADS[:N_STEPS])

    ref_params = clone_params(fused_params)
    ref = make_ref(ref_params)
    ref.load_state_dict(through_bytes(fused.state_dict()))
    force_single_tensor(ref)
    assert_match(fused_params, fused, ref_params, ref, keys)

    run(ref, ref_params, GRADS[N_STEPS:])
    run(fused, fused_params, GRADS[N_STEPS:])
    assert_match(fused_params, fused, ref_params, ref, keys)


@pytest.mark.parametrize("pair", ["adamw", "adam", "sgd_nesterov"])
def test_round_trip_with_a_torch_scheduler_attached(pair):
    """Mid-schedule in torch's sense: a torch LR scheduler on both sides; optimizer and scheduler state move
    from torch to fusedopt and back, and the runs stay together."""
    make_ref, make_fused, keys = PAIRS[pair]
    sched_of = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3 * N_STEPS, eta_min=1e-4)
    ref_params = make_params()
    ref = make_ref(ref_params)
    ref_sched = sched_of(ref)
    run(ref, ref_params, GRADS[:N_STEPS], ref_sched)

    fused_params = clone_params(ref_params)
    fused = make_fused(fused_params)
    fused_sched = sched_of(fused)
    fused.load_state_dict(through_bytes(ref.state_dict()))
    fused_sched.load_state_dict(ref_sched.state_dict())
    run(ref, ref_params, GRADS[N_STEPS:], ref_sched)
    run(fused, fused_params, GRADS[N_STEPS:], fused_sched)
    assert_match(ref_params, ref, fused_params, fused, keys)
    assert fused_sched.get_last_lr() == ref_sched.get_last_lr()

    back_params = clone_params(fused_params)
    back = make_ref(back_params)
    back_sched = sched_of(back)
    back.load_state_dict(through_bytes(fused.state_dict()))
    back_sched.load_state_dict(fused_sched.state_dict())
    force_single_tensor(back)
    run(back, back_params, GRADS[:N_STEPS], back_sched)
    run(fused, fused_params, GRADS[:N_STEPS], fused_sched)
    assert_match(back_params, back, fused_params, fused, keys)


def test_adam_checkpoints_carry_the_decay_mode():
    """decoupled_weight_decay is a param-group key, as in torch.optim.Adam: FusedAdam's checkpoint tells
    torch.optim.Adam which decay to run, and a torch.optim.Adam checkpoint without the key (torch releases
    before it existed) means L2 decay, as torch.optim.Adam.__setstate__ assumes."""
    params = make_params()
    fused = FusedAdam(params, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
    run(fused, params, GRADS[:3])
    sd = through_bytes(fused.state_dict())
    assert [g["decoupled_weight_decay"] for g in sd["param_groups"]] == [True]
    ref = torch.optim.Adam(clone_params(params), lr=1e-2, weight_decay=0.1, foreach=False)
    ref.load_state_dict(sd)
    assert ref.param_groups[0]["decoupled_weight_decay"] is True

    old = torch.optim.Adam(clone_params(params), lr=1e-2, weight_decay=0.1, foreach=False).state_dict()
    for g in old["param_groups"]:
        del g["decoupled_weight_decay"]
    fused.load_state_dict(old)
    assert fused.param_groups[0]["decoupled_weight_decay"] is False


def test_adam_checkpoint_into_adamw_decays_decoupled_as_torch():
    """torch.optim.AdamW forces decoupled_weight_decay=True on load (its __setstate__): an Adam (L2) checkpoint
    loaded into AdamW continues with AdamW's decay. FusedAdamW does the same, and its groups carry the key
    with torch's value, checked against torch.optim.AdamW loading the same checkpoint."""
    params = make_params()
    adam = torch.optim.Adam(params, lr=1e-2, weight_decay=0.1, foreach=False)
    run(adam, params, GRADS[:3])
    sd = through_bytes(adam.state_dict())
    assert [g["decoupled_weight_decay"] for g in sd["param_groups"]] == [False]
    ref_params, fused_params = clone_params(params), clone_params(params)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, foreach=False)
    fused = FusedAdamW(fused_params, lr=1e-2, weight_decay=0.1)
    ref.load_state_dict(through_bytes(sd))  # a copy each: torch's load keeps float32 state tensors as they are
    fused.load_state_dict(through_bytes(sd))
    assert fused.param_groups[0]["decoupled_weight_decay"] is ref.param_groups[0]["decoupled_weight_decay"] is True
    run(ref, ref_params, GRADS[3:6])
    run(fused, fused_params, GRADS[3:6])
    # RTOL / ATOL: the kernel's roundings vs eager's (see their definition); L2 instead of decoupled decay would
    # differ by ~lr * weight_decay * |p| = 1e-3 relative, far outside them
    assert_match(ref_params, ref, fused_params, fused, ("exp_avg", "exp_avg_sq"))


def test_torch_adamw_checkpoint_into_a_table_schedule():
    """A torch.optim.AdamW + LambdaLR checkpoint loaded into FusedAdamW(schedule=table with the same
    factors): the schedule resumes at the checkpoint's step (the per-param 'step')."""
    factor = lambda t: 0.5 * (1 + math.cos(math.pi * t / (2 * N_STEPS)))
    ref_params = make_params()
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, foreach=False)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, factor)
    run(ref, ref_params, GRADS[:N_STEPS], ref_sched)

    fused_params = clone_params(ref_params)
    table = ScheduleTable([factor(t) for t in range(2 * N_STEPS + 1)])
    fused = FusedAdamW(fused_params, lr=1e-2, weight_decay=0.1, schedule=table)
    fused.load_state_dict(through_bytes(ref.state_dict()))
    assert fused.schedule_step == N_STEPS
    assert int(fused.param_groups[0]["schedule_step"]) == N_STEPS
    assert fused.get_last_lr() == pytest.approx(ref_sched.get_last_lr(), rel=1e-15)
    for _ in range(N_STEPS):
        run(ref, ref_params, GRADS[N_STEPS:N_STEPS + 1], ref_sched)
        run(fused, fused_params, GRADS[N_STEPS:N_STEPS + 1])
        assert fused.get_last_lr() == pytest.approx(ref_sched.get_last_lr(), rel=1e-12)
    # (group["lr"] differs by design: torch's scheduler writes the current lr there, a table leaves it alone)
    assert_match(ref_params, ref, fused_params, fused, ("exp_avg", "exp_avg_sq"), same_group_lr=False)


# --------------------------------------------------------------------------------------------------------
# Resume from a checkpoint with a schedule table: bit-identical to the uninterrupted run
# --------------------------------------------------------------------------------------------------------
TOTAL = 60
HALF = TOTAL // 2


def make_model(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def model_groups(model, lr):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": decay}, {"params": no_decay, "lr": lr * 3, "weight_decay": 0.0}]


def batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(8, 6, generator=g).to(dtype), torch.randn(8, 3, generator=g).to(dtype)) for _ in range(n)]


DATA = batches(TOTAL)


SCHEDULES = {
    "warmup_cosine": lambda: schedules.warmup_cosine(TOTAL, warmup_steps=10, min_factor=0.1),
    "one_cycle_momentum": lambda: schedules.one_cycle(TOTAL, pct_start=0.25),
    "list": lambda: ScheduleTable(lr_factors=[1.0 / (1 + 0.1 * t) for t in range(TOTAL // 3)]),  # runs out
    "baked_torch": lambda: schedules.from_lr_scheduler(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[g["lr"] for g in o.param_groups],
                                                      total_steps=TOTAL), TOTAL),
}

OPTIMIZERS = {
    "adamw": lambda params, sched, **kw: FusedAdamW(params, lr=1e-2, weight_decay=0.1, schedule=sched, **kw),
    "adamw_amsgrad_clip": lambda params, sched, **kw: FusedAdamW(
        params, lr=1e-2, weight_decay=0.1, amsgrad=True, max_grad_norm=0.5, schedule=sched, **kw),
    "sgd_nesterov": lambda params, sched, **kw: FusedSGD(params, lr=5e-2, momentum=0.9, nesterov=True,
                                                         weight_decay=1e-3, schedule=sched, **kw),
    "lion": lambda params, sched, **kw: FusedLion(params, lr=1e-3, weight_decay=0.1, schedule=sched, **kw),
}


def train(model, opt, data):
    lrs = []
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        lrs.append(opt.get_last_lr())
    return lrs


def assert_states_equal(opt_a, params_a, opt_b, params_b):
    for pa, pb in zip(params_a, params_b):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype, k
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("sched", SCHEDULES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_is_bit_identical(name, sched):
    make_opt = OPTIMIZERS[name]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fusedopt: the schedule table")
        model = make_model(0)
        opt = make_opt(model_groups(model, 1e-2 if name != "lion" else 1e-3), SCHEDULES[sched]())
        train(model, opt, DATA[:HALF])
        ckpt = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, ckpt)
        lr_at_save = opt.get_last_lr()
        mom_at_save = opt.get_last_momentum()
        lrs_a = train(model, opt, DATA[HALF:])

        model_b = make_model(1)  # other init: only the checkpoint may carry over
        opt_b = make_opt(model_groups(model_b, 1e-2 if name != "lion" else 1e-3), SCHEDULES[sched]())
        assert opt_b.schedule_step == 0
        ckpt.seek(0)
        loaded = torch.load(ckpt, weights_only=True)
        model_b.load_state_dict(loaded["model"])
        opt_b.load_state_dict(loaded["opt"])

        assert opt_b.schedule_step == HALF
        for group in opt_b.param_groups:
            step = group["schedule_step"]
            assert isinstance(step, torch.Tensor) and step.dtype == torch.int64 and int(step) == HALF
        assert opt_b.get_last_lr() == lr_at_save
        assert opt_b.get_last_momentum() == mom_at_save
        lrs_b = train(model_b, opt_b, DATA[HALF:])

    assert lrs_b == lrs_a
    assert opt_b.schedule_step == opt.schedule_step == TOTAL
    for group_a, group_b in zip(opt.param_groups, opt_b.param_groups):
        assert int(group_b["schedule_step"]) == int(group_a["schedule_step"]) == TOTAL
    for (n, a), b in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), n
    assert_states_equal(opt, list(model.parameters()), opt_b, list(model_b.parameters()))


@pytest.mark.parametrize("name", ["adamw", "sgd_nesterov", "lion"])
def test_master_weights_survive_save_and_load(name):
    """bfloat16 params with float32 master copies and float32 states: torch's load_state_dict would cast
    the floating state to the param dtype (bf16); the master copy must come back float32 and bit-identical,
    and training must continue exactly as without the interruption."""
    make_opt = OPTIMIZERS[name]
    data = batches(TOTAL, torch.bfloat16)
    lr = 1e-2 if name != "lion" else 1e-3
    model = make_model(0, torch.bfloat16)
    opt = make_opt(model_groups(model, lr), schedules.warmup_cosine(TOTAL, 5), master_weights=True)
    train(model, opt, data[:HALF])
    params = list(model.parameters())
    masters = [opt.state[p]["master_param"] for p in params]
    assert all(m.dtype == torch.float32 for m in masters)
    # the master copy holds more than the bf16 param (otherwise the test proves nothing)
    assert any(not torch.equal(m, p.detach().float()) for m, p in zip(masters, params))
    ckpt = through_bytes({"model": model.state_dict(), "opt": opt.state_dict()})
    saved_states = copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(params)})
    train(model, opt, data[HALF:])

    model_b = make_model(1, torch.bfloat16)
    opt_b = make_opt(model_groups(model_b, lr), schedules.warmup_cosine(TOTAL, 5), master_weights=True)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    params_b = list(model_b.parameters())
    for i, p in enumerate(params_b):
        state = opt_b.state[p]
        assert set(state) == set(saved_states[i])
        for key, value in saved_states[i].items():
            assert state[key].dtype == value.dtype, key
            assert torch.equal(state[key], value), key
        assert state["master_param"].dtype == torch.float32
        if "step" in state:
            assert state["step"].dtype == torch.int64
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in state:
                assert state[key].dtype == torch.float32, key
    train(model_b, opt_b, data[HALF:])
    for a, b in zip(params, params_b):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b)
    assert_states_equal(opt, params, opt_b, params_b)


def test_state_dict_without_schedule_loads_into_a_schedule():
    """A fusedopt checkpoint from a run without a table (no 'schedule_step' in its groups) resumes a table
    at the per-param step count, like a torch.optim checkpoint: the next steps use the lrs that Hugging Face's
    cosine schedule gives steps 10, 11, 12 (torch.optim.AdamW with the same checkpoint and those lrs)."""
    params = make_params()
    opt = FusedAdamW(params, lr=1e-2)
    run(opt, params, GRADS[:10])
    ckpt = opt.state_dict()
    params_b = clone_params(params)
    opt_b = FusedAdamW(params_b, lr=1e-2, schedule=schedules.warmup_cosine(40, 5))
    opt_b.load_state_dict(through_bytes(ckpt))
    assert opt_b.schedule_step == 10
    assert int(opt_b.param_groups[0]["schedule_step"]) == 10
    hf = hf_cosine_lrs(1e-2, 5, 40, 13)
    assert opt_b.get_last_lr() == [pytest.approx(hf[10], rel=1e-12)]
    ref_params = clone_params(params)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    ref.load_state_dict(through_bytes(ckpt))  # its own copy: torch keeps a loaded 'step' tensor as it is
    force_single_tensor(ref)
    for t in range(10, 13):
        ref.param_groups[0]["lr"] = hf[t]
        run(ref, ref_params, GRADS[t:t + 1])
        run(opt_b, params_b, GRADS[t:t + 1])
    assert_match(ref_params, ref, params_b, opt_b, ("exp_avg", "exp_avg_sq"), same_group_lr=False)


def test_schedule_checkpoint_loads_without_schedule():
    """And the other way: a table run's checkpoint into schedule=None drops the device counter, and the steps
    after the load use the group's lr, which (as under a torch scheduler) shows the lr the table gives the
    next step. Oracle: torch.optim.SGD under Hugging Face's cosine schedule for 10 steps, its checkpoint loaded
    into a torch.optim.SGD with no scheduler, 2 more steps (torch keeps the last scheduled lr)."""
    params = make_params()
    opt = FusedSGD(params, lr=1e-2, momentum=0.9, schedule=schedules.warmup_cosine(40, 5))
    run(opt, params, GRADS[:10])
    params_b = clone_params(params)
    opt_b = FusedSGD(params_b, lr=1e-2, momentum=0.9)
    opt_b.load_state_dict(through_bytes(opt.state_dict()))
    assert all("schedule_step" not in g for g in opt_b.param_groups)
    hf = hf_cosine_lrs(1e-2, 5, 40, 11)
    assert opt_b.get_last_lr() == pytest.approx([hf[10]], rel=1e-12)  # float64 products of the same formula
    run(opt_b, params_b, GRADS[10:12])

    ref_params = make_params()
    ref = torch.optim.SGD(ref_params, lr=1e-2, momentum=0.9, foreach=False)
    for t, lr in enumerate(hf[:10]):
        ref.param_groups[0]["lr"] = lr
        run(ref, ref_params, GRADS[t:t + 1])
    ref.param_groups[0]["lr"] = hf[10]  # what torch's scheduler leaves in the group after step 10
    ref_b = torch.optim.SGD(ref_params, lr=1e-2, momentum=0.9, foreach=False)
    ref_b.load_state_dict(through_bytes(ref.state_dict()))
    run(ref_b, ref_params, GRADS[10:12])
    ref = ref_b
    assert_match(ref_params, ref, params_b, opt_b, ("momentum_buffer",))


@pytest.mark.parametrize("precision", [None, "bf16"])
@pytest.mark.parametrize("how", ["channels_last checkpoint into a contiguous model", "model converted mid-run",
                                 "model converted mid-run, after a param that keeps its layout"])
def test_states_follow_the_params_memory_format(precision, how):
    """torch.optim runs with states whose strides differ from the param's (a channels_last checkpoint loaded into
    a contiguous model; model.to(memory_format=...) after some steps, which converts only the 4-d params: the
    batch's first param may keep its layout). The kernels walk param, grad and states in one memory order, so
    fusedopt lays the states out like the param: the same values, so the run continues bit for bit like a twin
    that never changed layout."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(32, 16, 3, 3, generator=g) for _ in range(4)]
    twin = torch.randn(32, 16, 3, 3, generator=g)
    p = twin.clone().to(memory_format=torch.channels_last)
    # a 2-d param ahead of the conv weight in the third case (model.to(memory_format=...) leaves it as it is)
    lead = [torch.randn(64, 80, generator=g)] if how.endswith("keeps its layout") else []
    lead_twin = [t.clone() for t in lead]
    opt_twin = FusedAdamW(lead_twin + [twin], lr=1e-2, state_precision=precision)
    opt = FusedAdamW(lead + [p], lr=1e-2, state_precision=precision)
    for k in range(4):
        if k == 2:
            if how.startswith("channels_last"):
                p = p.contiguous()
                sd = through_bytes(opt.state_dict())
                opt = FusedAdamW([p], lr=1e-2, state_precision=precision)
                opt.load_state_dict(sd)
            else:
                p.data = p.data.contiguous()
        twin.grad, p.grad = grads[k].clone(), grads[k].to(memory_format=torch.channels_last if k < 2 else
                                                          torch.contiguous_format)
        for a, b in zip(lead, lead_twin):
            a.grad = b.grad = torch.ones_like(a)
        opt_twin.step()
        opt.step()
    for a, b in zip(lead, lead_twin):
        assert torch.equal(a, b)
    assert p.is_contiguous() and all(opt.state[p][key].stride() == p.stride() for key in ("exp_avg", "exp_avg_sq"))
    assert torch.equal(p, twin)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[p][key], opt_twin.state[twin][key]), key


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("case", ["adamw-8bit-schedule-clip", "lion-decoupled", "sgd-bf16-stochastic"])
def test_copied_optimizer_continues_the_run(case, how):
    """copy.deepcopy / pickle of a whole optimizer (with its params, as torch.save(model_and_optimizer) does).
    torch.optim.Optimizer pickles defaults, state and param_groups only; the copy also needs fusedopt's options
    (schedule, clipping, state precision, rounding seed, Lion's initial_lr): it continues the run bit for bit."""
    import pickle

    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(80, 64, generator=g).to(dtype).requires_grad_(), torch.randn(64, generator=g).to(dtype)
              .requires_grad_()]
    if case.startswith("adamw"):
        opt = FusedAdamW(params, lr=1e-2, weight_decay=0.1, state_precision="8bit", max_grad_norm=0.5,
                         schedule=schedules.warmup_cosine(8, 2))
    elif case.startswith("lion"):
        opt = FusedLion(params, lr=1e-3, weight_decay=0.5, decoupled_weight_decay=True)
    else:
        opt = FusedSGD(params, lr=1e-2, momentum=0.9, nesterov=True, stochastic_rounding=True)
    grads = [[torch.randn(p.shape, generator=g).to(dtype) for p in params] for _ in range(6)]

    def run(params, opt, steps):
        for t in steps:
            for p, grad in zip(params, grads[t]):
                p.grad = grad.clone()
            opt.step()

    run(params, opt, range(3))
    copied = copy.deepcopy((params, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((params, opt)))
    run(params, opt, range(3, 6))
    run(*copied, range(3, 6))
    c_params, c_opt = copied
    assert all(torch.equal(a, b) for a, b in zip(params, c_params))
    for p, q in zip(params, c_params):
        for key, value in opt.state[p].items():
            assert torch.equal(value, c_opt.state[q][key]), key


def test_master_copy_follows_the_params_memory_format():
    """bfloat16 params with master_weights: model.to(memory_format=channels_last) after some steps, the conv
    weight behind a 2-d param that keeps its layout; the float32 master copy is laid out like the param (the
    kernels walk them in one memory order): the run goes on bit for bit like a twin that never changed."""
    g = torch.Generator().manual_seed(0)
    lead, conv = torch.randn(64, 80, generator=g).bfloat16(), torch.randn(32, 16, 3, 3, generator=g).bfloat16()
    params, twin = [lead.clone(), conv.clone()], [lead.clone(), conv.clone()]
    opt, opt_twin = (FusedAdamW(ps, lr=1e-2, master_weights=True) for ps in (params, twin))
    for k in range(4):
        if k == 2:
            params[1].data = params[1].data.to(memory_format=torch.channels_last)
        grads = [torch.randn(p.shape, generator=g).bfloat16() for p in params]
        for p, q, grad in zip(params, twin, grads):
            p.grad, q.grad = grad.clone().to(memory_format=torch.preserve_format), grad.clone()
        opt.step()
        opt_twin.step()
    assert opt.state[params[1]]["master_param"].stride() == params[1].stride()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], opt_twin.state[q]["master_param"])
