// How the CPU kernels load and store params and states: the storage side of the update, kept apart from the
// rules (fusedopt/rules.h) and shared by the adamw_, sgd_ and lion_ loops.
//
// The loops walk a work item in blocks of kQuantBlock (256) elements (work items start at multiples of it, and
// blocks restart at every tensor, so they are the 8-bit format's blocks). Per block: every state slot's
// begin_block() (8-bit: decode the codes into a float buffer that stays in L1), the rule on each element
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
    ptr[b + j] = static_cast<S>(x);
  }
};

struct Bf16SrSlot {
  uint16_t* __restrict__ ptr;
  Stream stream;
  void begin_block(int64_t, int64_t) {}
  void end_block(int64_t, int64_t) {}
  template <typename T>
  T load(int64_t b, int64_t j) const {
    return static_cast<T>(codec::bf16_to_float(ptr[b + j]));
  }
  template <typename T>
  void store(int64_t b, int64_t j, T x) {
    ptr[b + j] = codec::bf16_round_stochastic(static_cast<float>(x), stream_bits(stream, b + j));
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

template <typename Map>
struct Q8Slot {
  uint8_t* __restrict__ codes;
  float* __restrict__ absmax;  // of the work item's first block
  const float* __restrict__ table;
  alignas(64) float buf[kQuantBlock];

  Q8Slot(uint8_t* c, float* a) : codes(c), absmax(a), table(decode_table<Map>()) {}

  void begin_block(int64_t b, int64_t len) {
    const float scale = absmax[b / kQuantBlock];
    const uint8_t* __restrict__ in = codes + b;
    for (int64_t j = 0; j < len; ++j) buf[j] = table[in[j]] * scale;
  }
  // The block's new absmax (an integer max of the bit patterns: exact, a NaN wins), then every code.
  void end_block(int64_t b, int64_t len) {
    uint32_t top = 0;
    for (int64_t j = 0; j < len; ++j) top = codec::max_bits(top, codec::abs_bits(buf[j]));
    const float block_absmax = codec::bits_float(top);
    const float inv = codec::inverse_absmax(block_absmax);
    uint8_t* __restrict__ out = codes + b;
    for (int64_t j = 0; j < len; ++j) out[j] = static_cast<uint8_t>(codec::encode_8bit<Map>(buf[j] * inv));
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

// ---------------------------------------------------------------------------------------------------------
// Params
// ---------------------------------------------------------------------------------------------------------
template <typename P>
struct MasterParam {
  P* __restrict__ param;
  float* __restrict__ master;
  template <typename T>
  T load(int64_t e) const {
    return static_cast<T>(master[e]);
  }
  template <typename T>
  void store(int64_t e, T p) {
    master[e] = static_cast<float>(p);
    param[e] = static_cast<P>(p);  // the rounded result
  }
};

template <typename P>
struct PlainParam {
  P* __restrict__ param;
  template <typename T>
  T load(int64_t e) const {
    return static_cast<T>(param[e]);
  }
  template <typename T>
  void store(int64_t e, T p) {
    param[e] = static_cast<P>(p);
  }
};

struct SrParam {
  uint16_t* __restrict__ param;  // bfloat16 bits
  Stream stream;
  template <typename T>
  T load(int64_t e) const {
    return static_cast<T>(codec::bf16_to_float(param[e]));
  }
  template <typename T>
  void store(int64_t e, T p) {
    param[e] = codec::bf16_round_stochastic(static_cast<float>(p), stream_bits(stream, e));
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
  static PlainSlot<S> make(const at::Tensor& t, const at::Tensor*, int64_t begin, const Stream&) {
    return PlainSlot<S>{t.data_ptr<S>() + begin};
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
    TORCH_CHECK(master == nullptr, "fusedopt: master_params are float32 copies of bfloat16 / float16 params; ",
                c10::CppTypeToScalarType<P>::value, " params are their own master copy");
    if constexpr (std::is_same_v<P, at::BFloat16>) {
      if (rounding.on) {
        fn(SrParam{reinterpret_cast<uint16_t*>(param.data_ptr<P>()) + begin, rounding.stream(tensor, 0, begin)});
        return;
      }
    }
    fn(PlainParam<P>{param.data_ptr<P>() + begin});
  }
}

// The absmax tensor of state list `slot` (0-based) of tensor i (read only for 8-bit states), or nullptr.
inline const at::Tensor* absmax_of(at::TensorList absmaxes, size_t num_tensors, int slot, size_t i) {
  return absmaxes.empty() ? nullptr : &absmaxes[slot * num_tensors + i];
}

}  // namespace cpu
}  // namespace fusedopt
