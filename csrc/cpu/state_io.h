// How the CPU kernels load and store params and states: the storage side of the update, kept apart from the
// rules (fusedopt/rules.h) and shared by the adamw_, sgd_ and lion_ loops.
//
// The loops walk a work item in blocks of kQuantBlock (256) elements (work items start at multiples of it, and
// blocks restart at every tensor, so they are the 8-bit format's blocks). Per block: the param's and every state
// slot's begin_block() (8-bit: decode the codes into a float buffer that stays in L1; stochastic rounding: the
// block's random bits), the rule on each element
// (load -> update -> store through the slots), every slot's end_block() (8-bit: the block's new absmax, then
// the codes). One pass over memory, whatever the formats. The formats' definitions are
// fusedopt/state_codec.h (the same functions run in the CUDA kernels; fusedopt/triton/_codec.py mirrors them).
//
// Slot types (T is the math type):
//   PlainSlot<S>     a float dtype S: widen on load, round to nearest even on store (what fusedopt always did)
//   Bf16SrSlot       bfloat16 rounded stochastically with the counter-based bits of (seed, step, stream, element)
//   Q8Slot<Map>      8-bit blockwise codes + one float32 absmax per block
//   NoSlot           a state the call does not have (AdamW without amsgrad, SGD without momentum)
// Param types: MasterParam (float32 master copy + the rounded param), PlainParam (the param itself, rounded to
// nearest), SrParam (bfloat16 param rounded stochastically).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "fusedopt/rules.h"
#include "fusedopt/state_codec.h"

namespace fusedopt {
namespace cpu {

using codec::kQuantBlock;

// Where a stochastically rounded stream of one tensor starts: the key of (seed, step, 4 * param index + slot)
// and the index in the full tensor of the work item's first element (a DTensor shard's offset included).
struct Stream {
  codec::RoundingKey key;
  uint64_t first_element;
};

// The per-call stochastic-rounding arguments: empty `rounding` = round to nearest.
struct RoundingArgs {
  bool on = false;
  uint64_t seed = 0;
  int64_t step = 0;
  std::vector<int64_t> param_index;  // per tensor of the call
  std::vector<int64_t> offset;       // per tensor: index in the full tensor of the local first element

  Stream stream(int64_t tensor, int slot, int64_t begin) const {
    return Stream{codec::rounding_key(seed, step, 4 * param_index[tensor] + slot),
                  static_cast<uint64_t>(offset[tensor] + begin)};
  }
};

inline RoundingArgs read_rounding(c10::IntArrayRef rounding, const std::optional<at::Tensor>& rounding_step,
                                  size_t num_tensors, const char* op) {
  RoundingArgs r;
  if (rounding.empty()) return r;
  TORCH_CHECK(rounding.size() == 1 + 2 * num_tensors, op, ": rounding must be [seed, (param index, offset) per "
              "tensor] with ", 1 + 2 * num_tensors, " entries, got ", rounding.size());
  TORCH_CHECK(rounding_step.has_value() && rounding_step->numel() == 1 && rounding_step->scalar_type() == at::kLong,
              op, ": stochastic rounding needs rounding_step, a one-element int64 tensor");
  r.on = true;
  r.seed = static_cast<uint64_t>(rounding[0]);
  r.step = *rounding_step->data_ptr<int64_t>();
  for (size_t i = 0; i < num_tensors; ++i) {
    r.param_index.push_back(rounding[1 + 2 * i]);
    r.offset.push_back(rounding[2 + 2 * i]);
  }
  return r;
}

// The 32 random bits of element e (block-relative index b + j of the work item) of a stream.
inline uint32_t stream_bits(const Stream& s, int64_t e) {
  return codec::random_bits(s.key, s.first_element + static_cast<uint64_t>(e));
}

// The random bits of one block of a stream, stream_bits(s, b + j) for j < len, computed before the block's
// element loop: in 32-bit lanes (random_bits_lo with the high word of the element index folded into the key
// once), which vectorizes, where the per-element 64-bit index kept the rounding loops slow. A block whose
// element indices cross a multiple of 2^32 (a shard offset can put one there) takes the 64-bit definition.
struct BlockBits {
  alignas(64) uint32_t bits[kQuantBlock];

