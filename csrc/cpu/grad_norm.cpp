// fusedopt::grad_norm on CPU: the global norm of a list of grads in one parallel pass, for max_grad_norm.
//
// torch.nn.utils.clip_grad_norm_ takes the norm of the per-tensor norms (torch._foreach_norm). On CPU that
// is one reduction op per tensor, about 2.5 us each: on a model with thousands of small tensors the norm
// costs more than the whole update. This op walks the same (tensor, 32 Ki chunk) work items as the update
// kernels, accumulates in float64 (GradScaler-scaled fp16 grads cannot overflow it), and adds the per-item
// partial results up in item order, so the result does not depend on the number of threads.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/scalar_tensor.h>

#include <cmath>
#include <vector>

#include "cpu/multi_tensor_cpu.h"

namespace fusedopt {
namespace cpu {
namespace {

enum class NormKind { kL1, kL2, kInf, kGeneral };

// Adds one |x| to a partial result. kInf propagates NaN like torch's max reduction (a NaN grad gives a NaN norm,
// so the clip coefficient becomes NaN, as with clip_grad_norm_).
template <NormKind kKind>
inline double accumulate(double acc, double x, double p) {
  const double a = std::fabs(x);
  if constexpr (kKind == NormKind::kL1) return acc + a;
  if constexpr (kKind == NormKind::kL2) return acc + a * a;
  if constexpr (kKind == NormKind::kInf) return (a > acc || a != a) ? a : acc;
  return acc + std::pow(a, p);
}

template <NormKind kKind>
inline double merge(double acc, double part) {
  if constexpr (kKind == NormKind::kInf) return (part > acc || part != part) ? part : acc;
  return acc + part;
}

// Eight independent partial results so the loop vectorizes without reassociating any one sum.
template <NormKind kKind, typename G>
FUSEDOPT_CPU_CLONES double partial_norm(const G* __restrict__ x, int64_t n, double p) {
  constexpr int kLanes = 8;
  double lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      lanes[k] = accumulate<kKind>(lanes[k], static_cast<double>(x[j + k]), p);
    }
  }
  for (; j < n; ++j) lanes[0] = accumulate<kKind>(lanes[0], static_cast<double>(x[j]), p);
  double total = lanes[0];
  for (int k = 1; k < kLanes; ++k) total = merge<kKind>(total, lanes[k]);
  return total;
}

template <NormKind kKind>
double total_norm(const std::vector<at::Tensor>& grads, double p) {
  const std::vector<WorkItem> items = plan_work(grads);
  std::vector<double> partial(items.size(), 0.0);
  for_each_work_item(items, [&](int64_t k, const WorkItem& item) {
    const at::Tensor& g = grads[item.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "fusedopt::grad_norm", [&] {
      partial[k] = partial_norm<kKind>(g.const_data_ptr<scalar_t>() + item.begin, item.end - item.begin, p);
    });
  });
  double total = 0.0;
  for (const double part : partial) total = merge<kKind>(total, part);
  if constexpr (kKind == NormKind::kL2) return std::sqrt(total);
  if constexpr (kKind == NormKind::kGeneral) return std::pow(total, 1.0 / p);
  return total;
}

at::Tensor grad_norm_cpu(at::TensorList grads, double norm_type) {
  TORCH_CHECK(norm_type > 0, "fusedopt::grad_norm: norm_type must be > 0 (or inf), got ", norm_type);
  // Dense grads are read in memory order (the norm does not care which element is which); others are copied.
  std::vector<at::Tensor> dense;
  dense.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.is_floating_point(), "fusedopt::grad_norm: grads[", i, "] must be floating point, got ",
                g.scalar_type());
    TORCH_CHECK(g.device().is_cpu(), "fusedopt::grad_norm: grads[", i, "] is on ", g.device(), ", expected cpu");
    dense.push_back(g.is_non_overlapping_and_dense() ? g : g.contiguous());
  }
  double norm;
  if (norm_type == 1.0) {
    norm = total_norm<NormKind::kL1>(dense, norm_type);
  } else if (norm_type == 2.0) {
    norm = total_norm<NormKind::kL2>(dense, norm_type);
  } else if (std::isinf(norm_type)) {
    norm = total_norm<NormKind::kInf>(dense, norm_type);
  } else {
    norm = total_norm<NormKind::kGeneral>(dense, norm_type);
  }
  return at::scalar_tensor(norm, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("grad_norm", &grad_norm_cpu); }

}  // namespace cpu
}  // namespace fusedopt
