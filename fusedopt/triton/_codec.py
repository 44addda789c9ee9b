"""The small-state codec in Triton: csrc/fusedopt/state_codec.h, operation for operation, and the state slots the
three kernels load and store through (csrc/cpu/state_io.h's PlainSlot / Bf16SrSlot / Q8Slot and SrParam).

The formats are defined in fusedopt/quantization.py (module docstring). Every helper here uses only float32
add / multiply / compare / floor / IEEE division and 32-bit integer operations, in the order state_codec.h uses
them, so compiled kernels, the interpreter and the C++ kernels store the same bits:

  decode_8bit     the arithmetic decoder (no table of values): the code's slot from the exponent of a small
                  float, then base + (k + 0.5) * step, all exact
  encode_8bit     the exact catchment encoder: the slot by integer compares of |q|'s bits, a candidate entry,
                  one exact comparison with a midpoint
  block_absmax    the largest |x| of each 256-element block as an integer max of the sign-cleared float32 bits
                  (tl.max over a [BLOCK // 256, 256] reshape: BLOCK is a multiple of 256 and every block of
                  elements the kernels hold starts at a multiple of 256 within its tensor, so these are the
                  format's blocks)
  inverse_absmax  1 / absmax (IEEE), or 0 for a zero / subnormal / NaN absmax
  bf16_round_*    to nearest even (c10::BFloat16) and stochastic (torchao's bf16_stochastic_round)
  mix32 / rounding_key / random_bits
                  the counter-based random bits of stochastic rounding, in uint32 arithmetic (Triton's uint32
                  multiply wraps like C's; >> on uint32 is a logical shift)

The per-slot tables of the two maps (8 float32 entries per field: table_values(), from fusedopt.quantization's
codec_constants, the generator of state_codec.h's tables, which tests/test_cuda_host.py checks equal) are a
384-byte float32 tensor per device (launcher.py) read with one gather per field, as the CUDA kernels read theirs
from global memory: the lanes of a warp read different slots (constant memory would serialize them), and the
table stays in L1.

Formats of a launch (constexprs; the launcher groups a call's tensors by format, all states of one tensor share
one): FMT_PLAIN (a float dtype S_DTYPE, stored to nearest even), FMT_BF16_SR (bfloat16 rounded stochastically),
FMT_8BIT (uint8 codes + one float32 absmax per 256-element block; the signed or unsigned map by the state's
role, which the rule passes). The param is stored to nearest, or with PARAM_SR stochastically.
"""

import struct

import triton.language as tl

from fusedopt import quantization as Q
from fusedopt.triton import _jit as J

FMT_PLAIN = tl.constexpr(0)
FMT_BF16_SR = tl.constexpr(1)
FMT_8BIT = tl.constexpr(2)
QBLOCK = tl.constexpr(Q.BLOCK_SIZE)


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def table_values():
    """The kernels' constants table: for the signed map (offset 0) then the unsigned map (offset 48), the fields
    base, step, first, recip, kmax, midbase (8 float32 values each, slot 0..7)."""
    out = []
    for signed in (True, False):
        c = Q.codec_constants(signed)
        for field in ("base", "step", "first", "recip", "kmax", "midbase"):
            out += [float(v) for v in c[field]]
    return out


_BASE, _STEP, _FIRST, _RECIP, _KMAX, _MIDBASE = (tl.constexpr(i) for i in range(6))
_MAP_STRIDE = tl.constexpr(48)
_S_CATCH = tl.constexpr(tuple(_bits(v) for v in Q.codec_constants(True)["catchment"]))
_U_CATCH = tl.constexpr(tuple(_bits(v) for v in Q.codec_constants(False)["catchment"]))
# state_codec.h MapConstants::slot_offset / slot_bias: the exponent of float(m + offset) + bias is the slot of
# magnitude index m (signed map: m + 0.5, slot = floor(log2 m) + 1; unsigned map: m + 1.5, slot = floor(log2(m + 1)))
_S_SLOT_OFFSET, _S_SLOT_BIAS = tl.constexpr(0.5), tl.constexpr(1)
_U_SLOT_OFFSET, _U_SLOT_BIAS = tl.constexpr(1.5), tl.constexpr(0)
_SMALLEST_NORMAL = tl.constexpr(2.0 ** -126)


