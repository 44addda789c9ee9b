"""The 8-bit state format (fusedopt/quantization.py) against an independent definition, and the proof that the
fast encoders are exact.

* The maps are bitsandbytes' create_dynamic_map (computed here in exact arithmetic, tests/quant_reference.py)
  up to the documented 16-significant-bit rounding of each decade's offset and spacing: measured relative
  difference below 2e-5 (bound asserted: 2**-15 = 3.1e-5, the worst case of two 2**-17 roundings over a
  0.1 + 0.9 x split). Every value and every in-decade midpoint is a float32 exactly.
* The plain-torch quantizer (the definition the kernels are compared with) equals a brute-force float64 argmin
  over the 256 values, ties to the smaller magnitude, on every breakpoint of both (below) and 40k random values.
* The fast encoders (state_codec.h's scalar one, the CPU kernels' vectorized one, the Triton one) equal that
  definition for every float32. Proof by enumeration: each encoder is a step function of the bit pattern of
  |q| whose steps can only be at (a) the catchment thresholds, (b) the exact midpoints (the definition's only
  steps), (c) where its candidate floor((|q| - base) * (1 / step) - 0.5) reaches a new integer (enumerated by
  bisection: the expression is monotone in |q|, each operation being an IEEE-rounded monotone function).
  Between consecutive breakpoints both sides are constant, so agreement on both sides of every breakpoint is
  agreement everywhere; `breakpoints()` lists them (~1,400 bit patterns per map, signs and specials added).
* Blockwise round trip: each element's error is at most half the gap between the two map values around it,
  times the block's absmax (plus one float32 rounding of the decode's multiply).

Runs in about 2 s (no compiled code). The kernels' encoders are checked elsewhere: the CPU kernels' (AVX2) and the
Triton codec's against the plain-torch quantizer on float32 bit patterns in tests/test_small_state.py; the CUDA
block bodies (state_codec.h's scalar encoder) bit for bit against the CPU kernel in tests/test_cuda_host.py.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import quant_reference as R
from fusedopt import quantization as Q


# ----------------------------------------------------------------------------------------------------------------
# The maps
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_bitsandbytes_dynamic_maps(signed):
    ours = Q.dynamic_map(signed)
    exact = R.bnb_dynamic_map_exact(signed)
    assert ours.dtype == torch.float32 and ours.numel() == 256
    assert bool((ours[1:] > ours[:-1]).all()), "sorted, distinct"
    worst = max(abs(Fraction(float(v)) - e) / abs(e) for v, e in zip(ours.tolist(), exact) if e != 0)
    assert worst < Fraction(1, 2 ** 15), float(worst)
    assert all(float(v) == float(e) for v, e in zip(ours.tolist(), exact) if e in (0, 1))  # 0 and 1 are exact
    if signed:
        assert ours[127] == 0 and ours[255] == 1 and ours[0] > -1  # bitsandbytes' signed map has no -1
    else:
        assert ours[0] == 0 and ours[255] == 1


@pytest.mark.parametrize("signed", [True, False])
def test_maps_match_installed_bitsandbytes(signed):
    """Against bitsandbytes' own float32 table, when the peer is installed (it is not a test dependency)."""
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed (optional peer)")
    theirs = bnb.create_dynamic_map(signed=signed).to(torch.float64)
    ours = Q.dynamic_map(signed).to(torch.float64)
    nz = theirs != 0
    assert float(((ours - theirs).abs()[nz] / theirs.abs()[nz]).max()) < 2 ** -15


@pytest.mark.parametrize("signed", [True, False])
def test_values_and_midpoints_are_float32(signed):
    """The property the kernels rely on: a code decodes with one multiply-add that rounds nowhere, and the
    encoder's in-decade midpoints BASE + j * STEP are float32s."""
    c = Q.codec_constants(signed)
    values = Q.dynamic_map(signed).tolist()
    mags = sorted({abs(v) for v in values})
    for d in range(1, 8):
        base, step = Fraction(c["base"][d]), Fraction(c["step"][d])
        count = int(c["kmax"][d]) + 2 if c["midbase"][d] != math.inf else 1
        for k in range(count):
            v = base + (k + Fraction(1, 2)) * step
            assert float(v) in mags and Fraction(float(v)) == v
            assert float(np.float32(float(v))) == float(v)
        for j in range(1, count):
            mid = base + j * step
            assert Fraction(float(np.float32(float(mid)))) == mid


# ----------------------------------------------------------------------------------------------------------------
# The breakpoints of the encoders
# ----------------------------------------------------------------------------------------------------------------
def _candidate_floor(bits: np.ndarray, base: np.float32, recip: np.float32) -> np.ndarray:
    a = bits.astype(np.uint32).view(np.float32)
    with np.errstate(all="ignore"):
        t = (a - base) * recip - np.float32(0.5)  # float32 operations, as every kernel computes the candidate
    return np.floor(t)


