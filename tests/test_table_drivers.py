"""Schedule tables beside torch's schedulers, as a new user meets them (issue 14, items 1, 2, 3 and 5).

1. Two things driving one lr (a table and a torch scheduler attached to the same optimizer) is an error that
   says which to drop, raised before the step changes anything, not a silent no-op.
2. ``param_groups[i]["lr"]`` (and the momentum / beta1 a table drives) shows the value the table gives the next
   step, as a torch scheduler's group["lr"] does; the base stays in ``initial_lr``.
3. One length rule for every builder (``total_steps`` entries), and a past-the-end warning that names the held
   lr and says how to size the table.
5. ``schedule=`` given something else than a table, and backend="cuda" with CPU params: messages that say what
   to do.
Expected values come from torch's schedulers where there is one (rtol 1e-12: the table is float64, the
scheduler's floats are Python floats; test_schedules).
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

import fusedopt
from fusedopt import FusedAdamW, FusedLion, FusedSGD, schedules
from fusedopt import _ops


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(3, generator=g).requires_grad_()]


def _set_grads(params, t):
    g = torch.Generator().manual_seed(10 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


# ----------------------------------------------------------------------------------------------------------
# 1. a table and a torch scheduler on one optimizer
# ----------------------------------------------------------------------------------------------------------
DRIVERS = {
    "StepLR": (lambda o: L.StepLR(o, 1, gamma=0.01), lambda s, t: s.step()),
    "LambdaLR": (lambda o: L.LambdaLR(o, lambda t: 0.5 ** t), lambda s, t: s.step()),
    "ReduceLROnPlateau": (lambda o: L.ReduceLROnPlateau(o, patience=0), lambda s, t: s.step(1.0)),
    "OneCycleLR": (lambda o: L.OneCycleLR(o, max_lr=1e-2, total_steps=50), lambda s, t: s.step()),
}


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("cls", [FusedAdamW, FusedSGD, FusedLion])
def test_a_torch_scheduler_on_a_table_is_an_error(cls, driver):
    make, step = DRIVERS[driver]
    params = _params()
    opt = cls(params, lr=1e-3, schedule=schedules.warmup_cosine(100, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own "scheduler step before optimizer step"
        sched = make(opt)
        for t in range(5):
            _set_grads(params, t)
            before = [p.detach().clone() for p in params]
            counter = int(opt.param_groups[0]["schedule_step"])
            try:
                opt.step()
            except RuntimeError as e:
                message = str(e)
                break
            step(sched, t)
        else:
            pytest.fail(f"{driver} drove the lr of a table-scheduled {cls.__name__} for 5 steps without an error")
    # raised before anything changed, and says what to do
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert int(opt.param_groups[0]["schedule_step"]) == counter
    for hint in ("schedule=None", "from_lr_scheduler", "initial_lr", "param group 0"):
        assert hint in message, message


def test_a_hand_written_lr_is_an_error_but_initial_lr_is_the_base():
    params = _params()
    opt = FusedSGD(params, lr=0.1, momentum=0.9, schedule=schedules.warmup_linear(20, 5))
    _set_grads(params, 0)
    opt.step()
    opt.param_groups[0]["lr"] = 0.5
    _set_grads(params, 1)
    with pytest.raises(RuntimeError, match="param group 0's lr is 0.5"):
        opt.step()
    opt.param_groups[0]["lr"] = opt.get_last_lr()[0]  # put back what the table showed
    opt.param_groups[0]["initial_lr"] = 0.2  # the base the table multiplies: allowed, re-resolved
    opt.step()
    assert opt.get_last_lr() == [pytest.approx(0.2 * schedules.warmup_linear(20, 5).lr_at(2), rel=1e-15)]


def test_table_scheduler_is_not_a_second_driver():
    """fusedopt.TableScheduler writes the table's own values: no error (Trainer / Lightning use it)."""
    params = _params()
    opt = FusedAdamW(params, lr=1e-3, schedule=schedules.one_cycle(30))
    sched = fusedopt.TableScheduler(opt)
    for t in range(10):
        _set_grads(params, t)
        opt.step()
        sched.step()
        sched.step()  # idempotent
    assert sched.get_last_lr() == opt.get_last_lr() == [g["lr"] for g in opt.param_groups]