# ------------------------------------------------------------------------------------------------------------
# Per-slot tables
# ------------------------------------------------------------------------------------------------------------
@J.device_function
def _slot_field(table, slot, SIGNED: tl.constexpr, FIELD: tl.constexpr):
    """MapConstants::<field>[slot] of the signed or unsigned map (float32; slot an int32 tensor in 0..7)."""
    o: tl.constexpr = FIELD * 8 + (0 if SIGNED else _MAP_STRIDE)
    return tl.load(table + o + slot)


# ------------------------------------------------------------------------------------------------------------
# 8-bit
# ------------------------------------------------------------------------------------------------------------
@J.device_function
def decode_8bit(code, table, SIGNED: tl.constexpr):
    """state_codec.h decode_8bit: the map value (float32, in [-1, 1]) of int32 codes 0..255 (table: the
    constants table, a float32 pointer)."""
    if SIGNED:
        t = code - 127
        f = tl.abs(t).to(tl.float32)
        e = f + _S_SLOT_OFFSET
        slot = ((e.to(tl.int32, bitcast=True) >> 23) - 127 + _S_SLOT_BIAS) & 7
    else:
        t = code
        f = code.to(tl.float32)
        e = f + _U_SLOT_OFFSET
        slot = ((e.to(tl.int32, bitcast=True) >> 23) - 127 + _U_SLOT_BIAS) & 7
    k_half = f - _slot_field(table, slot, SIGNED, _FIRST) + 0.5  # k + 0.5, exact
    v = k_half * _slot_field(table, slot, SIGNED, _STEP) + _slot_field(table, slot, SIGNED, _BASE)  # exact
    v = tl.where(code == 255, 1.0, v)
    return tl.where(t < 0, -v, v)


@J.device_function
def encode_8bit(q, table, SIGNED: tl.constexpr):
    """state_codec.h encode_8bit: int32 codes of normalized float32 values q (x * inverse_absmax): the nearest
    map value, ties to the smaller magnitude; NaN, inf and |q| > 1 to the largest magnitude of q's sign (the
    unsigned map: q < 0 to 0)."""
    bits = q.to(tl.int32, bitcast=True)
    abs_bits = bits & 0x7FFFFFFF  # <= 0x7FFFFFFF: signed integer compares are the unsigned ones
    a = abs_bits.to(tl.float32, bitcast=True)
    if SIGNED:
        slot = ((abs_bits > _S_CATCH[0]).to(tl.int32) + (abs_bits > _S_CATCH[1]).to(tl.int32)
                + (abs_bits > _S_CATCH[2]).to(tl.int32) + (abs_bits > _S_CATCH[3]).to(tl.int32)
                + (abs_bits > _S_CATCH[4]).to(tl.int32) + (abs_bits > _S_CATCH[5]).to(tl.int32)
                + (abs_bits > _S_CATCH[6]).to(tl.int32))
        one = abs_bits > _S_CATCH[7]
        top = 128.0
    else:
        slot = ((abs_bits > _U_CATCH[0]).to(tl.int32) + (abs_bits > _U_CATCH[1]).to(tl.int32)
                + (abs_bits > _U_CATCH[2]).to(tl.int32) + (abs_bits > _U_CATCH[3]).to(tl.int32)
                + (abs_bits > _U_CATCH[4]).to(tl.int32) + (abs_bits > _U_CATCH[5]).to(tl.int32)
                + (abs_bits > _U_CATCH[6]).to(tl.int32))
        one = abs_bits > _U_CATCH[7]
        top = 255.0
    # candidate k0 within 0.5 of the exact position, clamped to [0, count - 2]
    k0 = tl.floor((a - _slot_field(table, slot, SIGNED, _BASE)) * _slot_field(table, slot, SIGNED, _RECIP) - 0.5)
    kmax = _slot_field(table, slot, SIGNED, _KMAX)
    k0 = tl.where(k0 > kmax, kmax, k0)
    k0 = tl.where(k0 < 0.0, 0.0, k0)  # (a NaN here only happens with `one` set, which overrides it)
    mid = (k0 + 1.0) * _slot_field(table, slot, SIGNED, _STEP) + _slot_field(table, slot, SIGNED, _MIDBASE)
    up = tl.where(a > mid, 1.0, 0.0)
    m = tl.where(one, top, _slot_field(table, slot, SIGNED, _FIRST) + k0 + up).to(tl.int32)
    negative = bits < 0
    if SIGNED:
        code = tl.where(negative, 127 - tl.minimum(m, 127), 127 + m)  # no -1 in the map
    else:
        code = tl.where(negative, 0, m)  # the unsigned map's nearest value to q < 0 is 0
    return code


