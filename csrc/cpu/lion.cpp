// fusedopt::lion_ on CPU: one parallel pass over every tensor of a param group.
#include <torch/library.h>

#include "cpu/multi_tensor_cpu.h"
#include "fusedopt/op_args.h"

namespace fusedopt {
namespace cpu {
namespace {

// One contiguous range of one tensor (restrict pointers: the loop vectorizes).
template <bool kMaster, typename P, typename S, typename T>
FUSEDOPT_CPU_CLONES void lion_range(P* __restrict__ param, S* __restrict__ master, const P* __restrict__ grad,
                                    S* __restrict__ m, int64_t n, const LionScalars<T> s,
                                    const GradTransform<T> transform) {
  for (int64_t j = 0; j < n; ++j) {
    T p = load_param<kMaster, T>(param, master, j);
    const T g = transform_grad(static_cast<T>(grad[j]), transform);
    T mj = static_cast<T>(m[j]);
    lion_update(p, g, mj, s);
    m[j] = static_cast<S>(mj);
    store_param<kMaster>(param, master, j, p);
  }
}

template <typename P, typename S>
void lion_typed(TensorList params, TensorList grads, TensorList exp_avgs, TensorList master_params,
                const LionScalars<at::opmath_type<P>>& s, const GradTransform<at::opmath_type<P>>& transform) {
  const bool master = !master_params.empty();
  for_each_chunk(params, [&](int64_t i, int64_t begin, int64_t end) {
    P* param = params[i].data_ptr<P>() + begin;
    S* mp = master ? master_params[i].data_ptr<S>() + begin : nullptr;
    const P* grad = grads[i].data_ptr<P>() + begin;
    S* m = exp_avgs[i].data_ptr<S>() + begin;
    const int64_t n = end - begin;
    master ? lion_range<true>(param, mp, grad, m, n, s, transform)
           : lion_range<false>(param, mp, grad, m, n, s, transform);
  });
}

void lion_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList master_params, double lr,
              double beta1, double beta2, double weight_decay, const OptionalTensor& lr_table,
              const OptionalTensor& beta1_table, const OptionalTensor& schedule_step,
              const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
              const OptionalTensor& clip_coef, const OptionalTensor& weight_decay_table) {
  if (!check_lion_args(params, grads, exp_avgs, master_params, lr_table, beta1_table, schedule_step, grad_scale,
                       found_inf, clip_coef, weight_decay_table)) {
    return;
  }

  const int64_t* step = optional_ptr<int64_t>(schedule_step);
  const double lr_now = read_table(table_view(lr_table, lr), step);
  const double beta1_now = read_table(table_view(beta1_table, beta1), step);
  const double weight_decay_now = read_table(table_view(weight_decay_table, weight_decay), step);

  dispatch_param_state(params[0].scalar_type(), !master_params.empty(), [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    using T = at::opmath_type<P>;
    GradTransform<T> transform;
    if (!read_grad_transform(grad_scale, found_inf, clip_coef, /*maximize=*/false, &transform)) return;
    const auto s = make_lion_scalars<T>(lr_now, beta1_now, beta2, weight_decay_now);
    lion_typed<P, S>(params, grads, exp_avgs, master_params, s, transform);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("lion_", &lion_cpu); }

}  // namespace cpu
}  // namespace fusedopt
