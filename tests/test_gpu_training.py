"""GPU: training steps written the way users write them, through FusedX.step(), on both GPU backends.

Every test is marked `gpu` (skipped without CUDA) and runs for backend in (cuda, triton) x every optimizer in
OPTIMIZERS; a backend that should be there and is not is a failure (tests/conftest.py). What they check
(issue 12, "Tests that would catch these on a GPU"):

  * torch's whole-network CUDA-graph capture recipe, verbatim: warm-up iterations on a side stream with
    zero_grad(set_to_none=True), zero_grad(set_to_none=True) before capture (the captured backward allocates the
    grads from the graph's private pool: new addresses), capture of forward + scaled backward + GradScaler
    (unscale and inf/NaN skip inside the step) + clipping + schedule table + step, 100 replays with new data
    and injected infs: bit-equal to the same iterations run eagerly;
  * a single eager warm-up step, then capture; warm-up without GradScaler, capture with it;
  * torch.cuda.set_sync_debug_mode("error") around 20 steps with a CPU-tensor lr, a CUDA-tensor lr, a schedule,
    clipping, GradScaler, master weights, and the first step after load_state_dict;
  * the optimizer built before model.cuda(); a CPU checkpoint loaded onto CUDA params;
  * device memory over 200 steps whose grads are reallocated every step stays bounded.
tests/test_gpu_compile.py adds torch.compile(mode="reduce-overhead") of a whole training step (slow to compile,
so in its own file, which `make gpu-check` runs last).

Bitwise comparisons: a captured graph replays the kernels the eager iteration launches, on the same data, so
everything (params, states, counters, scale) must be identical; cuBLAS gets a fixed workspace config
(conftest.py) so that the captured and the eager backward choose the same algorithms.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fusedopt
from conftest import require_backend
from fusedopt import schedules

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda")

# One line per optimizer class and its options: adding a class adds it to every test below. FusedAdam with a
# weight decay, so its L2 path (the kernels' decoupled_weight_decay=False) runs too.
OPTIMIZERS = {name: (cls, options) for name, cls, options in [
    ("adamw", fusedopt.FusedAdamW, dict(lr=1e-3, weight_decay=0.01)),
    ("adam", fusedopt.FusedAdam, dict(lr=1e-3, weight_decay=0.01)),
    ("sgd-nesterov", fusedopt.FusedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    ("lion", fusedopt.FusedLion, dict(lr=1e-4, weight_decay=0.1)),
]}


def make_opt(rule, params, **kw):
    cls, options = OPTIMIZERS[rule]
    return cls(params, **{**options, **kw})


@pytest.fixture(params=["cuda", "triton"])
def backend(request):
    require_backend(request.param)
    return request.param


@pytest.fixture(params=sorted(OPTIMIZERS))
def rule(request):
    return request.param


def make_model(seed=0, width=512, out=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out)).to(DEVICE)


def batch(t, n=64, width=512, out=16):
    g = torch.Generator(device=DEVICE).manual_seed(1000 + t)
    return (torch.randn(n, width, device=DEVICE, generator=g), torch.randn(n, out, device=DEVICE, generator=g))


def state_tensors(opt):
    """(name, tensor) of every tensor the optimizer holds: per-param states and per-group tensors."""
    for i, group in enumerate(opt.param_groups):
        for k, v in group.items():
            if isinstance(v, torch.Tensor):
                yield f"group {i} {k}", v
        for j, p in enumerate(group["params"]):
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    yield f"group {i} param {j} {k}", v


def assert_same(a, b, what):
    """Bit-equal (NaN equal to NaN), with the first differing elements on failure."""
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
    bad = int((~same).sum())
    assert bad == 0, f"{what}: {bad} of {a.numel()} elements differ, e.g. {a[~same][:3].tolist()} vs {b[~same][:3].tolist()}"


def assert_same_run(model_a, opt_a, model_b, opt_b, what):
    for i, (p, q) in enumerate(zip(model_a.parameters(), model_b.parameters())):
        assert_same(p, q, f"{what}: param {i}")
    sa, sb = dict(state_tensors(opt_a)), dict(state_tensors(opt_b))
    assert sa.keys() == sb.keys(), what
    for k in sa:
        assert_same(sa[k], sb[k], f"{what}: {k}")


# ------------------------------------------------------------------------------------------------------------
# torch's whole-network capture recipe
# ------------------------------------------------------------------------------------------------------------
class AmpRun:
    """Model, optimizer (schedule table + clipping) and GradScaler; one training iteration as torch's AMP and
    CUDA-graph docs write it (autocast without its cache, which capture forbids). `poison` adds inf to the
    output on chosen iterations, so that every grad is non-finite and GradScaler must skip the step."""

    def __init__(self, rule, backend, total=120):
        self.model = make_model()
        self.opt = make_opt(rule, self.model.parameters(), backend=backend, max_grad_norm=1.0,
                                    schedule=schedules.one_cycle(total))
        self.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10, growth_interval=4)
        self.x, self.y = batch(0)
        self.poison = torch.zeros((), device=DEVICE)

    def feed(self, t, inf_steps=()):
        x, y = batch(t)
        self.x.copy_(x)
        self.y.copy_(y)
        self.poison.fill_(math.inf if t in inf_steps else 0.0)

    def forward_backward_step(self):
        with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
            out = self.model(self.x)
        loss = nn.functional.mse_loss(out.float() + self.poison, self.y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def iteration(self):
        self.opt.zero_grad(set_to_none=True)
        self.forward_backward_step()


def test_whole_network_capture_recipe(rule, backend):
    """Issue 12 items 1 and 2: torch's "whole network capture" example, verbatim, with GradScaler, clipping and
    a schedule inside the captured step, replayed 100 times, against the same 103 iterations run eagerly."""
    warmup, replays, inf_steps = 3, 100, {10, 11, 57}
    eager, graphed = AmpRun(rule, backend), AmpRun(rule, backend)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for t in range(warmup):
            graphed.feed(t)
            graphed.iteration()
    torch.cuda.current_stream().wait_stream(s)
    for t in range(warmup):
        eager.feed(t)
        eager.iteration()

    g = torch.cuda.CUDAGraph()
    # Sets grads to None before capture, so backward() creates .grad attributes with allocations from the
    # graph's private pool (the torch docs' comment)
    graphed.opt.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in graphed.model.parameters()]
    with torch.cuda.graph(g):
        graphed.forward_backward_step()
    for p, q in zip(graphed.model.parameters(), before):
        assert_same(p, q, "capturing must run nothing")

    for t in range(warmup, warmup + replays):
        graphed.feed(t, inf_steps)
        g.replay()
        eager.feed(t, inf_steps)
        eager.iteration()
    torch.cuda.synchronize()

    taken = warmup + replays - len(inf_steps)
    for run in (eager, graphed):
        assert [int(gr["schedule_step"]) for gr in run.opt.param_groups] == [taken] * len(run.opt.param_groups)
    assert graphed.scaler.get_scale() == eager.scaler.get_scale()
    assert_same(graphed.opt.last_grad_norm, eager.opt.last_grad_norm, "last_grad_norm")
    assert_same_run(graphed.model, graphed.opt, eager.model, eager.opt, f"{rule}/{backend} replays vs eager")


@pytest.mark.parametrize("warm_up_with_scaler", [True, False], ids=["warm-up-with-scaler", "warm-up-without-scaler"])
def test_one_eager_step_then_capture(rule, backend, warm_up_with_scaler):
    """Issue 12 item 2: a single eager step before capture (SGD: its momentum buffers are created there, so the
    captured step is the first non-first step), on the current stream; warmed up with or without GradScaler,
    captured with it. 20 replays against 20 eager iterations."""
    eager, graphed = AmpRun(rule, backend), AmpRun(rule, backend)
    for run in (eager, graphed):
        run.feed(0)
        run.opt.zero_grad(set_to_none=True)
        if warm_up_with_scaler:
            run.forward_backward_step()
        else:
            nn.functional.mse_loss(run.model(run.x), run.y).backward()
            run.opt.step()
            run.scaler.scale(torch.ones((), device=DEVICE))  # creates the scale tensor outside the capture
    g = torch.cuda.CUDAGraph()
    graphed.opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        graphed.forward_backward_step()
    for t in range(1, 21):
        graphed.feed(t, {7})
        g.replay()
        eager.feed(t, {7})
        eager.iteration()
    torch.cuda.synchronize()
    assert graphed.scaler.get_scale() == eager.scaler.get_scale()
    assert int(graphed.opt.param_groups[0]["schedule_step"]) == 20  # 1 eager + 20 replays - 1 skipped
    assert_same_run(graphed.model, graphed.opt, eager.model, eager.opt, f"{rule}/{backend} after one eager step")


# ------------------------------------------------------------------------------------------------------------
# No host synchronization
# ------------------------------------------------------------------------------------------------------------
NO_SYNC_CASES = ["cpu-tensor-lr", "cuda-tensor-lr", "schedule", "clipping", "grad-scaler", "master-weights",
                 "after-load-state-dict"]


def _no_sync_setup(rule, backend, case):
    """(model, optimizer, scaler or None) for one case; everything the first step needs that is not the
    optimizer's own doing (the model, GradScaler's scale tensor) exists already."""
    dtype = torch.bfloat16 if case == "master-weights" else torch.float32
    model = make_model(width=64, out=8).to(dtype)
    kw = {}
    if case == "cpu-tensor-lr":
        kw["lr"] = torch.tensor(1e-3)  # the torch.compile idiom
    elif case == "cuda-tensor-lr":
        kw["lr"] = torch.tensor(1e-3, device=DEVICE)
    elif case in ("schedule", "after-load-state-dict"):
        kw["schedule"] = schedules.warmup_cosine(40, 5)
    elif case == "clipping":
        kw["max_grad_norm"] = 0.5
    elif case == "master-weights":
        kw["master_weights"] = True
    opt = make_opt(rule, model.parameters(), backend=backend, **kw)
    scaler = None
    if case == "grad-scaler":
        scaler = torch.amp.GradScaler("cuda")
        scaler.scale(torch.ones((), device=DEVICE))
    if case == "after-load-state-dict":
        for t in range(3):
            _train_step(model, opt, None, t)
        saved, trained = opt.state_dict(), model.state_dict()
        model = make_model(width=64, out=8)
        model.load_state_dict(trained)
        opt = make_opt(rule, model.parameters(), backend=backend, **kw)
        opt.load_state_dict(saved)  # reads the schedule counter once: a sync, outside the checked steps
    return model, opt, scaler


def _train_step(model, opt, scaler, t, data=None):
    """One AMP-style iteration on batch t (or on `data`, an (x, y) pair made beforehand)."""
    x, y = data if data is not None else batch(t, n=16, width=64, out=8)
    dtype = next(model.parameters()).dtype
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("case", NO_SYNC_CASES)
def test_training_steps_never_sync(rule, backend, case, monkeypatch):
    """20 training iterations through FusedX.step() under torch.cuda.set_sync_debug_mode("error"): any host
    synchronization (an .item(), a pageable host-to-device copy, a read of a device tensor) raises. The first
    step (state creation, table upload) is inside. Triton's autotuning benchmarks, a one-time synchronization
    at the first step of a kernel variant, is off here (FUSEDOPT_TRITON_AUTOTUNE=0's path)."""
    from fusedopt.triton import launcher

    monkeypatch.setattr(launcher, "AUTOTUNE", False)
    model, opt, scaler = _no_sync_setup(rule, backend, case)
    batches = [batch(t, n=16, width=64, out=8) for t in range(20)]  # made before: randn is not what is tested
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(20):
            _train_step(model, opt, scaler, t, batches[t])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------
# Device placement: the optimizer follows its params
# ------------------------------------------------------------------------------------------------------------
def test_optimizer_built_before_model_cuda(rule, backend):
    """Issue 12 item 4: torch.optim allows building the optimizer before model.cuda() (the Parameter objects
    stay the same). Everything the optimizer creates must follow the params to the GPU; the run must equal
    one whose optimizer was built after model.cuda()."""
    torch.manual_seed(0)
    cpu_model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    early = make_opt(rule, cpu_model.parameters(), backend=backend, max_grad_norm=1.0,
                             schedule=schedules.warmup_cosine(30, 3))
    cpu_model.cuda()
    late_model = make_model(width=64, out=8)
    late_model.load_state_dict(cpu_model.state_dict())
    late = make_opt(rule, late_model.parameters(), backend=backend, max_grad_norm=1.0,
                            schedule=schedules.warmup_cosine(30, 3))
    for t in range(10):
        _train_step(cpu_model, early, None, t)
        _train_step(late_model, late, None, t)
    for name, tensor in state_tensors(early):
        assert tensor.device.type == "cuda", f"{name} is on {tensor.device}"
    assert_same_run(cpu_model, early, late_model, late, f"{rule}/{backend} built before .cuda()")


def _synthetic_run(rule, backend, params, start, stop, opt=None):
    """Steps start..stop-1 with grads generated on the CPU from the step number (the same on any device)."""
    if opt is None:
        opt = make_opt(rule, params, backend=backend, schedule=schedules.warmup_cosine(40, 4))
    for t in range(start, stop):
        g = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        opt.step()
    return opt


def test_cpu_checkpoint_loads_onto_cuda_params(rule, backend):
    """Issue 12 item 4: a checkpoint saved on the CPU (backend cpu) and loaded onto CUDA params continues
    exactly as a run that was on the GPU throughout: states, step counts and the schedule counter move to the
    params' device. (The CPU, CUDA and Triton kernels are bit-equal to each other, tested elsewhere.)"""
    require_backend("cpu")
    torch.manual_seed(1)
    init = [torch.randn(33, 17), torch.randn(70001), torch.randn(5)]
    cpu_params = [p.clone() for p in init]
    saved = _synthetic_run(rule, "cpu", cpu_params, 0, 6).state_dict()
    resumed_params = [p.clone().to(DEVICE) for p in cpu_params]
    resumed = make_opt(rule, resumed_params, backend=backend, schedule=schedules.warmup_cosine(40, 4))
    resumed.load_state_dict(saved)
    _synthetic_run(rule, backend, resumed_params, 6, 12, resumed)
    straight_params = [p.clone().to(DEVICE) for p in init]
    straight = _synthetic_run(rule, backend, straight_params, 0, 12)
    for name, tensor in state_tensors(resumed):
        assert tensor.device.type == "cuda", f"{name} is on {tensor.device}"
    for i, (p, q) in enumerate(zip(resumed_params, straight_params)):
        assert_same(p, q, f"{rule}/{backend} param {i} after a CPU checkpoint")
    sa, sb = dict(state_tensors(resumed)), dict(state_tensors(straight))
    assert sa.keys() == sb.keys()
    for k in sb:
        assert_same(sa[k].to(sb[k].device), sb[k], f"{rule}/{backend} {k} after a CPU checkpoint")


# ------------------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------------------
def test_memory_stays_bounded_when_grads_move(rule, backend):
    """Issue 12 item 5: 200 steps whose grads are new tensors at new addresses every step (set_to_none plus an
    allocation of varying size in between). Whatever the optimizer caches per grad set must not pile up: the
    memory allocated after step 200 equals that after step 100, and the peak stays within the step's own
    working set."""
    from fusedopt.triton import launcher

    model = make_model(width=256, out=8)
    opt = make_opt(rule, model.parameters(), backend=backend, max_grad_norm=1.0)
    held, seen = [], set()
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    allocated = {}
    for t in range(201):
        junk = torch.empty((t * 7919) % 50_000 + 1, device=DEVICE)  # shifts where the next grads land
        x, y = batch(t, n=32, width=256, out=8)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        seen.add(tuple(p.grad.data_ptr() for p in model.parameters()))
        held = [p.grad for p in model.parameters()]  # the previous step's grads stay alive one step longer
        opt.step()
        del junk, x, y
        if t == 100:
            torch.cuda.synchronize()
            allocated[100] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    allocated[200] = torch.cuda.memory_allocated()
    peak = torch.cuda.max_memory_allocated()
    del held
    assert len(seen) > launcher.MAX_GRAD_VECTORS, "the grads must move for this test to mean anything"
    assert allocated[200] - allocated[100] <= 64 * 1024, allocated
    # the step's working set: this step's and the previous step's grads, activations, the junk, a few MiB
    assert peak - allocated[100] <= 2 * grad_bytes + 50_000 * 4 + 16 * 2 ** 20, (peak, allocated)
    assert launcher.cache_bytes() <= launcher.MAX_CACHE_BYTES
