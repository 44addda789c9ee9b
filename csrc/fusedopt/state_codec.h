// How optimizer states are stored: the state codecs, the one definition of fusedopt's small state formats.
//
// A codec loads a state element before the update rule (fusedopt/rules.h) and stores it after; the rules never
// see the storage format. Three formats (fusedopt/quantization.py's module docstring has the whole design):
//   plain  the state in a float dtype: widen on load, round to nearest even on store (what fusedopt always did)
//   bf16   bfloat16, rounded to nearest even or stochastically (random bits from random_bits() below)
//   8bit   blockwise dynamic quantization (Dettmers et al., arXiv:2110.02861; the maps of arXiv:1511.04561 in
//          bitsandbytes' create_dynamic_map form): a uint8 code per element, a float32 absmax per block of
//          kQuantBlock elements; decode = map value * absmax, encode = nearest map value to x * (1 / absmax)
//
// Everything here is __host__ __device__ and uses only float32 add / multiply / compare and 32-bit integer
// operations whose results are exact or IEEE-rounded, so the CPU kernels, the CUDA kernels (and their
// host-executed block bodies) and the Triton kernels (fusedopt/triton/_codec.py, the same operations) produce
// identical bits. The CPU kernels also have a vectorized spelling of decode_8bit / encode_8bit (csrc/cpu),
// tested equal to these for every float32.
//
// The maps, exactly: slot d of a map (0 = the value 0, 1..7 = the decades 10^(d-7)..10^(d-6), then the value 1)
// holds count[d] values kBase[d] + (k + 0.5) * kStep[d]; kBase and kStep have 16 significant bits, which makes
// every value and every midpoint between two values of one decade a float32, so decoding needs no table of
// values and the encoder compares with exact midpoints. The constants below are generated from
// fusedopt/quantization.py (codec_constants); tests/test_cuda_host.py checks that they are equal.
//
// The encoder (encode_8bit) is exact and branch-free: (1) the catchment slot by integer comparisons of |q|'s bits
// with the 8 midpoints between neighbouring slots, (2) a candidate entry k0 within 0.5 of the exact position
// (any rounding), (3) one exact comparison with the midpoint between entries k0 and k0 + 1. Ties go to the value
// of smaller magnitude. A proof that it equals the nearest-value search for every float32 is in
// tests/test_quantization.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fusedopt/schedule.h"

