"""Host side of the Triton backend, shared by the three rules: argument checks (those of
csrc/fusedopt/op_args.h), the cached work table, and the launch (autotuned on a GPU, fixed under the
interpreter).

The work table
--------------
One launch updates every tensor of a call. Every tensor is cut into rows of at most CHUNK elements; the rows
of all tensors form one int64 table of shape [n_rows, ROW] on the device, and program `pid` of a 1-D grid of
n_rows programs handles row `pid`. A row holds raw addresses, already offset to the row's first element:

    F_PARAM, F_GRAD, F_STATE0, F_STATE1, F_STATE2, F_MASTER   element addresses (states: exp_avg, exp_avg_sq,
                                                              max_exp_avg_sq for AdamW; momentum_buffer for
                                                              SGD; exp_avg for Lion), unused ones point at a pad
    F_STEP                                                    the address of the tensor's int64 AdamW step
    F_NUMEL                                                   elements in the row (1..CHUNK; 0 in the single
                                                              dummy row of a call whose tensors are all empty)

The kernels load the addresses and cast them with tl.pointer_type, so the table is the only per-tensor
argument and one compiled kernel serves any number of tensors. AdamW also gets the list of its step
addresses (one per tensor, empty tensors included) and a done-counter: the last program to finish (found by
an atomic increment of the counter) increments every step and resets the counter, so the increments happen
after every program has read its tensor's step, inside the same launch (see adamw.py).

The table depends only on the tensors' addresses, sizes and dtypes, so it is built once and cached (LRU,
MAX_PLANS entries) under a key of data_ptrs, numels and dtypes; while the param set (and the grad buffers)
stay where they are, a call builds nothing and copies nothing to the device. When they move (a new param
group, grads reallocated), the new table is built on the host (Python, ~2 us per row) and copied from pinned
memory asynchronously: still no host sync. That copy cannot happen during CUDA-graph capture: run one step
before capturing (torch asks for warm-up iterations anyway). A graph replays against the table it was
captured with, so a table used during a capture is pinned in the cache for the life of the process.
"""

import collections
import os
from typing import Dict, Optional, Sequence

import torch
import triton
import triton.language as tl

from fusedopt.triton import _jit

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

ROW = int(_jit.ROW)
F_PARAM, F_GRAD, F_STATE0, F_STATE1, F_STATE2, F_MASTER, F_STEP, F_NUMEL = (
    int(_jit.F_PARAM), int(_jit.F_GRAD), int(_jit.F_STATE0), int(_jit.F_STATE1), int(_jit.F_STATE2),
    int(_jit.F_MASTER), int(_jit.F_STEP), int(_jit.F_NUMEL))

# Elements per row of the work table. On a GPU 4096 elements (16-64 KiB per stream) amortize a program's
# prologue (a handful of scalar loads and the float64 scalar math) while a 1M-element model still gets 256
# programs. Under the interpreter every program and every block costs milliseconds of Python, so rows and
# blocks are large (97 elements: one masked block; 1025: a full block and a one-element tail); the tests
# shrink both to exercise many rows per tensor and many blocks per row.
CHUNK = 2048 if INTERPRET else 4096
INTERPRET_BLOCK = 1024
# The config used when autotuning is off (FUSEDOPT_TRITON_AUTOTUNE=0: no benchmarking at the first step of
# each kernel variant) and when a variant is first met during CUDA-graph capture, where benchmarking is
# impossible.
AUTOTUNE = os.environ.get("FUSEDOPT_TRITON_AUTOTUNE", "1") != "0"
DEFAULT_BLOCK, DEFAULT_WARPS = 1024, 4
MAX_PLANS = 256
# Autotuning benchmarks on scratch buffers of at most this many elements per stream (see _tune).
TUNE_MAX_ELEMENTS = 1 << 22

CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8))
]
# The autotuner's key: a size class (a runtime int argument the kernels ignore) and the dtypes. The rule
# modules add their own flags.
TUNE_KEY = ["SIZE_CLASS", "P_DTYPE", "S_DTYPE", "HAS_MASTER"]

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


# ------------------------------------------------------------------------------------------------------------
# Argument checks: the ones of csrc/fusedopt/op_args.h, with the same messages (RuntimeError like TORCH_CHECK).
# ------------------------------------------------------------------------------------------------------------


# c10::ScalarType names, which is how the C++ checks print dtypes
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def _fail(*parts) -> None:
    def fmt(x):
        if isinstance(x, torch.dtype):
            return _SCALAR_TYPE_NAMES.get(x, str(x).replace("torch.", ""))
        if isinstance(x, (torch.Size, tuple)):
            return str(list(x))
        return str(x)

    raise RuntimeError("".join(fmt(p) for p in parts))


