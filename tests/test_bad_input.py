"""Bad input is rejected with an exception that names the argument and the reason, before anything changes.

Every rejected call below is bracketed by a snapshot of the params (clones) and of the optimizer state
(``copy.deepcopy(opt.state_dict())``, which includes the param groups' hyperparameters), and the snapshot is
compared exactly afterwards (``torch.equal`` on every tensor, same dtype; plain values with ``==``, NaN equal
to NaN). The optimizers take two param groups and have taken one good step first, so there is state to
corrupt and an earlier group that a late check would already have updated: the bad value is always put in
the *last* param / group.
"""

import copy
import math

import pytest
import torch

import fusedopt
from fusedopt import BackendUnavailable, FusedAdam, FusedAdamW, FusedLion, FusedSGD, backends
from fusedopt import _ops
from fusedopt.schedules import ScheduleTable

NAN, INF = float("nan"), float("inf")

# name -> (class, good constructor kwargs)
OPTS = {
    "adamw": (FusedAdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam": (FusedAdam, dict(lr=1e-2, weight_decay=0.1)),
    "sgd": (FusedSGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.1)),
    "lion": (FusedLion, dict(lr=1e-3, weight_decay=0.1)),
}


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g).to(dtype)) for shape in ((4, 3), (3,), (2, 2))]


def make_opt(name, params=None, **overrides):
    cls, kwargs = OPTS[name]
    params = make_params() if params is None else params
    # two groups: the second has its own lr, so a late check would already have updated group 0
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": kwargs["lr"] * 2}]
    return cls(groups, **{**kwargs, **overrides})


