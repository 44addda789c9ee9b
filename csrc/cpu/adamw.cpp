// fusedopt::adamw_ on CPU: one parallel pass over every tensor of a param group.
#include <torch/library.h>

#include <type_traits>

#include "cpu/multi_tensor_cpu.h"
#include "cpu/state_io.h"
#include "fusedopt/op_args.h"

namespace fusedopt {
namespace cpu {
namespace {

// One contiguous range of one tensor, walked by the shared element loop (cpu/state_io.h) with the param and
// state slots of the tensor's formats. Loop-invariant choices are template parameters and all pointers are
// restrict, so the loop vectorizes.
template <bool kAmsgrad, bool kLerpSmallWeight, typename T, typename Param, typename G, typename M, typename V,
          typename X>
FUSEDOPT_CPU_CLONES void adamw_range(Param param, const G* __restrict__ grad, M m, V v, X vmax, int64_t n,
                                     AdamWScalars<T> s, const GradTransform<T> transform) {
  s.amsgrad = kAmsgrad;
  s.lerp_small_weight = kLerpSmallWeight;  // a constant: no control flow left in the loop (bf16 needs that)
  for_each_element<T>(param, grad, n, transform,
                      [&](T& p, T g, T* st) { adamw_update(p, g, st[0], st[1], st[2], s); }, m, v, vmax);
}

template <typename P, typename S>
void adamw_typed(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList max_exp_avg_sqs, TensorList steps, TensorList master_params, double lr,
                 double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                 bool decoupled_weight_decay, const GradTransform<at::opmath_type<P>>& transform,
                 TensorList absmaxes, const RoundingArgs& rounding) {
  using T = at::opmath_type<P>;
  const bool master = !master_params.empty();
  const auto plain = c10::CppTypeToScalarType<S>::value;
  const size_t count = params.size();
  for_each_chunk(params, [&](int64_t i, int64_t begin, int64_t end) {
    const auto s = make_adamw_scalars<T>(lr, beta1, beta2, eps, weight_decay, *steps[i].data_ptr<int64_t>(),
                                         amsgrad, decoupled_weight_decay);
    const P* grad = grads[i].data_ptr<P>() + begin;
    const int64_t n = end - begin;
    const auto stream = [&](int slot) { return rounding.on ? rounding.stream(i, slot, begin) : Stream{}; };
    dispatch_param<P, S>(params[i], master ? &master_params[i] : nullptr, begin, rounding, i, [&](auto param) {
      dispatch_format<P, S>(state_format(exp_avgs[i], plain, rounding.on), [&](auto format) {
        using F = decltype(format);
        auto m = F::template make<codec::SignedMap>(exp_avgs[i], absmax_of(absmaxes, count, 0, i), begin, stream(1));
        auto v = F::template make<codec::UnsignedMap>(exp_avg_sqs[i], absmax_of(absmaxes, count, 1, i), begin,
                                                      stream(2));
        // the loop-invariant choices become template arguments
        auto run = [&](auto amsgrad_tag, auto small_tag) {
          constexpr bool kAmsgrad = decltype(amsgrad_tag)::value;
          if constexpr (kAmsgrad) {
            auto vmax = F::template make<codec::UnsignedMap>(max_exp_avg_sqs[i], absmax_of(absmaxes, count, 2, i),
                                                             begin, stream(3));
            adamw_range<true, decltype(small_tag)::value>(param, grad, m, v, vmax, n, s, transform);
          } else {
            adamw_range<false, decltype(small_tag)::value>(param, grad, m, v, NoSlot{}, n, s, transform);
          }
        };
        using True = std::true_type;
        using False = std::false_type;
        if (amsgrad) {
          s.lerp_small_weight ? run(True{}, True{}) : run(True{}, False{});
        } else {
          s.lerp_small_weight ? run(False{}, True{}) : run(False{}, False{});
        }
      });
    });
  });
}

void adamw_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
               TensorList max_exp_avg_sqs, TensorList steps, TensorList master_params, double lr, double beta1,
               double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
               const OptionalTensor& lr_table, const OptionalTensor& beta1_table,
               const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
               const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
               const OptionalTensor& weight_decay_table, bool decoupled_weight_decay,
               const OptionalTensorList& state_absmaxes, c10::IntArrayRef rounding,
               const OptionalTensor& rounding_step) {
  constexpr const char* op = "fusedopt::adamw_";
  const bool small_state = state_absmaxes.has_value();
  if (!check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, amsgrad,
                        lr_table, beta1_table, schedule_step, grad_scale, found_inf, clip_coef,
                        weight_decay_table, small_state)) {
    return;
  }
  if (small_state) {
    check_small_states(op, params, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs},
                       {"exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"}, *state_absmaxes,
                       state_dtype(params, master_params));
  }
  check_rounding(op, params, rounding, rounding_step);
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
    const RoundingArgs rounding_args = read_rounding(rounding, rounding_step, params.size(), op);
    adamw_typed<P, S>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr_now,
                      beta1_now, beta2, eps, weight_decay_now, amsgrad, decoupled_weight_decay, transform,
                      small_state ? *state_absmaxes : TensorList(), rounding_args);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("adamw_", &adamw_cpu); }

}  // namespace cpu
}  // namespace fusedopt
