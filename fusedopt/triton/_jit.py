"""Device-side helpers shared by the three Triton kernels: the Triton spelling of csrc/fusedopt/rules.h and
csrc/fusedopt/schedule.h (everything that is not one rule's own per-element update).

Numerics, so that float32 results are bit-identical to the C++ kernels (which compile rules.h with
-ffp-contract=off):
  * float32 division and square root use tl.div_rn / tl.sqrt_rn (IEEE round-to-nearest, like the C++ '/' and
    std::sqrt / sqrtf); Triton's plain '/' and tl.sqrt are approximate for float32. For float64 the plain
    operators already lower to div.rn.f64 / sqrt.rn.f64 (and tl.div_rn / tl.sqrt_rn only accept float32).
  * the launcher compiles with enable_fp_fusion=False, so no a*b+c is contracted into an FMA.
  * the Triton interpreter's bfloat16 conversions are not exact (float32 -> bfloat16 truncates, bfloat16 ->
    float32 mishandles subnormals), so under the interpreter (SOFT_BF16) both are done with integer
    operations exactly as c10::BFloat16 does them; compiled kernels use the hardware conversions
    (cvt.f32.bf16 and cvt.rn.bf16.f32, round-to-nearest-even).

No helper here may use the Python-float rounding of a kernel argument: double hyperparameters arrive as
tl.float64-annotated arguments and are turned into float64 scalars with f64() (the interpreter would otherwise
round a Python float to float32 on first use).
"""

import functools
import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_function(fn):
    """@triton.jit for the helpers the kernels call.

    Compiled, this is exactly triton.jit. Under the interpreter, every call of a jitted helper re-patches
    triton.language (about 1.5 ms a call, which made one interpreted optimizer step cost over 100 ms); the
    kernel being interpreted has already patched it, so the helper's interpreter-rewritten Python function is
    called directly. Falls back to the plain jitted helper if the interpreter lacks that hook."""
    jitted = triton.jit(fn)
    if not _INTERPRET or not hasattr(jitted, "rewrite"):
        return jitted
    rewritten = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not rewritten:
            rewritten.append(jitted.rewrite())
        return rewritten[0](*args, **kwargs)

    return call


# Fields of one row of the work table (see launcher.py). The param, state and master fields are addresses
# already offset to the row's first element; the grad of a row is found through the call's grad-address vector
# (grads move between steps, the rest does not), at byte offset F_GRAD_OFFSET from the address of tensor
# F_TENSOR's grad; F_TENSOR also indexes the step table (AdamW).
F_PARAM = tl.constexpr(0)
F_GRAD_OFFSET = tl.constexpr(1)
F_STATE0 = tl.constexpr(2)
F_STATE1 = tl.constexpr(3)
F_STATE2 = tl.constexpr(4)
F_MASTER = tl.constexpr(5)
F_TENSOR = tl.constexpr(6)
F_NUMEL = tl.constexpr(7)
ROW = tl.constexpr(8)


@device_function
def f64(x):
    """An exact float64 scalar from a tl.float64 kernel argument (compiled: a no-op)."""
    return tl.full((), x, tl.float64)


@device_function
def row_ptr(rows_ptr):
    """This program's row of the work table."""
    return rows_ptr + tl.program_id(0).to(tl.int64) * ROW


@device_function
def grad_addr(row, grad_addrs_ptr):
    """The address of this row's first grad element: the call's address of the row's tensor's grad plus the
    row's byte offset in it."""
    return tl.load(grad_addrs_ptr + tl.load(row + F_TENSOR)) + tl.load(row + F_GRAD_OFFSET)


