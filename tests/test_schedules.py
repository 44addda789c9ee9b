"""Schedule tables against the torch LR schedulers they mirror, step by step.

Each test attaches a torch scheduler to a real torch.optim.SGD / AdamW (dummy params, several groups with
different lrs), reads every group's lr (and momentum / betas[0]) before each step, and compares it with
``table.resolve(groups, defaults)``. Both sides compute in float64 (Python floats vs. a float64 table), and
the builders use torch's own expressions, so the only differences are a few ulps of rounding (from
recursive vs. closed forms): rtol=1e-12, atol=0.
"""

import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

from fusedopt import schedules as S

LRS = (0.1, 3e-4, 2.5)  # one param group per lr
RTOL = 1e-12
EPS = torch.finfo(torch.float64).eps


def make_opt(kind="sgd", lrs=LRS):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    return torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.999))


def momentum_of(group, defaults):
    return group["betas"][0] if "betas" in defaults else group["momentum"]


def torch_trace(opt, sched, n):
    """lrs[t][g] and momenta[t][g] that torch uses for optimizer step t = 0..n-1."""
    lrs, moms = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(n):
            if t:
                opt.step()  # no grads: a no-op, but keeps torch's step-order check quiet
                sched.step()
            lrs.append([float(g["lr"]) for g in opt.param_groups])
            moms.append([float(momentum_of(g, opt.defaults)) for g in opt.param_groups])
    return torch.tensor(lrs, dtype=torch.float64).T, torch.tensor(moms, dtype=torch.float64).T


def table_trace(resolved, n):
    """The resolved per-group tables read at steps 0..n-1 (past the end the last entry holds)."""
    lrs = torch.stack([lr[torch.arange(n).clamp(max=lr.numel() - 1)] for lr, _ in resolved])
    if resolved[0][1] is None:
        assert all(m is None for _, m in resolved)
        return lrs, None
    moms = torch.stack([m[torch.arange(n).clamp(max=m.numel() - 1)] for _, m in resolved])
    return lrs, moms


def close(actual, expected, atol=0.0):
    """rtol=1e-12; ``atol`` (a scalar or one per row/group) only where torch's own formula cancels."""
    atol = torch.as_tensor(atol, dtype=torch.float64)
    if atol.dim() == 1 and actual.dim() == 2:
        atol = atol[:, None]
    err = (actual - expected).abs()
    bad = err > RTOL * expected.abs() + atol
    assert actual.shape == expected.shape
    assert not bool(bad.any()), (
        f"{int(bad.sum())} mismatches; first at {bad.nonzero()[0].tolist()}: "
        f"{actual[bad][0].item()!r} vs {expected[bad][0].item()!r}"
    )


def check(table, make_sched, n, kind="sgd", groups_before=False, momentum=False, peak_ulps=0):
    """Compare ``table`` with ``make_sched(opt)`` for n steps (lr atol: ``peak_ulps`` ulps of each group's lr)."""
    opt = make_opt(kind)
    before = [dict(g) for g in opt.param_groups]  # OneCycleLR rewrites lr: its max_lr is the group lr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = make_sched(opt)
    # Resolve against the live groups (they now carry initial_lr) unless the table's base is the pre-scheduler lr.
    resolved = table.resolve(before if groups_before else opt.param_groups, opt.defaults)
    assert len(resolved) == len(LRS)
    exp_lr, exp_mom = torch_trace(opt, sched, n)
    got_lr, got_mom = table_trace(resolved, n)
    close(got_lr, exp_lr, atol=peak_ulps * EPS * torch.tensor(LRS, dtype=torch.float64))
    if momentum:
        close(got_mom, exp_mom, atol=peak_ulps * EPS)
    else:
        assert got_mom is None
    return table


# ---------------------------------------------------------------------------------------------------- builders


@pytest.mark.parametrize("warmup,start", [(1, 0.5), (7, 0.1), (40, 1.0 / 3), (25, 1.0)])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_linear_warmup_matches_linearlr(warmup, start, kind):
    t = check(S.linear_warmup(warmup, start_factor=start),
              lambda o: L.LinearLR(o, start_factor=start, end_factor=1.0, total_iters=warmup), warmup + 10, kind)
    assert len(t) == warmup + 1 and t.lr_factors[-1] == 1.0 and t.lr_factors[0] == start