def _is_dense(t: torch.Tensor) -> bool:
    """Tensor::is_non_overlapping_and_dense: the elements fill numel * itemsize bytes from data_ptr."""
    if t.numel() <= 1 or t.is_contiguous():
        return True
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def check_device(op: str, device: torch.device) -> None:
    if INTERPRET and device.type != "cpu":
        _fail(op, ": the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors, but the params are on ",
              device, "; unset TRITON_INTERPRET to run compiled kernels on the GPU")
    if not INTERPRET and device.type != "cuda":
        _fail(op, ": backend 'triton' runs on CUDA tensors, but the params are on ", device,
              "; for CPU tensors set TRITON_INTERPRET=1 (testing only) or use backend='cpu'")


def check_params(op: str, params: Sequence[torch.Tensor]) -> None:
    if not params:
        return
    dtype, device = params[0].dtype, params[0].device
    if not dtype.is_floating_point:
        _fail(op, ": params must be floating point, got ", dtype)
    if dtype not in TL_DTYPES:
        _fail(op, ": params of dtype ", dtype, " are not supported (float32, float64, bfloat16, float16)")
    for i, p in enumerate(params):
        if p.dtype != dtype:
            _fail(op, ": params[", i, "] has dtype ", p.dtype, " but params[0] has ", dtype, " (call once per dtype)")
        if p.device != device:
            _fail(op, ": params[", i, "] is on ", p.device, " but params[0] is on ", device,
                  " (call once per device)")
        if not _is_dense(p):
            _fail(op, ": params[", i, "] is not dense (a strided view); update a contiguous copy instead")
    check_device(op, device)


def state_dtype(params: Sequence[torch.Tensor], master_params: Sequence[torch.Tensor]) -> torch.dtype:
    if master_params:
        return torch.float32
    return params[0].dtype if params else torch.float32


def check_list(op: str, name: str, params, lst, required: bool, dtype: Optional[torch.dtype]) -> None:
    if not lst and not required:
        return
    if len(lst) != len(params):
        _fail(op, ": ", name, " has ", len(lst), " tensors but params has ", len(params))
    for i, (p, t) in enumerate(zip(params, lst)):
        if t.device != p.device:
            _fail(op, ": ", name, "[", i, "] is on ", t.device, " but params[", i, "] is on ", p.device)
        if t.shape != p.shape:
            _fail(op, ": ", name, "[", i, "] has shape ", list(t.shape), " but params[", i, "] has shape ",
                  list(p.shape))
        if t.numel() > 1 and t.stride() != p.stride():
            _fail(op, ": ", name, "[", i, "] has strides ", list(t.stride()), " but params[", i, "] has strides ",
                  list(p.stride()))
        if dtype is not None and t.dtype != dtype:
            _fail(op, ": ", name, "[", i, "] has dtype ", t.dtype, ", expected ", dtype)


def check_steps(op: str, params, steps) -> None:
    if len(steps) != len(params):
        _fail(op, ": steps has ", len(steps), " tensors but params has ", len(params))
    for i, (p, s) in enumerate(zip(params, steps)):
        if s.numel() != 1 or s.dtype != torch.int64 or s.device != p.device:
            _fail(op, ": steps[", i, "] must be a one-element int64 tensor on the params' device")


def _check_scalar_tensor(op, name, t, device, dtype) -> None:
    if t is None:
        return
    if t.numel() != 1:
        _fail(op, ": ", name, " must have exactly one element, got ", t.numel())
    if t.device != device:
        _fail(op, ": ", name, " is on ", t.device, " but params are on ", device)
    if t.dtype != dtype:
        _fail(op, ": ", name, " must be ", dtype, ", got ", t.dtype)


def _check_table(op, name, t, device) -> None:
    if t is None:
        return
    if t.dim() != 1 or t.numel() == 0:
        _fail(op, ": ", name, " must be a non-empty 1-D tensor, got shape ", list(t.shape))
    if t.dtype != torch.float64:
        _fail(op, ": ", name, " must be float64, got ", t.dtype)
    if t.device != device:
        _fail(op, ": ", name, " is on ", t.device, " but params are on ", device)
    if not t.is_contiguous():
        _fail(op, ": ", name, " must be contiguous")


