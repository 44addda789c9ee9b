"""Weight-decay columns in schedule tables (issue 14, item 4): the weight decay of each step read on the device
like the lr, from a table built with ``schedules.with_weight_decay`` or baked from a torch scheduler that writes
``weight_decay``.

The oracle is the recipe as people write it today: torch.optim (single-tensor) / lion-pytorch with a LambdaLR
for the lr and ``group["weight_decay"]`` set by hand before every step (DINO's training loop does exactly
this for its regularized group). float32, rtol 1e-6 / atol 1e-6 over 40 steps (a few ulps, see test_parity);
Lion counts differing elements (sign(): see test_parity).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from lion_pytorch import Lion
from torch.optim import lr_scheduler as L

import fusedopt
from conftest import usable_backends
from fusedopt import FusedAdam, FusedAdamW, FusedLion, FusedSGD, schedules

N, W = 40, 5
BASE_WD = 0.04


def lr_factor(t):  # warmup_cosine(N, W), HF's formula
    if t < W:
        return t / W
    return 0.5 * (1.0 + math.cos(math.pi * (t - W) / (N - W)))


def wd_factor(t):  # cosine(N, 1.0, 10.0): DINO's weight decay 0.04 -> 0.4
    return 10.0 + (1.0 - 10.0) * (1 + math.cos(math.pi * t / N)) / 2


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


RULES = {
    "adamw": (lambda groups, **kw: FusedAdamW(groups, lr=1e-2, **kw),
              lambda groups: torch.optim.AdamW(groups, lr=1e-2, foreach=False)),
    # torch.optim.Adam's L2 decay read from the column (the kernels' decoupled_weight_decay=False)
    "adam": (lambda groups, **kw: FusedAdam(groups, lr=1e-2, **kw),
             lambda groups: torch.optim.Adam(groups, lr=1e-2, foreach=False)),
    "sgd": (lambda groups, **kw: FusedSGD(groups, lr=1e-2, momentum=0.9, nesterov=True, **kw),
            lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9, nesterov=True, foreach=False)),
    "lion": (lambda groups, **kw: FusedLion(groups, lr=1e-3, **kw), lambda groups: Lion(groups, lr=1e-3)),
    "lion_decoupled": (lambda groups, **kw: FusedLion(groups, lr=1e-3, decoupled_weight_decay=True, **kw),
                       lambda groups: Lion(groups, lr=1e-3, decoupled_weight_decay=True)),
}


def _grads(params, t):
    g = torch.Generator().manual_seed(7 + t)
    return [torch.randn(p.shape, generator=g) for p in params]


def _compare(rule, ours, ref):
    if rule.startswith("lion"):
        total = sum(p.numel() for p in ref)
        differ = sum(int((a != b).sum()) for a, b in zip(ours, ref))
        assert differ <= max(2, total // 1000), f"{rule}: {differ} of {total} elements differ"
        return
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6, msg=lambda m: f"{rule} {i}: {m}")


# every rule on the CPU kernels; under the (slow) Triton interpreter two rules suffice to show the column reaching
# that backend's kernels (the ops' own tests cover the table reading of every rule and backend)
DINO_CASES = [(rule, "cpu") for rule in RULES] + [
    (rule, "triton") for rule in ("sgd", "lion_decoupled") if "triton" in usable_backends()]


@pytest.mark.parametrize("rule,backend", DINO_CASES, ids=[f"{r}-{b}" for r, b in DINO_CASES])
def test_dino_weight_decay_recipe(rule, backend):
    make_ours, make_ref = RULES[rule]
    m_ours, m_ref = _model(), _model()
    table = schedules.with_weight_decay(schedules.warmup_cosine(N, W), schedules.cosine(N, 1.0, 10.0))
    ours = make_ours(fusedopt.param_groups(m_ours, BASE_WD), schedule=table, backend=backend)
    ref = make_ref(fusedopt.param_groups(m_ref, BASE_WD))
    sched = L.LambdaLR(ref, lr_factor)
    for t in range(N):
        for group, base in zip(ref.param_groups, (BASE_WD, 0.0)):
            group["weight_decay"] = base * wd_factor(t)  # DINO: for the regularized group
        # what the groups show is what the oracle's groups hold (the no-decay group stays at 0)
        assert [g["weight_decay"] for g in ours.param_groups] == pytest.approx(
            [g["weight_decay"] for g in ref.param_groups], rel=1e-12), t
        assert [g["initial_weight_decay"] for g in ours.param_groups] == [BASE_WD, 0.0]
        for params in (list(m_ours.parameters()), list(m_ref.parameters())):
            for p, g in zip(params, _grads(params, t)):
                p.grad = g
        ours.step()
        ref.step()
        sched.step()
    _compare(rule, list(m_ours.parameters()), list(m_ref.parameters()))
    if backend != "cpu":
        return
    # the decay mattered: without the column the run ends elsewhere
    m_plain = _model()
    plain = make_ours(fusedopt.param_groups(m_plain, BASE_WD), schedule=schedules.warmup_cosine(N, W),
                      backend=backend)
    for t in range(N):
        for p, g in zip(m_plain.parameters(), _grads(list(m_plain.parameters()), t)):
            p.grad = g
        plain.step()
    assert max((a - b).abs().max().item() for a, b in zip(m_plain.parameters(), m_ours.parameters())) > 1e-5


class _LambdaLRWithWeightDecay(L.LambdaLR):
    """A user's scheduler that also anneals weight_decay (torch has none built in; recipes write their own)."""

    def __init__(self, optimizer, lr_lambda, wd_lambda):
        self.wd_lambda = wd_lambda
        self.base_wds = [g["weight_decay"] for g in optimizer.param_groups]
        super().__init__(optimizer, lr_lambda)

    def step(self, epoch=None):
        super().step(epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_wds):
            group["weight_decay"] = base * self.wd_lambda(self.last_epoch)


