// fusedopt::sgd_ on CPU: one parallel pass over every tensor of a param group.
#include <torch/library.h>

#include <type_traits>

#include "cpu/multi_tensor_cpu.h"
#include "cpu/state_io.h"
#include "fusedopt/op_args.h"

namespace fusedopt {
namespace cpu {
namespace {

// One contiguous range of one tensor, walked by the shared element loop (cpu/state_io.h). The momentum buffer
// is always loaded when it exists (it is zeroed on creation), so the first-step and Nesterov choices are
// selects. kChoices < 0: they stay runtime selects (float32 / float64 storage: GCC vectorizes the loop with
// them); else they are constants, first_step = bit 0, nesterov = bit 1: with bfloat16 / float16 storage GCC
// does not if-convert a runtime bool select next to the conversions, and the loop ran scalar (with a branch
// per element), 3-4x slower than the stream. Only the narrow dtypes get the four variants (build time).
template <bool kMomentum, int kChoices, typename T, typename Param, typename G, typename B>
FUSEDOPT_CPU_CLONES void sgd_range(Param param, const G* __restrict__ grad, B buf, int64_t n, SGDScalars<T> s,
                                   const GradTransform<T> transform) {
  s.use_momentum = kMomentum;
  if constexpr (kChoices >= 0) {
    s.first_step = (kChoices & 1) != 0;
    s.nesterov = (kChoices & 2) != 0;
  }
  for_each_element<T>(param, grad, n, transform, [&](T& p, T g, T* st) { sgd_update(p, g, st[0], s); }, buf);
}

template <typename P, typename S>
void sgd_typed(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList master_params,
               const SGDScalars<at::opmath_type<P>>& s, const GradTransform<at::opmath_type<P>>& transform,
               TensorList absmaxes, const RoundingArgs& rounding) {
  using T = at::opmath_type<P>;
  const bool master = !master_params.empty();
  const auto plain = c10::CppTypeToScalarType<S>::value;
  for_each_chunk(params, [&](int64_t i, int64_t begin, int64_t end) {
    const P* grad = grads[i].data_ptr<P>() + begin;
    const int64_t n = end - begin;
    dispatch_param<P, S>(params[i], master ? &master_params[i] : nullptr, begin, rounding, i, [&](auto param) {
      if (!s.use_momentum) {
        sgd_range<false, -1, T>(param, grad, NoSlot{}, n, s, transform);
        return;
      }
      dispatch_format<P, S>(state_format(momentum_buffers[i], plain, rounding.on), [&](auto format) {
        using F = decltype(format);
        auto buf = F::template make<codec::SignedMap>(momentum_buffers[i], absmax_of(absmaxes, params.size(), 0, i),
                                                      begin, rounding.on ? rounding.stream(i, 1, begin) : Stream{});
        if constexpr (std::is_same_v<P, float> || std::is_same_v<P, double>) {
          sgd_range<true, -1, T>(param, grad, buf, n, s, transform);
        } else {
          switch (int{s.first_step} + 2 * int{s.nesterov}) {
            case 0: sgd_range<true, 0, T>(param, grad, buf, n, s, transform); break;
            case 1: sgd_range<true, 1, T>(param, grad, buf, n, s, transform); break;
            case 2: sgd_range<true, 2, T>(param, grad, buf, n, s, transform); break;
            default: sgd_range<true, 3, T>(param, grad, buf, n, s, transform); break;
          }
        }
      });
    });
  });
}

void sgd_cpu(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList master_params,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
             bool first_step, const OptionalTensor& lr_table, const OptionalTensor& momentum_table,
             const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
             const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
             const OptionalTensor& weight_decay_table, const OptionalTensorList& state_absmaxes, c10::IntArrayRef rounding,
             const OptionalTensor& rounding_step) {
  constexpr const char* op = "fusedopt::sgd_";
  const bool small_state = state_absmaxes.has_value();
  if (!check_sgd_args(params, grads, momentum_buffers, master_params, lr_table, momentum_table, schedule_step,
                      grad_scale, found_inf, clip_coef, weight_decay_table, small_state)) {
    return;
  }
  if (small_state) {
    check_small_states(op, params, {momentum_buffers}, {"momentum_buffers"}, *state_absmaxes,
                       state_dtype(params, master_params));
  }
  check_rounding(op, params, rounding, rounding_step);

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
    sgd_typed<P, S>(params, grads, momentum_buffers, master_params, s, transform, small_state ? *state_absmaxes : TensorList(),
                    read_rounding(rounding, rounding_step, params.size(), op));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("sgd_", &sgd_cpu); }

}  // namespace cpu
}  // namespace fusedopt
