// fusedopt::lion_ on CPU: one parallel pass over every tensor of a param group.
#include <torch/library.h>

#include "cpu/multi_tensor_cpu.h"
#include "fusedopt/op_args.h"

namespace fusedopt {
namespace cpu {
namespace {

template <typename P, typename S>
void lion_typed(TensorList params, TensorList grads, TensorList exp_avgs, TensorList master_params,
                const LionScalars<at::opmath_type<P>>& s, const GradTransform<at::opmath_type<P>>& transform) {
  using T = at::opmath_type<P>;
  const bool master = !master_params.empty();
  for_each_chunk(params, [&](int64_t i, int64_t begin, int64_t end) {
    S* m = exp_avgs[i].data_ptr<S>();
    auto body = [&](int64_t j, T& p, T g) {
      T mj = static_cast<T>(m[j]);
      lion_update(p, g, mj, s);
      m[j] = static_cast<S>(mj);
    };
    P* param = params[i].data_ptr<P>();
    const P* grad = grads[i].data_ptr<P>();
    if (master) {
      update_range<true, T>(param, master_params[i].data_ptr<S>(), grad, begin, end, transform, body);
    } else {
      update_range<false, T>(param, static_cast<S*>(nullptr), grad, begin, end, transform, body);
    }
  });
}

void lion_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList master_params, double lr,
              double beta1, double beta2, double weight_decay, const OptionalTensor& lr_table,
              const OptionalTensor& beta1_table, const OptionalTensor& schedule_step,
              const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
              const OptionalTensor& clip_coef) {
  constexpr const char* op = "fusedopt::lion_";
  check_params(op, params);
  if (params.empty()) return;
  const auto sdtype = state_dtype(params, master_params);
  check_list(op, "grads", params, grads, true, params[0].scalar_type());
  check_list(op, "exp_avgs", params, exp_avgs, true, sdtype);
  check_list(op, "master_params", params, master_params, false, at::kFloat);
  check_controls(op, params, lr_table, beta1_table, schedule_step, grad_scale, found_inf, clip_coef);

  const int64_t* step = optional_ptr<int64_t>(schedule_step);
  const double lr_now = read_table(table_view(lr_table, lr), step);
  const double beta1_now = read_table(table_view(beta1_table, beta1), step);

  dispatch_param_state(params[0].scalar_type(), !master_params.empty(), [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    using T = at::opmath_type<P>;
    GradTransform<T> transform;
    if (!read_grad_transform(grad_scale, found_inf, clip_coef, /*maximize=*/false, &transform)) return;
    const auto s = make_lion_scalars<T>(lr_now, beta1_now, beta2, weight_decay);
    lion_typed<P, S>(params, grads, exp_avgs, master_params, s, transform);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("lion_", &lion_cpu); }

}  // namespace cpu
}  // namespace fusedopt
