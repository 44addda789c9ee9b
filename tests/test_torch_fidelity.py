"""What people pass to torch.optim works here too (issue 11, section 1): every expected value comes from
torch.optim (single-tensor, foreach=False) and torch's LR schedulers, run beside ours.

Tolerances: float32 trajectories rtol 1e-6 / atol 1e-6 over <= 30 steps (a few ulps: torch's vectorized CPU
kernels fuse multiply-adds where fusedopt's kernels may round twice, see test_parity); lrs that both sides take
from the same torch scheduler code are compared exactly; lrs resolved into a float64 table from a torch
scheduler rtol 1e-12 (the table is float64, the scheduler's Python floats are too: only the order of a few
operations differs, test_schedules).
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L
from torch.optim.swa_utils import SWALR

from fusedopt import FusedAdam, FusedAdamW, FusedLion, FusedSGD, schedules

TOL = dict(rtol=1e-6, atol=1e-6)
TORCH = {"adamw": (FusedAdamW, torch.optim.AdamW), "adam": (FusedAdam, torch.optim.Adam),
         "sgd": (FusedSGD, torch.optim.SGD)}


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _grads(params, t):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(p.shape, generator=g) for p in params]


def _step_both(pairs, t):
    """pairs: [(optimizer, params)]; the same grads for all, then a step of each."""
    for opt, params in pairs:
        for p, g in zip(params, _grads(params, t)):
            p.grad = g
        opt.step()


def _assert_same_params(a, b, what=""):
    for i, (p, q) in enumerate(zip(a, b)):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL, msg=lambda m: f"{what} param {i}: {m}")


def _through_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----------------------------------------------------------------------------------------------------------
# named_parameters
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", TORCH)
def test_named_parameters_as_torch(rule):
    ours_cls, torch_cls = TORCH[rule]
    m_ours, m_torch = _model(), _model()
    ours = ours_cls(m_ours.named_parameters(), lr=1e-2)
    ref = torch_cls(m_torch.named_parameters(), lr=1e-2, foreach=False)
    assert ours.param_groups[0]["param_names"] == ref.param_groups[0]["param_names"] == [
        n for n, _ in m_ours.named_parameters()]
    for t in range(5):
        _step_both([(ours, list(m_ours.parameters())), (ref, list(m_torch.parameters()))], t)
    _assert_same_params(m_ours.parameters(), m_torch.parameters(), rule)
    sd = ours.state_dict()
    assert sd["param_groups"][0]["param_names"] == ref.state_dict()["param_groups"][0]["param_names"]
    back = torch_cls(_model().named_parameters(), lr=1e-2)
    back.load_state_dict(_through_bytes(sd))  # our checkpoint, names included, loads into torch.optim
    assert back.param_groups[0]["param_names"] == ref.param_groups[0]["param_names"]


@pytest.mark.parametrize("rule", TORCH)
def test_named_and_unnamed_mixed_is_torchs_value_error(rule):
    ours_cls, torch_cls = TORCH[rule]
    w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    for params in ([("w", w), b], [{"params": [w]}, {"params": [("b", b)]}]):
        with pytest.raises(ValueError) as ref_error:
            torch_cls(params, lr=0.1)
        with pytest.raises(ValueError) as ours_error:
            ours_cls(params, lr=0.1)
        assert str(ours_error.value) == str(ref_error.value)


def test_a_named_param_that_cannot_be_optimized_is_named():
    with pytest.raises(ValueError, match=r"params\[1\] \('z'\) is complex"):
        FusedLion([("w", torch.zeros(2, requires_grad=True)), ("z", torch.zeros(2, dtype=torch.complex64))])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("rule", ["adamw", "adam", "sgd"])
def test_complex_params_follow_torch_optim(rule, dtype):
    """Complex params, as torch.optim takes them (optim_db: supports_complex): AdamW / Adam view param, grad and
    states as real (torch.view_as_real), SGD's complex arithmetic by real scalars is the same per component; the
    kernels update the real views. 20 steps beside torch.optim's single-tensor path, next to a real param of the
    same group. Tolerance: test_torch_optim_db's (float32 rtol 1e-6: torch's vectorized kernels fuse
    multiply-adds, a few ulps; float64 rtol 1e-12). The states stay complex, so the checkpoint loads into
    torch.optim, which continues from it. Lion refuses complex params (sign() is not a per-component rule)."""
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    tol = dict(rtol=1e-12, atol=1e-12) if real == torch.float64 else TOL
    ours_cls, torch_cls, kw = {
        "adamw": (FusedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)),
        "adam": (FusedAdam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
        "sgd": (FusedSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)),
    }[rule]
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(40, 30, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(30, generator=g, dtype=real).requires_grad_()]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt, opt_ref = ours_cls(ours, **kw), torch_cls(ref, foreach=False, **kw)
    for t in range(20):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, **tol)
    assert all(v.dtype == dtype for k, v in opt.state[ours[0]].items() if k != "step")
    resumed = torch_cls(ref, foreach=False, **kw)
    resumed.load_state_dict(opt.state_dict())
    for key, value in opt.state[ours[0]].items():
        torch.testing.assert_close(resumed.state[ref[0]][key], value, **tol)
    back = ours_cls([q.detach().clone().requires_grad_() for q in ref], **kw)
    back.load_state_dict(opt_ref.state_dict())  # and torch.optim's checkpoint into fusedopt
    for key, value in opt_ref.state[ref[0]].items():
        assert torch.equal(back.state[back.param_groups[0]["params"][0]][key], value.to(
            torch.int64) if key == "step" else value), key
    assert all(v.dtype == dtype for k, v in opt.state_dict(dequantize=True)["state"][0].items() if k != "step")
    with pytest.raises(ValueError, match="is complex"):
        FusedLion([torch.zeros(2, dtype=dtype)])
    with pytest.raises(ValueError, match="complex params keep states of their dtype"):
        ours_cls([torch.zeros(2, dtype=dtype)], lr=1e-2, state_precision="bf16")


def test_a_generator_inside_a_group_dict_is_used_once():
    """{"params": model.parameters()} (a generator): the group must hold the params, as in torch.optim."""
    model = _model()
    for cls in (FusedAdamW, FusedSGD, FusedLion):
        opt = cls([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 1e-3}], lr=1e-2)
        ref = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
        assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in ref.param_groups] == [2, 2]


# ----------------------------------------------------------------------------------------------------------
# torch's constructor kwargs
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", TORCH)
def test_every_torch_argument_is_accepted_with_torchs_default(rule):
    ours_cls, torch_cls = TORCH[rule]
    ours = inspect.signature(ours_cls).parameters
    for name, param in inspect.signature(torch_cls).parameters.items():
        assert name in ours, f"{ours_cls.__name__} lacks torch's argument {name!r}"
        if name != "params":
            assert ours[name].default == param.default, name
            if param.kind == param.POSITIONAL_OR_KEYWORD:  # same position, so positional calls mean the same
                assert list(ours).index(name) == list(inspect.signature(torch_cls).parameters).index(name), name


@pytest.mark.parametrize("rule,flags", [
    ("adamw", dict(fused=True)), ("adamw", dict(foreach=True)), ("adamw", dict(capturable=True)),
    ("adamw", dict(foreach=False, fused=False, capturable=True)),
    ("sgd", dict(fused=True)), ("sgd", dict(foreach=True)), ("sgd", dict(foreach=False, fused=None)),
])
def test_implementation_flags_are_accepted_recorded_and_change_nothing(rule, flags):
    ours_cls, torch_cls = TORCH[rule]
    m_flags, m_plain = _model(), _model()
    with_flags = ours_cls(m_flags.parameters(), lr=1e-2, **flags)
    plain = ours_cls(m_plain.parameters(), lr=1e-2)
    for key, value in flags.items():
        assert with_flags.param_groups[0][key] == with_flags.state_dict()["param_groups"][0][key] == value
    for t in range(3):
        _step_both([(with_flags, list(m_flags.parameters())), (plain, list(m_plain.parameters()))], t)
    for a, b in zip(m_flags.parameters(), m_plain.parameters()):
        assert torch.equal(a, b)
    # the groups carry torch's keys: torch.optim reads them back as the user set them
    ref = torch_cls(_model().parameters(), lr=1e-2)
    ref.load_state_dict(with_flags.state_dict())
    assert {k: ref.param_groups[0][k] for k in flags} == flags


@pytest.mark.parametrize("rule", TORCH)
def test_differentiable_is_refused_with_torchs_exception_type(rule):
    ours_cls, torch_cls = TORCH[rule]
    with pytest.raises(RuntimeError, match="differentiable=True.*in place outside autograd"):
        ours_cls(_model().parameters(), differentiable=True)
    for flags, message in ((dict(fused=True, differentiable=True), "`fused` does not support `differentiable`"),
                           (dict(fused=True, foreach=True), "`fused` and `foreach` cannot be `True` together")):
        with pytest.raises(RuntimeError, match=message):
            torch_cls(_model().parameters(), **flags)
        with pytest.raises(RuntimeError, match=message):
            ours_cls(_model().parameters(), **flags)


@pytest.mark.parametrize("cls", [FusedAdamW, FusedAdam, FusedSGD, FusedLion])
def test_params_none_with_a_bad_lr_names_the_lr(cls):
    """torch checks the hyperparameters before the params."""
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        cls(None, lr=-1.0)


# ----------------------------------------------------------------------------------------------------------
# Tensor hyperparameters (what torch's schedulers write, and tensor betas at construction)
# ----------------------------------------------------------------------------------------------------------
def _run_with_scheduler(rule, make_sched, steps, *, ctor=None, tensor_lr=False, table_from=None):
    """Ours and torch side by side, the same scheduler attached to both (or, with table_from, baked into a
    table for ours); returns the lrs and momenta each used, after checking params every step."""
    ours_cls, torch_cls = TORCH[rule]
    kw = dict(ctor or ({"lr": 1e-2, "momentum": 0.9} if rule == "sgd" else {"lr": 1e-2}))
    m_ours, m_ref = _model(), _model()
    if tensor_lr:
        kw["lr"] = torch.tensor(kw["lr"])
    ref = torch_cls(m_ref.parameters(), foreach=False, **copy.deepcopy(kw))
    ref_sched = make_sched(ref)
    if table_from is not None:
        ours = ours_cls(m_ours.parameters(), **copy.deepcopy(kw), schedule=schedules.from_lr_scheduler(table_from, steps))
        ours_sched = None
    else:
        ours = ours_cls(m_ours.parameters(), **copy.deepcopy(kw))
        ours_sched = make_sched(ours)
    lrs = []
    for t in range(steps):
        lrs.append((float(ours.param_groups[0]["lr"]), float(ref.param_groups[0]["lr"])))
        _step_both([(ours, list(m_ours.parameters())), (ref, list(m_ref.parameters()))], t)
        if t + 1 < steps:
            ref_sched.step()
            if ours_sched is not None:
                ours_sched.step()
        _assert_same_params(m_ours.parameters(), m_ref.parameters(), f"{rule} step {t}")
    return lrs


def test_cyclic_lr_tensor_momentum_on_sgd():
    """CyclicLR with tensor base/max momentum writes group["momentum"] = tensor (issue 11: ValueError before)."""
    make = lambda o: L.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=4,  # noqa: E731
                                base_momentum=torch.tensor(0.8), max_momentum=torch.tensor(0.95))
    lrs = _run_with_scheduler("sgd", make, 20)
    assert all(a == b for a, b in lrs) and len({a for a, _ in lrs}) > 3


def test_one_cycle_tensor_momentum_on_adamw():
    """OneCycleLR with tensor momentum sets group["betas"] = (tensor, beta2)."""
    make = lambda o: L.OneCycleLR(o, max_lr=1e-2, total_steps=20,  # noqa: E731
                                  base_momentum=torch.tensor(0.85), max_momentum=torch.tensor(0.95))
    _run_with_scheduler("adamw", make, 20)


@pytest.mark.parametrize("betas", [
    pytest.param((torch.tensor(0.9), torch.tensor(0.99)), id="0d_tensors"),
    pytest.param((torch.tensor([[[0.9]]]), torch.tensor([[0.99]])), id="one_element_tensors"),
])
def test_tensor_betas_at_construction(betas):
    m_ours, m_ref = _model(), _model()
    ours = FusedAdamW(m_ours.parameters(), lr=1e-2, betas=betas)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, betas=betas, foreach=False)
    assert [b.shape for b in ours.param_groups[0]["betas"]] == [b.shape for b in ref.param_groups[0]["betas"]]
    for t in range(10):
        _step_both([(ours, list(m_ours.parameters())), (ref, list(m_ref.parameters()))], t)
    _assert_same_params(m_ours.parameters(), m_ref.parameters())


# ----------------------------------------------------------------------------------------------------------
# momentum >= 1: one rule for the table and the plain path, as torch's step
# ----------------------------------------------------------------------------------------------------------
def test_momentum_above_one_is_taken_on_both_paths():
    make = lambda o: L.OneCycleLR(o, max_lr=1e-3, total_steps=12, base_momentum=1.0,  # noqa: E731
                                  max_momentum=1.5)
    plain = _run_with_scheduler("sgd", make, 12)
    baked = _run_with_scheduler("sgd", make, 12, table_from=make)
    for (a, ref), (b, ref2) in zip(plain, baked):
        assert a == ref == ref2 and b == pytest.approx(ref, rel=1e-12)
    native = schedules.one_cycle(12, base_momentum=1.0, max_momentum=1.5)
    assert float(native.momentum.max()) == 1.5
    schedules.ScheduleTable([1.0, 1.0], momentum=[1.0, 2.0])  # a table may hold them too


# ----------------------------------------------------------------------------------------------------------
# from_lr_scheduler: per-group factories on every optimizer, tensor lrs replayed exactly
# ----------------------------------------------------------------------------------------------------------
PER_GROUP = {
    "LambdaLR": lambda o: L.LambdaLR(o, [lambda t: 0.9 ** t, lambda t: 1.0 / (1 + t)]),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, [lambda t: 0.95, lambda t: 0.9]),
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=1e-3, max_lr=[1e-2, 2e-2], step_size_up=3),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=[1e-2, 2e-2], total_steps=12),
    "SWALR": lambda o: SWALR(o, swa_lr=[5e-3, 1e-3], anneal_epochs=4),
}


@pytest.mark.parametrize("factory", PER_GROUP)
@pytest.mark.parametrize("rule", TORCH)
def test_per_group_factories(rule, factory):
    ours_cls, torch_cls = TORCH[rule]
    make = PER_GROUP[factory]
    kw = {"lr": 1e-2, "momentum": 0.9} if rule == "sgd" else {"lr": 1e-2}
    m_ours, m_ref = _model(), _model()

    def groups(m):
        return [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 5e-3}]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SWALR's own deprecation notes
        ours = ours_cls(groups(m_ours), **kw, schedule=schedules.from_lr_scheduler(make, 12))
        ref = torch_cls(groups(m_ref), **kw, foreach=False)
        sched = make(ref)
        for t in range(12):
            assert ours.get_last_lr() == pytest.approx([g["lr"] for g in ref.param_groups], rel=1e-12), t
            _step_both([(ours, list(m_ours.parameters())), (ref, list(m_ref.parameters()))], t)
            if t < 11:
                sched.step()
    _assert_same_params(m_ours.parameters(), m_ref.parameters(), f"{rule}/{factory}")
    with pytest.raises(schedules.NoStandaloneTable):  # still informative when read directly ...
        schedules.from_lr_scheduler(make, 12).lr_factors
    assert getattr(schedules.from_lr_scheduler(make, 12), "momentum", None) is None  # ... and getattr-safe


def test_from_lr_scheduler_replays_a_tensor_lr_exactly():
    """CyclicLR with a tensor base_lr on an optimizer whose lr is a float32 tensor: torch writes the lr into
    the tensor in place (rounding it to float32); the baked table holds exactly those values."""
    make = lambda o: L.CyclicLR(o, base_lr=torch.tensor(0.1), max_lr=0.2, step_size_up=10)  # noqa: E731
    ref = torch.optim.SGD(_model().parameters(), lr=torch.tensor(0.1), momentum=0.9)
    sched = make(ref)
    expected = []
    for _ in range(8):
        expected.append(float(ref.param_groups[0]["lr"]))
        ref.step()
        sched.step()
    ours = FusedSGD(_model().parameters(), lr=torch.tensor(0.1), momentum=0.9,
                    schedule=schedules.from_lr_scheduler(make, 8))
    got = []
    for t in range(8):
        got.append(ours.get_last_lr()[0])
        _step_both([(ours, list(ours.param_groups[0]["params"]))], t)
    assert got == expected


# ----------------------------------------------------------------------------------------------------------
# Checkpoints taken under a torch scheduler, into a table, and back
# ----------------------------------------------------------------------------------------------------------
N = 12
K = 4  # steps taken before the checkpoint
SCHEDULERS = {  # the keys each writes into the groups: initial_lr and ...
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=1e-2, total_steps=N),  # max_lr, min_lr, momentum keys
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3),  # momentum keys
    "SWALR": lambda o: SWALR(o, swa_lr=2e-3, anneal_epochs=5),  # swa_lr
    "LambdaLR": lambda o: L.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=5),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("rule", TORCH)
def test_torch_checkpoint_under_a_scheduler_resumes_in_a_table(rule, name):
    ours_cls, torch_cls = TORCH[rule]
    make = SCHEDULERS[name]
    kw = {"lr": 1e-2, "momentum": 0.9} if rule == "sgd" else {"lr": 1e-2}
    m_ref = _model()
    ref = torch_cls(m_ref.parameters(), **kw, foreach=False)
    sched = make(ref)
    for t in range(K):
        _step_both([(ref, list(m_ref.parameters()))], t)
        sched.step()
    checkpoint = _through_bytes({"model": m_ref.state_dict(), "opt": ref.state_dict(), "sched": sched.state_dict()})

    m_ours = _model(seed=1)
    m_ours.load_state_dict(checkpoint["model"])
    ours = ours_cls(m_ours.parameters(), **kw, schedule=schedules.from_lr_scheduler(make, N))
    ours.load_state_dict(checkpoint["opt"])
    if rule == "sgd":  # torch.optim.SGD keeps no per-param step: the position comes from the scheduler's state
        ours.schedule_step = checkpoint["sched"]["last_epoch"]
    assert ours.schedule_step == K
    for t in range(K, N - 1):
        assert ours.get_last_lr() == pytest.approx([ref.param_groups[0]["lr"]], rel=1e-12), f"{name} step {t}"
        assert ours.param_groups[0]["lr"] == ours.get_last_lr()[0]
        _step_both([(ours, list(m_ours.parameters())), (ref, list(m_ref.parameters()))], t)
        sched.step()
    _assert_same_params(m_ours.parameters(), m_ref.parameters(), f"{rule}/{name}")


def test_the_issue_case_one_cycle_table_keeps_its_peak():
    """torch AdamW + OneCycleLR(max_lr=1e-2, total_steps=10), 3 steps, loaded into FusedAdamW(lr=1e-2,
    schedule=one_cycle(10)): the next lr is torch's (9.5e-3), not 25x smaller (OneCycleLR's initial_lr is
    max_lr / div_factor, which the table must not take as the peak it multiplies)."""
    m = _model()
    ref = torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False)
    sched = L.OneCycleLR(ref, max_lr=1e-2, total_steps=10)
    for t in range(3):
        _step_both([(ref, list(m.parameters()))], t)
        sched.step()
    ours = FusedAdamW(_model().parameters(), lr=1e-2, schedule=schedules.one_cycle(10))
    ours.load_state_dict(ref.state_dict())
    assert ours.get_last_lr() == pytest.approx([ref.param_groups[0]["lr"]], rel=1e-12)
    assert ours.param_groups[0]["initial_lr"] == 1e-2
    assert ours.param_groups[0]["max_lr"] == 1e-2  # torch's keys stay, for a later move back


def test_table_checkpoint_into_torch_with_a_resumed_scheduler():
    """The other direction (README: moving a table run to torch.optim): group["lr"] in our checkpoint is the
    lr of the next step and initial_lr the base, so torch.optim alone continues at the right lr, and a torch
    scheduler built with last_epoch = schedule_step - 1 continues the schedule. A fresh scheduler
    (last_epoch=-1) restarts it, as it does for a torch checkpoint."""
    f = lambda t: 1.0 / (1 + t)  # noqa: E731
    m_ours, m_ref = _model(), _model()
    ours = FusedAdamW(m_ours.parameters(), lr=1e-2, schedule=schedules.ScheduleTable([f(t) for t in range(N)]))
    for t in range(K):
        _step_both([(ours, list(m_ours.parameters()))], t)
    sd = _through_bytes(ours.state_dict())
    assert sd["param_groups"][0]["lr"] == pytest.approx(1e-2 * f(K), rel=1e-15)
    m_ref.load_state_dict(m_ours.state_dict())
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, foreach=False)
    ref.load_state_dict(sd)
    ref.param_groups[0]["foreach"] = False
    assert ref.param_groups[0]["lr"] == ours.get_last_lr()[0]
    sched = L.LambdaLR(ref, f, last_epoch=int(sd["param_groups"][0]["schedule_step"]) - 1)
    for t in range(K, N - 1):
        assert ref.param_groups[0]["lr"] == pytest.approx(ours.get_last_lr()[0], rel=1e-12)
        _step_both([(ours, list(m_ours.parameters())), (ref, list(m_ref.parameters()))], t)
        sched.step()
    _assert_same_params(m_ours.parameters(), m_ref.parameters())
    fresh = torch.optim.AdamW(_model().parameters(), lr=1e-2)
    fresh.load_state_dict(sd)
    L.LambdaLR(fresh, f)  # restarts: base * f(0), the base coming from our initial_lr
    assert fresh.param_groups[0]["lr"] == pytest.approx(1e-2 * f(0))


# ----------------------------------------------------------------------------------------------------------
# Accessors return values, never live state
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [FusedAdamW, FusedAdam, FusedSGD, FusedLion])
def test_accessors_do_not_alias_live_tensors(cls):
    kw = {"momentum": torch.tensor(0.9)} if cls is FusedSGD else {"betas": (torch.tensor(0.9), torch.tensor(0.99))}
    if cls is FusedLion:
        kw = {}
    opt = cls(_model().parameters(), **kw)
    lr = opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    logged_lr, logged_mom = opt.get_last_lr(), opt.get_last_momentum()
    lr.fill_(5.0)  # a scheduler writing the tensor in place
    if cls is not FusedLion:
        mom = opt._group_momentum(opt.param_groups[0])
        if isinstance(mom, torch.Tensor):
            mom.fill_(0.5)
    assert float(logged_lr[0]) == pytest.approx(1e-3) and logged_lr[0] is not lr
    assert float(logged_mom[0]) == pytest.approx(0.9)


# ----------------------------------------------------------------------------------------------------------
# FusedLion with a tensor lr (torch.compile's idiom), against lion-pytorch given the same tensor
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoupled", [False, True], ids=["weight_decay_times_lr", "decoupled_weight_decay"])
def test_lion_tensor_lr_matches_lion_pytorch(decoupled):
    """lion-pytorch takes a tensor lr (its update multiplies by it); so does FusedLion, read on the device as a
    one-entry table, with lion-pytorch's initial lr (the divisor of a decoupled weight decay) read once at
    construction. Decayed in place mid-run, as a scheduler writing the tensor would; not with
    decoupled_weight_decay, where lion-pytorch keeps the tensor itself as its initial lr, so an in-place decay
    also changes its divisor (lr * wd / init_lr stays wd): FusedLion divides by the initial lr as a number, the
    documented meaning. Lion compares exactly except where sign() meets a last-bit tie (test_parity bounds
    those); over 10 steps on these grads none."""
    from lion_pytorch import Lion

    m_ours, m_ref = _model(), _model()
    lr_ours, lr_ref = torch.tensor(1e-2), torch.tensor(1e-2)
    ours = FusedLion(m_ours.parameters(), lr=lr_ours, weight_decay=0.1, decoupled_weight_decay=decoupled)
    ref = Lion(m_ref.parameters(), lr=lr_ref, weight_decay=0.1, decoupled_weight_decay=decoupled)
    for t in range(10):
        if t == 5 and not decoupled:
            lr_ours.mul_(0.5)
            lr_ref.mul_(0.5)
        _step_both([(ours, list(m_ours.parameters())), (ref, list(m_ref.parameters()))], t)
    _assert_same_params(m_ours.parameters(), m_ref.parameters(), "lion tensor lr")


@pytest.mark.parametrize("norm_type", [1.0, 2.0, float("inf")])
def test_complex_grads_are_clipped_by_their_moduli(norm_type):
    """max_grad_norm with complex params: clip_grad_norm_ norms a complex grad by its elements' moduli (the
    kernels see real views, whose 1- and inf-norms differ). Tolerance: float32 rounding of the sums."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(40, 30, generator=g, dtype=torch.complex64).requires_grad_()
    q = p.detach().clone().requires_grad_()
    p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    q.grad = p.grad.clone()
    opt = FusedSGD([p], lr=0.1, max_grad_norm=0.5, norm_type=norm_type)
    opt.step()
    total = torch.nn.utils.clip_grad_norm_([q], 0.5, norm_type=norm_type)
    torch.optim.SGD([q], lr=0.1, foreach=False).step()
    torch.testing.assert_close(opt.last_grad_norm, total, rtol=1e-6, atol=0)
    torch.testing.assert_close(p, q, **TOL)
