"""The custom ops under torch.library.opcheck, and the optimizers inside torch.compile.

opcheck runs its default test_utils on every case: test_schema (the op mutates exactly the arguments its
schema marks ``(x!)``), test_autograd_registration, test_faketensor (the fake impls in fusedopt/_ops.py) and
test_aot_dispatch_dynamic (AOTAutograd / functionalization: the mutating op becomes auto_functionalized,
with dynamic shapes). All four apply to these ops, so none is left out.

The tensors do not require grad: the optimizers call the ops under torch.no_grad() (a mutating op on
leaves that require grad is an autograd error in eager torch, whatever the op), so that is the realistic
input, and test_autograd_registration then checks that no autograd kernel is needed.

torch.compile uses backend="aot_eager": it runs everything that concerns the ops' registration (Dynamo
capture with the fake impls, AOTAutograd functionalization of the in-place op and the copy back into the
mutated inputs) and then executes the very same ATen / fusedopt kernels as eager mode, so the compiled run
must equal the eager run bit for bit (torch.equal). Inductor would add a C++ codegen + compile of the
surrounding graph (tens of seconds on a 2-core machine) without touching the custom op, which stays an
opaque extern call, and its fusions may re-round the model's own arithmetic, so its results could only be
compared with a tolerance.
"""

import functools

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch.library import opcheck

import fusedopt  # noqa: F401  (registers the ops and their fake impls)
from fusedopt import FusedAdamW, FusedLion, FusedSGD, schedules

SHAPES = [(4, 3), (5,), (2, 3, 2), (1,)]
F64 = torch.float64


def _t(shape, dtype=torch.float32, positive=False, seed=0):
    g = torch.Generator().manual_seed(seed + hash(shape) % 1000)
    t = torch.randn(*shape, generator=g)
    return (t.abs() if positive else t).to(dtype)


def tensors(dtype=torch.float32, positive=False, seed=0):
    return [_t(s, dtype, positive, seed) for s in SHAPES]


def controls(table=False, momentum_table=False, grad_scale=False, found_inf=None, clip=False, step=3,
             tensor_lr=False, wd_table=None):
    """lr_table, momentum/beta1 table, schedule_step, grad_scale, found_inf, clip_coef, weight_decay_table.
    tensor_lr: a one-entry lr table and no schedule_step, as step() passes a tensor lr. wd_table: "stepped" (8
    entries, read at the schedule step) or "one_entry" (a tensor weight decay, no schedule_step needed)."""
    lr_table = torch.linspace(1e-2, 1e-3, 8, dtype=F64) if table else None
    if tensor_lr:
        lr_table = torch.tensor([2e-3], dtype=F64)
    mom_table = torch.linspace(0.95, 0.85, 8, dtype=F64) if momentum_table else None
    weight_decay_table = {None: None, "stepped": torch.linspace(0.0, 0.2, 8, dtype=F64),
                          "one_entry": torch.tensor([0.05], dtype=F64)}[wd_table]
    stepped = table or momentum_table or wd_table == "stepped"
    schedule_step = torch.tensor(step, dtype=torch.int64) if stepped else None
    return (lr_table, mom_table, schedule_step,
            torch.tensor(1024.0) if grad_scale else None,
            None if found_inf is None else torch.tensor(float(found_inf)),
            torch.tensor(0.25) if clip else None, weight_decay_table)


# --------------------------------------------------------------------------------------------------------
# adamw_
# --------------------------------------------------------------------------------------------------------
def adamw_args(dtype=torch.float32, master=False, amsgrad=False, maximize=False, decoupled=True, **ctl):
    state_dtype = torch.float32 if master else dtype
    params = tensors(dtype, seed=1)
    return (
        params, tensors(dtype, seed=2), tensors(state_dtype, seed=3), tensors(state_dtype, positive=True, seed=4),
        tensors(state_dtype, positive=True, seed=5) if amsgrad else [],
        [torch.tensor(k + 1, dtype=torch.int64) for k in range(len(SHAPES))],  # per-param step counts
        [p.float() for p in params] if master else [],
        1e-3, 0.9, 0.999, 1e-8, 0.01, amsgrad, maximize, *controls(**ctl), decoupled,
    )