namespace fusedopt {
namespace codec {

constexpr int64_t kQuantBlock = 256;         // elements per absmax block (bitsandbytes' and torchao's block)
constexpr int64_t kMinQuantizedNumel = 4096;  // smaller tensors keep float32 states (as both peers do)

FUSEDOPT_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

FUSEDOPT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// ---------------------------------------------------------------------------------------------------------
// The two maps' constants, per slot 0..7 (slot 8, the value 1, needs only its catchment threshold).
// ---------------------------------------------------------------------------------------------------------
struct MapConstants {
  float base[8];        // decode: value = base + (k + 0.5) * step
  float step[8];
  float first[8];       // the slot's first magnitude index (signed map: |code - 127|; unsigned map: code)
  float recip[8];       // ~1 / step: the encoder's candidate (only needs to be within 0.5 of the position)
  float kmax[8];        // max(count - 2, 0): the candidate's largest value
  float midbase[8];     // base, or +inf for slots of one value (no midpoint inside: never move up)
  uint32_t catchment[8];  // bits of the float32 thresholds between slot k and k + 1 (k = 0..7), the last is
                          // between the largest decade value and 1
  int one;              // magnitude index of the value 1 (128 signed, 255 unsigned)
  float slot_offset;    // decode: the exponent of float(m + slot_offset) + slot_bias is the slot of magnitude m
  int slot_bias;
};

#define FUSEDOPT_CODEC_INF __builtin_inff()

#define FUSEDOPT_SIGNED_MAP_CONSTANTS                                                                         \
  {                                                                                                            \
    {0.0f, 0x1.ad8p-24f, 0x1.0c7p-20f, 0x1.4f8cp-17f, 0x1.a36ep-14f, 0x1.0624p-10f, 0x1.47aep-7f, 0x1.999ap-4f}, \
    {0.0f, 0x1.e33p-21f, 0x1.2dfep-18f, 0x1.797cp-16f, 0x1.d7dcp-14f, 0x1.26eap-11f, 0x1.70a4p-9f, 0x1.ccccp-7f}, \
    {0.0f, 1.0f, 2.0f, 4.0f, 8.0f, 16.0f, 32.0f, 64.0f},                                                      \
    {0.0f, 0x1.0f43eap+20f, 0x1.b20644p+17f, 0x1.5b3998p+15f, 0x1.15c716p+13f, 0x1.bc70fcp+10f, 0x1.638e12p+8f, \
     0x1.1c7246p+6f},                                                                                          \
    {0.0f, 0.0f, 0.0f, 2.0f, 6.0f, 14.0f, 30.0f, 62.0f},                                                      \
    {FUSEDOPT_CODEC_INF, FUSEDOPT_CODEC_INF, 0x1.0c7p-20f, 0x1.4f8cp-17f, 0x1.a36ep-14f, 0x1.0624p-10f,       \
     0x1.47aep-7f, 0x1.999ap-4f},                                                                              \
    {0x3493A400u, 0x35FF0400u, 0x37734520u, 0x39007340u, 0x3A91D120u, 0x3C2D0E6Cu, 0x3DD28F7Cu, 0x3F7F196Au}, \
    128, 0.5f, 1                                                                                               \
  }

#define FUSEDOPT_UNSIGNED_MAP_CONSTANTS                                                                       \
  {                                                                                                            \
    {0.0f, 0x1.ad8p-24f, 0x1.0c7p-20f, 0x1.4f8cp-17f, 0x1.a36ep-14f, 0x1.0624p-10f, 0x1.47aep-7f, 0x1.999ap-4f}, \
    {0.0f, 0x1.e33p-22f, 0x1.2dfep-19f, 0x1.797cp-17f, 0x1.d7dcp-15f, 0x1.26eap-12f, 0x1.70a4p-10f, 0x1.ccccp-8f}, \
    {0.0f, 1.0f, 3.0f, 7.0f, 15.0f, 31.0f, 63.0f, 127.0f},                                                    \
    {0.0f, 0x1.0f43eap+21f, 0x1.b20644p+18f, 0x1.5b3998p+16f, 0x1.15c716p+14f, 0x1.bc70fcp+11f, 0x1.638e12p+9f, \
     0x1.1c7246p+7f},                                                                                          \
    {0.0f, 0.0f, 2.0f, 6.0f, 14.0f, 30.0f, 62.0f, 126.0f},                                                    \
    {FUSEDOPT_CODEC_INF, 0x1.ad8p-24f, 0x1.0c7p-20f, 0x1.4f8cp-17f, 0x1.a36ep-14f, 0x1.0624p-10f, 0x1.47aep-7f, \
     0x1.999ap-4f},                                                                                            \
    {0x342E7C00u, 0x35C29E00u, 0x374D8590u, 0x38E94EB0u, 0x3A8A71ACu, 0x3C2872C6u, 0x3DCFAE36u, 0x3F7F8C9Du}, \
    255, 1.5f, 0                                                                                               \
  }

// Host copies (CPU kernels, host-executed CUDA bodies) and device copies (global memory: a warp's lanes read
// different slots, which constant memory would serialize).
inline constexpr MapConstants kSignedMapHost = FUSEDOPT_SIGNED_MAP_CONSTANTS;
inline constexpr MapConstants kUnsignedMapHost = FUSEDOPT_UNSIGNED_MAP_CONSTANTS;
#if defined(__CUDACC__)
static __device__ const MapConstants kSignedMapDevice = FUSEDOPT_SIGNED_MAP_CONSTANTS;
static __device__ const MapConstants kUnsignedMapDevice = FUSEDOPT_UNSIGNED_MAP_CONSTANTS;
#endif

// The signed map (first moments, momentum) and the unsigned map (second moments), as types for templates.
struct SignedMap {
  static constexpr bool kSigned = true;
  static FUSEDOPT_HD const MapConstants& constants() {
#if defined(__CUDA_ARCH__)
    return kSignedMapDevice;
#else
    return kSignedMapHost;
#endif
  }
};

struct UnsignedMap {
  static constexpr bool kSigned = false;
  static FUSEDOPT_HD const MapConstants& constants() {
#if defined(__CUDA_ARCH__)
    return kUnsignedMapDevice;
#else
    return kUnsignedMapHost;
#endif
  }
};

// ---------------------------------------------------------------------------------------------------------
// 8-bit: decode and encode of one element, and the per-block normalisation
// ---------------------------------------------------------------------------------------------------------

// The map value of `code` (in [-1, 1]); the element is this times its block's absmax.
template <typename Map>
FUSEDOPT_HD float decode_8bit(uint32_t code) {
  const MapConstants& c = Map::constants();
  // magnitude index m and sign: signed map |code - 127|, unsigned map the code itself
  const int t = static_cast<int>(code) - (Map::kSigned ? 127 : 0);
  const int m = t < 0 ? -t : t;
  // The slot is the position of m's leading one, read from the exponent of a float (exact: small integers).
  // Signed map: m + 0.5 has exponent floor(log2(m)) for m >= 1 (slot = that + 1) and -1 for m = 0 (slot 0).
  // Unsigned map: m + 1.5 has exponent floor(log2(m + 1)) = the slot, 0 for m = 0. The value 1 (code 255)
  // lands in slot 8 & 7 = 0 and is selected below.
  const float f = static_cast<float>(m) + c.slot_offset;
  const int slot = (static_cast<int>(float_bits(f) >> 23) - 127 + c.slot_bias) & 7;
  const float k_half = static_cast<float>(m) - c.first[slot] + 0.5f;  // k + 0.5, exact
  float v = k_half * c.step[slot] + c.base[slot];  // exact: every map value is a float32 (no rounding at all)
  v = code == 255u ? 1.0f : v;
  return t < 0 ? -v : v;
}

FUSEDOPT_HD float floor_f(float x) {
#if defined(__CUDA_ARCH__)
  return ::floorf(x);
#else
  return std::floor(x);
#endif
}

// The magnitude index of the map value nearest to |q| (ties: the smaller), in [0, one].
template <typename Map>
FUSEDOPT_HD int encode_magnitude(float a, uint32_t abs_bits) {
  const MapConstants& c = Map::constants();
  int slot = 0;
  for (int k = 0; k < 7; ++k) slot += abs_bits > c.catchment[k] ? 1 : 0;  // integer compares: exact, NaN -> top
  const bool one = abs_bits > c.catchment[7];
  // candidate k0 within 0.5 of the exact position (a - base) / step - 0.5, clamped to [0, count - 2]
  float k0 = floor_f((a - c.base[slot]) * c.recip[slot] - 0.5f);
  k0 = k0 > c.kmax[slot] ? c.kmax[slot] : k0;
  k0 = k0 < 0.0f ? 0.0f : k0;  // (a NaN here only happens with `one` set, which overrides it)
  // the exact midpoint between entries k0 and k0 + 1 is a float32: (k0 + 1) * step + base rounds nowhere
  const float up = a > (k0 + 1.0f) * c.step[slot] + c.midbase[slot] ? 1.0f : 0.0f;
  // every table read happens on both sides of the select (no conditional load: the CPU loops vectorize)
  const float first = c.first[slot];
  const float m = one ? static_cast<float>(c.one) : first + k0 + up;
  return static_cast<int>(m);
}

// The code of q (q = x * inv_absmax): the nearest map value, ties to the smaller magnitude.
template <typename Map>
FUSEDOPT_HD uint32_t encode_8bit(float q) {
  const uint32_t bits = float_bits(q);
  const uint32_t abs_bits = bits & 0x7FFFFFFFu;
  const int m = encode_magnitude<Map>(bits_float(abs_bits), abs_bits);
  const bool negative = (bits >> 31) != 0;
  if (Map::kSigned) {
    return static_cast<uint32_t>(negative ? 127 - (m < 127 ? m : 127) : 127 + m);  // no -1 in the map
  }
  return static_cast<uint32_t>(negative ? 0 : m);  // the unsigned map's nearest value to q < 0 is 0
}

// The block's absmax is the largest |x| as an integer max over the bit patterns with the sign cleared: exact,
// independent of the order of the reduction, and a NaN (any NaN pattern is above +inf) wins.
FUSEDOPT_HD uint32_t abs_bits(float x) { return float_bits(x) & 0x7FFFFFFFu; }

FUSEDOPT_HD uint32_t max_bits(uint32_t a, uint32_t b) { return a > b ? a : b; }

// 1 / absmax for the encoder, or 0 when absmax is 0, subnormal or NaN: such a block encodes every element
// as 0 (a NaN element as the largest magnitude; the NaN absmax decodes the block to NaN anyway).
FUSEDOPT_HD float inverse_absmax(float absmax) {
  return absmax >= 0x1p-126f ? 1.0f / absmax : 0.0f;
}

// ---------------------------------------------------------------------------------------------------------
// bfloat16: round to nearest even (c10::BFloat16) or stochastically
// ---------------------------------------------------------------------------------------------------------
// Both written as selects, not branches, so that the CPU loops vectorize (c10's conversion branches on NaN,
// which keeps GCC from vectorizing a loop that stores bfloat16: the cause of the slow bf16 CPU steps).
FUSEDOPT_HD uint16_t bf16_round_nearest(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);  // c10's NaN
}

// Away from zero with probability (low 16 bits of x) / 65536, given 16 uniform random bits `r` (torchao's
// _fp32_to_bf16_sr): (bits + r) >> 16. inf stays inf (its low bits are 0); NaN becomes c10's NaN.
FUSEDOPT_HD uint16_t bf16_round_stochastic(float x, uint32_t r) {
  const uint32_t rounded = (float_bits(x) + (r & 0xFFFFu)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}

FUSEDOPT_HD float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// ---------------------------------------------------------------------------------------------------------
// Random bits for stochastic rounding: a counter-based generator (Salmon et al., SC'11) -- a pure function of
// (seed, step, stream, element) built from 32-bit multiplies, xors and shifts, identical on every backend.
// ---------------------------------------------------------------------------------------------------------

// Chris Wellons' "lowbias32" integer hash (hash-prospector): a bijection of 32 bits with low avalanche bias.
FUSEDOPT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The per-(call, tensor) part of the counter: computed once per tensor (CPU), block (CUDA) or row (Triton).
struct RoundingKey {
  uint32_t k0;
  uint32_t k1;
};

// seed: the optimizer's rounding seed; step: the group's rounding_step (read on the device); stream:
// 4 * param index + slot (0 = the param, 1.. = its states in the op's order).
FUSEDOPT_HD RoundingKey rounding_key(uint64_t seed, int64_t step, int64_t stream) {
  const uint64_t s = static_cast<uint64_t>(step);
  const uint64_t t = static_cast<uint64_t>(stream);
  uint32_t h = mix32(static_cast<uint32_t>(seed) ^ 0x9E3779B9u);
  h = mix32(h ^ static_cast<uint32_t>(seed >> 32));
  h = mix32(h ^ static_cast<uint32_t>(s));
  h = mix32(h ^ static_cast<uint32_t>(s >> 32));
  h = mix32(h ^ static_cast<uint32_t>(t));
  h = mix32(h ^ static_cast<uint32_t>(t >> 32));
  return RoundingKey{h, mix32(h ^ 0x85EBCA6Bu)};
}

// 32 random bits for element `element` (its index in the full tensor) of the stream keyed by `key`. The high 32
// bits of the index enter through the second round, so callers that walk a range with one high word can fold
// `key.k1 ^ high` once (random_bits_lo).
FUSEDOPT_HD uint32_t random_bits_lo(uint32_t k0, uint32_t k1_high, uint32_t element_lo) {
  return mix32(mix32(element_lo ^ k0) ^ k1_high);
}

FUSEDOPT_HD uint32_t random_bits(const RoundingKey& key, uint64_t element) {
  return random_bits_lo(key.k0, key.k1 ^ static_cast<uint32_t>(element >> 32), static_cast<uint32_t>(element));
}

}  // namespace codec
}  // namespace fusedopt
