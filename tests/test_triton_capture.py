"""The Triton launcher's rules for CUDA-graph capture, the layout rule and the step counts, checked without a GPU.

A capture cannot be made without a GPU, but the launcher asks one question about it, `launcher._capturing`,
and everything it does differently then (no table upload, grads through the staging buffer, only kernels
already launched) is host logic. These tests answer "capturing" at chosen calls and run the kernels under the
interpreter (compiled on a GPU), comparing every update with the C++ CPU op bit for bit. tests/test_gpu_capture.py
runs the same situations through real captures on a GPU.
"""

import os

import pytest
import torch

from conftest import HAS_CUDA, expected_backends, require_backend

if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401
except ImportError as e:  # a skip where Triton must exist (CI, a GPU) would hide a broken install
    if "triton" in expected_backends():
        raise
    pytest.skip(f"triton is not installed ({e})", allow_module_level=True)
import fusedopt  # noqa: E402
import fusedopt.triton as ft  # noqa: E402
from fusedopt.triton import launcher  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    """Empty caches and variant records, so that each test decides what was launched eagerly before."""
    require_backend("cpu")
    monkeypatch.setattr(launcher, "_LAYOUTS", type(launcher._LAYOUTS)())
    monkeypatch.setattr(launcher, "_LAUNCHED", set())
    monkeypatch.setattr(launcher, "_TUNED", set())
    monkeypatch.setattr(launcher, "AUTOTUNE", False)


class Capture:
    """launcher._capturing answers True inside `with capture:` (as during torch.cuda.graph's capture)."""

    def __init__(self, monkeypatch):
        self.on = False
        monkeypatch.setattr(launcher, "_capturing", lambda device: self.on)

    def __enter__(self):
        self.on = True

    def __exit__(self, *exc):
        self.on = False


def _tensors(sizes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in sizes]


SIZES = [(3,), (1025,), (0,), (7, 5)]


class OpPair:
    """The same AdamW / SGD / Lion op calls on ours (DEVICE) and on the C++ CPU op, states kept for both."""

    def __init__(self, rule, sizes=SIZES):
        self.rule = rule
        base = _tensors(sizes, 0)
        self.sides = []
        for impl, dev in ((getattr(ft, rule + "_"), DEVICE), (getattr(torch.ops.fusedopt, rule + "_"), torch.device("cpu"))):
            params = [p.clone().to(dev) for p in base]
            states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
            steps = [torch.zeros((), dtype=torch.int64, device=dev) for _ in params]
            self.sides.append((impl, dev, params, states, steps))
        self._on_device = {}  # id(grads) -> their copies per device: one grads object keeps its addresses

    def step(self, grads, *, amsgrad=False, first_step=False, controls=False, t=0):
        for impl, dev, params, states, steps in self.sides:
            gs = self._on_device.setdefault((id(grads), dev), (grads, [g.to(dev) for g in grads]))[1]
            ctl = (dict(lr_table=torch.tensor([1e-2, 5e-3, 2e-3], dtype=torch.float64, device=dev),
                        mom_table=torch.tensor([0.9, 0.8], dtype=torch.float64, device=dev),
                        schedule_step=torch.tensor(t, device=dev), grad_scale=torch.tensor([4.0], device=dev),
                        found_inf=torch.zeros(1, device=dev), clip_coef=torch.tensor([0.5], device=dev))
                   if controls else dict(lr_table=None, mom_table=None, schedule_step=None, grad_scale=None,
                                         found_inf=None, clip_coef=None))
            c = [ctl[k] for k in ("lr_table", "mom_table", "schedule_step", "grad_scale", "found_inf", "clip_coef")]
            if self.rule == "adamw":
                impl(params, gs, states[0], states[1], states[2] if amsgrad else [], steps, [], 1e-2, 0.9, 0.999,
                     1e-8, 0.1, amsgrad, False, *c)
            elif self.rule == "sgd":
                impl(params, gs, states[0], [], 1e-2, 0.9, 0.0, 1e-3, True, False, first_step, *c)
            else:
                impl(params, gs, states[0], [], 1e-3, 0.9, 0.99, 0.1, *c)

    def assert_equal(self, what):
        (_, _, p1, s1, st1), (_, _, p2, s2, st2) = self.sides
        for a, b in zip(p1 + sum(s1, []) + st1, p2 + sum(s2, []) + st2):
            assert torch.equal(a.cpu(), b), what


def _grads(seed, sizes=SIZES):
    return _tensors(sizes, seed)


