"""fusedopt.lr_finder.find_lr: the LR range test on a small synthetic regression."""

from __future__ import annotations

import math

import pytest
import torch

import fusedopt
from fusedopt.lr_finder import LRFinderResult, exponential_ramp, find_lr, zero_phase_smooth

D = 16


def regression(seed=0, n=512, batch=64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen)
    w = torch.randn(D, 1, generator=gen)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=gen)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(D, 1)


def snapshot(model):
    return [t.detach().clone() for t in model.state_dict().values()]


def assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


def test_sgd_suggestion_in_range_and_weights_restored():
    batches = regression()
    model = make_model()
    before = snapshot(model)
    result = find_lr(model, torch.nn.functional.mse_loss, batches,
                     lambda params, schedule: fusedopt.FusedSGD(params, lr=123.0, schedule=schedule))
    assert_bitwise_equal(before, snapshot(model))
    assert isinstance(result, LRFinderResult)
    assert result.extra["schedule_on_device"] is True
    # plain SGD on this least-squares problem (Hessian ~ 2I) diverges for lr > ~1: the run stops there
    assert result.stop_reason == "diverged"
    assert 0.1 < result.lrs[-1] < 10
    # steepest descent: well inside the stable range, below the lr of the minimum loss
    assert 1e-3 <= result.suggested_lr <= 0.3
    assert result.suggested_lr < result.min_loss_lr
    assert len(result.losses) == len(result.lrs) == len(result.smoothed_losses)


def test_adamw_suggestion_in_range():
    model = make_model()
    before = snapshot(model)
    result = find_lr(model, torch.nn.functional.mse_loss, regression(),
                     lambda params, schedule: fusedopt.FusedAdamW(params, schedule=schedule), num_steps=80)
    assert_bitwise_equal(before, snapshot(model))
    assert 1e-3 <= result.suggested_lr <= 1.0
    assert result.losses[result.suggested_index] < result.losses[0]


def test_lrs_follow_the_exponential_ramp():
    result = find_lr(make_model(), torch.nn.functional.mse_loss, regression(),
                     lambda params, schedule: fusedopt.FusedSGD(params, schedule=schedule),
                     start_lr=1e-6, end_lr=1.0, num_steps=61, diverge_factor=1e9)
    assert result.stop_reason == "num_steps" and len(result.lrs) == 61
    assert result.lrs[0] == pytest.approx(1e-6) and result.lrs[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:])]
    assert ratios == pytest.approx([10 ** 0.1] * 60)
    table = exponential_ramp(1e-6, 1.0, 61)
    assert len(table) == 62 and table.lr_at(0) == 1.0 and table.lr_at(60) == pytest.approx(1e6)