ADAMW_CASES = {
    "plain": dict(),
    "amsgrad_maximize_past_end": dict(amsgrad=True, maximize=True, table=True, step=100),
    "tables_scale_clip": dict(table=True, momentum_table=True, grad_scale=True, found_inf=0, clip=True),
    "found_inf_skips": dict(grad_scale=True, found_inf=1, amsgrad=True),
    "bf16_master": dict(dtype=torch.bfloat16, master=True, table=True, momentum_table=True, grad_scale=True,
                        found_inf=0, clip=True),
    "fp16_no_master": dict(dtype=torch.float16, clip=True),
    "tensor_lr": dict(tensor_lr=True, grad_scale=True, found_inf=0),
    "wd_table": dict(wd_table="stepped", table=True, amsgrad=True),
    "adam_l2": dict(decoupled=False, maximize=True),
    "adam_l2_wd_table_bf16_master": dict(decoupled=False, wd_table="stepped", dtype=torch.bfloat16, master=True,
                                         grad_scale=True, found_inf=0),
    "one_entry_wd_table": dict(wd_table="one_entry", decoupled=False),
}


@pytest.mark.parametrize("case", ADAMW_CASES)
def test_opcheck_adamw(case):
    opcheck(torch.ops.fusedopt.adamw_.default, adamw_args(**ADAMW_CASES[case]))


# --------------------------------------------------------------------------------------------------------
# sgd_
# --------------------------------------------------------------------------------------------------------
def sgd_args(dtype=torch.float32, master=False, momentum=0.9, first_step=False, nesterov=False, maximize=False,
             **ctl):
    state_dtype = torch.float32 if master else dtype
    params = tensors(dtype, seed=1)
    return (
        params, tensors(dtype, seed=2), tensors(state_dtype, seed=3) if momentum else [],
        [p.float() for p in params] if master else [],
        1e-2, momentum, 0.0, 1e-4, nesterov, maximize, first_step, *controls(**ctl),
    )


SGD_CASES = {
    "no_momentum": dict(momentum=0.0),
    "momentum_first_step": dict(first_step=True),
    "nesterov_maximize": dict(nesterov=True, maximize=True),
    "tables_scale_clip": dict(table=True, momentum_table=True, grad_scale=True, found_inf=0, clip=True),
    "found_inf_skips": dict(found_inf=1, grad_scale=True),
    "fp16_master": dict(dtype=torch.float16, master=True, table=True, clip=True),
    "float64": dict(dtype=F64, nesterov=True, table=True),
    "tensor_lr": dict(tensor_lr=True, nesterov=True),
    "wd_table": dict(wd_table="stepped", momentum_table=True),
    "one_entry_wd_table": dict(wd_table="one_entry", momentum=0.0),
}


@pytest.mark.parametrize("case", SGD_CASES)
def test_opcheck_sgd(case):
    opcheck(torch.ops.fusedopt.sgd_.default, sgd_args(**SGD_CASES[case]))


# --------------------------------------------------------------------------------------------------------
# lion_
# --------------------------------------------------------------------------------------------------------
def lion_args(dtype=torch.float32, master=False, **ctl):
    state_dtype = torch.float32 if master else dtype
    params = tensors(dtype, seed=1)
    return (
        params, tensors(dtype, seed=2), tensors(state_dtype, seed=3), [p.float() for p in params] if master else [],
        1e-4, 0.9, 0.99, 0.1, *controls(**ctl),
    )


LION_CASES = {
    "plain": dict(),
    "tables_scale_clip": dict(table=True, momentum_table=True, grad_scale=True, found_inf=0, clip=True),
    "found_inf_skips": dict(found_inf=1),
    "bf16_master": dict(dtype=torch.bfloat16, master=True, table=True, grad_scale=True),
    "tensor_lr": dict(tensor_lr=True, clip=True),
    "wd_table": dict(wd_table="stepped", table=True, clip=True),
    "one_entry_wd_table_fp16_master": dict(wd_table="one_entry", dtype=torch.float16, master=True),
}


def test_a_table_of_several_entries_needs_a_counter():
    """A one-entry table reads the same at any step (a tensor lr), so it may come without schedule_step; a
    longer one without a counter would silently read entry 0 at every step."""
    args = list(sgd_args(table=True))
    args[13] = None  # schedule_step
    with pytest.raises(RuntimeError, match="a schedule table of more than one entry needs schedule_step"):
        torch.ops.fusedopt.sgd_.default(*args)
    args = list(sgd_args(wd_table="stepped"))
    args[13] = None
    with pytest.raises(RuntimeError, match="a schedule table of more than one entry needs schedule_step"):
        torch.ops.fusedopt.sgd_.default(*args)


