// The bodies of fusedopt's CUDA kernels, written as __host__ __device__ functions of (block, thread).
//
// The __global__ kernels in csrc/cuda/multi_tensor.cuh only read blockIdx / threadIdx and call these;
// the host test harness (tests/cuda_host/hostsim.cpp, compiled by g++) runs the very same functions for
// every block and every thread, one after another, on CPU memory. Everything CUDA-only (vector types,
// atomics) is behind `#if defined(__CUDA_ARCH__)`, with a host equivalent next to it.
//
// A block's work is split in two:
//   prepare(args, block, &prep)   once per block (thread 0 on the device, result shared through shared
//                                 memory): reads found_inf (false: skip the block), grad_scale, clip_coef,
//                                 the lr / beta1 / momentum / weight-decay tables at *schedule_step,
//                                 AdamW's step of the block's tensor, and builds the rule's scalars with
//                                 make_*_scalars.
//   rule_block<Rule, P, S>(...)   per thread: walks the block's chunk, ILP elements at a time, calling the
//                                 rule's per-element update from fusedopt/rules.h.
// No math is written here: the element updates, the gradient transform and the scalars come from
// fusedopt/rules.h, like in the CPU backend.
//
// AdamW step counters: the op first runs increment_steps (its own one-block kernel, up to 508 counters per launch),
// which adds 1 to every counter unless *found_inf is set; the update kernel is launched after it on the
// same stream, so every block of every launch reads the already-incremented value, and nothing writes a
// counter while the update kernel runs. No block ever writes a counter, so there is no read/write race
// between blocks of one tensor, nor across the launches a tensor is spread over.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <cstring>

#include "cuda/launch_plan.h"
#include "cuda/state_slots.h"
#include "fusedopt/rules.h"