  void fill(const Stream& s, int64_t b, int64_t len) {
    const uint64_t first = s.first_element + static_cast<uint64_t>(b);
    const uint32_t lo = static_cast<uint32_t>(first);
    if (static_cast<uint64_t>(lo) + static_cast<uint64_t>(len) <= (uint64_t{1} << 32)) {
      const uint32_t k1_high = s.key.k1 ^ static_cast<uint32_t>(first >> 32);
      for (int64_t j = 0; j < len; ++j) {
        bits[j] = codec::random_bits_lo(s.key.k0, k1_high, lo + static_cast<uint32_t>(j));
      }
    } else {
      for (int64_t j = 0; j < len; ++j) bits[j] = stream_bits(s, b + j);
    }
  }
};

// A math value rounded to the storage dtype S: c10's conversions, except bfloat16, which goes through the
// codec's branch-free round-to-nearest-even (the same bits as c10::BFloat16, NaN included; c10's branch on NaN
// keeps GCC from vectorizing the loop).
template <typename S, typename T>
inline S to_storage(T x) {
  if constexpr (std::is_same_v<S, at::BFloat16>) {
    return c10::BFloat16(codec::bf16_round_nearest(static_cast<float>(x)), c10::BFloat16::from_bits());
  } else {
    return static_cast<S>(x);
  }
}

// ---------------------------------------------------------------------------------------------------------
// State slots
// ---------------------------------------------------------------------------------------------------------
template <typename S>
struct PlainSlot {
  S* __restrict__ ptr;
  void begin_block(int64_t, int64_t) {}
  void end_block(int64_t, int64_t) {}
  template <typename T>
  T load(int64_t b, int64_t j) const {
    return static_cast<T>(ptr[b + j]);
  }
  template <typename T>
  void store(int64_t b, int64_t j, T x) {
    ptr[b + j] = to_storage<S>(x);
  }
};

struct Bf16SrSlot {
  uint16_t* __restrict__ ptr;
  Stream stream;
  BlockBits random;  // the block's bits, filled by begin_block
  void begin_block(int64_t b, int64_t len) { random.fill(stream, b, len); }
  void end_block(int64_t, int64_t) {}
  template <typename T>
  T load(int64_t b, int64_t j) const {
    return static_cast<T>(codec::bf16_to_float(ptr[b + j]));
  }
  template <typename T>
  void store(int64_t b, int64_t j, T x) {
    ptr[b + j] = codec::bf16_round_stochastic(static_cast<float>(x), random.bits[j]);
  }
};

// The 256 map values of a map (decode_8bit of every code, exact), built once.
template <typename Map>
const float* decode_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (uint32_t c = 0; c < 256; ++c) t[c] = codec::decode_8bit<Map>(c);
    return t;
  }();
  return table.data();
}

// encode_8bit of len normalized values (x * inv) into codes: the codec's encoder spelled with AVX2 intrinsics,
// 8 lanes at once, giving the same codes (tests/test_quantization.py checks it against the scalar encoder for
// every float32 pattern class; it was also compared for all 2^32 float32 inputs when written). GCC does not
// vectorize the scalar encoder (it threads the per-slot table reads into branches); here the 8-entry tables are
// register permutes. Where it departs from the scalar spelling, the result is provably the same:
//   - the candidate k0 = clamp(floor(y), 0, kmax) is taken as clamp(trunc(y), 0, kmax) in integers: trunc and
//     floor differ only for y < 0, where both clamp to 0 (y is bounded for every lane that is not `one`, whose
//     result is replaced; y is NaN only in those lanes, and then the integer is clamped like any other);
//   - first + k0 + up is summed in integers (small integers: exact in float32 too);
//   - the sign: 127 + m / 127 - min(m, 127) (signed) and m / 0 (unsigned, q < 0) are zp + sign(m, q): the
//     only negative result, 127 - 128 = -1 (signed) or -m (unsigned), saturates to code 0 in the pack to
//     bytes, as the min / select gave; q = +-0 has m = 0 either way.
// The loop packs 32 codes per store (the per-8 pack of 8 dwords to 8 bytes costs as much as the encoding).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDOPT_HAVE_AVX2_ENCODER 1  // and decoder, absmax
template <typename Map>
struct Avx2Encoder {
  __m256 base, step, recip, midbase, inv;
  __m256i first, kmax, zero_point, one_code;
  __m256i catchment[8];