@device_function
def typed_ptr(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A raw int64 address from the work table as a typed pointer. ALIGNED: the host checked that every
    address of the table is a multiple of 16 bytes, which lets the compiler use 128-bit accesses."""
    p = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@device_function
def load_elems(addr, offs, mask, DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
               SOFT_BF16: tl.constexpr):
    """Loads DTYPE elements and widens them to the math type T_DTYPE (exact). mask None: a full block."""
    if SOFT_BF16 and DTYPE == tl.bfloat16:
        ptrs = typed_ptr(addr, tl.uint16, ALIGNED) + offs
        if mask is None:
            bits = tl.load(ptrs)
        else:
            bits = tl.load(ptrs, mask=mask, other=0)
        x = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        ptrs = typed_ptr(addr, DTYPE, ALIGNED) + offs
        if mask is None:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=mask, other=0)
    return x.to(T_DTYPE)


@device_function
def store_elems(addr, offs, x, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Rounds x to DTYPE (round-to-nearest-even, like the static_cast<S> / static_cast<P> of the C++ kernels)
    and stores it. mask None: a full block."""
    if SOFT_BF16 and DTYPE == tl.bfloat16:
        # c10::detail::round_to_nearest_even; NaN -> the canonical quiet NaN 0x7FC0
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        ptrs = typed_ptr(addr, tl.uint16, ALIGNED) + offs
        val = r.to(tl.uint16)
    else:
        ptrs = typed_ptr(addr, DTYPE, ALIGNED) + offs
        val = x.to(DTYPE)
    if mask is None:
        tl.store(ptrs, val)
    else:
        tl.store(ptrs, val, mask=mask)


@device_function
def load_param(p_addr, master_addr, offs, mask, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
               T_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr):
    """multi_tensor_cpu.h load_param(): the param as the update sees it, from its float32 master copy if any."""
    if HAS_MASTER:
        p = load_elems(master_addr, offs, mask, S_DTYPE, T_DTYPE, ALIGNED, SOFT_BF16)
    else:
        p = load_elems(p_addr, offs, mask, P_DTYPE, T_DTYPE, ALIGNED, SOFT_BF16)
    return p


@device_function
def store_param(p_addr, master_addr, offs, p, mask, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                HAS_MASTER: tl.constexpr, ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr):
    """multi_tensor_cpu.h store_param(): to the master copy, and (rounded, with one) to the param."""
    if HAS_MASTER:
        store_elems(master_addr, offs, p, mask, S_DTYPE, ALIGNED, SOFT_BF16)
    store_elems(p_addr, offs, p, mask, P_DTYPE, ALIGNED, SOFT_BF16)


@device_function
def div(a, b):
    """IEEE-rounded a / b (the C++ '/' in rules.h)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@device_function
def sqrt(x):
    """IEEE-rounded square root: schedule.h sqrt_host_device."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@device_function
def power2(base_a, base_b, exponent):
    """(power(base_a, exponent), power(base_b, exponent)) with rules.h power(), exponentiation by squaring in
    double: each result goes through exactly the multiplications of power(); the two share the loop control
    (half the work under the interpreter)."""
    result_a = tl.full((), 1.0, tl.float64)
    result_b = tl.full((), 1.0, tl.float64)
    e = exponent.to(tl.int64)
    while e > 0:
        odd = (e & 1) != 0
        result_a = tl.where(odd, result_a * base_a, result_a)
        result_b = tl.where(odd, result_b * base_b, result_b)
        base_a = base_a * base_a
        base_b = base_b * base_b
        e = e >> 1
    return result_a, result_b


@device_function
def lerp(self, end, weight):
    """rules.h lerp() (torch's two-formula lerp); weight is a scalar of the math type."""
    small = (weight < 0.5) & (weight > -0.5)
    return tl.where(small, self + weight * (end - self), end - (end - self) * (1.0 - weight))


@device_function
def sign(x):
    """rules.h sign(): sign(0) == 0 and sign(NaN) == 0."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@device_function
def transform_grad(g, inv_scale, clip_coef, MAXIMIZE: tl.constexpr):
    """rules.h transform_grad(): AMP unscale, global-norm clip, maximize."""
    g = g * inv_scale
    g = g * clip_coef
    if MAXIMIZE:
        g = -g
    return g


@device_function
def read_table(table_ptr, table_len, step, fallback):
    """schedule.h read_table(): the entry at `step` clamped to [0, len - 1], or the group's own value when there
    is no table (table_len == 0; table_ptr then points at a valid dummy, so the load is harmless). A runtime
    test, not a constexpr: a table present at one step and absent at another is the same compiled kernel."""
    entry = tl.load(table_ptr + tl.minimum(tl.maximum(step, 0), tl.maximum(table_len - 1, 0)))
    return tl.where(table_len > 0, entry, f64(fallback))


@device_function
def read_controls(schedule_step_ptr, lr_table_ptr, lr_table_len, mom_table_ptr, mom_table_len,
                  grad_scale_ptr, found_inf_ptr, clip_coef_ptr, wd_table_ptr, wd_table_len, lr, mom, wd,
                  T_DTYPE: tl.constexpr):
    """Everything a call reads from device memory besides the tensors themselves, read by every program:
    the scheduled lr, momentum/beta1 and weight decay (float64), whether the step runs (found_inf == 0) and
    the gradient factors of multi_tensor_cpu.h read_grad_transform(), rounded to the math type.

    Every pointer is valid: a control the call does not have points at a neutral dummy (launcher.controls():
    schedule step 0, grad_scale 1, found_inf 0, clip_coef 1, tables of length 0), whose factors are exact
    (g * 1.0 == g). So GradScaler, clipping or a schedule switched on between two calls select no other
    compiled kernel, which matters under CUDA-graph capture (a kernel first loaded while a stream is capturing
    is an error)."""
    step = tl.load(schedule_step_ptr).to(tl.int64)
    lr_now = read_table(lr_table_ptr, lr_table_len, step, lr)
    mom_now = read_table(mom_table_ptr, mom_table_len, step, mom)
    wd_now = read_table(wd_table_ptr, wd_table_len, step, wd)
    live = tl.load(found_inf_ptr) == 0.0  # C++: skip when *found_inf != 0.0f (NaN skips too)
    # GradScaler's float32 reciprocal of the scale, computed in double: float(1.0 / double(scale))
    inv_scale = (1.0 / tl.load(grad_scale_ptr).to(tl.float64)).to(tl.float32).to(T_DTYPE)
    clip_coef = tl.load(clip_coef_ptr).to(T_DTYPE)
    return lr_now, mom_now, wd_now, live, inv_scale, clip_coef
