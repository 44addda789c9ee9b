"""torch's own optimizer test configurations, run against fusedopt's classes.

PyTorch describes each optimizer once, in ``torch.testing._internal.common_optimizers.optim_db``: the
constructor kwargs its suite runs (``optim_inputs_func``: default, tensor lr, weight decay, maximize, amsgrad,
momentum, dampening, Nesterov; and, meant for GPUs, ``capturable`` with tensor lr and tensor betas), the LR
schedulers it attaches (``scheduler_inputs``), and the inputs that must fail, with the exception type and
message (``optim_error_inputs_func``). Here every one of them is given to the fusedopt class that replaces the
torch.optim class, on CPU, in float32 and float64:

* each config, with each of the optimizer's scheduler lists attached (schedule=None: the plain swap-in), runs
  20 steps beside torch.optim's single-tensor path (foreach=False) from the same params and grads, and must end
  where it ends. Tolerances: float64 rtol 1e-12 (both compute in double; they differ by the order of operations
  and fused multiply-adds, ~1e-16 per operation); float32 rtol 1e-6 (a few float32 ulps: torch's vectorized
  kernels fuse multiply-adds, see test_parity's notes), atol of the same size for elements near zero. Where a
  config passes float32 tensors as hyperparameters (tensor lr / betas) to float64 params, torch's AdamW does
  its scalar math (1 - beta1**t, lr / bias correction) in float32 tensor arithmetic while fusedopt's is float64:
  there the float32 tolerance applies. The GPU-only configs (``capturable=True``) run on CPU too: torch's capturable path refuses CPU tensors, so the
  oracle runs without the flag, which does not change its math;
* each error input must raise torch's exception type with a message matching torch's regex (or warn, for
  the duplicate-param warning).

To cover another class, add one line to OURS (torch.optim class name -> fusedopt class).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fusedopt

_flags_were_free = not torch.backends.flags_frozen()
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db  # noqa: E402

if _flags_were_free:  # importing torch's test utilities freezes torch.backends flags for the whole session
    setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)

# torch.optim class name -> the fusedopt class that replaces it
OURS = {
    "Adam": fusedopt.FusedAdam,
    "AdamW": fusedopt.FusedAdamW,
    "SGD": fusedopt.FusedSGD,
}
INFOS = {info.name: info for info in optim_db if info.name in OURS}
assert set(INFOS) == set(OURS), f"not in torch's optim_db: {set(OURS) - set(INFOS)}"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}
SHAPES = [(4, 3), (3,), (2, 2, 2), ()]
N_STEPS = 20


def _configs(info, dtype):
    """optim_inputs_func's CPU configs, then its GPU-only ones (by description), for this dtype."""
    configs = list(info.optim_inputs_func("cpu", dtype))
    seen = {c.desc for c in configs}
    configs += [c for c in info.optim_inputs_func("cuda", dtype) if c.desc not in seen]
    return configs


CASES = [(name, dtype_name, i, len(info.scheduler_inputs))
         for name, info in INFOS.items() for dtype_name in DTYPES
         for i in range(len(_configs(info, DTYPES[dtype_name])))]


def _float32_tensors(kwargs) -> bool:
    values = [v for v in kwargs.values()] + [b for b in kwargs.get("betas", ())]
    return any(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in values)


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def _run(name, dtype, config, schedulers):
    """Both optimizers side by side, N_STEPS steps with the same grads; returns what to compare."""
    torch_cls = INFOS[name].optim_cls
    ours_kwargs = copy.deepcopy(config.kwargs)
    oracle_kwargs = {k: v for k, v in copy.deepcopy(config.kwargs).items() if k != "capturable"}
    ours_params, oracle_params = _params(dtype), _params(dtype)
    ours = OURS[name](ours_params, **ours_kwargs)
    oracle = torch_cls(oracle_params, foreach=False, **oracle_kwargs)
    ours_scheds = [make(ours) for make in schedulers]
    oracle_scheds = [make(oracle) for make in schedulers]
    g = torch.Generator().manual_seed(1)
    for t in range(N_STEPS):
        for p, q in zip(ours_params, oracle_params):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        oracle.step()
        metric = float(sum((q.detach().double() ** 2).sum() for q in oracle_params))  # one value for both
        for a, b in zip(ours_scheds, oracle_scheds):
            if isinstance(b, torch.optim.lr_scheduler.ReduceLROnPlateau):
                a.step(metric)
                b.step(metric)
            else:
                a.step()
                b.step()
        for ga, gb in zip(ours.param_groups, oracle.param_groups):
            assert float(ga["lr"]) == float(gb["lr"]), f"step {t}: the schedulers wrote different lrs"
    return ours, ours_params, oracle, oracle_params


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's own warnings about these configs (e.g. step order)
@pytest.mark.parametrize("name,dtype_name,index,n_sched", CASES,
                         ids=[f"{n}-{d}-{i}" for n, d, i, _ in CASES])
def test_optim_inputs_match_torch(name, dtype_name, index, n_sched):
    dtype = DTYPES[dtype_name]
    info = INFOS[name]
    config = _configs(info, dtype)[index]
    for schedulers in [[]] + [list(s) for s in info.scheduler_inputs]:
        ours, ours_params, oracle, oracle_params = _run(name, dtype, config, schedulers)
        what = f"{name}({config.desc}: {config.kwargs}), schedulers {len(schedulers)}"
        tol = TOL[torch.float32 if _float32_tensors(config.kwargs) else dtype]
        for i, (a, b) in enumerate(zip(ours_params, oracle_params)):
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a.detach(), b.detach(), **tol, msg=lambda m: f"{what}, param {i}: {m}")
            for key, value in oracle.state[b].items():
                if key == "step":
                    assert int(ours.state[a][key]) == int(value) == N_STEPS
                elif isinstance(value, torch.Tensor):
                    torch.testing.assert_close(ours.state[a][key], value, **tol,
                                               msg=lambda m: f"{what}, param {i}, state {key}: {m}")
        # the params moved (a frozen pair would agree trivially)
        assert any(not torch.equal(a.detach(), b) for a, b in zip(ours_params, _params(dtype)))
        # the flags torch records are recorded here too, with the values given
        for flag in ("foreach", "fused", "differentiable", "capturable"):
            if flag in oracle.param_groups[0] and flag != "capturable":
                assert flag in ours.param_groups[0]
        if "capturable" in config.kwargs:
            assert ours.param_groups[0]["capturable"] == config.kwargs["capturable"]


ERROR_CASES = [(name, dtype_name, i) for name, info in INFOS.items() for dtype_name in DTYPES
               for i in range(len(info.optim_error_inputs_func("cpu", DTYPES[dtype_name])))]


@pytest.mark.parametrize("name,dtype_name,index", ERROR_CASES, ids=[f"{n}-{d}-{i}" for n, d, i in ERROR_CASES])
def test_optim_error_inputs_match_torch(name, dtype_name, index):
    error = INFOS[name].optim_error_inputs_func("cpu", DTYPES[dtype_name])[index]
    given = error.optimizer_error_input
    cls = OURS[name]
    if error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        def call():
            cls(given.params, **given.kwargs)
    else:
        opt = cls(given.params, **given.kwargs)

        def call():
            opt.step()
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            call()
    else:
        with pytest.raises(error.error_type, match=error.error_regex):
            call()
