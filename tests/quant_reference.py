"""An independent float64 reference of fusedopt's small-state formats, for the tests only.

Written from the definitions (fusedopt/quantization.py's module docstring and the papers), not from the library
code: the dynamic maps from bitsandbytes' formula in exact arithmetic, nearest-value quantization by a
brute-force argmin over the 256 values, one optimizer step of each rule on 8-bit states in float64, the random
bits of stochastic rounding one element at a time with Python integers.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import List, Tuple

import torch

BLOCK = 256


# ---------------------------------------------------------------------------------------------------------------
# The dynamic maps (bitsandbytes' create_dynamic_map, arXiv:1511.04561 / arXiv:2110.02861), exactly
# ---------------------------------------------------------------------------------------------------------------
def bnb_dynamic_map_exact(signed: bool) -> List[Fraction]:
    """The 256 values of create_dynamic_map(signed, max_exponent_bits=7, total_bits=8) in exact arithmetic (the
    library computes them in float32: linspace, midpoints, times 10**e), sorted."""
    values = [Fraction(0), Fraction(1)]
    for i in range(7):
        n = 2 ** i if signed else 2 ** (i + 1)  # fraction_items - 1
        scale = Fraction(10) ** (i - 6)
        for k in range(n):
            mean = Fraction(1, 10) + Fraction(9, 10) * (Fraction(2 * k + 1, 2 * n))  # midpoint of linspace(0.1, 1)
            values.append(scale * mean)
            if signed:
                values.append(-scale * mean)
    assert len(values) == 256
    return sorted(values)


# ---------------------------------------------------------------------------------------------------------------
# Quantization in float64 by brute force
# ---------------------------------------------------------------------------------------------------------------
def nearest_codes(q: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Index of the nearest qmap value to each q (float64 arithmetic on float32 inputs, so |q - v| is exact for
    the magnitudes involved), ties to the value of smaller magnitude; NaN / +-inf / |q| > 1 to the largest
    magnitude of q's sign (the unsigned map: q < 0 to 0)."""
    q64 = q.reshape(-1).to(torch.float64)
    m64 = qmap.to(torch.float64)
    # beyond +-1 the nearest value is the largest magnitude; clamping keeps |q - v| exact in float64
    finite = torch.nan_to_num(q64, nan=2.0, posinf=2.0, neginf=-2.0).clamp(-2.0, 2.0)
    dist = (finite[:, None] - m64[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    candidates = dist == best
    # among equally near values, the one of smaller magnitude
    magnitude = torch.where(candidates, m64.abs()[None, :], torch.full_like(dist, math.inf))
    codes = magnitude.argmin(dim=1)
    nan = torch.isnan(q64)
    if nan.any():  # NaN: the code of the largest magnitude of its sign bit
        negative = q.reshape(-1).view(torch.int32) < 0
        top = int(m64.abs().argmax())
        bottom = int(m64.argmin())
        codes = torch.where(nan, torch.where(negative, torch.full_like(codes, bottom), torch.full_like(codes, top)),
                            codes)
    return codes.view(q.shape)


def absmax_of_blocks(flat: torch.Tensor) -> torch.Tensor:
    n = flat.numel()
    nb = -(-n // BLOCK)
    padded = torch.zeros(nb * BLOCK, dtype=flat.dtype)
    padded[:n] = flat.abs()
    return padded.view(nb, BLOCK).amax(dim=1)


def quantize64(x: torch.Tensor, qmap: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blockwise quantization of float64 values: absmax per 256, codes of the nearest map value to x / absmax
    (computed in float64). Returns (codes int64, absmax float64)."""
    flat = x.reshape(-1).to(torch.float64)
    absmax = absmax_of_blocks(flat)
    scale = torch.repeat_interleave(absmax, BLOCK)[: flat.numel()]
    q = torch.where(scale > 0, flat / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(flat))
    # float64 q: nearest by brute force in float64
    m64 = qmap.to(torch.float64)
    dist = (q[:, None] - m64[None, :]).abs()
    codes = dist.argmin(dim=1)
    return codes.view(x.shape), absmax


def dequantize64(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(-1)
    scale = torch.repeat_interleave(absmax.to(torch.float64), BLOCK)[: flat.numel()]
    return (qmap.to(torch.float64)[flat.long()] * scale).view(codes.shape)


def half_gap_bound(q: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """For each q: half the distance between the two map values around it, the largest error a nearest-value
    quantizer may make there; outside [min(map), max(map)] (q = -1 in the signed map, which has no -1), the
    distance to the nearest end."""
    m64 = qmap.to(torch.float64)
    q64 = q.reshape(-1).to(torch.float64)
    inside = q64.clamp(float(m64[0]), float(m64[-1]))
    hi = torch.searchsorted(m64, inside).clamp(1, m64.numel() - 1)
    return torch.maximum((m64[hi] - m64[hi - 1]) / 2, (q64 - inside).abs()).view(q.shape)


# ---------------------------------------------------------------------------------------------------------------
# Stochastic rounding's random bits, one element at a time with Python integers
# ---------------------------------------------------------------------------------------------------------------
_M = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 (hash-prospector): x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15;
    x *= 0x846ca68b; x ^= x >> 16 (mod 2**32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M
    return x ^ (x >> 16)


def random_bits_reference(seed: int, step: int, stream: int, element: int) -> int:
    """The documented counter-based generator (state_codec.h rounding_key / random_bits)."""
    words = [seed & _M, (seed >> 32) & _M, step & _M, (step >> 32) & _M, stream & _M, (stream >> 32) & _M]
    h = lowbias32(words[0] ^ 0x9E3779B9)
    for w in words[1:]:
        h = lowbias32(h ^ w)
    k0, k1 = h, lowbias32(h ^ 0x85EBCA6B)
    return lowbias32(lowbias32((element & _M) ^ k0) ^ k1 ^ ((element >> 32) & _M))


def bf16_round_stochastic_reference(x: float, r: int) -> float:
    """float32 x -> bfloat16 away from zero iff the low 16 bits of x plus the low 16 bits of r carry (probability
    low16(x) / 2**16); as a Python float."""
    import struct

    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    if math.isnan(x):
        return math.nan
    out = ((bits + (r & 0xFFFF)) >> 16) << 16
    return struct.unpack("<f", struct.pack("<I", out & _M))[0]
