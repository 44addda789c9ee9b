"""Small optimizer state: how fusedopt stores optimizer states in bfloat16 or in 8 bits, and rounds stochastically.

This module holds the definition of the storage formats (the two 8-bit maps, exactly, as float32 values; the
block layout; the rounding rules) and the plain-torch quantizer / dequantizer used to convert checkpoints. The
kernels implement the same formats in csrc/fusedopt/state_codec.h (CPU and CUDA) and fusedopt/triton/_codec.py
(Triton); tests compare all of them with this module and with an independent float64 reference.

Design: state storage is a codec, orthogonal to the update rules
---------------------------------------------------------------
The per-element math of AdamW / Adam, SGD and Lion stays written once (csrc/fusedopt/rules.h, mirrored by the
Triton kernels). How a state element is *loaded* before the rule and *stored* after it is a separate piece, the
codec, which the loops are templated on (one loop per rule, not one per rule x precision):

  ``plain``   the state in a float dtype S (float32, float64, or the param dtype): load = widen, store =
              round-to-nearest-even. What fusedopt always did.
  ``bf16``    bfloat16 state: load = widen (exact), store = round to nearest even, or stochastic rounding.
  ``8bit``    blockwise dynamic quantization (below): a uint8 code per element and one float32 absmax per
              block of 256 elements.

The 8-bit codec needs the absmax of the *new* values of a block before it can encode any of them, so the loops
work one quantization block at a time: decode the block's codes to float32 -> rules.h update of each element
-> reduce the block's new absmax -> encode. CPU: a block is 256 contiguous elements of one tensor, decoded into
and encoded from a small buffer that stays in L1; CUDA: 64 threads x 4 elements, the absmax reduced through
shared memory between barriers (the reduction is part of the block bodies that tests/test_cuda_host.py
executes on the host); Triton: the BLOCK elements a program holds are reshaped to [BLOCK / 256, 256] and
reduced with tl.max over the quantization axis.

Blockwise 8-bit states (Dettmers et al.)
----------------------------------------
The scheme of "8-bit Optimizers via Block-wise Quantization" (Dettmers, Lewis, Shleifer, Zettlemoyer;
arXiv:2110.02861), as bitsandbytes' 8-bit optimizers and torchao's ``prototype.low_bit_optim`` implement it:

* A state tensor is cut into blocks of ``BLOCK_SIZE = 256`` consecutive elements (the last block may be
  shorter). Each block stores ``absmax`` (float32), the largest ``|x|`` of the block, and each element a uint8
  code: the index of the map value nearest to ``x / absmax`` (``x * (1 / absmax)``, see below); it decodes to
  ``map[code] * absmax``. Blocks never straddle tensors, nor the shards of a DTensor (blocks are per local
  shard), so every rank quantizes its own shard independently.
* The maps are the *dynamic tree quantization* of Dettmers ("8-Bit Approximations for Parallelism in Deep
  Learning", arXiv:1511.04561) in bitsandbytes' form (``bitsandbytes.functional.create_dynamic_map``, copied by
  torchao): per decade ``10**(i-6)``, ``i = 0..6``, the midpoints of an even split of ``[0.1, 1] * 10**(i-6)``
  into ``2**i`` (signed map) or ``2**(i+1)`` (unsigned map) parts, plus 0 and 1. The signed map (127 negative
  values, 0, 127 positive values, 1.0; 256 codes sorted by value, code 127 = 0) stores first moments and
  momentum (AdamW's / Adam's ``exp_avg``, Lion's ``exp_avg``, SGD's ``momentum_buffer``); the unsigned map
  (0, 254 values, 1.0) stores AdamW's / Adam's ``exp_avg_sq`` and ``max_exp_avg_sq``. The code order is
  bitsandbytes' (sorted by value).
* Exactly as float32: in decade slot ``d = i + 1`` the value of its ``k``-th entry is
  ``BASE[d] + (k + 0.5) * STEP[d]``, where ``BASE[d] = 0.1 * 10**(i-6)`` and ``STEP[d] = 0.9 * 10**(i-6) / count``
  are each rounded to 16 significant bits. With that rounding every map value, and every midpoint between two
  neighbours of one decade, is a float32 *exactly* (checked when the maps are built), so a code decodes with
  one multiply and one add, without any table, to the same float on every backend, and the encoder can compare
  against exact midpoints. The values differ from bitsandbytes' float32 table by less than 2e-5 relative
  (tests/test_quantization.py measures it).
* Normalisation: ``absmax`` is the largest ``|x|`` taken on the float32 bit patterns with the sign cleared
  (an integer max: exact, order-independent, and a NaN wins, so a NaN poisons its block instead of vanishing),
  and ``q = x * (1 / absmax)`` (one IEEE division per block, one multiply per element) when
  ``absmax >= 2**-126``; a block whose absmax is 0 or subnormal encodes every element as the code of 0 (it
  decodes to 0: an error below 1.2e-38).
* Encoding is the nearest map value to ``q``; a tie (``q`` exactly halfway between two map values) goes to the
  value of smaller magnitude. ``q`` is compared with the exact midpoints, so the code is a function of the
  float32 ``q`` alone and identical on every backend. ``|q| > 1`` (by the rounding of ``1 / absmax``), +inf
  and NaN encode as the largest magnitude of ``q``'s sign bit. A negative ``q`` in the unsigned map encodes as 0
  (its nearest value).
* Non-finite states (a run that has already diverged: inf / NaN grads without GradScaler): a NaN element makes
  its block's absmax NaN, so the whole block decodes to NaN. An infinite element makes the absmax +inf and
  ``1 / absmax`` 0: the block's finite elements encode as 0, and the infinite one as ``inf * 0`` = NaN, whose
  sign bit is the hardware's default NaN (negative on x86 CPUs, where +inf then decodes as -inf; positive on
  CUDA GPUs): such blocks are the one place the backends may store different codes.

The fast exact encoder
----------------------
A binary search over the 255 midpoints (8 dependent lookups) is far too slow for a CPU optimizer step, and
table lookups keyed by the float bits need gathers, which cost several ns per vector on x86. The encoder
instead uses the map's structure, with eight-entry tables that fit a vector register (one vpermps each):

1. the *catchment* ``d``: the map slot (0 = the zero value, 1..7 = the decades, 8 = the one value) whose values
   are nearest to ``|q|``, by integer comparisons of ``|q|``'s bits with the 8 midpoints between neighbouring
   slots (a three-level branch-free binary search, plus one comparison for the one value);
2. a candidate ``k0 = clamp(floor((|q| - BASE[d]) * (1 / STEP[d]) - 0.5), 0, count - 2)``: any rounding will do,
   since the result only has to be within 0.5 of the exact position for the true nearest entry to be k0 or
   k0 + 1;
3. one exact comparison of ``|q|`` with the midpoint ``BASE[d] + (k0 + 1) * STEP[d]`` (a float32, computed
   exactly) picks k0 or k0 + 1.

``tests/test_quantization.py`` proves it equal to the nearest-value search for every float32: both are step
functions of the bit pattern of ``q``, so they agree everywhere once they agree on both sides of every step of
either (the midpoints, the catchment boundaries and the steps of the candidate); the test enumerates those.

bfloat16 states and stochastic rounding
---------------------------------------
``state_precision="bf16"`` stores states as bfloat16 (math in float32). ``stochastic_rounding=True`` rounds
every bfloat16 value the kernels write (bf16 params without a float32 master copy, and bf16 states)
stochastically instead of to nearest, so that updates smaller than half a bf16 ulp are not lost on average
(torchao's ``bf16_stochastic_round``): with ``r`` 16 uniformly random bits, the float32 bit pattern ``b`` is
rounded to ``(b + r) & 0xFFFF0000``, i.e. away from zero with probability ``(b & 0xFFFF) / 65536`` (NaN and inf
stay what they are).

The random bits are a pure function of ``(seed, step, stream, element)``, a counter-based generator in the sense
of Salmon et al. ("Parallel Random Numbers: As Easy as 1, 2, 3", SC'11), built from 32-bit integer multiplies,
xors and shifts that the CPU, CUDA and Triton kernels compute identically (state_codec.h ``random_bits``):

* ``seed``: a 63-bit integer per optimizer, drawn from torch's default generator when the optimizer is
  constructed (so ``torch.manual_seed`` makes a run reproducible), kept in every param group as
  ``"rounding_seed"`` and saved in ``state_dict()``, so a resumed run continues the same stream;
* ``step``: the group's ``"rounding_step"`` counter, an int64 tensor on the params' device that the step
  advances on the device (like ``schedule_step``) and that does not advance on a step GradScaler skips: a
  captured CUDA graph reads fresh bits at every replay, and a resumed run the bits it would have read;
* ``stream``: ``4 * i + slot`` for the optimizer's ``i``-th param (its position in ``param_groups``, as in
  ``state_dict()``), ``slot`` 0 for the param and 1..3 for its states in the op's order: stable across backends;
* ``element``: the element's index in the *full* tensor: for a DTensor shard, its local index plus the
  shard's global offset (Shard(0), FSDP2's layout, where a shard is a contiguous slice of the full tensor), so
  an FSDP2 run rounds exactly as an unsharded one.

Layout in the optimizer state and in checkpoints
------------------------------------------------
An 8-bit state ``exp_avg`` is a uint8 tensor of the param's shape (the codes) plus ``exp_avg_absmax``, float32
of shape ``[ceil(numel / 256)]``; the same for every quantized state key. Tensors with fewer than
``MIN_QUANTIZED_NUMEL = 4096`` elements keep float32 states (both peers do: the absmax and the rounding cost
more than they save there). ``state_dict()`` saves codes and absmax as they are (a lossless round trip);
``state_dict(dequantize=True)`` saves float32 states under torch's keys, loadable by torch.optim; loading
float states into an 8-bit optimizer quantizes them with :func:`quantize_blockwise`, and loading 8-bit states
into a float optimizer dequantizes them.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Dict, List, Tuple

import torch

__all__ = [
    "BLOCK_SIZE",
    "MIN_QUANTIZED_NUMEL",
    "SIGNED_STATE_KEYS",
    "UNSIGNED_STATE_KEYS",
    "dynamic_map",
    "midpoints",
    "num_blocks",
    "is_quantized_size",
    "quantize_blockwise",
    "dequantize_blockwise",
    "encode",
    "codec_constants",
]

BLOCK_SIZE = 256
MIN_QUANTIZED_NUMEL = 4096
# Which map each state key uses: first moments / momentum are signed, second moments unsigned.
SIGNED_STATE_KEYS = ("exp_avg", "momentum_buffer")
UNSIGNED_STATE_KEYS = ("exp_avg_sq", "max_exp_avg_sq")

_DECADES = 7  # 10**-6 .. 10**0, bitsandbytes' max_exponent_bits = 7
_SIG_BITS = 16  # significant bits of BASE and STEP: the most that keeps every value and midpoint a float32
_SMALLEST_NORMAL = 2.0 ** -126


# ----------------------------------------------------------------------------------------------------------------
# Exact arithmetic on rationals (building the maps)
# ----------------------------------------------------------------------------------------------------------------
def _exponent(x: Fraction) -> int:
    """floor(log2(x)) for x > 0, exactly."""
    e = x.numerator.bit_length() - x.denominator.bit_length()
    if Fraction(2) ** e > x:
        e -= 1
    return e


def _round_significant(x: Fraction, bits: int) -> Fraction:
    """x rounded to `bits` significant bits, to nearest, ties to even (x > 0)."""
    scale = Fraction(2) ** (bits - 1 - _exponent(x))
    scaled = x * scale
    whole = scaled.numerator // scaled.denominator
    rest = scaled - whole
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and whole % 2 == 1):
        whole += 1
    return Fraction(whole) / scale


def _is_float32(x: Fraction) -> bool:
    """True when x is exactly a (normal or zero) float32."""
    if x == 0:
        return True
    x = abs(x)
    if x.denominator & (x.denominator - 1):  # not a dyadic rational
        return False
    e = _exponent(x)
    if not -126 <= e <= 127:
        return False
    m = x / Fraction(2) ** (e - 23)  # the 24-bit significand, an integer when x is a float32
    return m.denominator == 1


def _round_down_float32(x: Fraction) -> float:
    """The largest float32 <= x (x >= 0, x <= 2)."""
    if x == 0:
        return 0.0
    e = max(_exponent(x), -126)
    ulp = Fraction(2) ** (e - 23)
    return float((x // ulp) * ulp)  # exact in float64, and a float32


def _float32(x: Fraction) -> float:
    assert _is_float32(x), x
    return float(x)


# ----------------------------------------------------------------------------------------------------------------
# The maps
# ----------------------------------------------------------------------------------------------------------------
class _Slot:
    """One slot of a map: the zero value (slot 0), a decade (slots 1..7) or the one value (slot 8)."""

    def __init__(self, first: int, count: int, base: Fraction, step: Fraction):
        self.first = first  # magnitude index (see _magnitudes) of the slot's first value
        self.count = count
        self.base = base
        self.step = step

    def value(self, k: int) -> Fraction:
        return self.base + (k + Fraction(1, 2)) * self.step


@functools.lru_cache(maxsize=None)
def _slots(signed: bool) -> Tuple[_Slot, ...]:
    """The map's slots, sorted by value. Magnitude index: the signed map's |code - 127| (0..128), the unsigned
    map's code (0..255)."""
    slots = [_Slot(0, 1, Fraction(0), Fraction(0))]
    first = 1
    for i in range(_DECADES):
        decade = Fraction(10) ** (i - (_DECADES - 1))
        count = 2 ** i if signed else 2 ** (i + 1)
        base = _round_significant(decade / 10, _SIG_BITS)
        # the unsigned step is the signed one halved (exactly), so both maps share the rounding
        step = _round_significant(decade * 9 / 10 / 2 ** i, _SIG_BITS) / (1 if signed else 2)
        slot = _Slot(first, count, base, step)
        for k in range(count):
            assert _is_float32(slot.value(k)), (signed, i, k)
        for j in range(1, count):
            assert _is_float32(base + j * step), (signed, i, j)  # the midpoints the encoder compares with
        slots.append(slot)
        first += count
    slots.append(_Slot(first, 1, Fraction(1), Fraction(0)))  # the one value: base 1, step 0 -> value 1
    assert first == (128 if signed else 255)
    return tuple(slots)


