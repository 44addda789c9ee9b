"""GPU: torch.compile(train_step, mode="reduce-overhead") (cudagraph trees) of a whole training step, with
FusedX.step() inside, for backend in (cuda, triton) x every optimizer of test_gpu_training.OPTIMIZERS.

The compiled step must advance the schedule at every call and follow the eager run of the same function. It
cannot be bitwise: Inductor's forward and backward kernels round differently from eager ones (ulps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusedopt import schedules
from test_gpu_training import backend, batch, make_model, make_opt, rule  # noqa: F401  (fixtures)

pytestmark = pytest.mark.gpu


def _close_or_sign_tie(a, b, what):
    """Compiled forward/backward kernels round differently from eager ones (ulps), and Lion's sign() turns an
    ulp near a tie into a 2 lr step: all but 0.1% of the elements within 1e-5 of the param's scale, none off
    by more than a few lr."""
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max().clamp_min(1e-6))
    off = (a - b).abs() > 1e-5 * scale
    assert int(off.sum()) <= max(2, a.numel() // 1000), f"{what}: {int(off.sum())} of {a.numel()} elements differ"
    assert float((a - b).abs().max()) <= 1e-2 * scale, what


def test_torch_compile_reduce_overhead_training_step(rule, backend):
    """A whole training step compiled with mode="reduce-overhead" (cudagraph trees), 50 steps, against the
    same function run eagerly: the schedule advances at every step and the params follow the eager run."""
    torch._dynamo.reset()

    def train_step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    runs = []
    for compiled in (False, True):
        model = make_model(width=64, out=8)
        opt = make_opt(rule, model.parameters(), backend=backend, max_grad_norm=1.0,
                               schedule=schedules.warmup_cosine(60, 5))
        step = torch.compile(train_step, mode="reduce-overhead") if compiled else train_step
        for t in range(50):
            x, y = batch(t, n=16, width=64, out=8)
            step(model, opt, x, y)
        torch.cuda.synchronize()
        runs.append((model, opt))
    (m_eager, o_eager), (m_comp, o_comp) = runs
    assert int(o_comp.param_groups[0]["schedule_step"]) == int(o_eager.param_groups[0]["schedule_step"]) == 50
    for i, (p, q) in enumerate(zip(m_comp.parameters(), m_eager.parameters())):
        _close_or_sign_tie(p, q, f"{rule}/{backend} compiled param {i}")
    torch._dynamo.reset()