def all_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def set_grads(opt, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in all_params(opt):
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def trained(name, params=None, **overrides):
    """An optimizer that has taken one good step (so it has state) and holds fresh good grads."""
    opt = make_opt(name, params, **overrides)
    set_grads(opt, seed=1)
    opt.step()
    set_grads(opt, seed=2)
    return opt


def snapshot(opt):
    return ([p.detach().clone() for p in all_params(opt)], copy.deepcopy(opt.state_dict()),
            opt.schedule_step)


def assert_same(a, b, path="state_dict"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor became {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, path
        if a.is_floating_point():  # torch.equal, except that NaN (a NaN tensor lr) equals NaN
            same = torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
        else:
            same = torch.equal(a, b)
        assert same, f"{path} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} -> {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} -> {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{path}: nan -> {b!r}"
    else:
        assert a == b and type(a) is type(b), f"{path}: {a!r} -> {b!r}"


def assert_unchanged(opt, snap):
    params, state, host_step = snap
    for i, (before, p) in enumerate(zip(params, all_params(opt))):
        assert p.dtype == before.dtype and torch.equal(p.detach(), before), f"param {i} changed"
    assert len(params) == len(all_params(opt))
    assert_same(state, opt.state_dict())
    assert opt.schedule_step == host_step


# --------------------------------------------------------------------------------------------------------
# hyperparameters: at construction, and edited in param_groups before a step
# --------------------------------------------------------------------------------------------------------
# (optimizer, key, bad value, regex naming the argument, regex giving the reason)
LR_CASES = [
    (name, "lr", value, "learning rate", reason)
    for name in OPTS
    for value, reason in ((-1e-3, ">= 0"), (NAN, "finite"), (INF, "finite"), (-INF, "finite"))
]
BETA_CASES = [
    (name, "betas", betas, f"beta parameter at index {i}", reason)
    for name in ("adamw", "lion")
    for betas, i, reason in (((1.0, 0.99), 0, "< 1"), ((0.9, 1.0), 1, "< 1"), ((0.9, 1.5), 1, "< 1"),
                             ((-0.1, 0.99), 0, ">= 0"), ((NAN, 0.99), 0, "finite"), ((0.9, INF), 1, "finite"))
]
OTHER_CASES = [
    ("adamw", "eps", -1e-8, "epsilon", ">= 0"),
    ("adamw", "eps", NAN, "epsilon", "finite"),
    ("adamw", "weight_decay", -0.1, "weight_decay", ">= 0"),
    ("adamw", "weight_decay", INF, "weight_decay", "finite"),
    ("sgd", "weight_decay", -0.1, "weight_decay", ">= 0"),
    ("sgd", "momentum", -0.5, "momentum", ">= 0"),
    ("sgd", "momentum", NAN, "momentum", "finite"),
    ("sgd", "dampening", NAN, "dampening", "finite"),
    ("lion", "weight_decay", -0.1, "weight_decay", ">= 0"),
    ("lion", "weight_decay", NAN, "weight_decay", "finite"),
]
HYPER_CASES = LR_CASES + BETA_CASES + OTHER_CASES


def _id(case):
    name, key, value, *_ = case
    return f"{name}-{key}={value}"


@pytest.mark.parametrize("case", HYPER_CASES, ids=_id)
def test_bad_hyperparameter_in_constructor(case):
    name, key, value, arg, reason = case
    with pytest.raises(ValueError, match=arg) as info:
        make_opt(name, **{key: value})
    assert reason in str(info.value), str(info.value)


def _oracle_of(name, opt):
    """torch.optim (single-tensor) / lion-pytorch with the same params (clones), groups and state as opt."""
    from lion_pytorch import Lion

    params = [p.detach().clone().requires_grad_() for p in all_params(opt)]
    groups = [{"params": params[:2]}, {"params": params[2:]}]
    if name == "lion":
        oracle = Lion(groups, lr=1e-3)
    else:
        torch_class = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]
        oracle = torch_class(groups, lr=1e-3, foreach=False)
    oracle.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(all_params(opt), params):
        q.grad = p.grad.clone()
    return oracle, params


@pytest.mark.parametrize("case", HYPER_CASES, ids=_id)
def test_value_written_later_is_taken_as_torch_takes_it(case):
    """torch validates hyperparameters at construction only: a value written into a param group later (by a
    scheduler, or by hand) is used by its step as it is (a negative lr ascends, a NaN gives NaNs). fusedopt's
    step takes it the same way (issue 11) and ends where the oracle ends (float32: rtol 1e-6 as in
    test_parity; NaN where the oracle has NaN)."""
    name, key, value, arg, _ = case
    opt = trained(name)
    oracle, oracle_params = _oracle_of(name, opt)
    for o in (opt, oracle):
        o.param_groups[-1][key] = value  # the last group: group 0 is fine and would be updated first
    try:
        oracle.step()
    except (ArithmeticError, RuntimeError):
        # torch's step itself fails (AdamW: beta1 == 1 divides by a zero bias correction, beta2 > 1 takes the
        # square root of a negative one): fusedopt refuses it too, saying why, before anything changes
        snap = snapshot(opt)
        with pytest.raises(ValueError, match=arg):
            opt.step()
        assert_unchanged(opt, snap)
        return
    opt.step()
    for i, (a, b) in enumerate(zip(all_params(opt), oracle_params)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6, equal_nan=True,
                                   msg=lambda m: f"param {i}: {m}")


@pytest.mark.parametrize("case", HYPER_CASES, ids=_id)
def test_bad_hyperparameter_in_added_group(case):
    name, key, value, arg, _ = case
    opt = trained(name)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=arg):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], key: value})
    assert_unchanged(opt, snap)
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("momentum,dampening", [(0.0, 0.0), (0.9, 0.1), (0.9, -0.1), (0.0, 0.5)])
def test_nesterov_needs_momentum_and_no_dampening(momentum, dampening):
    with pytest.raises(ValueError, match="Nesterov") as info:
        make_opt("sgd", nesterov=True, momentum=momentum, dampening=dampening)
    msg = str(info.value)
    assert "momentum" in msg and "dampening" in msg

    # at step time torch.optim.SGD checks nothing (a scheduler may write momentum 0): neither does fusedopt
    opt = trained("sgd", nesterov=True, momentum=0.9, dampening=0.0)
    oracle, oracle_params = _oracle_of("sgd", opt)
    for o in (opt, oracle):
        o.param_groups[-1]["momentum"] = momentum
        o.param_groups[-1]["dampening"] = dampening
        o.step()
    for a, b in zip(all_params(opt), oracle_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)


