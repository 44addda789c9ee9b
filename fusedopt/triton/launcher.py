"""Host side of the Triton backend, shared by the three rules: argument checks (those of
csrc/fusedopt/op_args.h), the cached work tables, and the launch (autotuned on a GPU, fixed under the
interpreter).

The work table
--------------
One launch updates every tensor of a call. Every tensor is cut into rows of at most CHUNK elements; the rows
of all tensors form one int64 table of shape [n_rows, ROW] on the device, and program `pid` of a 1-D grid of
n_rows programs handles row `pid`. A row holds (fields of _jit.py):

    F_PARAM, F_STATE0, F_STATE1, F_STATE2, F_MASTER   element addresses, already offset to the row's first
                                                      element (states: exp_avg, exp_avg_sq, max_exp_avg_sq
                                                      for AdamW; momentum_buffer for SGD; exp_avg for Lion);
                                                      unused ones point at a pad
    F_TENSOR                                          the index of the row's tensor in the call's lists
    F_GRAD_OFFSET                                     the row's byte offset in its tensor's grad
    F_NUMEL                                           elements in the row (1..CHUNK; 0 in the single dummy
                                                      row of a call whose tensors are all empty)
    F_ABSMAX0, F_ABSMAX1, F_ABSMAX2                   8-bit states: the address of the absmax of the row's
                                                      first 256-element block (rows then start at multiples
                                                      of 256 in their tensor, so the kernels' blocks are the
                                                      format's blocks)
    F_ELEMENT, F_STREAM                               stochastic rounding: the index in the full tensor of
                                                      the row's first element, and 4 * the param's index

The kernels load the addresses and cast them with tl.pointer_type, so the tables are the only per-tensor
arguments and one compiled kernel serves any number of tensors.

The grads are not in the table. Params, states and master copies stay where they are for a whole run, but
grads move: `zero_grad(set_to_none=True)` (the default, and what torch's CUDA-graph recipe uses) makes every
backward allocate new ones, and a backward inside a CUDA-graph capture allocates them from the graph's
private pool. So the table (a "layout", cached under the addresses of everything but the grads) is built once,
and each call passes a small vector of grad addresses (one int64 per tensor), cached per layout under the grad
addresses. AdamW also gets a step table: per tensor the address of its int64 step, the increment the op makes
to it (1; more if one step tensor is listed twice, as the C++ ops count every entry) and that increment again at
the first occurrence of each address (0 at the others), plus a done-counter: the last program to finish (found
by an atomic increment of the counter) increments every step and resets the counter, so the increments happen
after every program has read its tensor's step, inside the same launch (see adamw.py).

Copies to the device never synchronize: a new table is built on the host and copied from pinned memory
asynchronously. During CUDA-graph capture pinned memory cannot be allocated (the allocator queries events), so
each layout keeps a pinned staging buffer for one grad vector, allocated in an eager call: a capture that meets
new grads (the standard recipe does) fills it on the host and captures its copy, which every replay repeats
(the buffer stays alive and unchanged, as the graph re-reads it). A capture that meets new params or states
cannot copy a whole table and raises, asking for an eager step first, as torch's recipe does anyway. Tables
and grad vectors used during a capture are never evicted (a graph replays against them); the rest is an LRU
cache bounded in bytes (MAX_CACHE_BYTES); freed device buffers go back to torch's caching allocator, which
hands them out again.

Small state
-----------
With state_absmaxes / rounding / rounding_step (the op's small-state arguments), a call's tensors are grouped by
the format of their states (plain float, bfloat16 rounded stochastically, 8-bit codes: a constexpr of the
kernels, see _codec.py) and each group is one launch with its own cached work table; the rounding seed and the
device-side rounding step are runtime arguments, like the controls.

Compiled kernels and capture
----------------------------
A Triton kernel is compiled and loaded at its first launch, and loading a module while a stream is capturing
is an error. So everything that may differ between an eager warm-up step and a captured step is a runtime
argument, not a constexpr: the controls (a missing schedule table, grad_scale, found_inf or clip_coef points at
a neutral dummy), SGD's first step, and every integer argument is exempt from Triton's value specialization.
What remains compile-time (dtypes, master weights, amsgrad / maximize / Nesterov / momentum, 16-byte
alignment, the block size chosen by autotuning) is fixed for a given param group; a captured call that would
need a kernel variant not yet launched raises a RuntimeError naming it instead of failing inside the CUDA
driver.
"""

import collections
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fusedopt.triton import _codec, _jit

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

ROW = int(_jit.ROW)
F_PARAM, F_GRAD_OFFSET, F_STATE0, F_STATE1, F_STATE2, F_MASTER, F_TENSOR, F_NUMEL = (
    int(_jit.F_PARAM), int(_jit.F_GRAD_OFFSET), int(_jit.F_STATE0), int(_jit.F_STATE1), int(_jit.F_STATE2),
    int(_jit.F_MASTER), int(_jit.F_TENSOR), int(_jit.F_NUMEL))
