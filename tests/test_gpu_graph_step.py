"""GPU: a whole AMP training step (forward, scaled backward, fused clip + unscale + inf-skip, on-device
schedule) captured in one CUDA graph and replayed, against the same steps run eagerly. Skipped without CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fusedopt
from fusedopt import backends, schedules

pytestmark = pytest.mark.gpu

RULES = {
    "adamw": lambda params, **kw: fusedopt.FusedAdamW(params, lr=1e-3, weight_decay=0.01, **kw),
    "sgd": lambda params, **kw: fusedopt.FusedSGD(params, lr=1e-2, momentum=0.9, nesterov=True, **kw),
    "lion": lambda params, **kw: fusedopt.FusedLion(params, lr=1e-4, weight_decay=0.1, **kw),
}
STEPS, INF_STEPS = 24, {5, 6, 17}


def _backend_or_skip(name):
    ok, why = backends.available()[name]
    if not ok:
        pytest.skip(f"backend {name!r} not available: {why}")


class Run:
    """Model, optimizer and scaler on static buffers, so the same object can run eagerly or be captured."""

    def __init__(self, rule, backend):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8)).cuda()
        self.opt = RULES[rule](self.model.parameters(), backend=backend, max_grad_norm=0.5,
                               schedule=schedules.one_cycle(STEPS + 8))
        self.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10, growth_interval=4)
        self.x = torch.zeros(32, 64, device="cuda")
        self.y = torch.zeros(32, 8, device="cuda")
        self.poison = torch.zeros((), device="cuda")  # 0, or inf to make this step's grads non-finite

    def step(self):
        self.opt.zero_grad(set_to_none=False)  # grads keep their addresses across replays
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.mse_loss(self.model(self.x).float(), self.y) + self.poison
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def feed(self, t):
        g = torch.Generator(device="cuda").manual_seed(t)
        self.x.copy_(torch.randn(32, 64, device="cuda", generator=g))
        self.y.copy_(torch.randn(32, 8, device="cuda", generator=g))
        self.poison.fill_(math.inf if t in INF_STEPS else 0.0)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_captured_amp_step_matches_eager(rule, backend):
    _backend_or_skip(backend)
    eager, graphed = Run(rule, backend), Run(rule, backend)
    warmup = 3  # creates state and lets the scaler settle, outside the graph (as CUDA graphs require)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for t in range(warmup):
            for run in (eager, graphed):
                run.feed(t)
                run.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for t in range(warmup, STEPS):
        eager.feed(t)
        eager.step()
        graphed.feed(t)
        graph.replay()
    torch.cuda.synchronize()

    taken = STEPS - len(INF_STEPS)
    assert int(eager.opt.param_groups[0]["schedule_step"]) == taken
    assert int(graphed.opt.param_groups[0]["schedule_step"]) == taken, "replays must advance the schedule"
    assert eager.scaler.get_scale() == graphed.scaler.get_scale()
    torch.testing.assert_close(graphed.opt.last_grad_norm, eager.opt.last_grad_norm, rtol=1e-6, atol=0)
    for a, b in zip(graphed.model.parameters(), eager.model.parameters()):
        # the same kernels on the same data: graph replay changes when work is launched, not what it computes
        torch.testing.assert_close(a, b, rtol=0, atol=0)