TYPE_CASES = [(name, key, value) for name in OPTS
              for key, value in [("lr", "0.1"), ("lr", None), ("lr", True), ("maximize", 1), ("amsgrad", None),
                                 ("nesterov", "yes"), ("betas", (0.9,)), ("betas", 0.9)]
              if key in OPTS[name][0](make_params()).defaults]


@pytest.mark.parametrize("name,key,value", TYPE_CASES, ids=[f"{n}-{k}={v!r}" for n, k, v in TYPE_CASES])
def test_wrong_types_are_named(name, key, value):
    opt = trained(name)
    opt.param_groups[-1][key] = value
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=rf"({key}|learning rate|beta)") as info:
        opt.step()
    assert "must be" in str(info.value)
    assert_unchanged(opt, snap)


def test_lion_decoupled_weight_decay_needs_nonzero_lr():
    with pytest.raises(ValueError, match="learning rate"):
        FusedLion(make_params(), lr=0.0, weight_decay=0.1, decoupled_weight_decay=True)


@pytest.mark.parametrize("name", OPTS)
def test_negative_tensor_lr_rejected(name):
    """A one-element tensor lr is allowed (read on the device), but at construction its value must be checked
    where reading it is free: torch.optim.AdamW(lr=torch.tensor(-1.)) raises 'Invalid learning rate'. Written
    later, torch's step takes it as it is (a NaN lr gives NaNs): so does fusedopt's (issue 11)."""
    with pytest.raises(ValueError, match="learning rate"):
        make_opt(name, lr=torch.tensor(-1e-3))
    opt = trained(name)
    oracle, oracle_params = _oracle_of(name, opt)
    for o in (opt, oracle):
        o.param_groups[-1]["lr"] = torch.tensor(NAN)
        o.step()
    for a, b in zip(all_params(opt), oracle_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6, equal_nan=True)
    assert all_params(opt)[-1].isnan().all() and not all_params(opt)[0].isnan().any()


@pytest.mark.parametrize("name", OPTS)
def test_tensor_lr_wrong_shape_or_dtype(name):
    for bad in (torch.tensor([1e-3, 1e-3]), torch.tensor(1, dtype=torch.int64)):
        # (FusedLion takes no tensor lr at construction: "learning rate must be a number")
        with pytest.raises(ValueError, match="learning rate must be a (number|float or a one-element floating tensor)"):
            make_opt(name, lr=bad)


# --------------------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPTS)
def test_complex_params(name):
    """Lion refuses complex params; AdamW / Adam / SGD take them as torch.optim does (test_torch_fidelity), but
    not with small states (state_precision keeps them as complex in their own dtype)."""
    extra = dict(state_precision="bf16") if OPTS[name][0].supports_complex else {}
    params = make_params() + [torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))]
    with pytest.raises(ValueError, match=r"params\[\d\]( of param group \d)? is complex"):
        make_opt(name, params=params, **extra)
    opt = trained(name, **extra)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.complex128, requires_grad=True)]})
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("name", OPTS)
def test_integer_params(name):
    with pytest.raises(ValueError, match="dtype torch.int64"):
        make_opt(name, params=make_params() + [torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("name", OPTS)
def test_params_of_one_group_on_two_devices(name):
    params = make_params() + [torch.zeros(3, device="meta", requires_grad=True)]
    with pytest.raises(ValueError, match=r"one device.*\['cpu', 'meta'\]"):
        make_opt(name, params=params)
    opt = trained(name)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True),
                                        torch.zeros(2, device="meta", requires_grad=True)]})
    assert_unchanged(opt, snap)
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("name", OPTS)
def test_params_on_a_device_without_backend(name):
    cls, kwargs = OPTS[name]
    with pytest.raises(BackendUnavailable, match="no backend for meta tensors"):
        cls([torch.zeros(3, device="meta", requires_grad=True)], **kwargs)


# --------------------------------------------------------------------------------------------------------
# grads: one bad grad among good ones leaves everything unchanged
# --------------------------------------------------------------------------------------------------------
def _sparse(p):
    return torch.zeros_like(p).to_sparse()