@pytest.mark.parametrize("rule", ["adamw", "sgd"])
def test_baked_from_a_scheduler_that_writes_weight_decay(rule):
    make_ours, make_ref = RULES[rule]
    factory = lambda o: _LambdaLRWithWeightDecay(o, lr_factor, wd_factor)  # noqa: E731
    m_ours, m_ref = _model(), _model()
    ours = make_ours(fusedopt.param_groups(m_ours, BASE_WD), schedule=schedules.from_lr_scheduler(factory, N))
    ref = make_ref(fusedopt.param_groups(m_ref, BASE_WD))
    sched = factory(ref)
    for t in range(N):
        assert [g["weight_decay"] for g in ours.param_groups] == pytest.approx(
            [g["weight_decay"] for g in ref.param_groups], rel=1e-12), t
        assert ours.get_last_lr() == pytest.approx([g["lr"] for g in ref.param_groups], rel=1e-12)
        for params in (list(m_ours.parameters()), list(m_ref.parameters())):
            for p, g in zip(params, _grads(params, t)):
                p.grad = g
        ours.step()
        ref.step()
        if t + 1 < N:
            sched.step()
    _compare(rule, list(m_ours.parameters()), list(m_ref.parameters()))


def test_a_scheduler_writing_weight_decay_beside_a_column_is_a_second_driver():
    model = _model()
    table = schedules.with_weight_decay(schedules.constant(N), schedules.cosine(N, 1.0, 10.0))
    opt = FusedAdamW(fusedopt.param_groups(model, BASE_WD), schedule=table)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[0]["weight_decay"] = 0.3
    with pytest.raises(RuntimeError, match=r"param group 0's weight_decay is 0.3.*initial_weight_decay"):
        opt.step()


def test_resume_with_a_weight_decay_column_is_bit_identical():
    table = lambda: schedules.with_weight_decay(schedules.warmup_cosine(N, W), schedules.cosine(N, 1.0, 10.0))  # noqa: E731
    model = _model()
    opt = FusedSGD(fusedopt.param_groups(model, BASE_WD), lr=1e-2, momentum=0.9, schedule=table())

    def run(model, opt, steps):
        for t in steps:
            for p, g in zip(model.parameters(), _grads(list(model.parameters()), t)):
                p.grad = g
            opt.step()

    run(model, opt, range(15))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(model, opt, range(15, 30))
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["opt"]["param_groups"][0]["initial_weight_decay"] == BASE_WD
    model_b = _model()
    model_b.load_state_dict(saved["model"])
    opt_b = FusedSGD(fusedopt.param_groups(model_b, 0.5), lr=1e-2, momentum=0.9, schedule=table())
    opt_b.load_state_dict(saved["opt"])  # a table checkpoint: its base weight decay (0.04) comes with it
    assert opt_b.param_groups[0]["initial_weight_decay"] == BASE_WD
    run(model_b, opt_b, range(15, 30))
    for a, b in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_cosine_builder_is_cosineannealinglr():
    for end in (0.1, 10.0):  # falling and rising
        table = schedules.cosine(25, 1.0, end)
        opt = torch.optim.SGD([torch.zeros(1)], lr=0.3)
        sched = L.CosineAnnealingLR(opt, T_max=25, eta_min=0.3 * end)
        for t in range(25):
            assert 0.3 * table.lr_at(t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
            opt.step()
            sched.step()


def test_weight_decay_columns_bad_input():
    with pytest.raises(ValueError, match="weight-decay column has 3 entries but the table has 4"):
        schedules.with_weight_decay(schedules.constant(4), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="weight-decay factor entry 1 is -1.0"):
        schedules.with_weight_decay(schedules.constant(2), [1.0, -1.0])
    with pytest.raises(ValueError, match="already has a weight-decay column"):
        schedules.with_weight_decay(schedules.with_weight_decay(schedules.constant(2), [1, 2]), [1, 2])
    with pytest.raises(ValueError, match="weight-decay factor table has 1 entries but the lr table has 2"):
        schedules.ScheduleTable([1.0, 1.0], weight_decay=[1.0])
    with pytest.raises(ValueError, match=r"weight_decay: tables \[0\] have a weight_decay table"):
        schedules.sequential([schedules.ScheduleTable([1.0], weight_decay=[2.0]), schedules.constant(2)], [1])
    spliced = schedules.sequential([schedules.ScheduleTable([1.0], weight_decay=[2.0]),
                                    schedules.ScheduleTable([0.5, 0.25], weight_decay=[3.0, 4.0])], [2])
    assert spliced.weight_decay.tolist() == [2.0, 2.0, 3.0, 4.0]
