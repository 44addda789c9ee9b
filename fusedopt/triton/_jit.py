"""Device-side helpers shared by the three Triton kernels: the Triton spelling of csrc/fusedopt/rules.h and
csrc/fusedopt/schedule.h (everything that is not one rule's own per-element update).

Numerics, so that results are bit-identical to the C++ kernels (which compile rules.h with -ffp-contract=off):
  * float32 division and square root use tl.div_rn / tl.sqrt_rn (IEEE round-to-nearest, like the C++ '/' and
    std::sqrt / sqrtf); Triton's plain '/' and tl.sqrt are approximate for float32. For float64 the plain
    operators already lower to div.rn.f64 / sqrt.rn.f64 (and tl.div_rn / tl.sqrt_rn only accept float32).
  * the launcher compiles with enable_fp_fusion=False, so no a*b+c is contracted into an FMA; the rules fuse
    exactly where rules.h calls fma_host_device, through fma() below (tl.fma: fma.rn). The interpreter's
    tl.fma rounds twice (numpy's a * b + c), so under the interpreter fma() computes the fused result exactly
    in numpy with error-free transformations instead.
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
# F_TENSOR's grad; F_TENSOR also indexes the step table (AdamW). Small state (_codec.py): F_ABSMAX0..2 the
# addresses of the 8-bit states' absmax entries of the row's first block; F_ELEMENT the index in the full tensor
# of the row's first element and F_STREAM 4 * the param's index (the stochastic-rounding stream).
F_PARAM = tl.constexpr(0)
F_GRAD_OFFSET = tl.constexpr(1)
F_STATE0 = tl.constexpr(2)
F_STATE1 = tl.constexpr(3)
F_STATE2 = tl.constexpr(4)
F_MASTER = tl.constexpr(5)
F_TENSOR = tl.constexpr(6)
F_NUMEL = tl.constexpr(7)
F_ABSMAX0 = tl.constexpr(8)
F_ABSMAX1 = tl.constexpr(9)
F_ABSMAX2 = tl.constexpr(10)
F_ELEMENT = tl.constexpr(11)
F_STREAM = tl.constexpr(12)
ROW = tl.constexpr(16)


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
    """multi_tensor_cpu.h load_param(): the param as the update sees it, from its float32 master copy if any
    (S_DTYPE: the master copy's dtype, float32)."""
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


def _fma_exact_numpy(x, y, z):
    """x * y + z with one rounding, for numpy arrays of one float dtype (float32 or float64), from operations
    that each round once. float32: x * y is exact in float64, and the float64 sum rounded to odd rounds
    correctly to float32. float64 (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums: proved
    algorithms using rounding to odd", IEEE TC 2008): x * y = uh + ul exactly (Dekker's product with
    Veltkamp's split), z + uh = th + tl exactly (TwoSum), result = RN(th + RO(tl + ul)). Exact unless a
    float64 product underflows (|x * y| < 2^-969) or |x|, |y| exceed 2^995, far outside an optimizer's
    values; non-finite results are x * y + z."""
    import numpy as np

    def two_sum_error(a, b, s):
        bb = s - a
        return (a - (s - bb)) + (b - bb)

    def round_to_odd(s, err):  # s + err exact; s stays where exact or odd, else moves one ulp towards err
        bits = s.view(np.int64)
        moved = (bits + np.where((err > 0) == (s > 0), 1, -1).astype(np.int64)).view(np.float64)
        return np.where((err != 0) & (err == err) & ((bits & 1) == 0), moved, s)

    with np.errstate(all="ignore"):
        if z.dtype == np.float64:
            x, y, z = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (x, y, z)))
            split = 134217729.0  # 2^27 + 1
            tx = x * split
            xh = tx - (tx - x)
            xl = x - xh
            ty = y * split
            yh = ty - (ty - y)
            yl = y - yh
            uh = x * y
            ul = ((xh * yh - uh) + xh * yl + xl * yh) + xl * yl
            th = z + uh
            tl_ = two_sum_error(z, uh, th)
            v = tl_ + ul
            v = round_to_odd(v, two_sum_error(tl_, ul, v))
            r = th + v
            return np.where(np.isfinite(r), r, x * y + z)
        x64, y64, z64 = (np.asarray(v).astype(np.float64) for v in (x, y, z))
        ab = x64 * y64
        s = ab + z64
        return round_to_odd(np.asarray(s, dtype=np.float64), two_sum_error(ab, z64, s)).astype(np.float32)


if _INTERPRET:
    def fma(a, b, c):
        """schedule.h fma_host_device(): a * b + c rounded once (a, b, c of one float dtype). The interpreter's
        tl.fma rounds twice (numpy's a * b + c), so this computes the fused result exactly in numpy on the
        interpreter's tensors (a plain function: the interpreter runs kernels as Python)."""
        from triton.runtime.interpreter import TensorHandle

        out = _fma_exact_numpy(a.handle.data, b.handle.data, c.handle.data)
        result = max((a, b, c), key=lambda t: len(t.shape))  # the block operand (or a scalar) gives the type
        return tl.core.tensor(TensorHandle(out.reshape(result.handle.data.shape), c.handle.dtype.scalar),
                              result.type)
else:
    @triton.jit
    def fma(a, b, c):
        """schedule.h fma_host_device(): a * b + c rounded once (fma.rn), of one float dtype."""
        return tl.fma(a, b, c)


@device_function
def _dd_mul(ah, al, bh, bl):
    """rules.h dd_mul(): (ah + al) * (bh + bl) in double-double arithmetic."""
    p = ah * bh
    e = fma(ah, bh, -p)
    e = e + (ah * bl + al * bh)
    hi = p + e
    return hi, e - (hi - p)


@device_function
def power2(base_a, base_b, exponent):
    """(power(base_a, exponent), power(base_b, exponent)) with rules.h power(): exponentiation by squaring in
    double-double arithmetic, each result through exactly the operations of power() (the squarings after the
    last used one change nothing); the two share the loop control (half the work under the interpreter)."""
    zero = tl.full((), 0.0, tl.float64)
    ra_h = tl.full((), 1.0, tl.float64)
    rb_h = tl.full((), 1.0, tl.float64)
    ra_l, rb_l, ba_l, bb_l = zero, zero, zero, zero
    ba_h, bb_h = base_a, base_b
    e = exponent.to(tl.int64)
    while e > 0:
        odd = (e & 1) != 0
        na_h, na_l = _dd_mul(ra_h, ra_l, ba_h, ba_l)
        nb_h, nb_l = _dd_mul(rb_h, rb_l, bb_h, bb_l)
        ra_h = tl.where(odd, na_h, ra_h)
        ra_l = tl.where(odd, na_l, ra_l)
        rb_h = tl.where(odd, nb_h, rb_h)
        rb_l = tl.where(odd, nb_l, rb_l)
        ba_h, ba_l = _dd_mul(ba_h, ba_l, ba_h, ba_l)
        bb_h, bb_l = _dd_mul(bb_h, bb_l, bb_h, bb_l)
        e = e >> 1
    return ra_h, rb_h


@device_function
def lerp(self, end, weight):
    """rules.h lerp() (torch's two-formula lerp, each a fused multiply-add); weight is a scalar of the math
    type."""
    small = (weight < 0.5) & (weight > -0.5)
    diff = end - self
    return tl.where(small, fma(weight, diff, self), fma(-diff, 1.0 - weight, end))


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