  __attribute__((target("avx2"))) explicit Avx2Encoder(float inv_absmax) {
    const codec::MapConstants& c = Map::constants();
    base = _mm256_loadu_ps(c.base);
    step = _mm256_loadu_ps(c.step);
    recip = _mm256_loadu_ps(c.recip);
    midbase = _mm256_loadu_ps(c.midbase);
    first = _mm256_cvttps_epi32(_mm256_loadu_ps(c.first));  // small integers in float32: exact
    kmax = _mm256_cvttps_epi32(_mm256_loadu_ps(c.kmax));
    zero_point = _mm256_set1_epi32(Map::kSigned ? 127 : 0);
    one_code = _mm256_set1_epi32(c.one);
    for (int k = 0; k < 8; ++k) catchment[k] = _mm256_set1_epi32(static_cast<int32_t>(c.catchment[k]));
    inv = _mm256_set1_ps(inv_absmax);
  }

  // The codes of x[0..8) * inv as int32 in [-1, 255] (-1: code 0 after the saturating pack).
  __attribute__((target("avx2"))) __m256i codes8(const float* __restrict__ x) const {
    const __m256i bits = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(x), inv));
    const __m256i abs_bits = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));  // signed compares: exact
    const __m256 a = _mm256_castsi256_ps(abs_bits);
    __m256i minus_slot = _mm256_cmpgt_epi32(abs_bits, catchment[0]);
    for (int k = 1; k < 7; ++k) minus_slot = _mm256_add_epi32(minus_slot, _mm256_cmpgt_epi32(abs_bits, catchment[k]));
    const __m256i slot = _mm256_sub_epi32(_mm256_setzero_si256(), minus_slot);
    const __m256i one = _mm256_cmpgt_epi32(abs_bits, catchment[7]);
    const __m256 y = _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps(a, _mm256_permutevar8x32_ps(base, slot)),
                                                 _mm256_permutevar8x32_ps(recip, slot)),
                                   _mm256_set1_ps(0.5f));
    __m256i k0 = _mm256_min_epi32(_mm256_cvttps_epi32(y), _mm256_permutevar8x32_epi32(kmax, slot));
    k0 = _mm256_max_epi32(k0, _mm256_setzero_si256());
    // the exact midpoint between entries k0 and k0 + 1: (k0 + 1) * step + base rounds nowhere
    const __m256 k1 = _mm256_cvtepi32_ps(_mm256_add_epi32(k0, _mm256_set1_epi32(1)));
    const __m256 mid = _mm256_add_ps(_mm256_mul_ps(k1, _mm256_permutevar8x32_ps(step, slot)),
                                     _mm256_permutevar8x32_ps(midbase, slot));
    const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(a, mid, _CMP_GT_OQ));  // -1 where a > mid
    __m256i m = _mm256_sub_epi32(_mm256_add_epi32(_mm256_permutevar8x32_epi32(first, slot), k0), up);
    m = _mm256_blendv_epi8(m, one_code, one);
    return _mm256_add_epi32(zero_point, _mm256_sign_epi32(m, bits));
  }
};