@pytest.mark.parametrize("warmup", [1, 5, 64])
def test_linear_warmup_from_zero_matches_lambdalr(warmup):
    t = check(S.linear_warmup(warmup), lambda o: L.LambdaLR(o, lambda s: min(1.0, s / warmup)), warmup + 5)
    assert t.lr_factors[0] == 0.0
    assert S.linear_warmup(0).lr_factors.tolist() == [1.0]


@pytest.mark.parametrize("total,warmup,m", [(1, 0, 0.0), (50, 0, 0.0), (120, 10, 0.0), (200, 37, 0.05), (9, 8, 0.5)])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_warmup_cosine_and_linear_match_hugging_face(total, warmup, m, kind):
    """warmup_cosine against transformers' get_cosine_with_min_lr_schedule_with_warmup (min_lr_rate = the floor;
    get_cosine_schedule_with_warmup when it is 0), warmup_linear against get_polynomial_decay_schedule_with_warmup
    with power 1 and lr_end = floor * lr (get_linear_schedule_with_warmup when the floor is 0), for the steps
    0..total-1 of a total-step run (the length rule: one entry per step)."""
    import transformers as hf

    if m:
        cosine = lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup(o, warmup, total, min_lr_rate=m)  # noqa: E731
        linear = lambda o: hf.get_polynomial_decay_schedule_with_warmup(  # noqa: E731
            o, warmup, total, lr_end=m * o.defaults["lr"], power=1.0)
    else:
        cosine = lambda o: hf.get_cosine_schedule_with_warmup(o, warmup, total)  # noqa: E731
        linear = lambda o: hf.get_linear_schedule_with_warmup(o, warmup, total)  # noqa: E731
    tc = check(S.warmup_cosine(total, warmup_steps=warmup, min_factor=m), cosine, total, kind)
    tl = check(S.warmup_linear(total, warmup_steps=warmup, min_factor=m), linear, total, kind)
    for t in (tc, tl):
        assert len(t) == total  # the length rule: one entry per step of a total_steps run
        assert t.lr_factors[warmup] == 1.0


@pytest.mark.parametrize("total,m", [(30, 0.0), (100, 0.2)])
def test_warmup_cosine_without_warmup_is_cosineannealinglr(total, m):
    lr0 = LRS[0]  # CosineAnnealingLR has one absolute eta_min: compare the group it fits
    tab = S.warmup_cosine(total, min_factor=m)
    opt = make_opt()
    sched = L.CosineAnnealingLR(opt, T_max=total, eta_min=m * lr0)
    exp, _ = torch_trace(opt, sched, total)
    close(tab.resolve(opt.param_groups, opt.defaults)[0][0], exp[0])


ONE_CYCLE_CASES = [
    dict(total_steps=100),
    dict(total_steps=57, pct_start=0.25, anneal_strategy="linear"),
    dict(total_steps=80, three_phase=True, div_factor=10.0, final_div_factor=100.0),
    dict(total_steps=33, pct_start=0.45, three_phase=True, anneal_strategy="linear", base_momentum=0.8,
         max_momentum=0.99),
    dict(total_steps=20, pct_start=0.0),
    dict(total_steps=3, pct_start=0.1),
    dict(total_steps=1),
    dict(total_steps=40, cycle_momentum=False),
]


@pytest.mark.parametrize("kw", ONE_CYCLE_CASES)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_one_cycle_matches_onecyclelr(kw, kind):
    n = kw["total_steps"]
    tab = S.one_cycle(**kw)
    # OneCycleLR's linear anneal ``(end - start) * pct + start`` cancels as pct -> 1 and is then only
    # accurate to an ulp of the peak lr, not relative to the (1e5 times smaller) final lr: allow 2 ulps of it.
    check(tab, lambda o: L.OneCycleLR(o, max_lr=list(LRS), **kw), n, kind, groups_before=True,
          momentum=kw.get("cycle_momentum", True), peak_ulps=2 if kw.get("anneal_strategy") == "linear" else 0)
    assert len(tab) == n


def test_one_cycle_degenerate_warmup_counts_as_done():
    # pct_start * total_steps == 1: OneCycleLR divides 0 by 0 at step 0; the table is at the peak there.
    with pytest.raises(ZeroDivisionError):
        L.OneCycleLR(make_opt(), max_lr=1.0, total_steps=10, pct_start=0.1)
    assert S.one_cycle(10, pct_start=0.1).lr_factors[0] == 1.0