F_ABSMAX0, F_ABSMAX1, F_ABSMAX2, F_ELEMENT, F_STREAM = (
    int(_jit.F_ABSMAX0), int(_jit.F_ABSMAX1), int(_jit.F_ABSMAX2), int(_jit.F_ELEMENT), int(_jit.F_STREAM))
# the absmax field of each state field (8-bit states)
ABSMAX_FIELD = {F_STATE0: F_ABSMAX0, F_STATE1: F_ABSMAX1, F_STATE2: F_ABSMAX2}
# elements per quantization block: rows of a layout with 8-bit states start at multiples of it
QBLOCK = int(_codec.QBLOCK)
FMT_PLAIN, FMT_BF16_SR, FMT_8BIT = int(_codec.FMT_PLAIN), int(_codec.FMT_BF16_SR), int(_codec.FMT_8BIT)

# Elements per row of the work table. On a GPU 4096 elements (16-64 KiB per stream) amortize a program's
# prologue (a handful of scalar loads and the float64 scalar math) while a 1M-element model still gets 256
# programs. Under the interpreter every program and every block costs milliseconds of Python, so rows and
# blocks are large (97 elements: one masked block; 1025: a full block and a one-element tail); the tests
# shrink both to exercise many rows per tensor and many blocks per row.
CHUNK = 2048 if INTERPRET else 4096
INTERPRET_BLOCK = 1024
# The config used when autotuning is off (FUSEDOPT_TRITON_AUTOTUNE=0: no benchmarking at the first step of
# each kernel variant).
AUTOTUNE = os.environ.get("FUSEDOPT_TRITON_AUTOTUNE", "1") != "0"
DEFAULT_BLOCK, DEFAULT_WARPS = 1024, 4
# Device bytes of cached work tables and grad vectors (FUSEDOPT_TRITON_CACHE_MB, default 256 MiB; a table
# takes 64 bytes per 4096 elements, 1/256 of the float32 params it describes). Beyond it the least recently
# used entries go, except those in use and those a CUDA graph replays against.
MAX_CACHE_BYTES = int(float(os.environ.get("FUSEDOPT_TRITON_CACHE_MB", "256")) * 2 ** 20)
# Grad vectors kept per layout (grads that move every step would otherwise pile up).
MAX_GRAD_VECTORS = 8
# Autotuning benchmarks on scratch buffers of at most this many elements per stream (see _tune).
TUNE_MAX_ELEMENTS = 1 << 22

CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8))
]
# The autotuner's key: a size class (a runtime int argument the kernels ignore) and the dtypes. The rule
# modules add their own flags.
TUNE_KEY = ["SIZE_CLASS", "P_DTYPE", "S_DTYPE", "HAS_MASTER", "STATE_FORMAT", "PARAM_SR"]


def jit_options(int_args: Sequence[str] = (), pointer_args: Sequence[str] = ()) -> dict:
    """triton.jit options that keep the compiled kernel the same for every value of the runtime arguments.
    Triton specializes an integer argument that equals 1 or is a multiple of 16, and a pointer that is 16-byte
    aligned, into a separate kernel; the counts, table lengths and flags below change between calls (a table
    of one entry, 16 tensors, a control tensor that is a view), and a new kernel first met during CUDA-graph
    capture could not be loaded. The work-table pointers keep their specialization: the launcher allocates
    them, always aligned."""
    ints = ["n_tensors", "lr_table_len", "wd_table_len", "rounding_seed", "SIZE_CLASS", *int_args]
    pointers = ["lr_table_ptr", "wd_table_ptr", "schedule_step_ptr", "grad_scale_ptr", "found_inf_ptr", "clip_coef_ptr",
                "rounding_step_ptr", *pointer_args]
    return dict(do_not_specialize=ints, do_not_specialize_on_alignment=pointers)


TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}
# storage dtypes of states: the float dtypes, and 8-bit codes
TL_STATE_DTYPES = {**TL_DTYPES, torch.uint8: tl.uint8}


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


def walks_like(param: torch.Tensor, t: torch.Tensor) -> bool:
    """op_args.h walks_like(): one flat index walks t and the (dense) param alike: the same strides, or both
    contiguous (two contiguous tensors walk their elements in the same order even where the strides of size-1
    dims differ, as for the grad a bmm of a transposed weight makes)."""
    return t.numel() <= 1 or t.stride() == param.stride() or (t.is_contiguous() and param.is_contiguous())


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
        if not walks_like(p, t):
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
# Control tensors (schedule tables, schedule step, AMP and clipping scalars): always passed as valid pointers,
# a missing one as a per-device dummy with a neutral value, so that every call of one kernel has the same
# arguments and the same compiled kernel (see _jit.read_controls).
# ------------------------------------------------------------------------------------------------------------

_DUMMIES: Dict[torch.device, Dict[str, torch.Tensor]] = {}