template <typename Map>
__attribute__((target("avx2"))) void encode_block_avx2(const float* __restrict__ x, float inv,
                                                       uint8_t* __restrict__ out, int64_t len) {
  const Avx2Encoder<Map> enc(inv);
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    const __m256i c0 = enc.codes8(x + j), c1 = enc.codes8(x + j + 8);
    const __m256i c2 = enc.codes8(x + j + 16), c3 = enc.codes8(x + j + 24);
    // the packs work per 128-bit half: the dwords of `bytes` are c0[0:4] c1[0:4] c2[0:4] c3[0:4] c0[4:8] c1[4:8] ...
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  for (; j + 8 <= len; j += 8) {
    const __m256i code = enc.codes8(x + j);
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + j), _mm_packus_epi16(words, words));
  }
  for (; j < len; ++j) out[j] = static_cast<uint8_t>(codec::encode_8bit<Map>(x[j] * inv));
}

// decode_8bit(codes[j]) * scale for j < len: the codec's arithmetic decoder (exact: no rounding anywhere), 8 lanes.
template <typename Map>
__attribute__((target("avx2"))) void decode_block_avx2(const uint8_t* __restrict__ codes, float scale,
                                                       float* __restrict__ out, int64_t len) {
  const codec::MapConstants& c = Map::constants();
  const __m256 base = _mm256_loadu_ps(c.base), step = _mm256_loadu_ps(c.step), first = _mm256_loadu_ps(c.first);
  const __m256 offset = _mm256_set1_ps(c.slot_offset), half = _mm256_set1_ps(0.5f), vscale = _mm256_set1_ps(scale);
  const __m256i bias = _mm256_set1_epi32(c.slot_bias - 127), seven = _mm256_set1_epi32(7);
  const __m256i zero_point = _mm256_set1_epi32(Map::kSigned ? 127 : 0), v255 = _mm256_set1_epi32(255);
  const __m256 one_f = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m256i code = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j)));
    const __m256i t = _mm256_sub_epi32(code, zero_point);
    const __m256i m = _mm256_abs_epi32(t);
    const __m256 m_f = _mm256_cvtepi32_ps(m);
    const __m256i f_bits = _mm256_castps_si256(_mm256_add_ps(m_f, offset));
    const __m256i slot = _mm256_and_si256(_mm256_add_epi32(_mm256_srli_epi32(f_bits, 23), bias), seven);
    const __m256 k_half = _mm256_add_ps(_mm256_sub_ps(m_f, _mm256_permutevar8x32_ps(first, slot)), half);
    __m256 v = _mm256_add_ps(_mm256_mul_ps(k_half, _mm256_permutevar8x32_ps(step, slot)),
                             _mm256_permutevar8x32_ps(base, slot));
    v = _mm256_blendv_ps(v, one_f, _mm256_castsi256_ps(_mm256_cmpeq_epi32(code, v255)));
    v = _mm256_or_ps(v, _mm256_and_ps(sign, _mm256_castsi256_ps(t)));  // t < 0: -v (v >= 0)
    _mm256_storeu_ps(out + j, _mm256_mul_ps(v, vscale));
  }
  for (; j < len; ++j) out[j] = codec::decode_8bit<Map>(codes[j]) * scale;
}

// The largest |x| of x[0..len) as float32 bits with the sign cleared (an integer max: exact, a NaN wins).
__attribute__((target("avx2"))) inline uint32_t absmax_bits_avx2(const float* __restrict__ x, int64_t len) {
  const __m256i mask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i top = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    top = _mm256_max_epu32(top, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)), mask));
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), top);
  uint32_t out = 0;
  for (int l = 0; l < 8; ++l) out = codec::max_bits(out, lanes[l]);
  for (; j < len; ++j) out = codec::max_bits(out, codec::abs_bits(x[j]));
  return out;
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