@pytest.mark.parametrize("step_size,gamma,total", [(1, 0.5, 40), (7, 0.1, 50), (10, 0.9, 95), (3, 1.0, 10)])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_step_decay_matches_steplr(step_size, gamma, total, kind):
    tab = check(S.step_decay(step_size, gamma, total_steps=total),
                lambda o: L.StepLR(o, step_size, gamma), total, kind)  # past total_steps the table holds
    assert len(tab) == total


def test_step_decay_default_length():
    tab = S.step_decay(30, 0.1)  # decays until the factor is below 1e-30, then holds
    assert len(tab) == 31 * 30 + 1
    assert tab.lr_factors[-1] < 1e-30 <= tab.lr_factors[-2]
    check(tab, lambda o: L.StepLR(o, 30, 0.1), len(tab))
    assert len(S.step_decay(5, 1.0)) == 1 and len(S.step_decay(5, 0.0)) == 6
    with pytest.raises(ValueError, match="total_steps is required when gamma > 1"):
        S.step_decay(5, 1.5)
    with pytest.raises(ValueError, match="pass total_steps"):
        S.step_decay(100_000, 0.5)
    assert len(S.step_decay(5, 1.5, total_steps=12)) == 12


@pytest.mark.parametrize("gamma,total", [(0.95, 120), (0.5, 30), (1.0, 5)])
def test_exponential_matches_exponentiallr(gamma, total):
    tab = check(S.exponential(gamma, total), lambda o: L.ExponentialLR(o, gamma), total)
    assert len(tab) == total


@pytest.mark.parametrize("total,power", [(1, 1.0), (50, 1.0), (64, 2.0), (33, 0.5), (10, 3.7)])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_polynomial_matches_polynomiallr(total, power, kind):
    tab = check(S.polynomial(total, power), lambda o: L.PolynomialLR(o, total_iters=total, power=power),
                total, kind)
    assert len(tab) == total


def test_polynomial_min_factor():
    tab = S.polynomial(10, power=2.0, min_factor=0.1)
    expect = [0.9 * (1 - t / 10) ** 2 + 0.1 for t in range(10)]
    close(tab.lr_factors, torch.tensor(expect, dtype=torch.float64))


def hf_wsd(total, warmup, decay, m):
    """transformers' get_wsd_schedule with linear warmup and linear decay (get_constant_schedule_with_warmup when
    decay == 0: no decay at all, where WSD would drop to min_lr_ratio at the end). One difference is documented:
    the table's warmup ramps from 0 (t / warmup_steps, as HF's get_*_schedule_with_warmup do) while HF's WSD
    ramps from min_lr_ratio, so the warmup steps are compared with HF's WSD at min_lr_ratio=0."""
    import transformers as hf

    def make(o):
        if decay == 0:
            return hf.get_constant_schedule_with_warmup(o, warmup)
        kw = dict(num_training_steps=total, warmup_type="linear", decay_type="linear")
        ramp = hf.get_wsd_schedule(o, warmup, decay, min_lr_ratio=0.0, **kw).lr_lambdas[0]
        rest = hf.get_wsd_schedule(o, warmup, decay, min_lr_ratio=m, **kw).lr_lambdas[0]
        return L.LambdaLR(o, lambda t: ramp(t) if t < warmup else rest(t))

    return make


@pytest.mark.parametrize("total,warmup,decay,m", [(100, 10, 20, 0.0), (50, 0, 50, 0.1), (30, 5, 0, 0.0),
                                                  (40, 20, 20, 0.01), (1, 0, 1, 0.0)])
def test_warmup_stable_decay_matches_hugging_face(total, warmup, decay, m):
    tab = check(S.warmup_stable_decay(total, warmup, decay, min_factor=m), hf_wsd(total, warmup, decay, m), total)
    assert len(tab) == total


@pytest.mark.parametrize("T_0,T_mult,m", [(10, 1, 0.0), (4, 2, 0.0), (7, 3, 0.1), (1, 1, 0.0), (1, 2, 0.5)])
def test_cosine_restarts_matches_torch(T_0, T_mult, m):
    n = 150
    lr0 = LRS[0]  # eta_min is absolute in torch: compare the group it belongs to
    tab = S.cosine_restarts(T_0, T_mult, min_factor=m, total_steps=n)
    opt = make_opt()
    sched = L.CosineAnnealingWarmRestarts(opt, T_0, T_mult, eta_min=m * lr0)
    exp, _ = torch_trace(opt, sched, n)
    close(tab.resolve(opt.param_groups, opt.defaults)[0][0], exp[0])
    if m == 0.0:  # eta_min = 0 fits every group
        check(tab, lambda o: L.CosineAnnealingWarmRestarts(o, T_0, T_mult), n)
    assert len(tab) == n