@pytest.mark.parametrize("op", ["adamw_", "sgd_", "lion_"])
@pytest.mark.parametrize("bad,match", [
    (torch.ones(4, dtype=torch.float32), "weight_decay_table must be float64, got Float"),
    (torch.ones(2, 2, dtype=F64), r"weight_decay_table must be a non-empty 1-D tensor, got shape \[2, 2\]"),
    (torch.ones(0, dtype=F64), r"weight_decay_table must be a non-empty 1-D tensor, got shape \[0\]"),
    (torch.ones(8, dtype=F64)[::2], "weight_decay_table must be contiguous"),
])
def test_bad_weight_decay_table_is_rejected_before_anything_changes(op, bad, match):
    args = {"adamw_": adamw_args, "sgd_": sgd_args, "lion_": lion_args}[op](wd_table="stepped")
    args = list(args)
    index = {"adamw_": 20, "sgd_": 17, "lion_": 14}[op]  # weight_decay_table
    assert args[index] is not None
    args[index] = bad
    before = [[t.clone() for t in a] for a in args if isinstance(a, list)]
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.fusedopt, op).default(*args)
    after = [a for a in args if isinstance(a, list)]
    for b, a in zip(before, after):
        assert all(torch.equal(x, y) for x, y in zip(b, a))


def test_new_arguments_by_keyword_and_their_defaults():
    """The trailing arguments are optional (older positional callers keep working) and can be passed by
    keyword: weight_decay_table=None and decoupled_weight_decay=True are the defaults."""
    runs = []
    for extra in ({}, dict(weight_decay_table=None, decoupled_weight_decay=True),
                  dict(weight_decay_table=torch.tensor([0.01], dtype=F64))):
        args = adamw_args()[:20]  # up to clip_coef
        torch.ops.fusedopt.adamw_(*args, **extra)
        runs.append(args[0])
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[2]):  # a one-entry table holding the same weight decay: the same update
        assert torch.equal(a, b)
    l2 = adamw_args()[:20]
    torch.ops.fusedopt.adamw_(*l2, decoupled_weight_decay=False)
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], l2[0]))


@pytest.mark.parametrize("case", LION_CASES)
def test_opcheck_lion(case):
    opcheck(torch.ops.fusedopt.lion_.default, lion_args(**LION_CASES[case]))


def test_opcheck_transposed_params():
    """Dense params that are not contiguous (a transposed weight) are handed to the op as they are, with
    grads and states of the same strides: the fake / functionalized paths must keep those strides."""
    params = [_t((6, 4), seed=1).t(), _t((3,), seed=2)]
    grads = [_t((6, 4), seed=3).t(), _t((3,), seed=4)]
    exp_avgs = [torch.zeros_like(p) for p in params]
    opcheck(torch.ops.fusedopt.lion_.default,
            (params, grads, exp_avgs, [], 1e-3, 0.9, 0.99, 0.0, None, None, None, None, None, None))


# --------------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------------
OPTIMIZERS = {
    "adamw": (FusedAdamW, dict(lr=1e-2, weight_decay=0.1), "fusedopt.adamw_"),
    "sgd": (FusedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True), "fusedopt.sgd_"),
    "lion": (FusedLion, dict(lr=1e-3, weight_decay=0.1), "fusedopt.lion_"),
}
N_STEPS = 6
X = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))


def setup(name, schedule, max_grad_norm):
    cls, kwargs, _ = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    sched = schedules.one_cycle(2 * N_STEPS) if schedule else None
    return model, cls(model.parameters(), schedule=sched, max_grad_norm=max_grad_norm, **kwargs)


def graphs_call(counter, target):
    return any(str(n.target) == target for g in counter.graphs for n in g.graph.nodes if n.op == "call_function")


def check_same(model_e, opt_e, model_c, opt_c):
    """Params, states and the device-side schedule counters."""
    for (n, a), b in zip(model_e.named_parameters(), model_c.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(model_e.parameters(), model_c.parameters()):
        sa, sb = opt_e.state[a], opt_c.state[b]
        assert set(sa) == set(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    for ge, gc in zip(opt_e.param_groups, opt_c.param_groups):
        if "schedule_step" in ge:
            assert int(gc["schedule_step"]) == int(ge["schedule_step"]) == N_STEPS


def check_host_bookkeeping(opt_e, opt_c):
    """What the optimizer keeps on the host: the schedule mirror behind get_last_lr() / schedule_step, and
    last_grad_norm."""
    assert opt_c.schedule_step == opt_e.schedule_step
    assert opt_c.get_last_lr() == opt_e.get_last_lr()
    assert opt_c.get_last_momentum() == opt_e.get_last_momentum()
    if opt_e.max_grad_norm is not None:
        assert opt_c.last_grad_norm is not None, "last_grad_norm was never set under torch.compile"
        assert torch.equal(opt_e.last_grad_norm, opt_c.last_grad_norm)


def train_step(model, opt):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X), Y)
    loss.backward()
    opt.step()
    return loss


