// fusedopt::lion_ on CPU: one parallel pass over every tensor of a param group.
#include <torch/library.h>

#include "cpu/multi_tensor_cpu.h"
#include "cpu/state_io.h"
#include "fusedopt/op_args.h"

namespace fusedopt {
namespace cpu {
namespace {

// One contiguous range of one tensor, walked by the shared element loop (cpu/state_io.h).
template <typename T, typename Param, typename G, typename M>
FUSEDOPT_CPU_CLONES void lion_range(Param param, const G* __restrict__ grad, M m, int64_t n, const LionScalars<T> s,
                                    const GradTransform<T> transform) {
  for_each_element<T>(param, grad, n, transform, [&](T& p, T g, T* st) { lion_update(p, g, st[0], s); }, m);
}

template <typename P, typename S>
void lion_typed(TensorList params, TensorList grads, TensorList exp_avgs, TensorList master_params,
                const LionScalars<at::opmath_type<P>>& s, const GradTransform<at::opmath_type<P>>& transform,
                TensorList absmaxes, const RoundingArgs& rounding) {
  using T = at::opmath_type<P>;
  const bool master = !master_params.empty();
  const auto plain = c10::CppTypeToScalarType<S>::value;
  for_each_chunk(params, [&](int64_t i, int64_t begin, int64_t end) {
    const P* grad = grads[i].data_ptr<P>() + begin;
    const int64_t n = end - begin;
    dispatch_param<P, S>(params[i], master ? &master_params[i] : nullptr, begin, rounding, i, [&](auto param) {
      dispatch_format<P, S>(state_format(exp_avgs[i], plain, rounding.on), [&](auto format) {
        using F = decltype(format);
        auto m = F::template make<codec::SignedMap>(exp_avgs[i], absmax_of(absmaxes, params.size(), 0, i), begin,
                                                    rounding.on ? rounding.stream(i, 1, begin) : Stream{});
        lion_range<T>(param, grad, m, n, s, transform);
      });
    });
  });
}

void lion_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList master_params, double lr,
              double beta1, double beta2, double weight_decay, const OptionalTensor& lr_table,
              const OptionalTensor& beta1_table, const OptionalTensor& schedule_step,
              const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
              const OptionalTensor& clip_coef, const OptionalTensor& weight_decay_table,
              const OptionalTensorList& state_absmaxes, c10::IntArrayRef rounding, const OptionalTensor& rounding_step) {
  constexpr const char* op = "fusedopt::lion_";
  const bool small_state = state_absmaxes.has_value();
  if (!check_lion_args(params, grads, exp_avgs, master_params, lr_table, beta1_table, schedule_step, grad_scale,
                       found_inf, clip_coef, weight_decay_table, small_state)) {
    return;
  }
  if (small_state) {
    check_small_states(op, params, {exp_avgs}, {"exp_avgs"}, *state_absmaxes, state_dtype(params, master_params));
  }
  check_rounding(op, params, rounding, rounding_step);

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
    lion_typed<P, S>(params, grads, exp_avgs, master_params, s, transform, small_state ? *state_absmaxes : TensorList(),
                     read_rounding(rounding, rounding_step, params.size(), op));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("lion_", &lion_cpu); }

}  // namespace cpu
}  // namespace fusedopt