@pytest.mark.parametrize("warmup,T_max", [(5, 40), (1, 10), (12, 25)])
def test_sequential_matches_sequentiallr(warmup, T_max):
    tab = S.sequential([S.linear_warmup(warmup, start_factor=0.1), S.warmup_cosine(T_max)], [warmup])

    def make(o):
        return L.SequentialLR(o, [L.LinearLR(o, start_factor=0.1, total_iters=warmup),
                                  L.CosineAnnealingLR(o, T_max=T_max)], milestones=[warmup])

    check(tab, make, warmup + T_max)
    assert len(tab) == warmup + T_max


def test_sequential_three_segments_and_momentum():
    a, b, c = S.constant(3), S.exponential(0.5, 2), S.polynomial(4)
    tab = S.sequential([a, b, c], [5, 9])  # a holds its last entry for steps 3, 4; b for 7, 8
    assert tab.lr_factors.tolist() == [1, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 1, 0.75, 0.5, 0.25]
    m = S.sequential([S.one_cycle(10), S.one_cycle(6, pct_start=0.5)], [10])
    assert len(m) == 16 and m.momentum[:10].tolist() == S.one_cycle(10).momentum.tolist()
    assert m.momentum[10:].tolist() == S.one_cycle(6, pct_start=0.5).momentum.tolist()


def test_constant():
    check(S.constant(), lambda o: L.LambdaLR(o, lambda s: 1.0), 5)


# -------------------------------------------------------------------------------------------- from_lr_scheduler