def _set_bad_grad(p, kind):
    if kind == "sparse":
        p.grad = _sparse(p.detach())  # torch's grad setter accepts a sparse grad of the right size
    elif kind == "dtype":
        # torch's setter refuses a grad of another dtype (test_torch_refuses_mismatched_grads); .data swaps
        # the grad's storage behind its back, the way buggy user code or a hand-rolled AMP can
        p.grad = torch.zeros_like(p)
        p.grad.data = torch.ones(p.shape, dtype=torch.float64)
    elif kind == "shape":
        p.grad = torch.zeros_like(p)
        p.grad.data = torch.ones(p.numel() + 1, dtype=p.dtype)
    else:
        raise AssertionError(kind)


BAD_GRAD_MATCH = {
    "sparse": r"does not support sparse gradients \(param 0 of param group 1",
    "dtype": r"param 0 of param group 1: grad dtype torch.float64 differs from param dtype torch.(float32|bfloat16)",
    "shape": r"param 0 of param group 1: grad shape \(5,\) differs from param shape \(2, 2\)",
}


@pytest.mark.parametrize("extras", ["plain", "schedule_clip_master"])
@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("kind", ["sparse", "dtype", "shape"])
def test_one_bad_grad_changes_nothing(name, kind, extras):
    # with a table, clipping and bf16 params with float32 master weights there is more to leave alone: the
    # device schedule counters, the host step mirror (in assert_unchanged), the master copies
    if extras == "plain":
        opt = trained(name)
    else:
        opt = trained(name, make_params(dtype=torch.bfloat16), schedule=ScheduleTable([1.0, 0.5, 0.25]),
                      max_grad_norm=1.0, master_weights=True)
        assert "master_param" in opt.state[all_params(opt)[-1]]
    _set_bad_grad(all_params(opt)[-1], kind)  # the only param of the last group; group 0's grads are fine
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=BAD_GRAD_MATCH[kind]):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("name", OPTS)
def test_bad_grad_in_fresh_optimizer_creates_no_state(name):
    opt = make_opt(name)
    set_grads(opt)
    _set_bad_grad(all_params(opt)[1], "sparse")  # group 0, second param: params[0] is fine
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, snap)
    assert len(opt.state) == 0


def test_torch_refuses_mismatched_grads():
    """Without `.data`, torch itself refuses grads of another shape, dtype or device: its errors suffice
    there. (A grad on another device can only be smuggled in with .data between real devices, e.g.
    cpu/cuda; see test_grad_on_other_device.)"""
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="size"):
        p.grad = torch.zeros(4)
    with pytest.raises(RuntimeError, match="dtype"):
        p.grad = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="device"):
        p.grad = torch.zeros(3, device="meta")


@pytest.mark.gpu  # needs a second real device (CUDA)
@pytest.mark.parametrize("name", OPTS)
def test_grad_on_other_device(name):
    opt = trained(name)
    p = all_params(opt)[-1]
    p.grad.data = torch.zeros(p.shape, device="cuda")
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match="grad is on cuda"):
        opt.step()
    assert_unchanged(opt, snap)


# --------------------------------------------------------------------------------------------------------
# AMP control tensors (GradScaler hands them over as attributes)
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("attr,value", [
    pytest.param("grad_scale", torch.tensor(2), id="grad_scale-int64_tensor"),
    pytest.param("grad_scale", torch.tensor([2.0, 2.0]), id="grad_scale-two_elements"),
    pytest.param("grad_scale", 2.0, id="grad_scale-python_float"),
    pytest.param("found_inf", torch.tensor(0), id="found_inf-int64_tensor"),
    pytest.param("found_inf", torch.tensor([0.0, 0.0]), id="found_inf-two_elements"),
])
def test_bad_amp_tensors(name, attr, value):
    opt = trained(name)
    setattr(opt, attr, value)
    snap = snapshot(opt)
    with pytest.raises(TypeError, match=f"{attr} set by GradScaler must be a one-element floating-point tensor"):
        opt.step()
    assert_unchanged(opt, snap)