@J.device_function
def block_absmax(x, mask, BLOCK: tl.constexpr):
    """The absmax (float32, [BLOCK // 256]) of each 256-element block of x ([BLOCK] float32): the integer max of
    the bit patterns with the sign cleared (exact, order-independent, a NaN wins). Masked-off elements count
    as 0."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if mask is not None:
        bits = tl.where(mask, bits, 0)
    top = tl.max(tl.reshape(bits, (BLOCK // QBLOCK, QBLOCK)), axis=1)
    return top.to(tl.float32, bitcast=True)


@J.device_function
def inverse_absmax(absmax):
    """state_codec.h inverse_absmax: 1 / absmax (IEEE), or 0 when absmax is 0, subnormal or NaN (the division
    of the lanes not selected is by 1, which keeps the interpreter's numpy from warning)."""
    normal = absmax >= _SMALLEST_NORMAL
    one = tl.full(absmax.shape, 1.0, tl.float32)
    return tl.where(normal, tl.div_rn(one, tl.where(normal, absmax, one)), 0.0)


# ------------------------------------------------------------------------------------------------------------
# bfloat16 and the random bits
# ------------------------------------------------------------------------------------------------------------
@J.device_function
def bf16_round_nearest(x):
    """state_codec.h bf16_round_nearest: float32 -> bfloat16 bits (uint16), to nearest even; NaN -> 0x7FC0."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@J.device_function
def bf16_round_stochastic(x, r):
    """state_codec.h bf16_round_stochastic: float32 -> bfloat16 bits (uint16), away from zero with probability
    (low 16 bits of x) / 65536 given uint32 random bits r (their low 16 bits); NaN -> 0x7FC0."""
    rounded = (x.to(tl.uint32, bitcast=True) + (r & 0xFFFF)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@J.device_function
def mix32(x):
    """state_codec.h mix32 (Wellons' lowbias32) on uint32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@J.device_function
def rounding_key(seed, step, stream):
    """state_codec.h rounding_key: the (k0, k1) uint32 pair of (seed, step, stream), int64 scalars. The high
    words come from arithmetic shifts of int64, whose low 32 bits are the logical shift's."""
    h = mix32(seed.to(tl.uint32) ^ 0x9E3779B9)
    h = mix32(h ^ (seed >> 32).to(tl.uint32))
    h = mix32(h ^ step.to(tl.uint32))
    h = mix32(h ^ (step >> 32).to(tl.uint32))
    h = mix32(h ^ stream.to(tl.uint32))
    h = mix32(h ^ (stream >> 32).to(tl.uint32))
    return h, mix32(h ^ 0x85EBCA6B)


@J.device_function
def random_bits(seed, step, stream, element):
    """state_codec.h random_bits: 32 random bits (uint32) for each int64 element index of the stream."""
    k0, k1 = rounding_key(seed, step, stream)
    lo = element.to(tl.uint32)
    hi = (element >> 32).to(tl.uint32)
    return mix32(mix32(lo ^ k0) ^ (k1 ^ hi))


# ------------------------------------------------------------------------------------------------------------
# State slots: how the kernels load a state before the rule and store it after (csrc/cpu/state_io.h)
# ------------------------------------------------------------------------------------------------------------
@J.device_function
def load_state(addr, absmax_addr, table, offs, mask, FORMAT: tl.constexpr, S_DTYPE: tl.constexpr,
               T_DTYPE: tl.constexpr, SIGNED: tl.constexpr, ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr):
    """A state's elements in the math type. 8-bit: map value * the block's absmax (offs are relative to the
    row, which starts at a block boundary, so offs // 256 is the block within the row's absmax; table: the
    codec's constants). mask None: a full block."""
    if FORMAT == FMT_8BIT:
        ptrs = J.typed_ptr(addr, tl.uint8, ALIGNED) + offs
        scales = absmax_addr.to(tl.pointer_type(tl.float32)) + offs // QBLOCK
        if mask is None:
            codes = tl.load(ptrs)
            scale = tl.load(scales)
        else:
            codes = tl.load(ptrs, mask=mask, other=0)
            scale = tl.load(scales, mask=mask, other=0.0)
        x = (decode_8bit(codes.to(tl.int32), table, SIGNED) * scale).to(T_DTYPE)
    elif FORMAT == FMT_BF16_SR:
        x = J.load_elems(addr, offs, mask, tl.bfloat16, T_DTYPE, ALIGNED, SOFT_BF16)
    else:
        x = J.load_elems(addr, offs, mask, S_DTYPE, T_DTYPE, ALIGNED, SOFT_BF16)
    return x


@J.device_function
def store_bf16_bits(addr, offs, bits, mask, ALIGNED: tl.constexpr):
    ptrs = J.typed_ptr(addr, tl.uint16, ALIGNED) + offs
    if mask is None:
        tl.store(ptrs, bits)
    else:
        tl.store(ptrs, bits, mask=mask)


@J.device_function
def store_state(addr, absmax_addr, table, start, offs, x, mask, seed, rstep, stream, element0,
                FORMAT: tl.constexpr, S_DTYPE: tl.constexpr, SIGNED: tl.constexpr, SLOT: tl.constexpr,
                ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """Stores a state's new values. 8-bit (state_io.h Q8Slot::end_block): each block's new absmax, then the
    codes of x * inverse_absmax; the absmax of every block holding a live element. bfloat16 rounded
    stochastically: the bits of stream `stream + SLOT` (seed, rounding step rstep) at element index
    element0 + offs. Else to nearest even in S_DTYPE."""
    if FORMAT == FMT_8BIT:
        xf = x.to(tl.float32)
        absmax = block_absmax(xf, mask, BLOCK)
        inv = inverse_absmax(absmax)
        q = tl.reshape(tl.reshape(xf, (BLOCK // QBLOCK, QBLOCK)) * inv[:, None], (BLOCK,))
        codes = encode_8bit(q, table, SIGNED).to(tl.uint8)
        ptrs = J.typed_ptr(addr, tl.uint8, ALIGNED) + offs
        blocks = start // QBLOCK + tl.arange(0, BLOCK // QBLOCK)
        absmax_ptrs = absmax_addr.to(tl.pointer_type(tl.float32)) + blocks
        if mask is None:
            tl.store(ptrs, codes)
            tl.store(absmax_ptrs, absmax)
        else:
            tl.store(ptrs, codes, mask=mask)
            live = tl.max(tl.reshape(mask.to(tl.int32), (BLOCK // QBLOCK, QBLOCK)), axis=1) != 0
            tl.store(absmax_ptrs, absmax, mask=live)
    elif FORMAT == FMT_BF16_SR:
        r = random_bits(seed, rstep, stream + SLOT, element0 + offs.to(tl.int64))
        store_bf16_bits(addr, offs, bf16_round_stochastic(x.to(tl.float32), r), mask, ALIGNED)
    else:
        J.store_elems(addr, offs, x, mask, S_DTYPE, ALIGNED, SOFT_BF16)


@J.device_function
def store_param(p_addr, master_addr, offs, p, mask, seed, rstep, stream, element0, P_DTYPE: tl.constexpr,
                HAS_MASTER: tl.constexpr, PARAM_SR: tl.constexpr, ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr):
    """multi_tensor_cpu.h store_param() / state_io.h SrParam: to the float32 master copy and (rounded to
    nearest) the param; or a bfloat16 param without one rounded stochastically with stream slot 0."""
    if PARAM_SR:
        r = random_bits(seed, rstep, stream, element0 + offs.to(tl.int64))
        store_bf16_bits(p_addr, offs, bf16_round_stochastic(p.to(tl.float32), r), mask, ALIGNED)
    else:
        J.store_param(p_addr, master_addr, offs, p, mask, P_DTYPE, tl.float32, HAS_MASTER, ALIGNED, SOFT_BF16)


@J.device_function
def rounding_stream(row, rounding_step_ptr, ON: tl.constexpr):
    """(rounding step, stream base = 4 * param index, index in the full tensor of the row's first element) for
    a row whose stores round stochastically (ON); zeros otherwise (nothing reads them then)."""
    if ON:
        rstep = tl.load(rounding_step_ptr).to(tl.int64)
        stream = tl.load(row + J.F_STREAM)
        element0 = tl.load(row + J.F_ELEMENT)
    else:
        rstep = tl.full((), 0, tl.int64)
        stream = tl.full((), 0, tl.int64)
        element0 = tl.full((), 0, tl.int64)
    return rstep, stream, element0
