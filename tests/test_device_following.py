"""The host side of the GPU step (issue 12, items 3 and 4), on CPU.

3. A CPU-tensor lr (the usual torch.compile idiom) must not become a synchronous copy from pageable memory every
   step (illegal inside CUDA-graph capture too), and tables are uploaded once per resolution, not per step.
4. What the optimizer creates (schedule counters, tables, states, master copies) follows the params to their
   device and dtype, the way torch.optim's state does: an optimizer built before ``model.cuda()`` works.

Without a GPU, the `meta` device stands in for "a device that is not the CPU": a backend that records its op
calls (instead of running kernels, which meta tensors cannot) is registered for meta tensors, so everything
else -- the optimizer's own code that decides what to copy and where -- runs as it does for CUDA. Modules
move between CPU and meta with torch's swap mode (``torch.__future__.set_swap_module_params_on_conversion``),
which keeps the Parameter objects, as ``.cuda()`` keeps them (a CPU -> meta ``param.data = ...`` is refused). Copies are
observed with a TorchDispatchMode that sees every aten op (no mock of the copying code). The GPU tests of the
same behaviour (set_sync_debug_mode, capture) live with the GPU suite. Numbers come from a run whose optimizer
was built where the params already were (bit for bit: the same kernels on the same inputs).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedopt import FusedAdamW, FusedLion, FusedSGD, backends, schedules


class _Recorder:
    """A backend for meta tensors: records each op call's tensor arguments."""

    def __init__(self):
        self.calls = []

    def backend(self):
        def op(name):
            def call(*args, **kwargs):
                self.calls.append((name, args + tuple(kwargs.values())))
            return call
        return backends.Backend("recording", op("adamw_"), op("sgd_"), op("lion_"))


@pytest.fixture
def meta_backend(monkeypatch):
    recorder = _Recorder()
    real = backends.resolve

    def resolve(name, device):
        return recorder.backend() if torch.device(device).type == "meta" else real(name, device)

    monkeypatch.setattr(backends, "resolve", resolve)
    return recorder


class _CrossDeviceCopies(TorchDispatchMode):
    """Counts the aten ops that copy a CPU tensor's data to another device."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_", "to", "_copy_from", "_copy_from_and_resize"):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            outs = out if isinstance(out, (tuple, list)) else [out]
            src_cpu = any(t.device.type == "cpu" for t in tensors)
            dst_other = any(isinstance(o, torch.Tensor) and o.device.type != "cpu" for o in outs)
            if src_cpu and dst_other:
                self.copies.append(name)
        return out


@pytest.fixture
def swap_mode():
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


def _move(params, device=None, dtype=None):
    """What Module.to / .cuda() / .double() do: the Parameter objects stay, their data is replaced."""
    for p in params:
        p.grad = None
        p.data = p.data.to(device=device or p.device, dtype=dtype or p.dtype)


def _grads(params, t, device=None):
    g = torch.Generator().manual_seed(50 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device=device or p.device, dtype=p.dtype)


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((6, 5), (5,), (3, 2))]


# ----------------------------------------------------------------------------------------------------------
# 4. the optimizer's tensors follow the params
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw", [(FusedAdamW, dict(amsgrad=True)), (FusedSGD, dict(momentum=0.9)), (FusedLion, {})])
def test_everything_follows_params_moved_after_steps(cls, kw, meta_backend, swap_mode):
    """Two steps on CPU, then model.to(device): the next op call gets the counter, the tables, the states and
    the master copies on the params' new device."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    params = list(model.parameters())
    opt = cls(params, lr=1e-3, **kw, schedule=schedules.one_cycle(10), master_weights=True)
    for t in range(2):
        _grads(params, t)
        opt.step()
    model.to("meta")
    assert [id(p) for p in model.parameters()] == [id(p) for p in params] and params[0].device.type == "meta"
    _grads(params, 2)
    opt.step()
    (name, args), = meta_backend.calls
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
    assert tensors and all(t.device.type == "meta" for t in tensors), [str(t.device) for t in tensors]
    assert opt.param_groups[0]["schedule_step"].device.type == "meta"
    for p in params:
        for key, value in opt.state[p].items():
            assert value.device.type == "meta", key
            if key == "master_param":
                assert value.dtype == torch.float32