# ----------------------------------------------------------------------------------------------------------
# 2. what param_groups show
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,momentum_of", [
    (FusedAdamW, lambda g: g["betas"][0]), (FusedSGD, lambda g: g["momentum"]), (FusedLion, lambda g: g["betas"][0])])
def test_groups_show_what_onecyclelr_would_show(cls, momentum_of):
    """A loop logging param_groups[i]["lr"] and the momentum sees, step by step, what it sees with torch's
    OneCycleLR on torch.optim.SGD (the table's oracle), and the base lr stays in initial_lr."""
    n = 25
    lrs = (1e-2, 3e-3)
    params = _params()
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": lrs[1]}]
    kwargs = {"momentum": 0.9} if cls is FusedSGD else {}
    opt = cls(groups, lr=lrs[0], **kwargs, schedule=schedules.one_cycle(n))
    ref = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": lr} for lr in lrs], momentum=0.9)
    sched = L.OneCycleLR(ref, max_lr=list(lrs), total_steps=n)
    for t in range(n):
        for g, r in zip(opt.param_groups, ref.param_groups):
            assert g["lr"] == pytest.approx(r["lr"], rel=1e-12), t
            assert momentum_of(g) == pytest.approx(r["momentum"], rel=1e-12), t
        assert [g["initial_lr"] for g in opt.param_groups] == list(lrs)
        assert opt.get_last_lr() == [g["lr"] for g in opt.param_groups]
        _set_grads(params, t)
        opt.step()
        if t + 1 < n:
            ref.step()
            sched.step()
    assert opt.state_dict()["param_groups"][0]["lr"] == opt.get_last_lr()[0]  # checkpoints carry it too