@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_new_grads_during_capture_take_the_staged_copy(rule, monkeypatch):
    """Issue 12 item 1 at the op level: torch's capture recipe calls zero_grad(set_to_none=True) before
    capturing, so the captured backward makes grads at new addresses. The cached table does not depend on the
    grads; their addresses go through the layout's staging buffer, whose copy the graph records."""
    capture = Capture(monkeypatch)
    pair = OpPair(rule)
    for t in range(2):  # warm-up, as the recipe does, with grads at whatever addresses
        pair.step(_grads(t), first_step=t == 0)
    layout = next(iter(launcher._LAYOUTS.values()))
    staging = layout.staging
    assert staging is not None
    with capture:
        pair.step(_grads(5))  # new grad tensors: a new grad vector, no table upload, no error
        vector = next(reversed(layout.grad_vectors.values()))
        assert vector.captured and layout.captured and vector.staging is staging and layout.staging is None
        with pytest.raises(RuntimeError, match="second new set of grads"):
            pair.step(_grads(6))  # the staging buffer now belongs to the captured copy
    pair.assert_equal(f"{rule}: the step with new grads during capture")
    pair.step(_grads(7))  # an eager step allocates a new staging buffer
    assert layout.staging is not None and layout.staging is not staging
    launcher.clear_caches()
    assert list(launcher._LAYOUTS.values()) == [layout] and vector in layout.grad_vectors.values()


def test_new_params_during_capture_raise(monkeypatch):
    capture = Capture(monkeypatch)
    pair = OpPair("lion")
    with capture, pytest.raises(RuntimeError, match="new params or states during CUDA-graph capture"):
        pair.step(_grads(0))


def test_kernel_variant_first_met_during_capture_raises(monkeypatch):
    """Issue 12 item 2: a variant never launched eagerly would be loaded during capture (illegal in CUDA). AdamW
    warmed up without amsgrad, captured with it: a RuntimeError naming the variant, before any launch."""
    capture = Capture(monkeypatch)
    pair = OpPair("adamw")
    pair.step(_grads(0), amsgrad=True)
    launcher._LAUNCHED.clear()
    pair.step(_grads(1), amsgrad=False)  # only the amsgrad=False variant is "loaded" now
    with capture, pytest.raises(RuntimeError, match=r"adamw_kernel \(.*AMSGRAD=True.*first time during CUDA-graph"):
        pair.step(_grads(2), amsgrad=True)


@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_warm_up_plain_then_capture_with_every_control(rule, monkeypatch):
    """Issue 12 item 2: one eager step without GradScaler, clipping or a schedule (SGD's first step: its
    momentum buffers are being created), then a captured step with all of them (SGD: not the first step). The
    same compiled kernel serves both: the controls and SGD's first-step flag are runtime arguments."""
    capture = Capture(monkeypatch)
    pair = OpPair(rule)
    pair.step(_grads(0), first_step=True)
    grads = _grads(1)
    with capture:
        pair.step(grads, controls=True, t=1)
        pair.step(grads, controls=True, t=9)  # past the tables' end: their last entries
    pair.assert_equal(f"{rule}: plain warm-up, captured step with every control")
    assert len(launcher._LAUNCHED) == 1


def test_grads_with_other_strides_on_size_one_dims():
    """Issue 12 item 7: a contiguous param (2, 1, 3) and a contiguous grad whose stride on the size-1 dim differs
    (what a bmm of a transposed weight makes). op_args.h walks_like() accepts it; so must Triton, with the
    same update as the CPU op. Through the op and through FusedAdamW.step()."""
    p = _tensors([(2, 1, 3)], 3)[0]
    g = torch.empty_strided((2, 1, 3), (3, 1, 1)).copy_(_tensors([(2, 1, 3)], 4)[0])
    assert g.is_contiguous() and g.stride() != p.stride()
    results = []
    for impl, dev in ((ft.adamw_, DEVICE), (torch.ops.fusedopt.adamw_, torch.device("cpu"))):
        ps = [p.clone().to(dev)]
        gs = [torch.empty_strided((2, 1, 3), (3, 1, 1), device=dev).copy_(g)]
        m, v = [torch.zeros_like(ps[0])], [torch.zeros_like(ps[0])]
        steps = [torch.zeros((), dtype=torch.int64, device=dev)]
        impl(ps, gs, m, v, [], steps, [], 1e-2, 0.9, 0.999, 1e-8, 0.1, False, False, None, None, None, None, None,
             None)
        results.append(ps[0].cpu())
    assert torch.equal(results[0], results[1])
    for backend, dev in (("triton", DEVICE), ("cpu", torch.device("cpu"))):
        param = torch.nn.Parameter(p.clone().to(dev))
        opt = fusedopt.FusedAdamW([param], lr=1e-2, weight_decay=0.1, backend=backend)
        param.grad = torch.empty_strided((2, 1, 3), (3, 1, 1), device=dev).copy_(g)
        opt.step()
        results.append(param.detach().cpu())
    assert torch.equal(results[2], results[3]) and torch.equal(results[2], results[0])