// bfloat16 <-> float32 for one block, the widening exact and the narrowing codec::bf16_round_nearest (c10's
// round to nearest even, NaN -> 0x7FC0), for the bf16 slots that stage a block in L1 (Bf16BufSlot below).
// Spelled with intrinsics: GCC's own vectorization of the rounding inside the rule loops packs a second vector
// of NaN masks, masks every dword before the saturating pack and permutes twice per 16 elements; the bf16 loops
// (no master weights) were bound by that instruction count, not by memory (0.69 ns per element with the data in
// L2 vs 0.52 for the in-place stream from DRAM, SGD, one core). Here NaN is replaced before the rounding
// (0x7FC00000 rounds to 0x7FC0; any other input rounds as in the codec) and the rounded words (<= 0xFF80 for a
// non-NaN input) are packed unmasked.
#if defined(FUSEDOPT_HAVE_AVX2_ENCODER)
__attribute__((target("avx2"))) inline __m256i bf16_round8_avx2(__m256 x) {
  const __m256i nan = _mm256_set1_epi32(0x7FC00000);
  const __m256i u = _mm256_castps_si256(
      _mm256_blendv_ps(x, _mm256_castsi256_ps(nan), _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
}

__attribute__((target("avx2"))) inline void bf16_round_block_avx2(const float* __restrict__ x,
                                                                  uint16_t* __restrict__ out, int64_t len) {
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    const __m256i lo = bf16_round8_avx2(_mm256_loadu_ps(x + j)), hi = bf16_round8_avx2(_mm256_loadu_ps(x + j + 8));
    // packus works per 128-bit half: lo[0:4] hi[0:4] lo[4:8] hi[4:8] -> quadword order 0 2 1 3
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8));
  }
  for (; j < len; ++j) out[j] = codec::bf16_round_nearest(x[j]);
}

__attribute__((target("avx2"))) inline void bf16_widen_block_avx2(const uint16_t* __restrict__ in,
                                                                  float* __restrict__ out, int64_t len) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + j)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_slli_epi32(w, 16));
  }
  for (; j < len; ++j) out[j] = codec::bf16_to_float(in[j]);
}
#endif

inline void bf16_round_block(const float* __restrict__ x, uint16_t* __restrict__ out, int64_t len) {
#if defined(FUSEDOPT_HAVE_AVX2_ENCODER)
  if (cpu_has_avx2()) {
    bf16_round_block_avx2(x, out, len);
    return;
  }
#endif
  for (int64_t j = 0; j < len; ++j) out[j] = codec::bf16_round_nearest(x[j]);
}

inline void bf16_widen_block(const uint16_t* __restrict__ in, float* __restrict__ out, int64_t len) {
#if defined(FUSEDOPT_HAVE_AVX2_ENCODER)
  if (cpu_has_avx2()) {
    bf16_widen_block_avx2(in, out, len);
    return;
  }
#endif
  for (int64_t j = 0; j < len; ++j) out[j] = codec::bf16_to_float(in[j]);
}

// The codes of x[0..len) * inv: the AVX2 encoder where the CPU has it, else the scalar one (the same bits).
template <typename Map>
inline void encode_block(const float* __restrict__ x, float inv, uint8_t* __restrict__ out, int64_t len) {
#if defined(FUSEDOPT_HAVE_AVX2_ENCODER)
  if (cpu_has_avx2()) {
    encode_block_avx2<Map>(x, inv, out, len);
    return;
  }
#endif
  for (int64_t j = 0; j < len; ++j) out[j] = static_cast<uint8_t>(codec::encode_8bit<Map>(x[j] * inv));
}

template <typename Map>
inline void decode_block(const uint8_t* __restrict__ codes, const float* __restrict__ table, float scale,
                         float* __restrict__ out, int64_t len) {
#if defined(FUSEDOPT_HAVE_AVX2_ENCODER)
  if (cpu_has_avx2()) {
    decode_block_avx2<Map>(codes, scale, out, len);
    return;
  }
#endif
  for (int64_t j = 0; j < len; ++j) out[j] = table[codes[j]] * scale;
}

inline uint32_t absmax_bits(const float* __restrict__ x, int64_t len) {
#if defined(FUSEDOPT_HAVE_AVX2_ENCODER)
  if (cpu_has_avx2()) return absmax_bits_avx2(x, len);
#endif
  uint32_t top = 0;
  for (int64_t j = 0; j < len; ++j) top = codec::max_bits(top, codec::abs_bits(x[j]));
  return top;
}