# ------------------------------------------------------------------------------------------------------------
# Control tensors (schedule tables, schedule step, AMP and clipping scalars): passed as pointers, with a
# constexpr flag saying whether each one is present. Absent ones point at a per-device dummy of the right
# dtype, so every call of one kernel has the same argument types.
# ------------------------------------------------------------------------------------------------------------

_DUMMIES: Dict[torch.device, Dict[torch.dtype, torch.Tensor]] = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    per_device = _DUMMIES.setdefault(device, {})
    if dtype not in per_device:
        per_device[dtype] = torch.zeros(2, dtype=dtype, device=device)
    return per_device[dtype]


class Controls:
    __slots__ = ("args", "flags", "found_inf_index")

    def __init__(self, args, flags, found_inf_index):
        self.args = args
        self.flags = flags
        self.found_inf_index = found_inf_index


def controls(op: str, device: torch.device, lr_table, mom_table, schedule_step, grad_scale, found_inf,
             clip_coef, wd_table=None) -> Controls:
    """check_controls() of op_args.h, then the kernel arguments: (lr_table, lr_table_len, mom_table,
    mom_table_len, schedule_step, grad_scale, found_inf, clip_coef, wd_table, wd_table_len) and their HAS_*
    flags."""
    _check_table(op, "lr_table", lr_table, device)
    _check_table(op, "momentum table", mom_table, device)
    _check_table(op, "weight_decay_table", wd_table, device)
    if any(t is not None and t.numel() > 1 for t in (lr_table, mom_table, wd_table)) and schedule_step is None:
        _fail(op, ": a schedule table of more than one entry needs schedule_step")  # else entry 0 is read
    _check_scalar_tensor(op, "schedule_step", schedule_step, device, torch.int64)
    _check_scalar_tensor(op, "grad_scale", grad_scale, device, torch.float32)
    _check_scalar_tensor(op, "found_inf", found_inf, device, torch.float32)
    _check_scalar_tensor(op, "clip_coef", clip_coef, device, torch.float32)

    def ptr(t, dtype):
        return _dummy(device, dtype) if t is None else t

    args = (
        ptr(lr_table, torch.float64), 1 if lr_table is None else lr_table.numel(),
        ptr(mom_table, torch.float64), 1 if mom_table is None else mom_table.numel(),
        ptr(schedule_step, torch.int64),
        ptr(grad_scale, torch.float32), ptr(found_inf, torch.float32), ptr(clip_coef, torch.float32),
        ptr(wd_table, torch.float64), 1 if wd_table is None else wd_table.numel(),
    )
    flags = dict(
        HAS_LR_TABLE=lr_table is not None,
        HAS_MOM_TABLE=mom_table is not None,
        HAS_SCHEDULE_STEP=schedule_step is not None,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        HAS_CLIP_COEF=clip_coef is not None,
        HAS_WD_TABLE=wd_table is not None,
    )
    return Controls(args, flags, 6)


# ------------------------------------------------------------------------------------------------------------
# Work tables
# ------------------------------------------------------------------------------------------------------------


class Plan:
    """One call's work table on the device, and what the launch needs to know about it."""

    __slots__ = ("rows", "n_rows", "step_addrs", "n_tensors", "done", "pad", "aligned", "total", "size_class",
                 "field_dtypes", "has_steps", "device", "captured")


def size_class(total: int) -> int:
    """The autotuning key: log2 of the elements of a call, clamped to [12, 22] (from 22 on, rows outnumber the
    SMs many times over and the best config no longer changes)."""
    return max(12, min(22, (max(total, 1) - 1).bit_length()))


def _rows_small(fields, steps, numels, chunk, pad_addr):
    """The rows as a flat Python list (fast for the few hundred rows of a typical call)."""
    flat = []
    lists = [(field, [t.data_ptr() for t in lst], lst[0].element_size()) for field, lst in fields.items()]
    step_addrs = [s.data_ptr() for s in steps] if steps else None
    template = [pad_addr] * ROW
    for i, n in enumerate(numels):
        for start in range(0, n, chunk):
            row = template.copy()
            for field, addrs, size in lists:
                row[field] = addrs[i] + start * size
            if step_addrs is not None:
                row[F_STEP] = step_addrs[i]
            row[F_NUMEL] = min(chunk, n - start)
            flat.extend(row)
    return torch.tensor(flat, dtype=torch.int64).reshape(-1, ROW)