# --------------------------------------------------------------------------------------------------------
# clipping arguments
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("value,reason", [(0.0, "> 0"), (-1.0, "> 0"), (NAN, "finite"), (INF, "finite"),
                                          ("1.0", "number")])
def test_bad_max_grad_norm(name, value, reason):
    with pytest.raises(ValueError, match="max_grad_norm") as info:
        make_opt(name, max_grad_norm=value)
    assert reason in str(info.value)


@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("value", [0, -2.0, NAN, -INF, "fro", "inf", True, None])
def test_bad_norm_type(name, value):
    with pytest.raises(ValueError, match="Invalid norm_type.*positive number or math.inf"):
        make_opt(name, max_grad_norm=1.0, norm_type=value)


@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("value", [1, 2.0, 0.5, INF])
def test_good_norm_types_accepted(name, value):
    opt = make_opt(name, max_grad_norm=1.0, norm_type=value)
    set_grads(opt)
    opt.step()
    assert torch.isfinite(opt.last_grad_norm)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_master_weights_must_be_bool(value):
    with pytest.raises(ValueError, match="master_weights must be a bool"):
        make_opt("adamw", master_weights=value)


# --------------------------------------------------------------------------------------------------------
# schedule tables
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values,match", [
    pytest.param([], "lr factor table is empty", id="empty_list"),
    pytest.param(torch.zeros(0), "lr factor table is empty", id="empty_tensor"),
    pytest.param([1.0, NAN], "lr factor entry 1 is nan; every entry must be finite", id="nan"),
    pytest.param([1.0, 0.5, INF], "lr factor entry 2 is inf; every entry must be finite", id="inf"),
    pytest.param([-INF], "lr factor entry 0 is -inf; every entry must be finite", id="minus_inf"),
    pytest.param([1.0, -0.5], "lr factor entry 1 is -0.5; entries must be >= 0", id="negative"),
])
def test_bad_lr_table(values, match):
    with pytest.raises(ValueError, match=match):
        ScheduleTable(values, name="t")


@pytest.mark.parametrize("momentum,match", [
    pytest.param([0.9, NAN], "momentum entry 1 is nan", id="nan"),
    pytest.param([-0.1, 0.9], "momentum entry 0 is -0.1; entries must be >= 0", id="negative"),
    pytest.param([0.9], "momentum table has 1 entries but the lr table has 2", id="length_mismatch"),
    pytest.param([], "momentum table is empty", id="empty"),
])
def test_bad_momentum_table(momentum, match):
    with pytest.raises(ValueError, match=match):
        ScheduleTable([1.0, 0.5], momentum=momentum, name="t")


@pytest.mark.parametrize("name", OPTS)
def test_schedule_must_be_a_table(name):
    with pytest.raises(TypeError, match="schedule must be a fusedopt.schedules.ScheduleTable"):
        make_opt(name, schedule=[1.0, 0.5])
    with pytest.raises(TypeError, match="from_lr_scheduler"):
        make_opt(name, schedule=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0))


@pytest.mark.parametrize("name", OPTS)
def test_table_whose_product_with_lr_overflows(name):
    """Every factor is finite and every lr is finite, but factor * lr is inf. BUG: the resolved per-group
    tables are not checked, so the kernel runs with lr = inf and every param becomes NaN; the group-lr check
    ('Invalid learning rate: inf') is bypassed."""
    # the tables are resolved at construction (param_groups show their values from the start): rejected there
    with pytest.raises(ValueError, match="(learning rate|lr)") as info:
        make_opt(name, lr=1e10, schedule=ScheduleTable([1.0, 1e300]))
    assert "inf" in str(info.value)
    # and when the base lr is raised later, at the step that re-resolves the tables, before anything changes
    opt = trained(name, schedule=ScheduleTable([1.0, 1e300]))
    opt.param_groups[-1]["initial_lr"] = 1e10
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="(learning rate|lr)"):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("name", OPTS)
def test_table_mutated_after_construction(name):
    """ScheduleTable checks its values once, but lr_factors is a plain mutable tensor. BUG: a NaN written
    into it later reaches the kernel (params become NaN) instead of being rejected when the tables are
    resolved (which happens on the first step: the check would cost nothing per step)."""
    table = ScheduleTable([1.0, 0.5, 0.25])
    table.lr_factors[1] = NAN
    with pytest.raises(ValueError, match="(nan|finite)"):
        make_opt(name, schedule=table)  # resolved at construction