def bake_check(factory, n, kind="sgd", momentum=False):
    opt = make_opt(kind)
    snapshot = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    tab = S.from_lr_scheduler(factory, n)
    resolved = tab.resolve(opt.param_groups, opt.defaults)
    # The real groups are untouched (no initial_lr, max_lr, ...; same betas / momentum).
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == snapshot
    ref_opt = make_opt(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = factory(ref_opt)
    exp_lr, exp_mom = torch_trace(ref_opt, sched, n)
    got_lr, got_mom = table_trace(resolved, n)
    close(got_lr, exp_lr)
    if momentum:
        close(got_mom, exp_mom)
    else:
        assert got_mom is None
    assert len(tab) == n and isinstance(tab, S.BakedSchedule)
    return tab


def test_from_lr_scheduler_per_group_lambdas():
    fns = [lambda s: 0.9**s, lambda s: 1.0 / (1 + s), lambda s: min(1.0, (s + 1) / 10)]
    tab = bake_check(lambda o: L.LambdaLR(o, fns), 30)
    # The factory needs 3 groups, so there is no single-group standalone table; resolve still works.
    with pytest.raises(ValueError, match="use resolve"):
        tab.lr_factors
    assert "30 steps" in repr(tab)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("three_phase", [False, True])
def test_from_lr_scheduler_one_cycle_momentum(kind, three_phase):
    n = 60
    factory = lambda o: L.OneCycleLR(o, max_lr=[0.5, 0.01, 2.0], total_steps=n, three_phase=three_phase)  # noqa: E731
    bake_check(factory, n, kind, momentum=True)
    # And it agrees with the native table (whose base lr is the peak).
    opt = make_opt(kind, lrs=(0.5, 0.01, 2.0))
    native = S.one_cycle(n, three_phase=three_phase).resolve(opt.param_groups, opt.defaults)
    baked = S.from_lr_scheduler(factory, n).resolve(opt.param_groups, opt.defaults)
    for (nl, nm), (bl, bm) in zip(native, baked):
        close(bl, nl)
        close(bm, nm)


def test_from_lr_scheduler_standalone_factors():
    tab = S.from_lr_scheduler(lambda o: L.OneCycleLR(o, max_lr=1.0, total_steps=25), 25)
    native = S.one_cycle(25)
    close(tab.lr_factors, native.lr_factors)
    close(tab.momentum, native.momentum)
    assert tab.lr_at(100) == native.lr_at(100)
    nomom = S.from_lr_scheduler(lambda o: L.StepLR(o, 3, 0.5), 10)
    assert nomom.momentum is None and nomom.lr_factors.tolist() == [0.5 ** (t // 3) for t in range(10)]


def test_from_lr_scheduler_sequential_and_restarts():
    def seq(o):
        return L.SequentialLR(o, [L.LinearLR(o, start_factor=0.2, total_iters=4),
                                  L.CosineAnnealingLR(o, T_max=20, eta_min=1e-5)], milestones=[4])

    bake_check(seq, 30)
    bake_check(lambda o: L.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2, eta_min=1e-6), 60, kind="adamw")
    bake_check(lambda o: L.CyclicLR(o, base_lr=1e-4, max_lr=[0.1, 0.2, 0.3], step_size_up=5), 40,
               momentum=True)


def test_from_lr_scheduler_uses_initial_lr_and_copies_hyperparams():
    opt = make_opt("adamw")
    L.StepLR(opt, 1, 0.5)  # sets initial_lr, and a step would change lr: the base is initial_lr
    opt.param_groups[0]["lr"] = 123.0
    opt.param_groups[1]["betas"] = (0.5, 0.9)
    seen = {}

    def factory(o):
        seen["betas"] = [g["betas"] for g in o.param_groups]
        seen["wd"] = [g["weight_decay"] for g in o.param_groups]
        return L.ExponentialLR(o, 0.5)

    res = S.from_lr_scheduler(factory, 4).resolve(opt.param_groups, opt.defaults)
    assert [float(r[0][0]) for r in res] == list(LRS)
    assert seen["betas"][1] == (0.5, 0.9) and seen["wd"] == [0.01] * 3
    assert opt.param_groups[0]["lr"] == 123.0 and opt.param_groups[1]["betas"] == (0.5, 0.9)


def test_from_lr_scheduler_errors():
    with pytest.raises(TypeError, match="ReduceLROnPlateau.*metric"):
        S.from_lr_scheduler(lambda o: L.ReduceLROnPlateau(o), 10)
    with pytest.raises(TypeError, match="must return a torch LRScheduler"):
        S.from_lr_scheduler(lambda o: None, 10)
    other = make_opt()
    with pytest.raises(ValueError, match="on the optimizer it is passed"):
        S.from_lr_scheduler(lambda o: L.StepLR(other, 2), 10)
    with pytest.raises(ValueError, match=r"failed on step\(\) 11"):  # OneCycleLR shorter than the table
        S.from_lr_scheduler(lambda o: L.OneCycleLR(o, max_lr=1.0, total_steps=10), 12)
    with pytest.raises(ValueError, match="entry 2 is -1.0"):
        S.from_lr_scheduler(lambda o: L.LambdaLR(o, lambda s: 1.0 - s), 5)
    with pytest.raises(ValueError, match="factory must be a callable"):
        S.from_lr_scheduler(3, 10)
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1"):
        S.from_lr_scheduler(lambda o: L.StepLR(o, 2), 0)
    tab = S.from_lr_scheduler(lambda o: L.LambdaLR(o, [lambda s: 1.0] * 2), 5)  # needs 2 groups
    opt = make_opt()
    with pytest.raises(ValueError, match="Expected 3 lr_lambdas, but got 2"):
        tab.resolve(opt.param_groups, opt.defaults)
    with pytest.raises(ValueError, match="from_lr_scheduler"):
        S.sequential([S.constant(), S.from_lr_scheduler(lambda o: L.StepLR(o, 2), 5)], [3])


# -------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("call,match", [
    (lambda: S.linear_warmup(-1), r"warmup_steps must be an integer >= 0, got -1"),
    (lambda: S.linear_warmup(2.0), r"warmup_steps must be an integer >= 0, got 2.0"),
    (lambda: S.linear_warmup(True), r"warmup_steps must be an integer"),
    (lambda: S.linear_warmup(5, start_factor=1.5), r"start_factor must be in \[0.0, 1.0\], got 1.5"),
    (lambda: S.warmup_cosine(0), r"total_steps must be an integer >= 1, got 0"),
    (lambda: S.warmup_cosine(10, warmup_steps=10), r"warmup_steps must be < total_steps"),
    (lambda: S.warmup_cosine(10, min_factor=-0.1), r"min_factor must be in"),
    (lambda: S.warmup_cosine(10, min_factor=float("nan")), r"min_factor must be in"),
    (lambda: S.warmup_linear(10, warmup_steps=-2), r"warmup_steps must be an integer >= 0, got -2"),
    (lambda: S.warmup_linear(10, min_factor="x"), r"min_factor must be a number, got 'x'"),
    (lambda: S.one_cycle(0), r"total_steps must be an integer >= 1"),
    (lambda: S.one_cycle(10, pct_start=1.2), r"pct_start must be in"),
    (lambda: S.one_cycle(10, anneal_strategy="exp"), r"anneal_strategy must be 'cos' or 'linear'"),
    (lambda: S.one_cycle(10, div_factor=0), r"div_factor must be in \(0.0"),
    (lambda: S.one_cycle(10, final_div_factor=-1), r"final_div_factor must be in"),
    (lambda: S.one_cycle(10, base_momentum=-0.1), r"base_momentum must be in \[0.0, inf\]"),
    (lambda: S.one_cycle(10, max_momentum=-0.1), r"max_momentum must be in"),
    (lambda: S.step_decay(0), r"step_size must be an integer >= 1, got 0"),
    (lambda: S.step_decay(3, gamma=-0.5), r"gamma must be in \[0.0, inf\]"),
    (lambda: S.step_decay(3, total_steps=0), r"total_steps must be an integer >= 1"),
    (lambda: S.exponential(0.9, 0), r"total_steps must be an integer >= 1"),
    (lambda: S.exponential(float("inf"), 10), r"gamma must be in"),
    (lambda: S.exponential(1e200, 10), r"lr factor entry 2 is inf"),
    (lambda: S.polynomial(10, power=0), r"power must be in \(0.0"),
    (lambda: S.polynomial(10, min_factor=2), r"min_factor must be in"),
    (lambda: S.warmup_stable_decay(10, 6, 5), r"warmup_steps \+ decay_steps must be <= total_steps"),
    (lambda: S.warmup_stable_decay(10, 2, -1), r"decay_steps must be an integer >= 0, got -1"),
    (lambda: S.cosine_restarts(0, total_steps=10), r"T_0 must be an integer >= 1, got 0"),
    (lambda: S.cosine_restarts(5, 0, total_steps=10), r"T_mult must be an integer >= 1, got 0"),
    (lambda: S.cosine_restarts(5, 1.5, total_steps=10), r"T_mult must be an integer"),
    (lambda: S.cosine_restarts(5, total_steps=0), r"total_steps must be an integer >= 1"),
    (lambda: S.sequential([], []), r"tables must be a non-empty sequence"),
    (lambda: S.sequential(S.constant(), []), r"tables must be a non-empty sequence"),
    (lambda: S.sequential([S.constant(), 1.0], [2]), r"tables\[1\] must be a ScheduleTable"),
    (lambda: S.sequential([S.constant(), S.constant()], []), r"milestones must have len\(tables\) - 1 = 1"),
    (lambda: S.sequential([S.constant()] * 3, [5, 5]), r"milestones\[1\] must be an integer >= 6, got 5"),
    (lambda: S.sequential([S.constant(), S.constant()], [0]), r"milestones\[0\] must be an integer >= 1"),
    (lambda: S.sequential([S.one_cycle(5), S.constant()], [5]), r"momentum: tables \[0\] have a momentum"),
    (lambda: S.constant(0), r"total_steps must be an integer >= 1"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cosine_restarts_total_steps_is_required():
    with pytest.raises(TypeError, match="total_steps"):
        S.cosine_restarts(10)


def test_a_tensor_lr_under_a_schedule_is_read_once():
    """With a schedule, a tensor lr is the base the table scales. It is read into a number once (the key of the
    resolved tables is compared every step, and reading a GPU tensor there would sync every step), and the lrs
    the kernels use are that number times the table, as with a float lr."""
    import fusedopt

    def run(lr):
        p = torch.zeros(5, requires_grad=True)
        opt = fusedopt.FusedSGD([p], lr=lr, schedule=S.warmup_cosine(20, 5))
        lrs = []
        for _ in range(12):
            p.grad = torch.ones(5)
            opt.step()
            lrs.append(opt.get_last_lr()[0])
        return opt, p, lrs

    opt_t, p_t, lrs_t = run(torch.tensor(0.1, dtype=torch.float64))
    _, p_f, lrs_f = run(0.1)
    base = opt_t.param_groups[0]["initial_lr"]  # a number, or a CPU copy of the tensor: free to read
    assert type(base) is float or (isinstance(base, torch.Tensor) and base.device.type == "cpu")
    assert lrs_t == lrs_f
    assert torch.equal(p_t, p_f)