def test_a_step_tensor_listed_twice_counts_twice():
    """Issue 12 item 8: the C++ ops add 1 per entry of the steps list, and every update then reads the counter
    after all increments. A step tensor listed for two params goes from 0 to 2 and both updates use step 2, on
    Triton as on the CPU op (and the CUDA op, whose step kernel adds atomically per entry)."""
    out = []
    for impl, dev in ((ft.adamw_, DEVICE), (torch.ops.fusedopt.adamw_, torch.device("cpu"))):
        params = [p.to(dev) for p in _tensors([(5,), (3000,), (4,)], 8)]
        grads = [g.to(dev) for g in _tensors([(5,), (3000,), (4,)], 9)]
        shared, own = torch.zeros((), dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.int64, device=dev)
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        for _ in range(2):
            impl(params, grads, m, v, [], [shared, own, shared], [], 1e-2, 0.9, 0.999, 1e-8, 0.0, False, False,
                 None, None, None, None, None, None)
        out.append([t.cpu() for t in params + m + v + [shared, own]])
    assert int(out[1][-2]) == 4 and int(out[1][-1]) == 2  # the C++ op's rule
    for a, b in zip(*out):
        assert torch.equal(a, b)


def _mlp(dev):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dev)


@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_optimizer_step_in_the_capture_recipe(rule, monkeypatch):
    """Issue 12 items 1 and 2 through FusedX.step(), as torch's whole-network capture recipe runs it: warm-up
    iterations with zero_grad(set_to_none=True), then zero_grad(set_to_none=True) and the captured iteration,
    whose backward makes new grads; and the README's single eager step before capture (SGD's first step is
    then the only one launched eagerly). The captured step must not raise, and must equal the CPU backend."""
    capture = Capture(monkeypatch)
    make = {"adamw": lambda ps, b: fusedopt.FusedAdamW(ps, lr=1e-2, backend=b),
            "sgd": lambda ps, b: fusedopt.FusedSGD(ps, lr=1e-2, momentum=0.9, nesterov=True, backend=b),
            "lion": lambda ps, b: fusedopt.FusedLion(ps, lr=1e-3, weight_decay=0.1, backend=b)}[rule]
    for warmup in (3, 1):
        models = {b: _mlp(d) for b, d in (("triton", DEVICE), ("cpu", torch.device("cpu")))}
        opts = {b: make(m.parameters(), b) for b, m in models.items()}
        x, y = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)), torch.randn(4, 2)
        for t in range(warmup + 1):
            for b, model in models.items():
                opts[b].zero_grad(set_to_none=True)
                dev = next(model.parameters()).device
                loss = torch.nn.functional.mse_loss(model(x.to(dev) * (t + 1)), y.to(dev))
                loss.backward()
                if b == "triton" and t == warmup:
                    with capture:
                        opts[b].step()
                else:
                    opts[b].step()
        for a, b in zip(models["triton"].parameters(), models["cpu"].parameters()):
            assert torch.equal(a.detach().cpu(), b.detach()), f"{rule}, {warmup} warm-up steps"


@pytest.mark.parametrize("precision, dtype, sr", [("8bit", torch.bfloat16, True), ("bf16", torch.float32, False)])
def test_small_state_step_in_the_capture_recipe(precision, dtype, sr, monkeypatch):
    """Small states (8-bit: two launches per step, the 8-bit tensor's and the float32-state small tensor's; bf16
    states; stochastic rounding reading the rounding counter on the device): one eager step loads every kernel
    variant, then a captured step with new grads (zero_grad(set_to_none=True)) neither raises nor differs from
    the CPU backend, nor does the eager step after it; the rounding counter included."""
    capture = Capture(monkeypatch)
    monkeypatch.setattr(launcher, "INTERPRET_BLOCK", launcher.CHUNK)  # one block per row: the interpreter is slow
    base = _tensors([(4099,), (7, 5)], 2, dtype)
    sides = {}
    for backend, dev in (("triton", DEVICE), ("cpu", torch.device("cpu"))):
        torch.manual_seed(4)  # the rounding seed
        params = [p.clone().to(dev) for p in base]
        sides[backend] = (params, fusedopt.FusedAdamW(params, lr=1e-2, weight_decay=0.1, backend=backend,
                                                      state_precision=precision, stochastic_rounding=sr))
    for t in range(3):
        grads = _tensors([(4099,), (7, 5)], 10 + t, dtype)
        for backend, (params, opt) in sides.items():
            for p, g in zip(params, grads):
                p.grad = g.to(p.device)
            if backend == "triton" and t == 1:  # (a second capture would need an eager step in between)
                with capture:
                    opt.step()
            else:
                opt.step()
    (pa, oa), (pb, ob) = sides["triton"], sides["cpu"]
    for a, b in zip(pa, pb):
        assert torch.equal(a.detach().cpu(), b.detach())
        for key, value in oa.state[a].items():
            assert torch.equal(value.cpu(), ob.state[b][key]), key
    if sr:
        assert int(oa.param_groups[0]["rounding_step"]) == int(ob.param_groups[0]["rounding_step"]) == 3