def _dummies(device: torch.device) -> Dict[str, torch.Tensor]:
    """Read-only two-element tensors with the neutral value of each control, and the codec's constants table,
    never written by any kernel. All are made at the first call on a device, which is eager (a first call during capture fails earlier, on its
    work table): one made during a capture would hold its value only once the graph has been replayed."""
    if device not in _DUMMIES:
        _DUMMIES[device] = dict(
            table=torch.zeros(2, dtype=torch.float64, device=device),
            schedule_step=torch.zeros(2, dtype=torch.int64, device=device),
            grad_scale=torch.ones(2, dtype=torch.float32, device=device),
            found_inf=torch.zeros(2, dtype=torch.float32, device=device),
            clip_coef=torch.ones(2, dtype=torch.float32, device=device),
            # the small-state codec's per-slot constants (_codec.table_values), read by every 8-bit launch
            codec=torch.tensor(_codec.table_values(), dtype=torch.float32, device=device),
        )
    return _DUMMIES[device]


class Controls:
    __slots__ = ("args", "found_inf_index")

    def __init__(self, args, found_inf_index):
        self.args = args
        self.found_inf_index = found_inf_index


def controls(op: str, device: torch.device, lr_table, mom_table, schedule_step, grad_scale, found_inf,
             clip_coef, wd_table=None) -> Controls:
    """check_controls() of op_args.h, then the kernel arguments: (lr_table, lr_table_len, mom_table,
    mom_table_len, schedule_step, grad_scale, found_inf, clip_coef, wd_table, wd_table_len). A missing table has
    length 0 (the kernel then reads the group's value); the other missing controls are dummies with neutral
    values."""
    _check_table(op, "lr_table", lr_table, device)
    _check_table(op, "momentum table", mom_table, device)
    _check_table(op, "weight_decay_table", wd_table, device)
    if any(t is not None and t.numel() > 1 for t in (lr_table, mom_table, wd_table)) and schedule_step is None:
        _fail(op, ": a schedule table of more than one entry needs schedule_step")  # else entry 0 is read
    _check_scalar_tensor(op, "schedule_step", schedule_step, device, torch.int64)
    _check_scalar_tensor(op, "grad_scale", grad_scale, device, torch.float32)
    _check_scalar_tensor(op, "found_inf", found_inf, device, torch.float32)
    _check_scalar_tensor(op, "clip_coef", clip_coef, device, torch.float32)

    dummy = _dummies(device)
    args = (
        dummy["table"] if lr_table is None else lr_table, 0 if lr_table is None else lr_table.numel(),
        dummy["table"] if mom_table is None else mom_table, 0 if mom_table is None else mom_table.numel(),
        dummy["schedule_step"] if schedule_step is None else schedule_step,
        dummy["grad_scale"] if grad_scale is None else grad_scale,
        dummy["found_inf"] if found_inf is None else found_inf,
        dummy["clip_coef"] if clip_coef is None else clip_coef,
        dummy["table"] if wd_table is None else wd_table, 0 if wd_table is None else wd_table.numel(),
    )
    return Controls(args, 6)


# ------------------------------------------------------------------------------------------------------------
# Small state (state_absmaxes / rounding / rounding_step, as the C++ ops take them; csrc/fusedopt/op_args.h
# check_small_states and check_rounding): each tensor's states have one format, a constexpr of the kernels, so
# a call runs one launch per format among its tensors (an 8-bit optimizer keeps float32 states for tensors
# under 4,096 elements: two launches).
# ------------------------------------------------------------------------------------------------------------


class Part:
    """The tensors of a call that share one state format (indices into the call's lists; None: all of them)."""

    __slots__ = ("indices", "s_dtype", "fmt", "param_sr", "absmaxes", "streams")

    def __init__(self, indices, s_dtype, fmt, param_sr, absmaxes, streams):
        self.indices = indices
        self.s_dtype = s_dtype  # the states' storage dtype (torch.uint8: 8-bit codes)
        self.fmt = fmt  # FMT_PLAIN / FMT_BF16_SR / FMT_8BIT
        self.param_sr = param_sr
        self.absmaxes = absmaxes  # {F_ABSMAXk: absmax tensors} for 8-bit states
        self.streams = streams  # (param index, element offset) per tensor with stochastic rounding, else None

    def take(self, lst):
        return lst if self.indices is None or not lst else [lst[i] for i in self.indices]


def check_rounding(op: str, params, rounding, rounding_step) -> None:
    if not rounding:
        return
    if len(rounding) != 1 + 2 * len(params):
        _fail(op, ": rounding must be [seed, (param index, offset) per tensor], ", 1 + 2 * len(params),
              " entries, got ", len(rounding))
    if rounding_step is None:
        _fail(op, ": stochastic rounding needs rounding_step")
    _check_scalar_tensor(op, "rounding_step", rounding_step, params[0].device, torch.int64)