# Each run is shared by the test that checks params / states and the one that checks host bookkeeping.
@functools.lru_cache(maxsize=None)
def run_compiled_training(name, schedule, max_grad_norm=None):
    torch._dynamo.reset()
    model_e, opt_e = setup(name, schedule, max_grad_norm)
    model_c, opt_c = setup(name, schedule, max_grad_norm)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(train_step, backend=counter)
    counter.frames_after_step = []
    for _ in range(N_STEPS):
        loss_e = train_step(model_e, opt_e)
        loss_c = compiled(model_c, opt_c)
        assert torch.equal(loss_e, loss_c)
        counter.frames_after_step.append(counter.frame_count)
    return model_e, opt_e, model_c, opt_c, counter


@functools.lru_cache(maxsize=None)
def run_compiled_step(name, schedule, max_grad_norm=None):
    torch._dynamo.reset()
    model_e, opt_e = setup(name, schedule, max_grad_norm)
    model_c, opt_c = setup(name, schedule, max_grad_norm)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt_c.step, backend=counter)
    for _ in range(N_STEPS):
        for model, opt in ((model_e, opt_e), (model_c, opt_c)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(X), Y).backward()
        opt_e.step()
        step()
    return model_e, opt_e, model_c, opt_c, counter


# (compiling is what costs time here: the schedule-free path is compiled for one optimizer only)
TRAINING_CASES = [("adamw", False), ("adamw", True), ("sgd", True), ("lion", True)]


@pytest.mark.parametrize("name,schedule", TRAINING_CASES,
                         ids=[f"{n}-{'table_and_clipping' if s else 'no_schedule'}" for n, s in TRAINING_CASES])
def test_compiled_training_step_matches_eager(name, schedule):
    model_e, opt_e, model_c, opt_c, counter = run_compiled_training(name, schedule, 0.05 if schedule else None)
    check_same(model_e, opt_e, model_c, opt_c)
    # the op really ran inside a compiled graph (not only in eager fallbacks after graph breaks) ...
    assert graphs_call(counter, OPTIMIZERS[name][2])
    # ... and once state exists (step 1 creates it, step 2 sees it) nothing recompiles: no guard on a value
    # that changes every step (the step count, the lr)
    frames = counter.frames_after_step
    assert frames[2:] == [frames[2]] * (N_STEPS - 2), frames


def test_compiled_opt_step_alone_matches_eager():
    """torch.compile(opt.step) alone (FusedSGD with Nesterov, a table with momentum, and in-step clipping:
    the global norm is computed in the graph)."""
    model_e, opt_e, model_c, opt_c, counter = run_compiled_step("sgd", True, 0.05)
    check_same(model_e, opt_e, model_c, opt_c)
    assert graphs_call(counter, OPTIMIZERS["sgd"][2])


BOOKKEEPING_CASES = [("adamw", "training_step"), ("sgd", "training_step"), ("lion", "training_step"),
                     ("sgd", "opt_step")]


@pytest.mark.parametrize("name,how", BOOKKEEPING_CASES, ids=[f"{n}-{h}" for n, h in BOOKKEEPING_CASES])
def test_compiled_step_keeps_host_bookkeeping(name, how):
    """BUG: under torch.compile, Dynamo drops plain attribute assignments on the optimizer object in a
    frame that ends without a graph break (torch.optim.Optimizer objects are special-cased by Dynamo;
    compare pytorch/pytorch#171590). The device counters advance, but `self._host_step += 1` and
    `self.last_grad_norm = total` are lost: get_last_lr() / get_last_momentum() / schedule_step stay at
    step 0 forever, the 'table exhausted' warning never fires, and last_grad_norm stays None. Mutations
    of a dict or list held by the optimizer do survive, as do any made in an eager (compiler-disabled)
    helper."""
    run = run_compiled_training if how == "training_step" else run_compiled_step
    model_e, opt_e, model_c, opt_c, _ = run(name, True, 0.05)
    check_same(model_e, opt_e, model_c, opt_c)
    check_host_bookkeeping(opt_e, opt_c)