@pytest.mark.parametrize("cls,kw", [(FusedAdamW, {}), (FusedSGD, dict(momentum=0.9, nesterov=True))])
def test_optimizer_built_before_the_params_are_materialized(cls, kw, meta_backend, swap_mode):
    """Built on meta params (deferred init), materialized on the CPU with to_empty + init, then trained: bit for
    bit the run of an optimizer built after materialization (schedule counter included)."""
    with torch.device("meta"):
        model = torch.nn.Linear(5, 3)
    early = cls(model.parameters(), lr=1e-2, **kw, schedule=schedules.warmup_cosine(12, 3))
    assert early.param_groups[0]["schedule_step"].device.type == "meta"
    params = list(model.parameters())
    model.to_empty(device="cpu")
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    reference = torch.nn.Linear(5, 3)
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            p.copy_(q)
    late = cls(reference.parameters(), lr=1e-2, **kw, schedule=schedules.warmup_cosine(12, 3))
    for t in range(8):
        _grads(list(model.parameters()), t)
        _grads(list(reference.parameters()), t)
        early.step()
        late.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert early.param_groups[0]["schedule_step"].device.type == "cpu"
    assert int(early.param_groups[0]["schedule_step"]) == int(late.param_groups[0]["schedule_step"]) == 8
    assert early.get_last_lr() == late.get_last_lr()


@pytest.mark.parametrize("cls", [FusedAdamW, FusedSGD])
def test_a_dtype_change_after_steps_is_what_a_checkpoint_reload_gives(cls):
    """model.double() after 3 float32 steps: the states follow the params' dtype, exactly as a reload of the
    float32 run's checkpoint into an optimizer on the float64 params casts them (torch.optim's load rule)."""
    kw = dict(momentum=0.9) if cls is FusedSGD else {}
    a, b = _params(), _params()
    opt_a = cls(a, lr=1e-2, **kw)
    opt_b = cls(b, lr=1e-2, **kw)
    for t in range(3):
        _grads(a, t)
        _grads(b, t)
        opt_a.step()
        opt_b.step()
    _move(a, dtype=torch.float64)
    checkpoint = opt_b.state_dict()
    _move(b, dtype=torch.float64)
    reloaded = cls(b, lr=1e-2, **kw)
    reloaded.load_state_dict(checkpoint)
    for t in range(3, 6):
        _grads(a, t)
        _grads(b, t)
        opt_a.step()
        reloaded.step()
    for p, q in zip(a, b):
        assert p.dtype == torch.float64 and torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            assert value.dtype == reloaded.state[q][key].dtype and torch.equal(value, reloaded.state[q][key]), key


# ----------------------------------------------------------------------------------------------------------
# 3. no per-step copies from host memory
# ----------------------------------------------------------------------------------------------------------
def test_a_cpu_tensor_lr_is_not_copied_to_the_device_every_step(meta_backend):
    """A CPU tensor lr with params elsewhere: read on the host (free) and sent as a fill value when it
    changed, never copied from (pageable) host memory; the kernels get a one-entry table on the params'
    device holding the current value."""
    params = [p.detach().to("meta").requires_grad_() for p in _params()]
    lr = torch.tensor(1e-3)
    opt = FusedSGD(params, lr=lr, momentum=0.9)
    counted = []
    for t in range(6):
        if t in (2, 4):
            lr.mul_(0.5)  # a scheduler writing the tensor in place
        _grads(params, t)
        with _CrossDeviceCopies() as mode:
            opt.step()
        counted.append(mode.copies)
    assert counted == [[]] * 6, counted
    lr_tables = [args[11] for _, args in meta_backend.calls]  # sgd_'s lr_table
    assert all(t.device.type == "meta" and t.shape == (1,) for t in lr_tables)
    values = [v for v, _ in [opt._host["one_entry"][(0, "lr", torch.device("meta"))]]]
    assert values == [pytest.approx(1e-3 / 4)]


def test_tables_are_uploaded_once_per_resolution(meta_backend):
    params = [p.detach().to("meta").requires_grad_() for p in _params()]
    opt = FusedAdamW(params, lr=1e-3, schedule=schedules.one_cycle(20))
    per_step = []
    for t in range(6):
        if t == 4:
            opt.param_groups[0]["initial_lr"] = 2e-3  # a new base: the tables are resolved and uploaded again
        _grads(params, t)
        with _CrossDeviceCopies() as mode:
            opt.step()
        per_step.append(len(mode.copies))
    assert per_step == [2, 0, 0, 0, 2, 0], per_step  # the lr and beta1 columns
