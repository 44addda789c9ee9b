// fusedopt::grads_ready: the fast path of the optimizers' step() validation.
//
// step() must check every grad before it modifies anything (shape, dtype, device, layout), and give the
// kernels dense tensors with matching strides. Done from Python that costs about a microsecond per param, which
// dominates a step over thousands of small tensors. This op answers in one call whether a whole param group is
// the common case: every param has a grad, all params share one dtype and one device, and each grad matches
// its param in dtype, device, shape and (dense) memory layout. When it says false, step() falls back to its
// per-param Python path, which handles every other case and words the errors; so this op never raises and
// needs no messages of its own.
//
// It reads metadata only, so it is registered once for every dispatch key (CompositeImplicitAutograd): CPU,
// CUDA and fake tensors alike.
#include <torch/library.h>

#include <optional>

#include "fusedopt/op_args.h"

namespace fusedopt {
namespace {

bool grads_ready(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads) {
  if (params.size() != grads.size() || params.empty()) return false;
  const auto dtype = params[0].scalar_type();
  const auto device = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const std::optional<at::Tensor> g = grads[i];
    if (!g.has_value() || !g->defined()) return false;
    if (g->layout() != at::kStrided || p.layout() != at::kStrided) return false;
    if (p.scalar_type() != dtype || g->scalar_type() != dtype) return false;
    if (p.device() != device || g->device() != device) return false;
    // what check_params and check_same_layout (fusedopt/op_args.h) require of params and grads
    if (g->sizes() != p.sizes() || !p.is_non_overlapping_and_dense() || !walks_like(p, *g)) return false;
  }
  return true;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CompositeImplicitAutograd, m) { m.impl("grads_ready", &grads_ready); }

}  // namespace fusedopt