namespace fusedopt {
namespace cuda {

// ---------------------------------------------------------------------------------------------------------
// ILP packs and vectorized access
// ---------------------------------------------------------------------------------------------------------

// Width of one memory access of a pack of kILP elements of X: 16 bytes (128-bit) when the pack is at least
// that long (float32: one access, float64: two), else the whole pack (bf16 / fp16: one 64-bit access).
template <typename X>
constexpr int access_bytes() {
  return sizeof(X) * kILP < 16 ? static_cast<int>(sizeof(X) * kILP) : 16;
}

template <typename X>
struct alignas(access_bytes<X>()) Pack {
  X v[kILP];
};

template <typename X>
FUSEDOPT_HD bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(access_bytes<X>()) == 0;
}

// Loads / stores kILP consecutive elements at an address aligned to access_bytes<X>().
template <typename X>
FUSEDOPT_HD void load_pack(Pack<X>& dst, const X* src) {
#if defined(__CUDA_ARCH__)
  constexpr int kBytes = access_bytes<X>();
  constexpr int kAccesses = static_cast<int>(sizeof(Pack<X>)) / kBytes;
  if constexpr (kBytes == 16) {
#pragma unroll
    for (int k = 0; k < kAccesses; ++k) reinterpret_cast<uint4*>(&dst)[k] = reinterpret_cast<const uint4*>(src)[k];
  } else if constexpr (kBytes == 8) {
    *reinterpret_cast<uint2*>(&dst) = *reinterpret_cast<const uint2*>(src);
  } else {
    static_assert(kBytes == 16 || kBytes == 8, "unsupported element size");
  }
#else
  std::memcpy(dst.v, src, sizeof(dst.v));
#endif
}

template <typename X>
FUSEDOPT_HD void store_pack(X* dst, const Pack<X>& src) {
#if defined(__CUDA_ARCH__)
  constexpr int kBytes = access_bytes<X>();
  constexpr int kAccesses = static_cast<int>(sizeof(Pack<X>)) / kBytes;
  if constexpr (kBytes == 16) {
#pragma unroll
    for (int k = 0; k < kAccesses; ++k) reinterpret_cast<uint4*>(dst)[k] = reinterpret_cast<const uint4*>(&src)[k];
  } else if constexpr (kBytes == 8) {
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(&src);
  } else {
    static_assert(kBytes == 16 || kBytes == 8, "unsupported element size");
  }
#else
  std::memcpy(dst, src.v, sizeof(src.v));
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Per-block controls
// ---------------------------------------------------------------------------------------------------------

// Same values as the CPU backend's read_grad_transform (csrc/cpu/multi_tensor_cpu.h): GradScaler's float32
// reciprocal computed in double, and the float32 clip coefficient. Returns false when found_inf is set.
template <typename T>
FUSEDOPT_HD bool read_grad_transform(const Controls& c, bool maximize, GradTransform<T>* out) {
  if (c.found_inf != nullptr && *c.found_inf != 0.0f) return false;
  out->maximize = maximize;
  out->inv_scale = c.grad_scale != nullptr
                       ? static_cast<T>(static_cast<float>(1.0 / static_cast<double>(*c.grad_scale)))
                       : T(1);
  out->clip_coef = c.clip_coef != nullptr ? static_cast<T>(*c.clip_coef) : T(1);
  return true;
}

// ---------------------------------------------------------------------------------------------------------
// The rules: per-block preparation and the per-element call into fusedopt/rules.h
// ---------------------------------------------------------------------------------------------------------

struct AdamWRule {
  using Args = AdamWArgs;
  using SmallArgs = AdamWSmallArgs;
  static constexpr int kStates = 3;  // exp_avg, exp_avg_sq, max_exp_avg_sq (null unless amsgrad)
  // 8-bit maps: signed for the first moment, unsigned for the second moments
  static FUSEDOPT_HD constexpr bool signed_state(int k) { return k == 0; }
  template <typename T>
  struct Prep {
    GradTransform<T> transform;
    AdamWScalars<T> s;
  };
  template <typename T, typename A>
  static FUSEDOPT_HD bool prepare(const A& a, int64_t block, Prep<T>* out) {
    if (!read_grad_transform(a.ctl, a.hyper.maximize, &out->transform)) return false;
    const int slot = a.table.block_slot[block];
    // Already incremented by the step kernel (see the top of this file).
    const int64_t step = *static_cast<const int64_t*>(a.table.ptr[kAdamWStepList][slot]);
    const double lr = read_table(a.ctl.lr, a.ctl.schedule_step);
    const double beta1 = read_table(a.ctl.momentum, a.ctl.schedule_step);
    const double weight_decay = read_table(a.ctl.weight_decay, a.ctl.schedule_step);
    out->s = make_adamw_scalars<T>(lr, beta1, a.hyper.beta2, a.hyper.eps, weight_decay, step, a.hyper.amsgrad,
                                   a.hyper.decoupled_weight_decay);
    return true;
  }
  template <typename T>
  static FUSEDOPT_HD bool loads_state(int, const Prep<T>&) {
    return true;
  }
  template <typename T>
  static FUSEDOPT_HD void update(T& p, T g, T (&st)[kStates], const Prep<T>& prep) {
    adamw_update(p, g, st[0], st[1], st[2], prep.s);
  }
};

struct SGDRule {
  using Args = SGDArgs;
  using SmallArgs = SGDSmallArgs;
  static constexpr int kStates = 1;  // momentum_buffer (null without momentum)
  static FUSEDOPT_HD constexpr bool signed_state(int) { return true; }
  template <typename T>
  struct Prep {
    GradTransform<T> transform;
    SGDScalars<T> s;
  };
  template <typename T, typename A>
  static FUSEDOPT_HD bool prepare(const A& a, int64_t, Prep<T>* out) {
    if (!read_grad_transform(a.ctl, a.hyper.maximize, &out->transform)) return false;
    const double lr = read_table(a.ctl.lr, a.ctl.schedule_step);
    const double momentum = read_table(a.ctl.momentum, a.ctl.schedule_step);
    const double weight_decay = read_table(a.ctl.weight_decay, a.ctl.schedule_step);
    out->s = make_sgd_scalars<T>(lr, momentum, a.hyper.dampening, weight_decay, a.hyper.use_momentum,
                                 a.hyper.first_step, a.hyper.nesterov);
    return true;
  }
  // On the first step the buffer is created from the gradient: it is written, never read.
  template <typename T>
  static FUSEDOPT_HD bool loads_state(int, const Prep<T>& prep) {
    return !prep.s.first_step;
  }
  template <typename T>
  static FUSEDOPT_HD void update(T& p, T g, T (&st)[kStates], const Prep<T>& prep) {
    sgd_update(p, g, st[0], prep.s);
  }
};

struct LionRule {
  using Args = LionArgs;
  using SmallArgs = LionSmallArgs;
  static constexpr int kStates = 1;  // exp_avg
  static FUSEDOPT_HD constexpr bool signed_state(int) { return true; }
  template <typename T>
  struct Prep {
    GradTransform<T> transform;
    LionScalars<T> s;
  };
  template <typename T, typename A>
  static FUSEDOPT_HD bool prepare(const A& a, int64_t, Prep<T>* out) {
    if (!read_grad_transform(a.ctl, /*maximize=*/false, &out->transform)) return false;
    const double lr = read_table(a.ctl.lr, a.ctl.schedule_step);
    const double beta1 = read_table(a.ctl.momentum, a.ctl.schedule_step);
    const double weight_decay = read_table(a.ctl.weight_decay, a.ctl.schedule_step);
    out->s = make_lion_scalars<T>(lr, beta1, a.hyper.beta2, weight_decay);
    return true;
  }
  template <typename T>
  static FUSEDOPT_HD bool loads_state(int, const Prep<T>&) {
    return true;
  }
  template <typename T>
  static FUSEDOPT_HD void update(T& p, T g, T (&st)[kStates], const Prep<T>& prep) {
    lion_update(p, g, st[0], prep.s);
  }
};

// ---------------------------------------------------------------------------------------------------------
// The generic block body
// ---------------------------------------------------------------------------------------------------------

// The pointers of one block, already advanced to the start of its chunk.
template <typename Rule, typename P, typename S>
struct ChunkView {
  P* param;
  const P* grad;
  S* master;                  // null: the param itself holds the value
  S* state[Rule::kStates];    // null: the state is absent (not read, not written)
  int64_t n;                  // elements in this chunk
};

template <typename Rule, typename P, typename S>
FUSEDOPT_HD ChunkView<Rule, P, S> chunk_view(const typename Rule::Args& a, int64_t block) {
  const auto& tab = a.table;
  const int slot = tab.block_slot[block];
  const int64_t chunk_size = a.ctl.chunk_size;
  const int64_t begin = static_cast<int64_t>(tab.block_chunk[block]) * chunk_size;
  const int64_t remaining = tab.numel[slot] - begin;
  ChunkView<Rule, P, S> v;
  v.n = remaining < chunk_size ? remaining : chunk_size;
  v.param = static_cast<P*>(tab.ptr[kParamList][slot]) + begin;
  v.grad = static_cast<const P*>(tab.ptr[kGradList][slot]) + begin;
  void* master = tab.ptr[kMasterList][slot];
  v.master = master != nullptr ? static_cast<S*>(master) + begin : nullptr;
  for (int k = 0; k < Rule::kStates; ++k) {
    void* st = tab.ptr[kFirstStateList + k][slot];
    v.state[k] = st != nullptr ? static_cast<S*>(st) + begin : nullptr;
  }
  return v;
}

// The vectorized path is taken when the chunk size is a multiple of kILP (so every chunk starts on a
// pack boundary) and every pointer of the tensor (param, grad, master, states) is aligned to its access
// width at the chunk start: 16 bytes for float32 / float64 lists, 8 bytes for bf16 / fp16 lists. Tensors
// allocated by PyTorch are 256-byte aligned; views with a storage offset usually are not and take the
// scalar path. A tail of fewer than kILP elements at the end of a tensor is done element by element.
template <typename Rule, typename P, typename S>
FUSEDOPT_HD bool chunk_is_vectorizable(const ChunkView<Rule, P, S>& v, int64_t chunk_size) {
  if (chunk_size % kILP != 0) return false;
  bool ok = is_aligned<P>(v.param) && is_aligned<P>(v.grad);
  if (v.master != nullptr) ok = ok && is_aligned<S>(v.master);
  for (int k = 0; k < Rule::kStates; ++k) {
    if (v.state[k] != nullptr) ok = ok && is_aligned<S>(v.state[k]);
  }
  return ok;
}

template <typename Rule, typename P, typename S>
FUSEDOPT_HD bool block_is_vectorized(const typename Rule::Args& a, int64_t block) {
  return chunk_is_vectorizable(chunk_view<Rule, P, S>(a, block), a.ctl.chunk_size);
}

// One element, in registers: transform the gradient, apply the rule.
template <typename Rule, typename T>
FUSEDOPT_HD void update_element(T& p, T g, T (&st)[Rule::kStates], const typename Rule::template Prep<T>& prep) {
  g = transform_grad(g, prep.transform);
  Rule::update(p, g, st, prep);
}

// Scalar access of element j of the chunk (used by the scalar path and the vectorized path's tail).
template <typename Rule, typename P, typename S, typename T>
FUSEDOPT_HD void load_element(const ChunkView<Rule, P, S>& v, const bool (&load)[Rule::kStates], int64_t j, T& p,
                              T& g, T (&st)[Rule::kStates]) {
  p = v.master != nullptr ? static_cast<T>(v.master[j]) : static_cast<T>(v.param[j]);
  g = static_cast<T>(v.grad[j]);
  for (int k = 0; k < Rule::kStates; ++k) st[k] = load[k] ? static_cast<T>(v.state[k][j]) : T(0);
}

template <typename Rule, typename P, typename S, typename T>
FUSEDOPT_HD void store_element(const ChunkView<Rule, P, S>& v, int64_t j, T p, const T (&st)[Rule::kStates]) {
  if (v.master != nullptr) v.master[j] = static_cast<S>(p);
  v.param[j] = static_cast<P>(p);
  for (int k = 0; k < Rule::kStates; ++k) {
    if (v.state[k] != nullptr) v.state[k][j] = static_cast<S>(st[k]);
  }
}

// The work of thread `tid` (of `block_dim`) in block `block`. `prep` is the block's prepare() result.
template <typename Rule, typename P, typename S>
FUSEDOPT_HD void rule_block(const typename Rule::Args& a, const typename Rule::template Prep<at::opmath_type<P>>& prep,
                            int64_t block, int tid, int block_dim) {
  using T = at::opmath_type<P>;
  constexpr int K = Rule::kStates;
  const ChunkView<Rule, P, S> v = chunk_view<Rule, P, S>(a, block);
  bool load[K];
  for (int k = 0; k < K; ++k) load[k] = v.state[k] != nullptr && Rule::loads_state(k, prep);
  const int64_t n = v.n;

  if (chunk_is_vectorizable(v, a.ctl.chunk_size)) {
    // Thread tid handles packs tid, tid + block_dim, ...: consecutive threads read consecutive 16-byte
    // (or 8-byte) pieces, so every warp access is fully coalesced.
    const int64_t packs = n / kILP;
    for (int64_t i = tid; i < packs; i += block_dim) {
      const int64_t j = i * kILP;
      T p[kILP];
      T g[kILP];
      T st[kILP][K];
      if (v.master != nullptr) {
        Pack<S> m;
        load_pack(m, v.master + j);
        for (int e = 0; e < kILP; ++e) p[e] = static_cast<T>(m.v[e]);
      } else {
        Pack<P> m;
        load_pack(m, v.param + j);
        for (int e = 0; e < kILP; ++e) p[e] = static_cast<T>(m.v[e]);
      }
      {
        Pack<P> m;
        load_pack(m, v.grad + j);
        for (int e = 0; e < kILP; ++e) g[e] = static_cast<T>(m.v[e]);
      }
      for (int k = 0; k < K; ++k) {
        if (load[k]) {
          Pack<S> m;
          load_pack(m, v.state[k] + j);
          for (int e = 0; e < kILP; ++e) st[e][k] = static_cast<T>(m.v[e]);
        } else {
          for (int e = 0; e < kILP; ++e) st[e][k] = T(0);
        }
      }
      for (int e = 0; e < kILP; ++e) update_element<Rule>(p[e], g[e], st[e], prep);
      if (v.master != nullptr) {
        Pack<S> m;
        for (int e = 0; e < kILP; ++e) m.v[e] = static_cast<S>(p[e]);
        store_pack(v.master + j, m);
      }
      {
        Pack<P> m;
        for (int e = 0; e < kILP; ++e) m.v[e] = static_cast<P>(p[e]);
        store_pack(v.param + j, m);
      }
      for (int k = 0; k < K; ++k) {
        if (v.state[k] != nullptr) {
          Pack<S> m;
          for (int e = 0; e < kILP; ++e) m.v[e] = static_cast<S>(st[e][k]);
          store_pack(v.state[k] + j, m);
        }
      }
    }
    // The last n % kILP elements of the tensor.
    for (int64_t j = packs * kILP + tid; j < n; j += block_dim) {
      T p;
      T g;
      T st[K];
      load_element(v, load, j, p, g, st);
      update_element<Rule>(p, g, st, prep);
      store_element(v, j, p, st);
    }
  } else {
    // Scalar path: each round, thread tid handles elements base + tid + e * block_dim for e < kILP, all
    // loaded before any is computed (kILP independent loads in flight per thread), coalesced per e.
    const int64_t stride = static_cast<int64_t>(block_dim) * kILP;
    for (int64_t base = 0; base < n; base += stride) {
      T p[kILP];
      T g[kILP];
      T st[kILP][K];
      for (int e = 0; e < kILP; ++e) {
        const int64_t j = base + tid + static_cast<int64_t>(e) * block_dim;
        if (j < n) load_element(v, load, j, p[e], g[e], st[e]);
      }
      for (int e = 0; e < kILP; ++e) {
        const int64_t j = base + tid + static_cast<int64_t>(e) * block_dim;
        if (j < n) update_element<Rule>(p[e], g[e], st[e], prep);
      }
      for (int e = 0; e < kILP; ++e) {
        const int64_t j = base + tid + static_cast<int64_t>(e) * block_dim;
        if (j < n) store_element(v, j, p[e], st[e]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The small-state block body (8-bit / bfloat16 / float32 states with float32 or bfloat16 params, stochastic
// rounding): one pass over memory, the storage formats of csrc/cuda/state_slots.h around the same rules.
// ---------------------------------------------------------------------------------------------------------
//
// The block walks its chunk (a multiple of 256 elements, starting on a quantization block of its tensor) in
// rounds of block_dim * 4 elements; thread tid holds the 4 consecutive elements 4 * tid .. 4 * tid + 3 of a round,
// so each 8-bit quantization block of 256 elements belongs to the 64 threads tid / 64 == q of one round.
// A round is one or two phases, separated by block barriers:
//   phase 1  load (8-bit: decode with the block's stored absmax), update, store the param (and non-8-bit states);
//            8-bit: keep the updated values in registers and max their |x| bits into the shared absmax of
//            their quantization block
//   barrier
//   phase 2  (8-bit only) read the block's new absmax, encode the 4 values, store codes and the absmax
//   barrier
// The shared absmax slots are double-buffered by round parity: phase 2 of round r zeroes the slots round r + 1
// will use, which nobody reads after the barrier that ended round r - 1.
//
// `Exec` runs the phases: Exec::threads(fn) calls fn(tid, regs of tid) for every thread of the block, and
// Exec::sync() is the barrier. On the device (csrc/cuda/multi_tensor.cuh) threads() is one call in each thread
// and sync() is __syncthreads(); the host harness (tests/cuda_host/hostsim.cpp) calls fn for every tid in turn,
// each with its own registers, so its run is this very code path with the barriers where they are. Code outside
// threads() is uniform across the block (it only reads kernel arguments).

// Loops over the 4 elements of a thread and over the states, fully unrolled on the device so that the per-element
// arrays stay in registers (a loop bounded by the element count would index them dynamically: local memory).
#if defined(__CUDA_ARCH__)
#define FUSEDOPT_UNROLL _Pragma("unroll")
#else
#define FUSEDOPT_UNROLL
#endif

// The registers of one thread that live across a barrier: its updated 8-bit state values.
template <int K>
struct SmallRegs {
  float st[kILP][K];
};

template <typename Rule, typename P, typename Fmt, typename Exec>
FUSEDOPT_HD void small_rule_block(Exec& ex, const typename Rule::SmallArgs& a,
                                  const typename Rule::template Prep<float>& prep, SmallShared& sh, int64_t block) {
  static_assert(kSmallStateParam<P>, "small-state kernels take float32 or bfloat16 params");
  using PS = typename ParamStorage<P>::type;
  using SS = typename Fmt::Storage;
  using Args = typename Rule::SmallArgs;
  constexpr int K = Rule::kStates;
  static_assert(K <= kMaxSmallStates, "too many states");

  // The block's chunk (uniform across the block).
  const auto& tab = a.table;
  const int slot = tab.block_slot[block];
  const int64_t chunk_size = a.ctl.chunk_size;
  const int64_t begin = static_cast<int64_t>(tab.block_chunk[block]) * chunk_size;
  const int64_t remaining = tab.numel[slot] - begin;
  const int64_t n = remaining < chunk_size ? remaining : chunk_size;
  PS* const param = static_cast<PS*>(tab.ptr[kParamList][slot]) + begin;
  const PS* const grad = static_cast<const PS*>(tab.ptr[kGradList][slot]) + begin;
  float* const master = tab.ptr[kMasterList][slot] != nullptr ? static_cast<float*>(tab.ptr[kMasterList][slot]) + begin
                                                              : nullptr;
  SS* state[K];
  float* absmax[K];  // 8-bit: the absmax of the chunk's first quantization block
  bool load[K];
  FUSEDOPT_UNROLL for (int k = 0; k < K; ++k) {
    void* st = tab.ptr[kFirstStateList + k][slot];
    void* am = tab.ptr[Args::kFirstAbsmaxList + k][slot];
    state[k] = st != nullptr ? static_cast<SS*>(st) + begin : nullptr;
    absmax[k] = am != nullptr ? static_cast<float*>(am) + begin / kSmallQuantBlock : nullptr;
    load[k] = state[k] != nullptr && Rule::loads_state(k, prep);
  }
  // One access per 4 elements when every pointer of the tensor is aligned to it at the chunk start.
  bool vector = quad_aligned<PS>(param) && quad_aligned<PS>(grad) && quad_aligned<float>(master);
  FUSEDOPT_UNROLL for (int k = 0; k < K; ++k) vector = vector && quad_aligned<SS>(state[k]);

  // Stochastic rounding: the key of each stream (0 = the param, 1 + k = state k), as the CPU slots build them.
  const bool stochastic = a.rounding.step != nullptr;
  codec::RoundingKey keys[K + 1] = {};
  if (stochastic) {
    const int64_t rstep = *a.rounding.step;
    FUSEDOPT_UNROLL for (int s = 0; s <= K; ++s) {
      keys[s] = codec::rounding_key(a.rounding.seed, rstep, 4 * a.stream_index[slot] + s);
    }
  }
  const uint64_t first_element = static_cast<uint64_t>(a.stream_offset[slot] + begin);
  const bool param_stochastic = stochastic && kBf16Param<P> && master == nullptr;

  const int block_dim = ex.block_dim();
  const int64_t round = static_cast<int64_t>(block_dim) * kILP;

  if constexpr (Fmt::kQuantized) {
    ex.threads([&](int tid, SmallRegs<K>&) {
      for (int i = tid; i < 2 * K * kQuantBlocksPerRound; i += block_dim) {
        sh.absmax_bits[i / (K * kQuantBlocksPerRound)][(i / kQuantBlocksPerRound) % K][i % kQuantBlocksPerRound] = 0;
      }
    });
    ex.sync();
  }

  int parity = 0;
  for (int64_t base = 0; base < n; base += round, parity ^= 1) {
    // Phase 1: load, update, store the param (and the states unless 8-bit).
    ex.threads([&](int tid, SmallRegs<K>& r) {
      const int64_t j = base + static_cast<int64_t>(tid) * kILP;  // within the chunk
      const int64_t left = n - j;
      if (left <= 0) return;
      const int count = left < kILP ? static_cast<int>(left) : kILP;
      const int q = tid / kThreadsPerQuantBlock;  // the quantization block within the round
      float p[kILP];
      float g[kILP];
      float st[kILP][K];
      {
        Quad<PS> w;
        load_quad(w, grad + j, count, vector);
        FUSEDOPT_UNROLL for (int e = 0; e < kILP; ++e) if (e < count) g[e] = ParamStorage<P>::widen(w.v[e]);
      }
      if (master != nullptr) {
        Quad<float> w;
        load_quad(w, master + j, count, vector);
        FUSEDOPT_UNROLL for (int e = 0; e < kILP; ++e) if (e < count) p[e] = w.v[e];
      } else {
        Quad<PS> w;
        load_quad(w, param + j, count, vector);
        FUSEDOPT_UNROLL for (int e = 0; e < kILP; ++e) if (e < count) p[e] = ParamStorage<P>::widen(w.v[e]);
      }
      FUSEDOPT_UNROLL for (int k = 0; k < K; ++k) {
        if (!load[k]) {
          for (int e = 0; e < kILP; ++e) st[e][k] = 0.0f;
          continue;
        }
        Quad<SS> w;
        load_quad(w, state[k] + j, count, vector);
        if constexpr (Fmt::kQuantized) {
          const float scale = absmax[k][(base + static_cast<int64_t>(q) * kSmallQuantBlock) / kSmallQuantBlock];
          FUSEDOPT_UNROLL for (int e = 0; e < kILP; ++e) if (e < count) {
            st[e][k] = Rule::signed_state(k) ? Fmt::template decode<MapOf<true>>(w.v[e], scale)
                                             : Fmt::template decode<MapOf<false>>(w.v[e], scale);
          }
        } else {
          FUSEDOPT_UNROLL for (int e = 0; e < kILP; ++e) if (e < count) st[e][k] = Fmt::widen(w.v[e]);
        }
      }
      FUSEDOPT_UNROLL for (int e = 0; e < kILP; ++e) if (e < count) update_element<Rule>(p[e], g[e], st[e], prep);
      const uint64_t element = first_element + static_cast<uint64_t>(j);  // in the full tensor
      if (master != nullptr) {
        Quad<float> w;
        FUSEDOPT_UNROLL for (int e = 0; e < kILP; ++e) if (e < count) w.v[e] = p[e];
        store_quad(master + j, w, count, vector);
      }
      {
        Quad<PS> w;
        FUSEDOPT_UNROLL for (int e = 0; e < kILP; ++e) if (e < count) {
          const uint32_t bits = param_stochastic ? codec::random_bits(keys[0], element + e) : 0u;
          w.v[e] = round_param<P>(p[e], param_stochastic, bits);
        }
        store_quad(param + j, w, count, vector);
      }
      FUSEDOPT_UNROLL for (int k = 0; k < K; ++k) {
        if (state[k] == nullptr) continue;
        if constexpr (Fmt::kQuantized) {
          uint32_t top = 0;
          FUSEDOPT_UNROLL for (int e = 0; e < kILP; ++e) if (e < count) {
            r.st[e][k] = st[e][k];
            top = codec::max_bits(top, codec::abs_bits(st[e][k]));
          }
          shared_max(&sh.absmax_bits[parity][k][q], top);
        } else {
          Quad<SS> w;
          FUSEDOPT_UNROLL for (int e = 0; e < kILP; ++e) if (e < count) {
            const uint32_t bits = stochastic ? codec::random_bits(keys[1 + k], element + e) : 0u;
            w.v[e] = Fmt::round(st[e][k], stochastic, bits);
          }
          store_quad(state[k] + j, w, count, vector);
        }
      }
    });
    if constexpr (Fmt::kQuantized) {
      ex.sync();
      // Phase 2: the quantization blocks' new absmax, then every code.
      ex.threads([&](int tid, SmallRegs<K>& r) {
        const int q = tid / kThreadsPerQuantBlock;
        const bool leader = tid % kThreadsPerQuantBlock == 0;
        if (leader) {
          FUSEDOPT_UNROLL for (int k = 0; k < K; ++k) sh.absmax_bits[parity ^ 1][k][q] = 0;  // for the next round
        }
        const int64_t j = base + static_cast<int64_t>(tid) * kILP;
        const int64_t left = n - j;
        if (left <= 0) return;
        const int count = left < kILP ? static_cast<int>(left) : kILP;
        FUSEDOPT_UNROLL for (int k = 0; k < K; ++k) {
          if (state[k] == nullptr) continue;
          const float block_absmax = codec::bits_float(sh.absmax_bits[parity][k][q]);
          const float inv = codec::inverse_absmax(block_absmax);
          Quad<SS> w;
          FUSEDOPT_UNROLL for (int e = 0; e < kILP; ++e) if (e < count) {
            w.v[e] = Rule::signed_state(k) ? Fmt::template encode<MapOf<true>>(r.st[e][k], inv)
                                           : Fmt::template encode<MapOf<false>>(r.st[e][k], inv);
          }
          store_quad(state[k] + j, w, count, vector);
          // the leader's first element is the block's first: the block has elements here
          if (leader) absmax[k][(base + static_cast<int64_t>(q) * kSmallQuantBlock) / kSmallQuantBlock] = block_absmax;
        }
      });
      ex.sync();
    }
  }
}

// The step-counter kernel's body: +1 on every counter unless found_inf is set. atomicAdd on the device so
// that a counter listed twice (which the CPU backend would also increment twice) is incremented twice.
FUSEDOPT_HD void increment_steps(const StepArgs& a, int tid, int block_dim) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  for (int i = tid; i < a.count; i += block_dim) {
#if defined(__CUDA_ARCH__)
    atomicAdd(reinterpret_cast<unsigned long long*>(a.steps[i]), 1ull);
#else
    *a.steps[i] += 1;
#endif
  }
}

}  // namespace cuda
}  // namespace fusedopt