template <typename Map>
struct Q8Slot {
  uint8_t* __restrict__ codes;
  float* __restrict__ absmax;  // of the work item's first block
  const float* __restrict__ table;
  alignas(64) float buf[kQuantBlock];

  Q8Slot(uint8_t* c, float* a) : codes(c), absmax(a), table(decode_table<Map>()) {}

  void begin_block(int64_t b, int64_t len) {
    decode_block<Map>(codes + b, table, absmax[b / kQuantBlock], buf, len);
  }
  // The block's new absmax (an integer max of the bit patterns: exact, a NaN wins), then every code.
  void end_block(int64_t b, int64_t len) {
    const float block_absmax = codec::bits_float(absmax_bits(buf, len));
    const float inv = codec::inverse_absmax(block_absmax);
    encode_block<Map>(buf, inv, codes + b, len);
    absmax[b / kQuantBlock] = block_absmax;
  }
  template <typename T>
  T load(int64_t, int64_t j) const {
    return static_cast<T>(buf[j]);
  }
  template <typename T>
  void store(int64_t, int64_t j, T x) {
    buf[j] = static_cast<float>(x);
  }
};

struct NoSlot {
  void begin_block(int64_t, int64_t) {}
  void end_block(int64_t, int64_t) {}
  template <typename T>
  T load(int64_t, int64_t) const {
    return T(0);
  }
  template <typename T>
  void store(int64_t, int64_t, T) {}
};

