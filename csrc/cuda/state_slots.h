// How the CUDA kernels' small-state bodies (csrc/cuda/block_bodies.h, small_rule_block) load and store params
// and states: the device-side counterpart of csrc/cpu/state_io.h, over the same codec (fusedopt/state_codec.h).
//
// State formats (one per kernel instantiation; a call's tensors are grouped by format, see csrc/cuda/ops_host.h):
//   F32State   float32 states
//   Bf16State  bfloat16 states, rounded to nearest even or, when the call rounds stochastically, with the
//              counter-based bits of (seed, rounding_step, 4 * param index + slot, element)
//   Q8State    8-bit blockwise codes (uint8) with one float32 absmax per 256-element block; the map of a state
//              (signed for first moments / momentum, unsigned for second moments) comes from the rule
// Params: float32 or bfloat16, held as their storage bits (ParamStorage); with a float32 master copy, or their
// own value, rounded to nearest or (bfloat16, stochastic rounding, no master copy) stochastically.
//
// Everything here is __host__ __device__: the host test harness (tests/cuda_host/hostsim.cpp) runs it as is.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/launch_plan.h"
#include "fusedopt/state_codec.h"

namespace fusedopt {
namespace cuda {

static_assert(kSmallQuantBlock == codec::kQuantBlock, "launch_plan.h and the codec disagree on the block size");

// ---------------------------------------------------------------------------------------------------------
// Four consecutive elements, loaded / stored with one 4-, 8- or 16-byte access when aligned
// ---------------------------------------------------------------------------------------------------------
static_assert(kILP == 4, "the small-state bodies move 4 elements per thread and access");

template <typename X>
struct alignas(4 * sizeof(X)) Quad {
  X v[4];
};

template <int kBytes>
struct QuadWord;
template <>
struct QuadWord<4> {
  using type = uint32_t;
};
#if defined(__CUDACC__)
template <>
struct QuadWord<8> {
  using type = uint2;
};
template <>
struct QuadWord<16> {
  using type = uint4;
};
#endif

template <typename X>
FUSEDOPT_HD bool quad_aligned(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * sizeof(X)) == 0;
}

// dst[0..count) = src[0..count): one access when `vector` (src aligned to 4 * sizeof(X)) and count == 4.
template <typename X>
FUSEDOPT_HD void load_quad(Quad<X>& dst, const X* src, int count, bool vector) {
  if (vector && count == 4) {
#if defined(__CUDA_ARCH__)
    using W = typename QuadWord<4 * sizeof(X)>::type;
    *reinterpret_cast<W*>(&dst) = *reinterpret_cast<const W*>(src);
#else
    std::memcpy(dst.v, src, sizeof(dst.v));
#endif
    return;
  }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int e = 0; e < 4; ++e) {
    if (e < count) dst.v[e] = src[e];  // (a constant index after unrolling: dst stays in registers)
  }
}

template <typename X>
FUSEDOPT_HD void store_quad(X* dst, const Quad<X>& src, int count, bool vector) {
  if (vector && count == 4) {
#if defined(__CUDA_ARCH__)
    using W = typename QuadWord<4 * sizeof(X)>::type;
    *reinterpret_cast<W*>(dst) = *reinterpret_cast<const W*>(&src);
#else
    std::memcpy(dst, src.v, sizeof(src.v));
#endif
    return;
  }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int e = 0; e < 4; ++e) {
    if (e < count) dst[e] = src.v[e];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Params: storage bits and rounding
// ---------------------------------------------------------------------------------------------------------
template <typename P>
struct ParamStorage;
template <>
struct ParamStorage<float> {
  using type = float;
  static FUSEDOPT_HD float widen(float x) { return x; }
};
template <>
struct ParamStorage<c10::BFloat16> {
  using type = uint16_t;  // the bfloat16 bits
  static FUSEDOPT_HD float widen(uint16_t b) { return codec::bf16_to_float(b); }
};

template <typename P>
constexpr bool kBf16Param = std::is_same_v<P, c10::BFloat16>;

// The params whose kernels read small states themselves (as on the CPU: float16 / float64 params with small
// states run through the optimizers' staged path).
template <typename P>
constexpr bool kSmallStateParam = std::is_same_v<P, float> || kBf16Param<P>;

// p rounded to P's storage: bfloat16 to nearest even (c10's bits, branch-free) or stochastically with `bits`.
template <typename P>
FUSEDOPT_HD typename ParamStorage<P>::type round_param(float p, bool stochastic, uint32_t bits) {
  if constexpr (kBf16Param<P>) {
    return stochastic ? codec::bf16_round_stochastic(p, bits) : codec::bf16_round_nearest(p);
  } else {
    return p;
  }
}

// ---------------------------------------------------------------------------------------------------------
// State formats
// ---------------------------------------------------------------------------------------------------------
struct F32State {
  using Storage = float;
  static constexpr bool kQuantized = false;
  static FUSEDOPT_HD float widen(float x) { return x; }
  // (stochastic rounding does not apply to float32)
  static FUSEDOPT_HD float round(float x, bool, uint32_t) { return x; }
};

struct Bf16State {
  using Storage = uint16_t;  // bfloat16 bits
  static constexpr bool kQuantized = false;
  static FUSEDOPT_HD float widen(uint16_t b) { return codec::bf16_to_float(b); }
  static FUSEDOPT_HD uint16_t round(float x, bool stochastic, uint32_t bits) {
    return stochastic ? codec::bf16_round_stochastic(x, bits) : codec::bf16_round_nearest(x);
  }
};

struct Q8State {
  using Storage = uint8_t;  // codes; the values are decode(code) * absmax of the code's block
  static constexpr bool kQuantized = true;
  template <typename Map>
  static FUSEDOPT_HD float decode(uint8_t code, float absmax) {
    return codec::decode_8bit<Map>(code) * absmax;  // exact decode, one rounding: the CPU slots' bits
  }
  template <typename Map>
  static FUSEDOPT_HD uint8_t encode(float x, float inv_absmax) {
    return static_cast<uint8_t>(codec::encode_8bit<Map>(x * inv_absmax));
  }
};

// The 8-bit map of each rule's state k (the op's state order).
template <bool kSigned>
using MapOf = std::conditional_t<kSigned, codec::SignedMap, codec::UnsignedMap>;

// ---------------------------------------------------------------------------------------------------------
// Shared memory of a small-state block: the running absmax (as float32 bits with the sign cleared: an integer
// max, exact and independent of the order in which threads arrive) of each state's quantization blocks of the
// current round, double-buffered so that one barrier per phase suffices (see small_rule_block).
// ---------------------------------------------------------------------------------------------------------
constexpr int kMaxSmallStates = 3;
constexpr int kQuantBlocksPerRound = static_cast<int>(kBlockSize * kILP / kSmallQuantBlock);
// Threads per quantization block: every thread holds kILP consecutive elements of one block.
constexpr int kThreadsPerQuantBlock = static_cast<int>(kSmallQuantBlock / kILP);

struct SmallShared {
  uint32_t absmax_bits[2][kMaxSmallStates][kQuantBlocksPerRound];
};

// An integer max into shared memory: atomicMax on the device (threads of one quantization block meet here),
// a plain max on the host, where the harness runs the threads one after another.
FUSEDOPT_HD void shared_max(uint32_t* slot, uint32_t bits) {
#if defined(__CUDA_ARCH__)
  atomicMax(slot, bits);
#else
  *slot = codec::max_bits(*slot, bits);
#endif
}

}  // namespace cuda
}  // namespace fusedopt
