// fusedopt::sgd_ on CPU: one parallel pass over every tensor of a param group.
#include <torch/library.h>

#include "cpu/multi_tensor_cpu.h"
#include "fusedopt/op_args.h"

namespace fusedopt {
namespace cpu {
namespace {

// One contiguous range of one tensor. The momentum buffer is always loaded when it exists (it is zeroed on
// creation), so the first-step and Nesterov choices are selects and the loop vectorizes.
template <bool kMaster, bool kMomentum, typename P, typename S, typename T>
FUSEDOPT_CPU_CLONES void sgd_range(P* __restrict__ param, S* __restrict__ master, const P* __restrict__ grad,
                                   S* __restrict__ buf, int64_t n, SGDScalars<T> s,
                                   const GradTransform<T> transform) {
  s.use_momentum = kMomentum;
  for (int64_t j = 0; j < n; ++j) {
    T p = load_param<kMaster, T>(param, master, j);
    const T g = transform_grad(static_cast<T>(grad[j]), transform);
    T bufj = kMomentum ? static_cast<T>(buf[j]) : T(0);
    sgd_update(p, g, bufj, s);
    if (kMomentum) buf[j] = static_cast<S>(bufj);
    store_param<kMaster>(param, master, j, p);
  }
}

template <typename P, typename S>
void sgd_typed(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList master_params,
               const SGDScalars<at::opmath_type<P>>& s, const GradTransform<at::opmath_type<P>>& transform) {
  const bool master = !master_params.empty();
  for_each_chunk(params, [&](int64_t i, int64_t begin, int64_t end) {
    P* param = params[i].data_ptr<P>() + begin;
    S* mp = master ? master_params[i].data_ptr<S>() + begin : nullptr;
    const P* grad = grads[i].data_ptr<P>() + begin;
    S* buf = s.use_momentum ? momentum_buffers[i].data_ptr<S>() + begin : nullptr;
    const int64_t n = end - begin;
    if (master) {
      s.use_momentum ? sgd_range<true, true>(param, mp, grad, buf, n, s, transform)
                     : sgd_range<true, false>(param, mp, grad, buf, n, s, transform);
    } else {
      s.use_momentum ? sgd_range<false, true>(param, mp, grad, buf, n, s, transform)
                     : sgd_range<false, false>(param, mp, grad, buf, n, s, transform);
    }
  });
}

void sgd_cpu(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList master_params,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
             bool first_step, const OptionalTensor& lr_table, const OptionalTensor& momentum_table,
             const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
             const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
             const OptionalTensor& weight_decay_table) {
  if (!check_sgd_args(params, grads, momentum_buffers, master_params, lr_table, momentum_table, schedule_step,
                      grad_scale, found_inf, clip_coef, weight_decay_table)) {
    return;
  }

  const int64_t* step = optional_ptr<int64_t>(schedule_step);
  const double lr_now = read_table(table_view(lr_table, lr), step);
  const double momentum_now = read_table(table_view(momentum_table, momentum), step);
  const double weight_decay_now = read_table(table_view(weight_decay_table, weight_decay), step);
  const bool use_momentum = !momentum_buffers.empty();

  dispatch_param_state(params[0].scalar_type(), !master_params.empty(), [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    using T = at::opmath_type<P>;
    GradTransform<T> transform;
    if (!read_grad_transform(grad_scale, found_inf, clip_coef, maximize, &transform)) return;
    const auto s = make_sgd_scalars<T>(lr_now, momentum_now, dampening, weight_decay_now, use_momentum,
                                       first_step, nesterov);
    sgd_typed<P, S>(params, grads, momentum_buffers, master_params, s, transform);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("sgd_", &sgd_cpu); }

}  // namespace cpu
}  // namespace fusedopt
