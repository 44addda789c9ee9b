// The CPU counterpart of multi-tensor apply: every tensor of a list is cut into chunks, the chunks of all
// tensors form one flat work list, and at::parallel_for spreads that list over the intra-op threads. One op
// call thus updates a whole param group with one parallel region, however many tensors it holds.
//
// The inner loops are plain loops over the shared rules in fusedopt/rules.h. They are branch-free in the
// element index (loop-invariant choices are template parameters), so the compiler vectorizes them.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "fusedopt/rules.h"

namespace fusedopt {
namespace cpu {

// 32 Ki elements per work item: 128 KiB per float32 stream, so the 4-7 streams of one item stay inside
// a core's L2 while a work item is still long enough to amortize the per-item setup.
constexpr int64_t kChunkElements = int64_t{1} << 15;

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<WorkItem> plan_work(at::TensorList params) {
  std::vector<WorkItem> items;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    for (int64_t begin = 0; begin < n; begin += kChunkElements) {
      items.push_back({static_cast<int64_t>(i), begin, std::min(n, begin + kChunkElements)});
    }
  }
  return items;
}

// fn(k, items[k]) runs once per work item, possibly on several threads at once.
template <typename Fn>
void for_each_work_item(const std::vector<WorkItem>& items, const Fn& fn) {
  int64_t total = 0;
  for (const auto& item : items) total += item.end - item.begin;
  const int64_t count = static_cast<int64_t>(items.size());
  if (total <= kChunkElements) {
    // Less than one work item of elements: waking the thread pool costs more than the work itself.
    for (int64_t k = 0; k < count; ++k) fn(k, items[k]);
    return;
  }
  at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) fn(k, items[k]);
  });
}

// fn(tensor_index, begin, end) runs once per work item of the tensors, possibly on several threads at once.
template <typename Fn>
void for_each_chunk(at::TensorList params, const Fn& fn) {
  for_each_work_item(plan_work(params), [&](int64_t, const WorkItem& item) { fn(item.tensor, item.begin, item.end); });
}

// The inner loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC function
// multiversioning), as torch does for its own CPU kernels. Contraction into FMA stays off (-ffp-contract=off):
// the rules fuse a multiply-add only where they say so (fma_host_device, where torch's eager ops fuse), so
// every variant rounds exactly the same way and results do not depend on the machine. The vectorized
// variants must include FMA: "avx2" alone does not (Haswell added AVX2 and FMA as separate extensions), so
// they are x86-64-v3 (AVX2, FMA, BMI, ...) and x86-64-v4 (plus AVX-512 F/BW/DQ/VL); std::fma is then one
// vfmadd instruction per vector. Only the baseline variant, for CPUs without FMA (before 2013), calls libm's
// fma per element (glibc: a software fused multiply-add; see benchmarks/README.md for its cost).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ < 11
// No x86-64-v3 / v4 names before GCC 11, and target_clones cannot combine features in one clone: "fma"
// (which implies AVX) is the vectorized variant there.
#define FUSEDOPT_CPU_CLONES __attribute__((target_clones("fma", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The AVX-512 variant is x86-64-v4 (F, BW, DQ, VL), not plain avx512f: bf16 / fp16 params are packed with 16-bit
// lane instructions (AVX512BW), without which a bf16 loop drops to 256-bit AVX2 code with register spills
// (measured: bf16 + master AdamW 1.6x slower than float32 on one core, the same bytes per param).
#define FUSEDOPT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSEDOPT_CPU_CLONES
#endif

// Loop-invariant choices become template arguments of the inner loops, so no control flow is left in them (with
// bf16 / fp16 storage GCC does not if-convert the rules' selects next to the conversions, and the loop would
// not vectorize). bool_dispatch calls fn(std::true_type{}) or fn(std::false_type{}).
template <typename Fn>
void bool_dispatch(bool b, const Fn& fn) {
  b ? fn(std::true_type{}) : fn(std::false_type{});
}

// fn(kMaster tag) for the (param, state) dtype pairs dispatch_param_state (op_args.h) produces: states of
// another dtype than the params mean master weights, states of the params' dtype other than float32 mean
// none; only float32 params may come either way. Unreachable pairs are not instantiated.
template <typename P, typename S, typename Fn>
void master_dispatch(bool master, const Fn& fn) {
  if constexpr (!std::is_same_v<S, P>) {
    fn(std::true_type{});
  } else if constexpr (!std::is_same_v<S, float>) {
    fn(std::false_type{});
  } else {
    bool_dispatch(master, fn);
  }
}

// The parameter as the update sees it: its float32 master copy when there is one, else the param itself.
template <bool kMaster, typename T, typename P, typename S>
inline T load_param(const P* __restrict__ param, const S* __restrict__ master, int64_t j) {
  return kMaster ? static_cast<T>(master[j]) : static_cast<T>(param[j]);
}

template <bool kMaster, typename T, typename P, typename S>
inline void store_param(P* __restrict__ param, S* __restrict__ master, int64_t j, T p) {
  if (kMaster) master[j] = static_cast<S>(p);
  param[j] = static_cast<P>(p);  // with a master copy: the rounded result
}

// Reads the AMP / clipping control tensors once per op call. Returns false when found_inf says to skip.
template <typename T>
inline bool read_grad_transform(const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf,
                                const std::optional<at::Tensor>& clip_coef, bool maximize,
                                GradTransform<T>* out) {
  if (found_inf.has_value() && *found_inf->data_ptr<float>() != 0.0f) return false;
  out->maximize = maximize;
  // GradScaler.unscale_ multiplies by the float32 reciprocal of the scale, computed in double.
  out->inv_scale = grad_scale.has_value()
                       ? static_cast<T>(static_cast<float>(1.0 / static_cast<double>(*grad_scale->data_ptr<float>())))
                       : T(1);
  out->clip_coef = clip_coef.has_value() ? static_cast<T>(*clip_coef->data_ptr<float>()) : T(1);
  return true;
}

}  // namespace cpu
}  // namespace fusedopt