def _range_test_with_torch(batches, start_lr, end_lr, num_steps):
    """The oracle: the LR range test as a plain loop, torch.optim.SGD driven by torch's ExponentialLR with
    gamma = (end_lr / start_lr) ** (1 / (num_steps - 1)). Returns (lrs, losses), the loss before each step."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=start_lr, foreach=False)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(end_lr / start_lr) ** (1 / (num_steps - 1)))
    lrs, losses = [], []
    for t in range(num_steps):
        x, y = batches[t % len(batches)]
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
    return lrs, losses


def test_device_table_matches_torch_exponential_lr():
    """The fusedopt run (lr read from the table on the device) and find_lr's host-side path (a torch.optim.SGD
    whose lr find_lr sets each step) both follow the plain torch loop with ExponentialLR: the same lrs (float64
    products, rel 1e-12) and losses (float32 training, rel 1e-4) until the run stops."""
    batches = regression()
    ref_lrs, ref_losses = _range_test_with_torch(batches, 1e-7, 10.0, 70)
    fused = find_lr(make_model(), torch.nn.functional.mse_loss, batches,
                    lambda params, schedule: fusedopt.FusedSGD(params, schedule=schedule), num_steps=70)
    host = find_lr(make_model(), torch.nn.functional.mse_loss, batches, lambda params: torch.optim.SGD(params, lr=1.0),
                   num_steps=70)
    assert fused.extra["schedule_on_device"] and not host.extra["schedule_on_device"]
    for result in (fused, host):
        n = len(result.losses)
        assert n > 30  # the run got well into the ramp before it stopped
        assert result.lrs == pytest.approx(ref_lrs[:n], rel=1e-12)
        assert result.losses == pytest.approx(ref_losses[:n], rel=1e-4)


def test_restores_grads_buffers_mode_rng_and_optimizer_state():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.1),
                                torch.nn.Linear(8, 1))
    model.train()
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)
    before = snapshot(model)
    existing = fusedopt.FusedAdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.grad is None else p.grad
    existing.step()  # an optimizer with state, reused by the factory
    before = snapshot(model)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    state_before = {k: v.clone() for k, v in existing.state[model[0].weight].items()}
    lr_before = existing.param_groups[0]["lr"]
    rng = torch.random.get_rng_state()

    def reuse(params, schedule):
        return existing

    result = find_lr(model, torch.nn.functional.mse_loss, regression(), reuse, num_steps=30)
    assert result.extra["schedule_on_device"] is False  # the reused optimizer has no table: lr set per step
    assert_bitwise_equal(before, snapshot(model))  # params and BatchNorm running stats
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.random.get_rng_state(), rng)
    for k, v in existing.state[model[0].weight].items():
        assert torch.equal(v, state_before[k]), k
    assert existing.param_groups[0]["lr"] == lr_before


def test_one_shot_iterator_is_cycled():
    batches = regression(n=128)  # 2 batches for 20 steps
    result = find_lr(make_model(), torch.nn.functional.mse_loss, iter(batches),
                     lambda params, schedule: fusedopt.FusedSGD(params, schedule=schedule), num_steps=20,
                     start_lr=1e-4, end_lr=1e-2)
    assert len(result.losses) == 20


def test_plot_writes_png(tmp_path):
    result = find_lr(make_model(), torch.nn.functional.mse_loss, regression(),
                     lambda params, schedule: fusedopt.FusedLion(params, schedule=schedule), num_steps=40)
    path = tmp_path / "lr.png"
    result.plot(str(path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_short_run_that_diverges_suggests_its_descent():
    """30 steps over 1e-7..10 (the smoothing's memory, ~50 steps at beta 0.98, is longer than the run): the
    divergence at the end must not lift the start of the smoothed curve, which made the first lr the steepest
    descent. The suggestion lies where the loss falls, below the lr of the minimum loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    batches = [(torch.randn(16, 128), torch.randint(0, 10, (16,))) for _ in range(4)]
    result = find_lr(model, torch.nn.functional.cross_entropy, batches,
                     lambda params, schedule: fusedopt.FusedAdamW(params, schedule=schedule), num_steps=30)
    assert max(result.losses) > 10 * result.losses[0]  # it diverged
    assert result.smoothed_losses[0] == pytest.approx(result.losses[0], rel=0.05)
    assert 1e-4 < result.suggested_lr < result.min_loss_lr
    assert result.losses[result.suggested_index + 2] < result.losses[result.suggested_index - 2]


def test_divergence_start_ignores_a_spike_that_comes_back():
    from fusedopt.lr_finder import divergence_start

    assert divergence_start([3.0, 2.0, 9.0, 2.5, 1.0, 3.5, 40.0, 90.0], 4.0, 0.0) == 6  # beta 0: the raw losses
    assert divergence_start([3.0, 2.0, 1.0], 4.0, 0.98) == 3
    # one lucky batch (0.2 among losses near 2) does not make every later loss look diverged
    assert divergence_start([2.0, 2.1, 0.2, 2.0, 1.9, 2.2, 30.0, 80.0], 4.0, 0.9) == 6


def test_zero_phase_smoothing_has_no_lag():
    ramp = [float(i) for i in range(50)]
    smoothed = zero_phase_smooth(ramp, 0.9)
    assert smoothed[25] == pytest.approx(25.0, abs=0.5)


@pytest.mark.parametrize("kwargs", [dict(start_lr=0), dict(start_lr=1.0, end_lr=0.5), dict(num_steps=1),
                                    dict(end_lr=math.inf), dict(diverge_factor=1.0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        find_lr(make_model(), torch.nn.functional.mse_loss, regression(),
                lambda params, schedule: fusedopt.FusedSGD(params, schedule=schedule), **kwargs)


def test_bad_batch():
    with pytest.raises(TypeError, match="pair"):
        find_lr(make_model(), torch.nn.functional.mse_loss, [torch.zeros(4, D)],
                lambda params, schedule: fusedopt.FusedSGD(params, schedule=schedule), num_steps=5)


def test_plot_without_matplotlib_says_what_to_install(tmp_path):
    """In an environment without matplotlib (made unimportable by tests/cli_runner.py's shim), plot() raises an
    ImportError that names the pip command; the measurement itself needs no matplotlib."""
    from cli_runner import run_code

    out = tmp_path / "lr.png"
    proc = run_code(f"""
from fusedopt._extras import MissingDependency
from fusedopt.lr_finder import LRFinderResult
result = LRFinderResult(lrs=[1e-3, 1e-2, 1e-1], losses=[1.0, 0.5, 2.0], smoothed_losses=[1.0, 0.6, 1.5],
                        suggested_lr=1e-2, suggested_index=1, stop_reason="num_steps", min_loss=0.5, min_loss_lr=1e-2)
try:
    result.plot({str(out)!r})
except MissingDependency as e:
    print(isinstance(e, ImportError), e)
""", without=["matplotlib"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("True LRFinderResult.plot needs matplotlib, which is not installed")
    assert 'pip install "fusedopt[plot]"' in proc.stdout
    assert not out.exists()
