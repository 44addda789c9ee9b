// fusedopt::adamw_ on CPU: one parallel pass over every tensor of a param group.
#include <torch/library.h>

#include <type_traits>

#include "cpu/multi_tensor_cpu.h"
#include "fusedopt/op_args.h"

namespace fusedopt {
namespace cpu {
namespace {

// One contiguous range of one tensor. Loop-invariant choices are template parameters and all pointers are
// restrict, so the loop vectorizes.
template <bool kMaster, bool kAmsgrad, bool kLerpSmallWeight, typename P, typename S, typename T>
FUSEDOPT_CPU_CLONES void adamw_range(P* __restrict__ param, S* __restrict__ master, const P* __restrict__ grad,
                                     S* __restrict__ m, S* __restrict__ v, S* __restrict__ vmax, int64_t n,
                                     AdamWScalars<T> s, const GradTransform<T> transform) {
  s.amsgrad = kAmsgrad;
  s.lerp_small_weight = kLerpSmallWeight;  // a constant: no control flow left in the loop (bf16 needs that)
  for (int64_t j = 0; j < n; ++j) {
    T p = load_param<kMaster, T>(param, master, j);
    const T g = transform_grad(static_cast<T>(grad[j]), transform);
    T mj = static_cast<T>(m[j]);
    T vj = static_cast<T>(v[j]);
    T vmaxj = kAmsgrad ? static_cast<T>(vmax[j]) : T(0);
    adamw_update(p, g, mj, vj, vmaxj, s);
    m[j] = static_cast<S>(mj);
    v[j] = static_cast<S>(vj);
    if (kAmsgrad) vmax[j] = static_cast<S>(vmaxj);
    store_param<kMaster>(param, master, j, p);
  }
}

template <typename P, typename S>
void adamw_typed(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList max_exp_avg_sqs, TensorList steps, TensorList master_params, double lr,
                 double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                 bool decoupled_weight_decay, const GradTransform<at::opmath_type<P>>& transform) {
  using T = at::opmath_type<P>;
  const bool master = !master_params.empty();
  for_each_chunk(params, [&](int64_t i, int64_t begin, int64_t end) {
    const auto s = make_adamw_scalars<T>(lr, beta1, beta2, eps, weight_decay, *steps[i].data_ptr<int64_t>(),
                                         amsgrad, decoupled_weight_decay);
    P* param = params[i].data_ptr<P>() + begin;
    S* mp = master ? master_params[i].data_ptr<S>() + begin : nullptr;
    const P* grad = grads[i].data_ptr<P>() + begin;
    S* m = exp_avgs[i].data_ptr<S>() + begin;
    S* v = exp_avg_sqs[i].data_ptr<S>() + begin;
    S* vmax = amsgrad ? max_exp_avg_sqs[i].data_ptr<S>() + begin : nullptr;
    const int64_t n = end - begin;
    // the loop-invariant choices become template arguments
    auto run = [&](auto master_tag, auto amsgrad_tag, auto small_tag) {
      adamw_range<decltype(master_tag)::value, decltype(amsgrad_tag)::value, decltype(small_tag)::value>(
          param, mp, grad, m, v, vmax, n, s, transform);
    };
    using True = std::true_type;
    using False = std::false_type;
    if (master) {
      if (amsgrad) {
        s.lerp_small_weight ? run(True{}, True{}, True{}) : run(True{}, True{}, False{});
      } else {
        s.lerp_small_weight ? run(True{}, False{}, True{}) : run(True{}, False{}, False{});
      }
    } else {
      if (amsgrad) {
        s.lerp_small_weight ? run(False{}, True{}, True{}) : run(False{}, True{}, False{});
      } else {
        s.lerp_small_weight ? run(False{}, False{}, True{}) : run(False{}, False{}, False{});
      }
    }
  });
}

void adamw_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
               TensorList max_exp_avg_sqs, TensorList steps, TensorList master_params, double lr, double beta1,
               double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
               const OptionalTensor& lr_table, const OptionalTensor& beta1_table,
               const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
               const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
               const OptionalTensor& weight_decay_table, bool decoupled_weight_decay) {
  if (!check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, amsgrad,
                        lr_table, beta1_table, schedule_step, grad_scale, found_inf, clip_coef,
                        weight_decay_table)) {
    return;
  }
  const int64_t* step = optional_ptr<int64_t>(schedule_step);
  const double lr_now = read_table(table_view(lr_table, lr), step);
  const double beta1_now = read_table(table_view(beta1_table, beta1), step);
  const double weight_decay_now = read_table(table_view(weight_decay_table, weight_decay), step);

  dispatch_param_state(params[0].scalar_type(), !master_params.empty(), [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    GradTransform<at::opmath_type<P>> transform;
    if (!read_grad_transform(grad_scale, found_inf, clip_coef, maximize, &transform)) return;
    for (const auto& s : steps) *s.data_ptr<int64_t>() += 1;
    adamw_typed<P, S>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr_now,
                      beta1_now, beta2, eps, weight_decay_now, amsgrad, decoupled_weight_decay, transform);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("adamw_", &adamw_cpu); }

}  // namespace cpu
}  // namespace fusedopt