# --------------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("backend", ["bogus", "CPU", "", None, "gpu"])
def test_unknown_backend(name, backend):
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'cpu', 'cuda', 'triton'"):
        make_opt(name, backend=backend)


NOT_BUILT = "ModuleNotFoundError: No module named 'fusedopt._cuda'"
BROKEN = "ImportError: fusedopt/_cuda.abi3.so: undefined symbol: _ZN3c104cuda20getCurrentCUDAStreamEa"


def _simulate_cuda_extension(monkeypatch, error):
    """As on an install where fusedopt._cuda failed to import with `error` (whatever was built here)."""
    monkeypatch.setattr(_ops, "HAS_CUDA_EXTENSION", False)
    monkeypatch.setitem(_ops.LOAD_ERRORS, "fusedopt._cuda", error)


@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("error", [NOT_BUILT, BROKEN], ids=["not_built", "broken_build"])
def test_cuda_backend_unavailable(name, error, monkeypatch):
    _simulate_cuda_extension(monkeypatch, error)
    with pytest.raises(BackendUnavailable, match="backend='cuda' is not available") as info:
        make_opt(name, backend="cuda")
    msg = str(info.value)
    assert "pip install" in msg or "CUDA toolkit" in msg, msg  # says how to get it
    if error == BROKEN:
        assert "undefined symbol" in msg  # and why the build that exists does not load


def test_cuda_backend_not_built_says_why(monkeypatch):
    """When fusedopt._cuda simply does not exist (built with FUSEDOPT_SKIP_CUDA=1, or without a CUDA
    toolkit), backends._status has a message for exactly that ("fusedopt was built without CUDA kernels
    ...; install a CUDA toolkit and reinstall"). BUG: it is unreachable, because _ops records every failed
    import in LOAD_ERRORS, including the ModuleNotFoundError of a module that was never built; users get
    "fusedopt._cuda did not load (ModuleNotFoundError: ...); reinstall fusedopt from source", which a
    rebuild on the same machine does not fix."""
    _simulate_cuda_extension(monkeypatch, NOT_BUILT)
    with pytest.raises(BackendUnavailable, match="CUDA toolkit"):
        make_opt("adamw", backend="cuda")


@pytest.mark.parametrize("name", OPTS)
def test_cuda_backend_with_cpu_tensors(name, monkeypatch):
    monkeypatch.setattr(_ops, "HAS_CUDA_EXTENSION", True)  # (as if) built: the device check must still refuse
    with pytest.raises(BackendUnavailable, match="backend='cuda' runs on CUDA tensors, but the params are on cpu"):
        make_opt(name, backend="cuda")


@pytest.mark.parametrize("name", OPTS)
def test_cpu_backend_with_meta_tensors(name):
    cls, kwargs = OPTS[name]
    with pytest.raises(BackendUnavailable, match="backend='cpu' runs on CPU tensors, but the params are on meta"):
        cls([torch.zeros(2, device="meta", requires_grad=True)], backend="cpu", **kwargs)