def _rows_large(fields, steps, numels, chunk, pad_addr):
    """The rows with vectorized tensor ops (for calls with many thousands of rows)."""
    numels_t = torch.tensor(numels, dtype=torch.int64)
    n_chunks = (numels_t + chunk - 1) // chunk
    n_rows = int(n_chunks.sum())
    tensor_of_row = torch.repeat_interleave(torch.arange(len(numels)), n_chunks)
    first_row = torch.cumsum(n_chunks, 0) - n_chunks
    start = (torch.arange(n_rows) - first_row[tensor_of_row]) * chunk
    rows = torch.full((n_rows, ROW), pad_addr, dtype=torch.int64)
    for field, lst in fields.items():
        base = torch.tensor([t.data_ptr() for t in lst], dtype=torch.int64)
        rows[:, field] = base[tensor_of_row] + start * lst[0].element_size()
    if steps:
        rows[:, F_STEP] = torch.tensor([s.data_ptr() for s in steps], dtype=torch.int64)[tensor_of_row]
    rows[:, F_NUMEL] = torch.clamp(numels_t[tensor_of_row] - start, max=chunk)
    return rows


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An asynchronous host-to-device copy from pinned memory: building a table never waits for the GPU. (The
    pinned buffer is returned to torch's caching host allocator, which reuses it only after the copy.)"""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def build_plan(fields: Dict[int, Sequence[torch.Tensor]], steps: Optional[Sequence[torch.Tensor]],
               device: torch.device, chunk: Optional[int] = None) -> Plan:
    chunk = CHUNK if chunk is None else chunk
    params = fields[F_PARAM]
    numels = [p.numel() for p in params]
    n_rows = sum(-(-n // chunk) for n in numels)
    pad = torch.zeros(4, dtype=torch.int64, device=device)  # what unused row fields point at
    pad_addr = pad.data_ptr()
    if n_rows == 0:
        # every tensor is empty: one row with no elements, so that one program still runs (AdamW's steps)
        rows = torch.full((1, ROW), pad_addr, dtype=torch.int64)
        rows[0, F_NUMEL] = 0
        n_rows = 1
    elif n_rows <= 4096:
        rows = _rows_small(fields, steps, numels, chunk, pad_addr)
    else:
        rows = _rows_large(fields, steps, numels, chunk, pad_addr)

    plan = Plan()
    plan.captured = False
    plan.device = device
    plan.pad = pad
    plan.rows = _to_device(rows, device)
    plan.n_rows = n_rows
    if steps:
        plan.step_addrs = _to_device(torch.tensor([s.data_ptr() for s in steps], dtype=torch.int64), device)
        plan.n_tensors = len(steps)
    else:
        plan.step_addrs = pad
        plan.n_tensors = 0
    plan.done = torch.zeros(1, dtype=torch.int32, device=device)
    # 16-byte alignment of every address lets the compiled kernel use 128-bit loads and stores; row offsets
    # are multiples of chunk * itemsize (16 bytes or more when chunk % 8 == 0), so the tensors' own
    # addresses decide.
    plan.aligned = chunk % 8 == 0 and all(
        t.data_ptr() % 16 == 0 for lst in fields.values() for t in lst if t.numel() > 0)
    plan.total = sum(numels)
    plan.size_class = size_class(plan.total)
    plan.field_dtypes = {field: lst[0].dtype for field, lst in fields.items()}
    plan.has_steps = bool(steps)
    return plan


_PLANS: "collections.OrderedDict[tuple, Plan]" = collections.OrderedDict()


def plan_key(op: str, fields: Dict[int, Sequence[torch.Tensor]], steps) -> tuple:
    params = fields[F_PARAM]
    key = [op, CHUNK, params[0].device, tuple(p.numel() for p in params)]
    for field, lst in fields.items():
        key.append((field, lst[0].dtype if lst else None, tuple(t.data_ptr() for t in lst)))
    if steps:
        key.append(tuple(s.data_ptr() for s in steps))
    return tuple(key)


def get_plan(op: str, fields: Dict[int, Sequence[torch.Tensor]], steps, validate) -> Plan:
    """The cached plan for these tensors; on a miss `validate()` runs the full list checks first."""
    key = plan_key(op, fields, steps)
    plan = _PLANS.get(key)
    device = fields[F_PARAM][0].device
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if plan is not None:
        _PLANS.move_to_end(key)
        plan.captured = plan.captured or capturing  # a graph will replay against this table: never evict it
        return plan
    validate()
    if capturing:
        _fail(op, ": the Triton backend met a new set of tensors during CUDA-graph capture and cannot copy its "
              "work table to the device now; run one step with the same params, grads and states before "
              "capturing")
    plan = build_plan(fields, steps, device)
    _PLANS[key] = plan
    if len(_PLANS) > MAX_PLANS:
        for old_key in [k for k, p in _PLANS.items() if not p.captured][:len(_PLANS) - MAX_PLANS]:
            del _PLANS[old_key]
    return plan


def clear_caches() -> None:
    """Drops every cached work table not used by a CUDA-graph capture."""
    for key in [k for k, p in _PLANS.items() if not p.captured]:
        del _PLANS[key]


# ------------------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------------------

_TUNED = set()
_TUNING_ROWS = None


def tuning_guard(kwargs, reset_only=False):
    """The autotuner's pre-hook: benchmarking runs the update many times, so it must only ever run on the
    scratch buffers of _tune, never on a caller's tensors."""
    if kwargs.get("rows_ptr") is not _TUNING_ROWS or _TUNING_ROWS is None:
        raise RuntimeError("fusedopt.triton: internal error: the autotuner tried to benchmark on live tensors")


def bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def common_meta(params, master_params) -> dict:
    p_dtype = params[0].dtype
    s_dtype = state_dtype(params, master_params)
    return dict(
        P_DTYPE=TL_DTYPES[p_dtype],
        S_DTYPE=TL_DTYPES[s_dtype],
        T_DTYPE=tl.float64 if p_dtype == torch.float64 else tl.float32,
        HAS_MASTER=bool(master_params),
    )


def _plan_args(plan: Plan) -> tuple:
    return (plan.rows, plan.n_tensors, plan.step_addrs, plan.done)


def _tune(tuned, plan: Plan, ctrl: Controls, scalars: tuple, meta: dict) -> None:
    """Runs the autotuner once for this kernel variant and size class, on scratch buffers shaped like the call
    (one flat tensor per stream, at most TUNE_MAX_ELEMENTS elements) and with found_inf cleared, so that the
    benchmark's repeated updates touch nothing of the caller's."""
    global _TUNING_ROWS
    device = plan.device
    n = max(1, min(plan.total, TUNE_MAX_ELEMENTS))
    fields = {f: [torch.zeros(n, dtype=dt, device=device)] for f, dt in plan.field_dtypes.items()}
    steps = [torch.zeros((), dtype=torch.int64, device=device)] if plan.has_steps else None
    scratch = build_plan(fields, steps, device)
    ctrl_args = list(ctrl.args)
    if meta["HAS_FOUND_INF"]:
        ctrl_args[ctrl.found_inf_index] = torch.zeros(1, dtype=torch.float32, device=device)
    args = _plan_args(scratch) + tuple(ctrl_args) + scalars + (plan.size_class,)  # kernel_args, on scratch
    _TUNING_ROWS = scratch.rows
    try:
        tuned[(scratch.n_rows,)](*args, **meta, enable_fp_fusion=False)
    finally:
        _TUNING_ROWS = None


def kernel_args(plan: Plan, ctrl: Controls, scalars: tuple) -> tuple:
    """The positional arguments every kernel takes: the plan, the controls, the float64 hyperparameters (lr
    and momentum/beta1 first, then the rule's own) and the size class."""
    return _plan_args(plan) + ctrl.args + scalars + (plan.size_class,)


def kernel_meta(plan: Plan, ctrl: Controls, meta: dict) -> dict:
    """The constexpr flags: the rule's, the controls' HAS_*, ALIGNED and SOFT_BF16."""
    return dict(meta, **ctrl.flags, ALIGNED=plan.aligned, SOFT_BF16=INTERPRET)


def launch(kernel, tuned, plan: Plan, ctrl: Controls, scalars: tuple, meta: dict) -> None:
    """One launch of `kernel` over the plan's rows (autotuned with `tuned` on a GPU)."""
    meta = kernel_meta(plan, ctrl, meta)
    args = kernel_args(plan, ctrl, scalars)
    grid = (plan.n_rows,)
    if INTERPRET:
        kernel[grid](*args, **meta, BLOCK=INTERPRET_BLOCK)
        return
    device = plan.device
    with torch.cuda.device(device):
        tune_key = (kernel, device, plan.size_class, tuple(sorted(meta.items())))
        if tune_key not in _TUNED:
            if not AUTOTUNE or torch.cuda.is_current_stream_capturing():
                # no benchmarking inside a capture: a fixed config (the next eager call tunes)
                kernel[grid](*args, **meta, BLOCK=DEFAULT_BLOCK, num_warps=DEFAULT_WARPS, enable_fp_fusion=False)
                return
            _tune(tuned, plan, ctrl, scalars, meta)
            _TUNED.add(tune_key)
        tuned[grid](*args, **meta, enable_fp_fusion=False)