def check_small_states(op: str, params, master_params, lists, names, state_absmaxes, stochastic: bool) -> None:
    """op_args.h check_small_states (each tensor's states: the plain dtype, float32, bfloat16 or uint8 codes with
    an absmax of a float32 per 256 elements, one dtype for all its states), and state_io.h's rule that only
    float32 and bfloat16 params take states other than their plain ones."""
    n = len(params)
    sdtype = state_dtype(params, master_params)
    if state_absmaxes is not None and len(state_absmaxes) != len(lists) * n:
        _fail(op, ": state_absmaxes has ", len(state_absmaxes), " entries, expected ", len(lists) * n,
              " (one per state list and tensor)")
    for i in range(n):
        shared = None
        for l, lst in enumerate(lists):
            if not lst:
                continue
            t = lst[i]
            dtype = t.dtype
            if state_absmaxes is not None:
                if dtype not in (sdtype, torch.float32, torch.bfloat16, torch.uint8):
                    _fail(op, ": ", names[l], "[", i, "] has dtype ", dtype, ", expected ", sdtype,
                          ", float32, bfloat16 or uint8 (8-bit codes)")
                if shared is not None and shared != dtype:
                    _fail(op, ": the states of params[", i, "] must share one dtype, got ", shared, " and ", dtype)
                if dtype == torch.uint8:
                    absmax = state_absmaxes[l * n + i]
                    blocks = -(-t.numel() // QBLOCK)
                    if (absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() < blocks
                            or not absmax.is_contiguous() or absmax.device != t.device):
                        _fail(op, ": ", names[l], "[", i, "] holds 8-bit codes and needs a contiguous float32 "
                              "absmax of at least ", blocks, " entries on its device")
            shared = dtype
            plain = dtype == sdtype and not (stochastic and dtype == torch.bfloat16)
            if not plain and params[0].dtype not in (torch.float32, torch.bfloat16):
                _fail("fusedopt: ", params[0].dtype, " params take states of their own dtype (small states run "
                      "through the optimizers' staged path)")


def small_state_parts(op: str, params, master_params, lists, state_absmaxes, rounding, rounding_step):
    """(parts, rounding args) of a call: the tensors grouped by their states' format (the dtype of their first
    state; check_small_states, run on a cache miss, makes sure the others agree), and the kernels'
    (rounding_step, seed) when rounding is stochastic, else None. lists: the call's state lists in the op's
    order (state list k is work-table field F_STATE0 + k), an empty list for one the call does not have."""
    check_rounding(op, params, rounding, rounding_step)
    on = bool(rounding)
    sdtype = state_dtype(params, master_params)
    if state_absmaxes is None and not on:  # plain states (the checks on a cache miss make sure): no per-tensor look
        return [Part(None, sdtype, FMT_PLAIN, False, {}, None)], None
    rounding_args = (rounding_step, int(rounding[0])) if on else None
    param_sr = on and params[0].dtype == torch.bfloat16 and not master_params
    n = len(params)
    first = next((lst for lst in lists if lst), None)
    groups: Dict[torch.dtype, List[int]] = {}
    if first is None or len(first) != n:  # no states (plain SGD), or a length the checks will reject
        groups[sdtype] = list(range(n))
    else:
        for i, t in enumerate(first):
            groups.setdefault(t.dtype, []).append(i)
    parts = []
    for dtype, indices in groups.items():
        fmt = FMT_8BIT if dtype == torch.uint8 else (
            FMT_BF16_SR if on and dtype == torch.bfloat16 else FMT_PLAIN)
        absmaxes = {}
        if fmt == FMT_8BIT and state_absmaxes is not None and len(state_absmaxes) == len(lists) * n:
            for k, lst in enumerate(lists):
                if lst:
                    absmaxes[ABSMAX_FIELD[F_STATE0 + k]] = [state_absmaxes[k * n + i] for i in indices]
        streams = [(int(rounding[1 + 2 * i]), int(rounding[2 + 2 * i])) for i in indices] if on else None
        parts.append(Part(None if len(groups) == 1 else indices, dtype if dtype in TL_STATE_DTYPES else sdtype,
                          fmt, param_sr, absmaxes, streams))
    return parts, rounding_args


def plan_parts(op: str, parts, fields: Dict[int, Sequence[torch.Tensor]], steps, grads, validate):
    """get_plan for every part (before any launch, so that a failing check modifies nothing); `validate`, the
    checks of the whole call, runs at most once, at the first cache miss."""
    done = []

    def once():
        if not done:
            validate()
            done.append(True)

    return [get_plan(op, {f: part.take(lst) for f, lst in fields.items()}, part.take(steps) if steps else steps,
                     part.take(grads), once, part.absmaxes, part.streams) for part in parts]


# ------------------------------------------------------------------------------------------------------------
# Work tables: the layout (everything but the grads) and the grad-address vectors
# ------------------------------------------------------------------------------------------------------------


class GradVector:
    """The addresses of one call's grads on the device (one int64 per tensor)."""

    __slots__ = ("addrs", "aligned", "captured", "nbytes", "staging", "streams")

    def __init__(self, addrs: torch.Tensor, aligned: bool, staging: Optional[torch.Tensor] = None):
        self.addrs = addrs
        self.aligned = aligned
        self.captured = False
        self.nbytes = addrs.numel() * 8
        self.staging = staging  # the pinned host buffer a captured copy re-reads at every replay
        self.streams = {_stream_id(addrs.device)}  # streams its kernels ran on (see _used_on)


class Layout:
    """The work table of a set of params, states and master copies on the device, and what the launch needs
    to know about it; its grad vectors, cached under the grad addresses."""

    __slots__ = ("rows", "n_rows", "step_table", "n_tensors", "done", "pad", "aligned", "total", "size_class",
                 "field_dtypes", "grad_dtype", "has_steps", "device", "captured", "nbytes", "grad_vectors",
                 "staging", "streams", "absmax_fields")


def size_class(total: int) -> int:
    """The autotuning key: log2 of the elements of a call, clamped to [12, 22] (from 22 on, rows outnumber the
    SMs many times over and the best config no longer changes)."""
    return max(12, min(22, (max(total, 1) - 1).bit_length()))


def _rows_small(fields, numels, chunk, pad_addr, grad_itemsize, absmaxes, streams):
    """The rows as a flat Python list (fast for the few hundred rows of a typical call)."""
    flat = []
    # (field, addresses, bytes per `per` elements): absmax has one float32 per QBLOCK elements (and chunk is a
    # multiple of QBLOCK when there is one)
    lists = [(field, [t.data_ptr() for t in lst], lst[0].element_size(), 1) for field, lst in fields.items()]
    lists += [(field, [t.data_ptr() for t in lst], 4, QBLOCK) for field, lst in absmaxes.items()]
    template = [pad_addr] * ROW
    for i, n in enumerate(numels):
        stream, offset = streams[i] if streams else (0, 0)
        for start in range(0, n, chunk):
            row = template.copy()
            for field, addrs, size, per in lists:
                row[field] = addrs[i] + (start // per) * size
            row[F_TENSOR] = i
            row[F_GRAD_OFFSET] = start * grad_itemsize
            row[F_NUMEL] = min(chunk, n - start)
            row[F_ELEMENT] = offset + start
            row[F_STREAM] = 4 * stream
            flat.extend(row)
    return torch.tensor(flat, dtype=torch.int64).reshape(-1, ROW)


def _rows_large(fields, numels, chunk, pad_addr, grad_itemsize, absmaxes, streams):
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
    for field, lst in absmaxes.items():
        base = torch.tensor([t.data_ptr() for t in lst], dtype=torch.int64)
        rows[:, field] = base[tensor_of_row] + (start // QBLOCK) * 4
    rows[:, F_TENSOR] = tensor_of_row
    rows[:, F_GRAD_OFFSET] = start * grad_itemsize
    rows[:, F_NUMEL] = torch.clamp(numels_t[tensor_of_row] - start, max=chunk)
    stream_of = torch.tensor([s for s, _ in streams] if streams else [0] * len(numels), dtype=torch.int64)
    offset_of = torch.tensor([o for _, o in streams] if streams else [0] * len(numels), dtype=torch.int64)
    rows[:, F_ELEMENT] = offset_of[tensor_of_row] + start
    rows[:, F_STREAM] = 4 * stream_of[tensor_of_row]
    return rows


def _step_table(steps: Sequence[torch.Tensor]) -> torch.Tensor:
    """[address | increment | increment at the first occurrence of the address, else 0] per tensor: the C++
    ops add 1 per list entry, so a step tensor listed k times advances by k and every update reads the
    counter after all increments (old + k)."""
    addrs = [s.data_ptr() for s in steps]
    counts = collections.Counter(addrs)
    seen = set()
    first = []
    for a in addrs:
        first.append(counts[a] if a not in seen else 0)
        seen.add(a)
    return torch.tensor(addrs + [counts[a] for a in addrs] + first, dtype=torch.int64)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An asynchronous host-to-device copy from pinned memory: building a table never waits for the GPU. (The
    pinned buffer is returned to torch's caching host allocator, which reuses it only after the copy.) Not
    for use during CUDA-graph capture: allocating pinned memory queries CUDA events, which a capture forbids."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _staging(n: int, device: torch.device) -> torch.Tensor:
    """A host buffer for one grad vector, pinned when the device is a GPU (allocated outside any capture)."""
    return torch.empty(n, dtype=torch.int64, pin_memory=device.type == "cuda")


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of `device` is capturing a CUDA graph."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _stream_id(device: torch.device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def _used_on(entry, tensors, device: torch.device) -> None:
    """Tells torch's caching allocator that `tensors` (a cached table) are read on the current stream when it
    is not the one they were allocated on (torch's recipe warms up on a side stream): their memory is then not
    reused for another stream's allocation before these launches end, when the cache drops them."""
    stream = _stream_id(device)
    if stream not in entry.streams:
        entry.streams.add(stream)
        for t in tensors:
            t.record_stream(torch.cuda.current_stream(device))


def _aligned(tensors) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors if t.numel() > 0)


def build_layout(fields: Dict[int, Sequence[torch.Tensor]], steps: Optional[Sequence[torch.Tensor]],
                 device: torch.device, chunk: Optional[int] = None,
                 absmaxes: Optional[Dict[int, Sequence[torch.Tensor]]] = None,
                 streams: Optional[Sequence[Tuple[int, int]]] = None) -> Layout:
    """The work table of these tensors. absmaxes: {F_ABSMAXk: the absmax of each tensor's 8-bit state k}, which
    makes every row start at a multiple of QBLOCK (the format's blocks); streams: (param index, element offset of
    the local shard in the full tensor) per tensor, for stochastic rounding."""
    absmaxes = absmaxes or {}
    chunk = CHUNK if chunk is None else chunk
    if absmaxes:
        chunk = -(-chunk // QBLOCK) * QBLOCK
    params = fields[F_PARAM]
    numels = [p.numel() for p in params]
    n_rows = sum(-(-n // chunk) for n in numels)
    grad_itemsize = params[0].element_size()  # grads have the params' dtype
    pad = torch.zeros(4, dtype=torch.int64, device=device)  # what unused row fields point at
    pad_addr = pad.data_ptr()
    if n_rows == 0:
        # every tensor is empty: one row with no elements, so that one program still runs (AdamW's steps)
        rows = torch.full((1, ROW), pad_addr, dtype=torch.int64)
        rows[0, F_TENSOR] = rows[0, F_GRAD_OFFSET] = rows[0, F_NUMEL] = rows[0, F_ELEMENT] = rows[0, F_STREAM] = 0
        n_rows = 1
    elif n_rows <= 4096:
        rows = _rows_small(fields, numels, chunk, pad_addr, grad_itemsize, absmaxes, streams)
    else:
        rows = _rows_large(fields, numels, chunk, pad_addr, grad_itemsize, absmaxes, streams)

    layout = Layout()
    layout.captured = False
    layout.device = device
    layout.pad = pad
    layout.rows = _to_device(rows, device)
    layout.n_rows = n_rows
    layout.n_tensors = len(params)
    layout.step_table = _to_device(_step_table(steps), device) if steps else pad
    layout.done = torch.zeros(1, dtype=torch.int32, device=device)
    # 16-byte alignment of every address lets the compiled kernel use 128-bit loads and stores; row offsets
    # are multiples of chunk * itemsize (16 bytes or more when chunk * itemsize % 16 == 0: chunk % 8 for 2-byte
    # elements, chunk % 16 for 8-bit codes), so the tensors' own addresses decide (the grads' are checked per
    # grad vector). The absmax pointers are never assumed aligned.
    smallest = min([grad_itemsize] + [lst[0].element_size() for lst in fields.values()])
    layout.aligned = (chunk * smallest) % 16 == 0 and all(_aligned(lst) for lst in fields.values())
    layout.total = sum(numels)
    layout.size_class = size_class(layout.total)
    layout.field_dtypes = {field: lst[0].dtype for field, lst in fields.items()}
    layout.grad_dtype = params[0].dtype
    layout.has_steps = bool(steps)
    layout.absmax_fields = tuple(absmaxes)
    layout.nbytes = rows.numel() * 8 + (3 * len(steps) * 8 if steps else 0)
    layout.grad_vectors = collections.OrderedDict()
    layout.staging = _staging(len(params), device)
    layout.streams = {_stream_id(device)}
    return layout


def _grad_vector(op: str, layout: Layout, grads: Sequence[torch.Tensor], capturing: bool) -> GradVector:
    host = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    aligned = _aligned(grads)
    if not capturing:
        return GradVector(_to_device(host, layout.device), aligned)
    # During capture: the layout's staging buffer, filled on the host; the captured copy re-reads it at every
    # replay, so it now belongs to this grad vector (and a new one is allocated at the next eager call).
    staging = layout.staging
    if staging is None:
        _fail(op, ": the Triton backend met a second new set of grads for the same params during one CUDA-graph "
              "capture; run an eager step between captures")
    layout.staging = None
    staging.copy_(host)
    if layout.device.type == "cpu":
        return GradVector(staging, aligned, staging)
    addrs = torch.empty(len(grads), dtype=torch.int64, device=layout.device)
    addrs.copy_(staging, non_blocking=True)  # cudaMemcpyAsync from pinned memory: a memcpy node of the graph
    return GradVector(addrs, aligned, staging)


_LAYOUTS: "collections.OrderedDict[tuple, Layout]" = collections.OrderedDict()


def layout_key(op: str, fields: Dict[int, Sequence[torch.Tensor]], steps, absmaxes=None, streams=None) -> tuple:
    params = fields[F_PARAM]
    key = [op, CHUNK, params[0].device, tuple(p.numel() for p in params)]
    for field, lst in fields.items():
        key.append((field, lst[0].dtype if lst else None, tuple(t.data_ptr() for t in lst)))
    if steps:
        key.append(tuple(s.data_ptr() for s in steps))
    for field, lst in (absmaxes or {}).items():
        key.append((field, tuple(t.data_ptr() for t in lst)))
    if streams:
        key.append(tuple(streams))
    return tuple(key)


def get_plan(op: str, fields: Dict[int, Sequence[torch.Tensor]], steps, grads: Sequence[torch.Tensor],
             validate, absmaxes=None, streams=None) -> Tuple[Layout, GradVector]:
    """The cached layout and grad vector for these tensors (absmaxes, streams: see build_layout). On a miss
    `validate()` runs the full list checks (the grads' included) first; nothing is built or copied while the
    tensors stay where they are."""
    params = fields[F_PARAM]
    device = params[0].device
    capturing = _capturing(device)
    key = layout_key(op, fields, steps, absmaxes, streams)
    layout = _LAYOUTS.get(key)
    missed = layout is None
    if missed:
        validate()
        if capturing:
            _fail(op, ": the Triton backend met new params or states during CUDA-graph capture and cannot copy its "
                  "work table to the device now; run one step with the same params and states before capturing "
                  "(torch's capture recipe warms up on a side stream first)")
        layout = build_layout(fields, steps, device, absmaxes=absmaxes, streams=streams)
        _LAYOUTS[key] = layout
    else:
        _LAYOUTS.move_to_end(key)
    grad_key = (grads[0].dtype,) + tuple(g.data_ptr() for g in grads)
    vector = layout.grad_vectors.get(grad_key)
    if vector is None:
        if not missed:
            validate()
        vector = _grad_vector(op, layout, grads, capturing)
        layout.grad_vectors[grad_key] = vector
        missed = True
    else:
        layout.grad_vectors.move_to_end(grad_key)
    if capturing:  # a graph will replay against these: never evict them
        layout.captured = vector.captured = True
    else:
        if layout.staging is None:
            layout.staging = _staging(layout.n_tensors, device)
        if device.type == "cuda":
            _used_on(layout, (layout.rows, layout.step_table, layout.done, layout.pad), device)
            _used_on(vector, (vector.addrs,), device)
    if missed:
        _evict(layout, vector)
    return layout, vector


def _evict(keep_layout: Layout, keep_vector: GradVector) -> None:
    """Drop least recently used grad vectors beyond MAX_GRAD_VECTORS per layout, then least recently used
    entries until the cache holds at most MAX_CACHE_BYTES (or only entries that must stay)."""
    vectors = keep_layout.grad_vectors
    for grad_key in [k for k, v in vectors.items() if not v.captured and v is not keep_vector][
            :max(0, len(vectors) - MAX_GRAD_VECTORS)]:
        del vectors[grad_key]
    total = cache_bytes()
    if total <= MAX_CACHE_BYTES:
        return
    for key, layout in list(_LAYOUTS.items()):  # oldest first
        for grad_key, v in list(layout.grad_vectors.items()):
            if total <= MAX_CACHE_BYTES:
                return
            if not v.captured and v is not keep_vector:
                del layout.grad_vectors[grad_key]
                total -= v.nbytes
        if total > MAX_CACHE_BYTES and not layout.captured and layout is not keep_layout:
            del _LAYOUTS[key]
            total -= layout.nbytes + sum(v.nbytes for v in layout.grad_vectors.values())


def cache_bytes() -> int:
    """Device bytes held by the cached work tables and grad vectors."""
    return sum(layout.nbytes + sum(v.nbytes for v in layout.grad_vectors.values()) for layout in _LAYOUTS.values())


def clear_caches() -> None:
    """Drops every cached work table and grad vector not used by a CUDA-graph capture."""
    for key, layout in list(_LAYOUTS.items()):
        for grad_key in [k for k, v in layout.grad_vectors.items() if not v.captured]:
            del layout.grad_vectors[grad_key]
        if not layout.captured:
            del _LAYOUTS[key]


# ------------------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------------------

_TUNED = set()
# Kernel variants (kernel, device, constexprs, config) launched outside a capture: compiled and loaded.
_LAUNCHED = set()
_TUNING_ROWS = None


def tuning_guard(kwargs, reset_only=False):
    """The autotuner's pre-hook: benchmarking runs the update many times, so it must only ever run on the
    scratch buffers of _tune, never on a caller's tensors."""
    if kwargs.get("rows_ptr") is not _TUNING_ROWS or _TUNING_ROWS is None:
        raise RuntimeError("fusedopt.triton: internal error: the autotuner tried to benchmark on live tensors")


def bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def common_meta(params, master_params, part: Optional["Part"] = None) -> dict:
    """The constexprs every kernel takes: dtypes, master weights, the states' format and the param's rounding
    (those of `part`, else plain states of the call's state dtype rounded to nearest)."""
    p_dtype = params[0].dtype
    s_dtype = state_dtype(params, master_params) if part is None else part.s_dtype
    return dict(
        P_DTYPE=TL_DTYPES[p_dtype],
        S_DTYPE=TL_STATE_DTYPES[s_dtype],
        T_DTYPE=tl.float64 if p_dtype == torch.float64 else tl.float32,
        HAS_MASTER=bool(master_params),
        STATE_FORMAT=FMT_PLAIN if part is None else part.fmt,
        PARAM_SR=False if part is None else part.param_sr,
    )


def _plan_args(layout: Layout, vector: GradVector) -> tuple:
    return (layout.rows, vector.addrs, layout.n_tensors, layout.step_table, layout.done)


def _tune(tuned, layout: Layout, vector: GradVector, ctrl: Controls, scalars: tuple, meta: dict,
          rounding: Optional[tuple] = None) -> None:
    """Runs the autotuner once for this kernel variant and size class, on scratch buffers shaped like the call
    (one flat tensor per stream, at most TUNE_MAX_ELEMENTS elements) and with found_inf cleared, so that the
    benchmark's repeated updates touch nothing of the caller's."""
    global _TUNING_ROWS
    device = layout.device
    n = max(1, min(layout.total, TUNE_MAX_ELEMENTS))
    fields = {f: [torch.zeros(n, dtype=dt, device=device)] for f, dt in layout.field_dtypes.items()}
    absmaxes = {f: [torch.zeros(-(-n // QBLOCK), dtype=torch.float32, device=device)] for f in layout.absmax_fields}
    grads = [torch.zeros(n, dtype=layout.grad_dtype, device=device)]
    steps = [torch.zeros((), dtype=torch.int64, device=device)] if layout.has_steps else None
    scratch = build_layout(fields, steps, device, absmaxes=absmaxes, streams=[(0, 0)])
    scratch_vector = _grad_vector("tune", scratch, grads, False)
    ctrl_args = list(ctrl.args)
    ctrl_args[ctrl.found_inf_index] = torch.zeros(1, dtype=torch.float32, device=device)
    args = kernel_args(scratch, scratch_vector, Controls(tuple(ctrl_args), ctrl.found_inf_index), scalars, rounding)
    _TUNING_ROWS = scratch.rows
    try:
        tuned[(scratch.n_rows,)](*args, **meta, enable_fp_fusion=False)
    finally:
        _TUNING_ROWS = None


def kernel_args(layout: Layout, vector: GradVector, ctrl: Controls, scalars: tuple,
                rounding: Optional[tuple] = None) -> tuple:
    """The positional arguments every kernel takes: the work table, the grad vector, the step table, the
    controls, the rounding stream (rounding_step_ptr, rounding_seed: small_state_parts' rounding args, a
    neutral pair without stochastic rounding), the codec's constants table (codec_ptr), the float64
    hyperparameters (lr and momentum/beta1 first, then the rule's own, then its runtime flags) and the size
    class."""
    dummies = _dummies(layout.device)
    if rounding is None:
        rounding = (dummies["schedule_step"], 0)
    return (_plan_args(layout, vector) + ctrl.args + tuple(rounding) + (dummies["codec"],) + scalars
            + (layout.size_class,))


def kernel_meta(layout: Layout, vector: GradVector, meta: dict) -> dict:
    """The constexprs: the rule's, ALIGNED and SOFT_BF16."""
    return dict(meta, ALIGNED=layout.aligned and vector.aligned, SOFT_BF16=INTERPRET)


def _not_loaded(kernel, meta: dict) -> None:
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
    flags = ", ".join(f"{k}={v}" for k, v in sorted(meta.items()))
    _fail("fusedopt.triton: the kernel variant ", name, " (", flags, ") would be compiled and loaded for the "
          "first time during CUDA-graph capture, which CUDA forbids; run one eager step with the same params, "
          "dtypes and optimizer options (and the same autotuning setting) before capturing")


def launch(kernel, tuned, layout: Layout, vector: GradVector, ctrl: Controls, scalars: tuple, meta: dict,
           rounding: Optional[tuple] = None) -> None:
    """One launch of `kernel` over the layout's rows (autotuned with `tuned` on a GPU). During CUDA-graph
    capture only a variant already launched eagerly may run (see the module docstring). rounding: the
    (rounding_step, seed) of small_state_parts (None: round to nearest)."""
    meta = kernel_meta(layout, vector, meta)
    args = kernel_args(layout, vector, ctrl, scalars, rounding)
    grid = (layout.n_rows,)
    device = layout.device
    capturing = _capturing(device)
    variant = (kernel, device, tuple(sorted(meta.items())))
    if INTERPRET:
        # nothing is compiled, but the capture rule is enforced alike, so CPU tests can check it
        if capturing and variant + ("interpreter",) not in _LAUNCHED:
            _not_loaded(kernel, meta)
        block = INTERPRET_BLOCK
        if meta.get("STATE_FORMAT", 0) == FMT_8BIT:  # blocks of elements must be whole quantization blocks
            block = -(-block // QBLOCK) * QBLOCK
        kernel[grid](*args, **meta, BLOCK=block)
        _LAUNCHED.add(variant + ("interpreter",))
        return
    with torch.cuda.device(device):
        tune_key = (kernel, device, layout.size_class, variant[2])
        default = variant + ("default",)
        if capturing:
            if AUTOTUNE and tune_key in _TUNED:  # the tuned config ran eagerly: loaded, and cached by the tuner
                tuned[grid](*args, **meta, enable_fp_fusion=False)
            elif default in _LAUNCHED:
                kernel[grid](*args, **meta, BLOCK=DEFAULT_BLOCK, num_warps=DEFAULT_WARPS, enable_fp_fusion=False)
            else:
                _not_loaded(kernel, meta)
            return
        if AUTOTUNE:
            if tune_key not in _TUNED:
                _tune(tuned, layout, vector, ctrl, scalars, meta, rounding)
                _TUNED.add(tune_key)
            tuned[grid](*args, **meta, enable_fp_fusion=False)
        else:
            kernel[grid](*args, **meta, BLOCK=DEFAULT_BLOCK, num_warps=DEFAULT_WARPS, enable_fp_fusion=False)
            _LAUNCHED.add(default)