@pytest.mark.parametrize("name", OPTS)
def test_triton_backend_on_cpu_tensors(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # Whether or not fusedopt.triton imports here, the message must say how to get a working backend.
    with pytest.raises(BackendUnavailable, match="backend='triton'") as info:
        make_opt(name, backend="triton")
    msg = str(info.value)
    assert "TRITON_INTERPRET=1" in msg or "pip install triton" in msg, msg
    # With Triton available, CPU tensors still need the interpreter: the message names it and the alternative.
    monkeypatch.setattr(backends, "_triton_status", lambda: (True, ""))
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1") as info:
        make_opt(name, backend="triton")
    assert "backend='cpu'" in str(info.value)


@pytest.mark.parametrize("name", OPTS)
def test_backend_error_raised_at_add_param_group(name, monkeypatch):
    opt = trained(name, backend="cpu")
    snap = snapshot(opt)
    with pytest.raises(BackendUnavailable, match="params are on meta"):
        opt.add_param_group({"params": [torch.zeros(2, device="meta", requires_grad=True)]})
    assert_unchanged(opt, snap)
    assert len(opt.param_groups) == 2


# --------------------------------------------------------------------------------------------------------
# state_dicts that do not belong here
# --------------------------------------------------------------------------------------------------------
def _torch_sgd_state(params, steps=1):
    sgd = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, momentum=0.9)
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        sgd.step()
    return sgd.state_dict()


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_load_torch_sgd_state(name):
    opt = trained(name)
    params = make_params(seed=5)
    sd = _torch_sgd_state(params)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"not from a Fused\w+-compatible optimizer.*(momentum_buffer|betas)"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_load_torch_sgd_state_without_per_param_state(name):
    """A torch.optim.SGD that never stepped has no per-param state, only param groups (lr, momentum,
    dampening, nesterov, ...). BUG: the key check only looks at per-param state, so this loads, replaces the
    groups with SGD's (no 'betas', no 'eps') and the next step dies with KeyError: 'betas'. Fix: in
    _check_state_dict, reject saved groups that lack any of self.defaults' keys (and run _check_group on
    them)."""
    opt = trained(name)
    params = make_params(seed=5)
    sd = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1).state_dict()
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="(betas|SGD|compatible|param group)"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)
    opt.step()  # still usable


def test_load_lion_state_into_adamw():
    """lion-pytorch state has only 'exp_avg', which is also an AdamW key, so the key check lets it through.
    BUG (same root cause as above): the groups lack 'eps' / 'amsgrad' / 'maximize' and the optimizer is
    broken after the load; nor is the per-param state complete ('step', 'exp_avg_sq' missing)."""
    from lion_pytorch import Lion

    opt = trained("adamw")
    params = make_params(seed=5)
    lion = Lion([{"params": params[:2]}, {"params": params[2:]}], lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    lion.step()
    snap = snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(lion.state_dict())
    assert_unchanged(opt, snap)


def test_load_adamw_state_into_lion():
    opt = trained("lion")
    other = trained("adamw")
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"not from a FusedLion-compatible optimizer.*exp_avg_sq"):
        opt.load_state_dict(other.state_dict())
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("name", OPTS)
def test_load_state_with_mismatched_shapes(name):
    opt = trained(name)
    cls, kwargs = OPTS[name]
    other_params = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(3)),
                    torch.nn.Parameter(torch.zeros(4))]  # last param: (4,) instead of (2, 2)
    other = cls([{"params": other_params[:2]}, {"params": other_params[2:], "lr": kwargs["lr"] * 2}], **kwargs)
    for p in other_params:
        p.grad = torch.ones_like(p)
    other.step()
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"does not fit the params: state '\w+' of param 2 has shape \(4,\), "
                                         r"the param has \(2, 2\)"):
        opt.load_state_dict(other.state_dict())
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("name", OPTS)
def test_load_state_with_other_group_structure(name):
    opt = trained(name)
    cls, kwargs = OPTS[name]
    sd = cls(make_params(seed=3), **kwargs).state_dict()  # one group of 3 params instead of 2 groups
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="1 parameter groups, this optimizer has 2"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)
    params = make_params(seed=3)
    sd = cls([{"params": params[:1]}, {"params": params[1:]}], **kwargs).state_dict()  # 1 + 2 instead of 2 + 1
    with pytest.raises(ValueError, match="doesn't match the size"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("name", OPTS)
def test_load_not_a_state_dict(name):
    opt = trained(name)
    snap = snapshot(opt)
    for bad in ({}, {"state": {}}, [1, 2], None):
        with pytest.raises(ValueError, match="state_dict must be a dict with 'state' and 'param_groups'"):
            opt.load_state_dict(bad)
    assert_unchanged(opt, snap)


def test_fusedopt_exports():
    assert fusedopt.BackendUnavailable is BackendUnavailable
    assert issubclass(BackendUnavailable, RuntimeError)