# ----------------------------------------------------------------------------------------------------------
# 3. one length rule; the past-the-end warning
# ----------------------------------------------------------------------------------------------------------
def _with_total_steps(n):
    """Every builder that takes total_steps, called for n steps (other arguments: small valid values)."""
    return {
        "constant": schedules.constant(n),
        "warmup_cosine": schedules.warmup_cosine(n, warmup_steps=n // 3),
        "warmup_linear": schedules.warmup_linear(n, warmup_steps=n // 3),
        "one_cycle": schedules.one_cycle(n),
        "step_decay": schedules.step_decay(3, 0.5, total_steps=n),
        "exponential": schedules.exponential(0.9, n),
        "polynomial": schedules.polynomial(n, power=2.0),
        "warmup_stable_decay": schedules.warmup_stable_decay(n, n // 3, n // 3),
        "cosine_restarts": schedules.cosine_restarts(2, total_steps=n),
        "cosine": schedules.cosine(n, 1.0, 0.1),
        "from_lr_scheduler": schedules.from_lr_scheduler(lambda o: L.StepLR(o, 2), n),
    }


def test_every_builder_with_total_steps_has_total_steps_entries():
    builders = {name for name in schedules.__all__ if callable(getattr(schedules, name))
                and not inspect.isclass(getattr(schedules, name))
                and "total_steps" in inspect.signature(getattr(schedules, name)).parameters}
    assert builders == set(_with_total_steps(4)), "a new builder with total_steps: add it above"
    for n in (1, 4, 37):
        for name, table in _with_total_steps(n).items():
            assert len(table) == n, f"{name}({n}) has {len(table)} entries"


@pytest.mark.parametrize("name", sorted(_with_total_steps(4)))
def test_a_run_of_total_steps_reads_the_whole_table_and_no_more(name):
    n = 9
    table = _with_total_steps(n)[name]
    params = _params()
    opt = FusedAdamW(params, lr=1e-3, schedule=table)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # n steps: no warning
        for t in range(n):
            seen.append(opt.get_last_lr()[0])
            _set_grads(params, t)
            opt.step()
    expected = table.resolve(opt.param_groups, opt.defaults)[0][0].tolist()
    assert seen == expected
    _set_grads(params, n)
    with pytest.warns(UserWarning) as record:
        opt.step()  # step n + 1 reads past the end
    message = str(record[0].message)
    held = f"{expected[-1]:.6g}"
    assert f"has {n} entries" in message and f"step {n + 1}" in message and held in message, message
    assert "total_steps" in message and "len(loader) * epochs" in message
    assert opt.get_last_lr() == [expected[-1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        opt.step()


# ----------------------------------------------------------------------------------------------------------
# 5. messages that say what to do
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,expect", [
    (schedules.warmup_cosine, r"the builder function fusedopt.schedules.warmup_cosine itself: call it"),
    ("warmup_cosine", r"the string 'warmup_cosine'.*fusedopt.schedules.warmup_cosine\(...\)"),
    ("cosine", r"the string 'cosine': build a table with one of the builders"),
    (L.StepLR, r"a torch LR scheduler \(StepLR\): to drive the lr with a torch LR scheduler, keep schedule=None"),
    (lambda opt: L.LambdaLR(opt, lambda t: 1.0), r"a callable .*keep schedule=None and attach.*from_lr_scheduler"),
    ([1.0, 0.5], r"a list: wrap per-step lr factors in a table"),
    (3, r"int; build one with fusedopt.schedules"),
])
def test_schedule_hints(schedule, expect):
    with pytest.raises(TypeError, match="schedule must be a fusedopt.schedules.ScheduleTable or None") as info:
        FusedAdamW(_params(), schedule=schedule)
    assert __import__("re").search(expect, str(info.value)), str(info.value)


def test_a_torch_scheduler_instance_as_schedule():
    opt = torch.optim.SGD(_params(), lr=0.1)
    with pytest.raises(TypeError, match=r"a torch LR scheduler \(CosineAnnealingLR\).*schedule=None"):
        FusedSGD(_params(), schedule=L.CosineAnnealingLR(opt, 10))


def test_cuda_backend_with_cpu_params_says_what_to_do(monkeypatch):
    monkeypatch.setattr(_ops, "HAS_CUDA_EXTENSION", True)  # as if built: the device check must still refuse
    with pytest.raises(fusedopt.BackendUnavailable, match=r"params are on cpu: move the model to the GPU.*"
                                                          r"backend='auto'"):
        FusedAdamW(_params(), backend="cuda")


def test_momentum_column_with_no_upper_bound_matches_torch():
    """one_cycle(max_momentum > 1) is OneCycleLR(max_momentum > 1): same values (torch's step takes them)."""
    n = 10
    table = schedules.one_cycle(n, base_momentum=0.9, max_momentum=1.2)
    ref = torch.optim.SGD([torch.zeros(1)], lr=0.1, momentum=0.5)
    sched = L.OneCycleLR(ref, max_lr=0.1, total_steps=n, base_momentum=0.9, max_momentum=1.2)
    for t in range(n):
        assert table.momentum_at(t) == pytest.approx(ref.param_groups[0]["momentum"], rel=1e-12)
        assert table.lr_at(t) * 0.1 == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12)
        if t + 1 < n:
            ref.step()
            sched.step()
    assert math.isclose(float(table.momentum.max()), 1.2)


def test_get_optimizer_state_dict_on_a_fresh_table_optimizer():
    """torch.distributed.checkpoint's get_optimizer_state_dict creates missing state with one step at lr 0
    (every group's lr set to 0, then put back): with a table that is not a second driver; the step changes no
    param and does not advance the schedule (a table whose first lr is not 0, so the zeros are visible)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = torch.nn.Linear(4, 3)
    opt = FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, schedule=schedules.one_cycle(10))
    before = [p.detach().clone() for p in model.parameters()]
    state = get_optimizer_state_dict(model, opt)
    assert set(state["state"]) == {"weight", "bias"}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.schedule_step == int(opt.param_groups[0]["schedule_step"]) == 0
    assert opt.param_groups[0]["lr"] == opt.get_last_lr()[0] == pytest.approx(1e-2 / 25)
    params = list(model.parameters())
    _set_grads(params, 0)
    opt.step()  # and training goes on
    assert opt.schedule_step == 1


def test_gpu_backend_built_before_model_cuda_is_checked_at_the_step(monkeypatch):
    """torch.optim lets an optimizer be built before model.cuda(): on a machine with a CUDA device, a built GPU
    backend given CPU params is accepted at construction (they may still move) and the first step, with the
    params still on the CPU, raises the same what-to-do message, before anything changes."""
    monkeypatch.setattr(_ops, "HAS_CUDA_EXTENSION", True)  # as if built
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as if a GPU were present
    params = _params()
    opt = FusedAdamW(params, backend="cuda")
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(fusedopt.BackendUnavailable, match=r"params are on cpu: move the model to the GPU"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state