// A bfloat16 state rounded to nearest, staged per block in L1 as float32 (widened in begin_block, rounded back in
// end_block with the block converters above): the rule loop then runs on float32 only. The same bits as
// PlainSlot<BFloat16>.
struct Bf16BufSlot {
  uint16_t* __restrict__ ptr;
  alignas(64) float buf[kQuantBlock];
  void begin_block(int64_t b, int64_t len) { bf16_widen_block(ptr + b, buf, len); }
  void end_block(int64_t b, int64_t len) { bf16_round_block(buf, ptr + b, len); }
  template <typename T>
  T load(int64_t, int64_t j) const {
    return static_cast<T>(buf[j]);
  }
  template <typename T>
  void store(int64_t, int64_t j, T x) {
    buf[j] = static_cast<float>(x);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Params
// ---------------------------------------------------------------------------------------------------------
template <typename P>
struct MasterParam {
  P* __restrict__ param;
  float* __restrict__ master;
  void begin_block(int64_t, int64_t) {}
  void end_block(int64_t, int64_t) {}
  template <typename T>
  T load(int64_t e) const {
    return static_cast<T>(master[e]);
  }
  template <typename T>
  void store(int64_t e, T p) {
    master[e] = static_cast<float>(p);
    param[e] = to_storage<P>(p);  // the rounded result
  }
};

template <typename P>
struct PlainParam {
  P* __restrict__ param;
  void begin_block(int64_t, int64_t) {}
  void end_block(int64_t, int64_t) {}
  template <typename T>
  T load(int64_t e) const {
    return static_cast<T>(param[e]);
  }
  template <typename T>
  void store(int64_t e, T p) {
    param[e] = to_storage<P>(p);
  }
};

// bfloat16 params rounded to nearest, staged per block like Bf16BufSlot: the same bits as PlainParam<BFloat16>.
// end_block runs after the slots' (the loop calls it last).
struct Bf16BufParam {
  uint16_t* __restrict__ param;
  int64_t block = 0;  // the block's first element (of the work item)
  alignas(64) float buf[kQuantBlock];
  void begin_block(int64_t b, int64_t len) {
    bf16_widen_block(param + b, buf, len);
    block = b;
  }
  void end_block(int64_t b, int64_t len) { bf16_round_block(buf, param + b, len); }
  template <typename T>
  T load(int64_t e) const {
    return static_cast<T>(buf[e - block]);
  }
  template <typename T>
  void store(int64_t e, T p) {
    buf[e - block] = static_cast<float>(p);
  }
};

struct SrParam {
  uint16_t* __restrict__ param;  // bfloat16 bits
  Stream stream;
  BlockBits random;   // the block's bits, filled by begin_block
  int64_t block = 0;  // the block's first element (of the work item)
  void begin_block(int64_t b, int64_t len) {
    random.fill(stream, b, len);
    block = b;
  }
  void end_block(int64_t, int64_t) {}
  template <typename T>
  T load(int64_t e) const {
    return static_cast<T>(codec::bf16_to_float(param[e]));
  }
  template <typename T>
  void store(int64_t e, T p) {
    param[e] = codec::bf16_round_stochastic(static_cast<float>(p), random.bits[e - block]);
  }
};

// ---------------------------------------------------------------------------------------------------------
// The one element loop of every rule: update(p, g, s) with s an array of the slots' values (in slot order).
// ---------------------------------------------------------------------------------------------------------
template <typename T, typename Param, typename G, typename Update, typename Slots, size_t... I>
inline __attribute__((always_inline)) void for_each_element_impl(Param& param, const G* __restrict__ grad,
                                                                 int64_t n, const GradTransform<T>& transform,
                                                                 const Update& update, Slots& slots,
                                                                 std::index_sequence<I...>) {
  for (int64_t b = 0; b < n; b += kQuantBlock) {
    const int64_t len = std::min(kQuantBlock, n - b);
    param.begin_block(b, len);
    (std::get<I>(slots).begin_block(b, len), ...);
    for (int64_t j = 0; j < len; ++j) {
      T p = param.template load<T>(b + j);
      const T g = transform_grad(static_cast<T>(grad[b + j]), transform);
      T s[sizeof...(I)] = {std::get<I>(slots).template load<T>(b, j)...};
      update(p, g, s);
      (std::get<I>(slots).template store<T>(b, j, s[I]), ...);
      param.template store<T>(b + j, p);
    }
    (std::get<I>(slots).end_block(b, len), ...);
    param.end_block(b, len);
  }
}

template <typename T, typename Param, typename G, typename Update, typename... Slot>
inline __attribute__((always_inline)) void for_each_element(Param& param, const G* __restrict__ grad, int64_t n,
                                                            const GradTransform<T>& transform,
                                                            const Update& update, Slot&... slots) {
  std::tuple<Slot&...> refs(slots...);
  for_each_element_impl<T>(param, grad, n, transform, update, refs, std::index_sequence_for<Slot...>{});
}

// ---------------------------------------------------------------------------------------------------------
// Per-tensor formats, and the dispatch to the slot types (one runtime choice per work item)
// ---------------------------------------------------------------------------------------------------------
enum class StateFormat { kPlain, kFloat, kBf16, kBf16Sr, kQ8 };

// The format of a tensor's states: all its rule states share one (the optimizers choose it per param).
// `plain` is the dtype the states have without small state (float32 with master weights, else the param's).
inline StateFormat state_format(const at::Tensor& state, at::ScalarType plain, bool stochastic) {
  const auto dtype = state.scalar_type();
  if (dtype == at::kByte) return StateFormat::kQ8;
  if (dtype == at::kBFloat16 && stochastic) return StateFormat::kBf16Sr;
  if (dtype == plain) return StateFormat::kPlain;
  if (dtype == at::kFloat) return StateFormat::kFloat;
  if (dtype == at::kBFloat16) return StateFormat::kBf16;
  TORCH_CHECK(false, "fusedopt: a state of dtype ", dtype, " is not supported (", plain,
              ", float32, bfloat16 or uint8 codes)");
}

// A slot factory per format: make<Map>(tensor, absmax, stream for this slot) -> the slot of a work item.
template <typename S>
struct PlainFormat {
  template <typename Map>
  static auto make(const at::Tensor& t, const at::Tensor*, int64_t begin, const Stream&) {
    if constexpr (std::is_same_v<S, at::BFloat16>) {
      return Bf16BufSlot{reinterpret_cast<uint16_t*>(t.data_ptr<S>()) + begin};
    } else {
      return PlainSlot<S>{t.data_ptr<S>() + begin};
    }
  }
};

struct Bf16SrFormat {
  template <typename Map>
  static Bf16SrSlot make(const at::Tensor& t, const at::Tensor*, int64_t begin, const Stream& stream) {
    return Bf16SrSlot{reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()) + begin, stream};
  }
};

struct Q8Format {
  template <typename Map>
  static Q8Slot<Map> make(const at::Tensor& t, const at::Tensor* absmax, int64_t begin, const Stream&) {
    return Q8Slot<Map>(t.data_ptr<uint8_t>() + begin, absmax->data_ptr<float>() + begin / kQuantBlock);
  }
};

// The params whose kernels read small states themselves: float32 and bfloat16 (the optimizers send float16 and
// float64 params with small states through their staged path, which keeps the number of compiled loops down).
template <typename P>
constexpr bool kFusedSmallState = std::is_same_v<P, float> || std::is_same_v<P, at::BFloat16>;

// fn(format tag) for the work item's format; S is the plain state dtype of the call (float32 with master
// weights, else the params' dtype).
template <typename P, typename S, typename Fn>
void dispatch_format(StateFormat f, const Fn& fn) {
  if constexpr (!kFusedSmallState<P>) {
    TORCH_CHECK(f == StateFormat::kPlain, "fusedopt: ", c10::CppTypeToScalarType<P>::value,
                " params take states of their own dtype (small states run through the optimizers' staged path)");
    fn(PlainFormat<S>{});
  } else {
    switch (f) {
      case StateFormat::kPlain:
        fn(PlainFormat<S>{});
        break;
      case StateFormat::kFloat:
        if constexpr (!std::is_same_v<S, float>) fn(PlainFormat<float>{});
        break;
      case StateFormat::kBf16:
        if constexpr (!std::is_same_v<S, at::BFloat16>) fn(PlainFormat<at::BFloat16>{});
        break;
      case StateFormat::kBf16Sr:
        fn(Bf16SrFormat{});
        break;
      case StateFormat::kQ8:
        fn(Q8Format{});
        break;
    }
  }
}

// fn(param io) for the work item's params: the float32 master copy (S is float32 and P is not: master weights),
// plain, or stochastically rounded bfloat16.
template <typename P, typename S, typename Fn>
void dispatch_param(const at::Tensor& param, const at::Tensor* master, int64_t begin, const RoundingArgs& rounding,
                    int64_t tensor, const Fn& fn) {
  if constexpr (!std::is_same_v<P, S>) {
    fn(MasterParam<P>{param.data_ptr<P>() + begin, master->data_ptr<float>() + begin});
  } else {
    if constexpr (std::is_same_v<P, float>) {
      if (master != nullptr) {  // float32 params with a float32 master copy, accepted as on every backend: both
        fn(MasterParam<P>{param.data_ptr<P>() + begin, master->data_ptr<float>() + begin});  // written
        return;
      }
    }
    TORCH_CHECK(master == nullptr, "fusedopt: master_params are float32 copies of bfloat16 / float16 / float32 ",
                "params; ", c10::CppTypeToScalarType<P>::value, " params are their own master copy");
    if constexpr (std::is_same_v<P, at::BFloat16>) {
      if (rounding.on) {
        fn(SrParam{reinterpret_cast<uint16_t*>(param.data_ptr<P>()) + begin, rounding.stream(tensor, 0, begin)});
        return;
      }
    }
    if constexpr (std::is_same_v<P, at::BFloat16>) {
      fn(Bf16BufParam{reinterpret_cast<uint16_t*>(param.data_ptr<P>()) + begin});
    } else {
      fn(PlainParam<P>{param.data_ptr<P>() + begin});
    }
  }
}

// The absmax tensor of state list `slot` (0-based) of tensor i (read only for 8-bit states), or nullptr.
inline const at::Tensor* absmax_of(at::TensorList absmaxes, size_t num_tensors, int slot, size_t i) {
  return absmaxes.empty() ? nullptr : &absmaxes[slot * num_tensors + i];
}

}  // namespace cpu
}  // namespace fusedopt