@functools.lru_cache(maxsize=None)
def _magnitudes(signed: bool) -> Tuple[Fraction, ...]:
    """The sorted non-negative map values, indexed by magnitude index."""
    out: List[Fraction] = []
    for slot in _slots(signed):
        out += [slot.value(k) for k in range(slot.count)]
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _map_values(signed: bool) -> Tuple[float, ...]:
    mags = [_float32(v) for v in _magnitudes(signed)]
    if not signed:
        return tuple(mags)  # 256 values: 0, 254 decade values, 1
    neg = [-v for v in reversed(mags[1:128])]  # -w_127 .. -w_1 (no -1: bitsandbytes' map has none)
    return tuple(neg + mags)  # 127 + 129 = 256 values, code 127 = 0


def dynamic_map(signed: bool, device=None) -> torch.Tensor:
    """The 256 float32 values of the signed (first moments) or unsigned (second moments) dynamic map, sorted;
    ``code -> value``. bitsandbytes' ``create_dynamic_map(signed)`` up to the 16-significant-bit rounding of
    each decade's offset and spacing described in the module docstring."""
    return torch.tensor(_map_values(signed), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _thresholds(signed: bool) -> Tuple[float, ...]:
    """For magnitude index n >= 1, the largest float32 <= the midpoint between magnitudes n - 1 and n: a
    non-negative float32 a is strictly nearer to magnitude n than to n - 1 iff a > this."""
    mags = _magnitudes(signed)
    return tuple(_round_down_float32((mags[n - 1] + mags[n]) / 2) for n in range(1, len(mags)))


def midpoints(signed: bool) -> torch.Tensor:
    """The float32 decision thresholds of the encoder, one per pair of neighbouring magnitudes: a float32
    magnitude ``a`` encodes as magnitude index ``#{t in midpoints : a > t}`` (ties go to the smaller
    magnitude). Each is the largest float32 not above the exact midpoint, so ``a > t`` iff ``a`` is above the
    exact midpoint."""
    return torch.tensor(_thresholds(signed), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Block layout
# ----------------------------------------------------------------------------------------------------------------
def num_blocks(numel: int) -> int:
    """Quantization blocks of a tensor (or local shard) of `numel` elements: ceil(numel / 256)."""
    return -(-int(numel) // BLOCK_SIZE)


def is_quantized_size(numel: int) -> bool:
    """Whether an 8-bit optimizer quantizes the states of a tensor of `numel` elements (else float32 states)."""
    return int(numel) >= MIN_QUANTIZED_NUMEL


# ----------------------------------------------------------------------------------------------------------------
# Plain-torch quantizer (checkpoint conversion) -- exactly the kernels' encoding
# ----------------------------------------------------------------------------------------------------------------
def _block_view(flat: torch.Tensor) -> torch.Tensor:
    """flat (n,) -> (num_blocks, 256), zero-padded at the end (zeros change no absmax)."""
    n = flat.numel()
    pad = num_blocks(n) * BLOCK_SIZE - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK_SIZE)


def _abs_bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32) & 0x7FFFFFFF


def quantize_blockwise(x: torch.Tensor, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float tensor to 8-bit codes with one absmax per 256-element block (module docstring).

    Args:
        x: a floating tensor of any shape (converted to float32 first; its elements are taken in row-major
            order, the order of a contiguous tensor: pass a contiguous tensor, or the codes will not line up
            with a kernel walking the tensor's memory).
        signed: True for the signed map (first moments, momentum), False for the unsigned map (second moments).

    Returns:
        ``(codes, absmax)``: uint8 codes of ``x``'s shape, and float32 absmax of shape ``[ceil(numel / 256)]``,
        on ``x``'s device. Bit for bit what the kernels store for the same float32 values.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize_blockwise: x must be a floating tensor, got {x.dtype}")
    flat = x.detach().reshape(-1).to(torch.float32)
    blocks = _block_view(flat)
    absmax = _abs_bits(blocks).amax(dim=1).view(torch.float32) if blocks.numel() else blocks.new_zeros(0)
    ones = torch.ones_like(absmax)
    inv = torch.where(absmax >= _SMALLEST_NORMAL, ones / absmax, torch.zeros_like(absmax))  # NaN >= .. is False
    q = (blocks * inv[:, None]).reshape(-1)[: flat.numel()]
    codes = encode(q, signed)
    return codes.view(x.shape), absmax


def encode(q: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 codes of normalized float32 values q (``x * (1 / absmax)``): the nearest map value, ties to the
    smaller magnitude; NaN, +inf and ``|q| > 1`` to the largest magnitude of q's sign (the unsigned map: 0 for
    q < 0). The definition every kernel's encoder is tested against."""
    q = q.to(torch.float32).contiguous()
    thresholds = midpoints(signed).to(q.device).view(torch.int32)
    count = torch.searchsorted(thresholds, _abs_bits(q).contiguous(), right=False)  # #{t < |q|}, on the bits
    negative = q.view(torch.int32) < 0
    if signed:
        codes = torch.where(negative, 127 - count.clamp(max=127), 127 + count)
    else:
        codes = torch.where(negative, torch.zeros_like(count), count)
    return codes.to(torch.uint8)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """float32 values of 8-bit codes: ``map[code] * absmax[block]`` (the kernels' decoding, bit for bit).

    Args:
        codes: uint8, any shape, blocks of 256 in row-major order.
        absmax: float32, ``[ceil(codes.numel() / 256)]``.
        signed: the map the codes index.

    Raises:
        ValueError: when dtypes or the number of blocks do not match.
    """
    if codes.dtype != torch.uint8:
        raise ValueError(f"dequantize_blockwise: codes must be uint8, got {codes.dtype}")
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() != num_blocks(codes.numel()):
        raise ValueError(f"dequantize_blockwise: absmax must be float32 of shape [{num_blocks(codes.numel())}] "
                         f"for {codes.numel()} codes, got {absmax.dtype} {tuple(absmax.shape)}")
    values = dynamic_map(signed, device=codes.device)[codes.reshape(-1).long()]
    blocks = _block_view(values)
    return (blocks * absmax.to(codes.device)[:, None]).reshape(-1)[: codes.numel()].view(codes.shape)


# ----------------------------------------------------------------------------------------------------------------
# The encoder's constants (csrc/fusedopt/state_codec.h holds the same numbers; a test compares them)
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _constants(signed: bool) -> Dict[str, Tuple]:
    slots = _slots(signed)
    decades = slots[:8]  # slots 0..7; the one value is handled by its catchment threshold alone
    thresholds = _thresholds(signed)
    inf = float("inf")
    return dict(
        # decode: value = BASE + (k + 0.5) * STEP, k = magnitude index - FIRST
        base=tuple(_float32(s.base) for s in decades),
        step=tuple(_float32(s.step) for s in decades),
        first=tuple(float(s.first) for s in decades),
        # encode: candidate, then one exact comparison with MIDBASE + (k0 + 1) * STEP (+inf: never above)
        recip=tuple(_float32(_round_significant(1 / s.step, 24)) if s.step else 0.0 for s in decades),
        kmax=tuple(float(max(s.count - 2, 0)) for s in decades),
        midbase=tuple(_float32(s.base) if s.count >= 2 else inf for s in decades),
        # catchment k (1..8) starts above the threshold between slot k - 1's last and slot k's first value
        catchment=tuple(thresholds[slots[k].first - 1] for k in range(1, 9)),
        one=(128.0 if signed else 255.0,),
    )


def codec_constants(signed: bool) -> Dict[str, Tuple]:
    """The per-slot tables of the decoder and the fast encoder (module docstring), as Python floats:
    ``base``, ``step``, ``first``, ``recip``, ``kmax``, ``midbase`` (8 entries each, slot 0 = zero, 1..7 =
    decades), ``catchment`` (the 8 float32 thresholds between neighbouring slots) and ``one`` (the one
    value's magnitude index)."""
    return dict(_constants(signed))