def breakpoints(signed: bool) -> np.ndarray:
    """float32 values on both sides of every step of the definition and of the fast encoders (module docstring),
    with both signs, plus 0, -0, subnormals, 1, values above 1, inf and NaNs."""
    c = Q.codec_constants(signed)
    thresholds = Q.midpoints(signed).numpy().view(np.uint32).astype(np.int64)
    catch = np.array(c["catchment"], dtype=np.float32).view(np.uint32).astype(np.int64)
    points = [thresholds - 1, thresholds, thresholds + 1]
    for d in range(1, 8):
        lo, hi = int(catch[d - 1]) + 1, int(catch[d])
        base, recip = np.float32(c["base"][d]), np.float32(c["recip"][d])
        for target in range(0, int(c["kmax"][d]) + 2):
            if _candidate_floor(np.array([hi]), base, recip)[0] < target:
                break
            a, b = lo, hi  # smallest bits in [lo, hi] with floor(candidate) >= target
            if _candidate_floor(np.array([a]), base, recip)[0] >= target:
                continue
            while b - a > 1:
                mid = (a + b) // 2
                if _candidate_floor(np.array([mid]), base, recip)[0] >= target:
                    b = mid
                else:
                    a = mid
            points.append(np.array([b - 1, b, b + 1]))
    specials = np.array([0, 1, 2, 0x007FFFFF, 0x00800000, 0x3F800000, 0x3F800001, 0x3F800002, 0x40000000,
                         0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF], dtype=np.int64)
    mags = np.unique(np.concatenate(points + [specials]))
    mags = mags[(mags >= 0) & (mags <= 0x7FFFFFFF)].astype(np.uint32)
    return np.concatenate([mags, mags | np.uint32(0x80000000)]).view(np.float32)


def brute_force_codes(q: np.ndarray, signed: bool) -> np.ndarray:
    out = []
    qt = torch.from_numpy(q)
    for chunk in torch.split(qt, 4096):
        out.append(R.nearest_codes(chunk, Q.dynamic_map(signed)))
    return torch.cat(out).numpy()


@pytest.mark.parametrize("signed", [True, False])
def test_definition_is_nearest_value(signed):
    q = breakpoints(signed)
    rng = np.random.default_rng(0)
    rand = (rng.standard_normal(40_000) * 10.0 ** rng.uniform(-8, 0, 40_000)).astype(np.float32)
    q = np.concatenate([q, rand])
    ours = Q.encode(torch.from_numpy(q), signed).numpy().astype(np.int64)
    want = brute_force_codes(q, signed).astype(np.int64)
    if not signed:
        want = np.where(q.view(np.int32) < 0, 0, want)  # the unsigned map's nearest value to q < 0 is 0
    bad = np.nonzero(ours != want)[0]
    assert bad.size == 0, f"{bad.size} mismatches, e.g. q={q[bad[:5]]} ours={ours[bad[:5]]} brute={want[bad[:5]]}"


def test_breakpoints_cover_every_step():
    """Sanity of the enumeration: the definition's own steps (all 255 thresholds, both sides) are in it."""
    for signed in (True, False):
        pts = set(breakpoints(signed).view(np.uint32).tolist())
        for t in Q.midpoints(signed).numpy().view(np.uint32).tolist():
            assert t in pts and t + 1 in pts


# ----------------------------------------------------------------------------------------------------------------
# Blockwise round trip
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 4097])
def test_round_trip_error_within_half_gap(signed, n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
    if not signed:
        x = x * x
    codes, absmax = Q.quantize_blockwise(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (Q.num_blocks(n),)
    assert torch.equal(absmax, R.absmax_of_blocks(x.reshape(-1)).to(torch.float32))
    y = Q.dequantize_blockwise(codes, absmax, signed)
    scale = torch.repeat_interleave(absmax.to(torch.float64), Q.BLOCK_SIZE)[:n]
    q = x.to(torch.float64) / scale
    bound = R.half_gap_bound(q, Q.dynamic_map(signed)) * scale
    # + one float32 rounding of map value * absmax, and of x * (1 / absmax) (half an ulp of each)
    slack = scale * 2.0 ** -23
    err = (y.to(torch.float64) - x.to(torch.float64)).abs()
    assert bool((err <= bound + slack).all()), float((err - bound - slack).max())
    # the block's largest element is exact when it is positive (the map has +1 but not -1)
    top = x.abs().reshape(-1)[: n].argmax()
    if x[top] > 0:
        assert y[top] == x[top]


def test_round_trip_of_special_blocks():
    zeros = torch.zeros(300)
    codes, absmax = Q.quantize_blockwise(zeros, True)
    assert torch.equal(absmax, torch.zeros(2)) and bool((codes == 127).all())
    assert torch.equal(Q.dequantize_blockwise(codes, absmax, True), zeros)
    tiny = torch.full((10,), 1e-40)  # a subnormal absmax encodes every element as 0
    codes, absmax = Q.quantize_blockwise(tiny, False)
    assert bool((codes == 0).all()) and absmax[0] == tiny[0]
    nan = torch.tensor([1.0, float("nan"), -2.0])  # a NaN poisons its block
    codes, absmax = Q.quantize_blockwise(nan, True)
    assert torch.isnan(absmax).all() and torch.isnan(Q.dequantize_blockwise(codes, absmax, True)).all()


def test_quantize_rejects_bad_input():
    with pytest.raises(TypeError, match="floating"):
        Q.quantize_blockwise(torch.zeros(3, dtype=torch.int32), True)
    with pytest.raises(ValueError, match="uint8"):
        Q.dequantize_blockwise(torch.zeros(3), torch.zeros(1), True)
    with pytest.raises(ValueError, match=r"shape \[1\]"):
        Q.dequantize_blockwise(torch.zeros(3, dtype=torch.uint8), torch.zeros(2), True)
