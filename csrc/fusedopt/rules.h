// The per-element update rules of fusedopt: the one place where the math of AdamW, SGD and Lion is written.
//
// Everything here is __host__ __device__ so that the CPU kernels (csrc/cpu), the CUDA kernels (csrc/cuda)
// and the host-executed CUDA block tests all run exactly this code. The Triton kernels (fusedopt/triton)
// mirror it line by line and are tested against the same oracles.
//
// Conventions
// - `T` is the math type: float for float32 / bfloat16 / float16 storage, double for float64 storage.
// - The order of operations follows torch.optim's single-tensor implementations (and lion-pytorch's Lion),
//   so that float32 results agree with those oracles to the last few ulps. Scalars that torch computes on
//   the host in double (1 - lr*wd, lr / bias_correction1, ...) are computed here in double too and rounded
//   to T once, where torch rounds them when it passes a Python float to a float32 tensor op.
// - Per-step scalars that depend on the schedule table or on the step count are resolved once per tensor
//   (CPU) or once per block (CUDA) by the make_*_scalars functions below, never per element.
#pragma once

#include <cstdint>

#include "fusedopt/schedule.h"

namespace fusedopt {

// ---------------------------------------------------------------------------------------------------------
// Gradient preprocessing shared by every rule: AMP unscaling and the global-norm clip coefficient.
// torch.amp.GradScaler.unscale_ multiplies by a float32 reciprocal of the scale; clip_grad_norm_ then
// multiplies by the float32 clip coefficient. Both factors are 1 when the feature is off, which is exact.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct GradTransform {
  T inv_scale;  // 1 / grad_scale, rounded to float like GradScaler
  T clip_coef;  // min(1, max_norm / (norm + 1e-6))
  bool maximize;
};

template <typename T>
FUSEDOPT_HD T transform_grad(T g, const GradTransform<T>& t) {
  g = g * t.inv_scale;
  g = g * t.clip_coef;
  return g * (t.maximize ? T(-1) : T(1));  // exact negation, and no branch in the element loop
}

// torch's lerp: two formulas so that weight 0 and weight 1 are both exact. Which one applies depends only
// on the weight, so kernels decide it once (lerp_weight_is_small) and pass it in.
template <typename T>
FUSEDOPT_HD bool lerp_weight_is_small(T weight) {
  return weight < T(0.5) && weight > T(-0.5);
}

template <typename T>
FUSEDOPT_HD T lerp(T self, T end, T weight, bool small_weight) {
  return small_weight ? self + weight * (end - self) : end - (end - self) * (T(1) - weight);
}

// torch.sign: sign(0) == 0, sign(NaN) == 0 (a NaN never moves a Lion parameter).
template <typename T>
FUSEDOPT_HD T sign(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

FUSEDOPT_HD double power(double base, int64_t exponent) {
  // Exponentiation by squaring: identical on host and device, exact for exponent <= 2^53, no libm.
  double result = 1.0;
  int64_t e = exponent;
  while (e > 0) {
    if (e & 1) result *= base;
    base *= base;
    e >>= 1;
  }
  return result;
}

// ---------------------------------------------------------------------------------------------------------
// AdamW (torch.optim.AdamW, single-tensor) and Adam (torch.optim.Adam, single-tensor): one rule, the weight
// decay either decoupled (AdamW: p *= 1 - lr * wd) or added to the gradient (Adam's L2: g = g + wd * p).
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct AdamWScalars {
  T decay;                  // decoupled: 1 - lr * weight_decay; L2: 1 (exact, the param is not decayed)
  T l2_weight_decay;        // L2: weight_decay; decoupled: 0 (torch.optim.Adam skips the add when it is 0)
  T beta2;
  T one_minus_beta1;        // lerp weight
  T one_minus_beta2;
  T neg_step_size;          // -lr / (1 - beta1^step)
  T bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  T eps;
  bool amsgrad;
  bool lerp_small_weight;  // lerp_weight_is_small(one_minus_beta1)
};

// lr, beta1 and weight_decay are the values for this step (the schedule tables may have replaced them); step
// counts from 1. decoupled_weight_decay: true for torch.optim.AdamW, false for torch.optim.Adam's L2 decay.
template <typename T>
FUSEDOPT_HD AdamWScalars<T> make_adamw_scalars(double lr, double beta1, double beta2, double eps,
                                               double weight_decay, int64_t step, bool amsgrad,
                                               bool decoupled_weight_decay) {
  const double bias_correction1 = 1.0 - power(beta1, step);
  const double bias_correction2 = 1.0 - power(beta2, step);
  AdamWScalars<T> s;
  s.decay = decoupled_weight_decay ? static_cast<T>(1.0 - lr * weight_decay) : T(1);
  s.l2_weight_decay = decoupled_weight_decay ? T(0) : static_cast<T>(weight_decay);
  s.beta2 = static_cast<T>(beta2);
  s.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  s.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  s.neg_step_size = static_cast<T>(-(lr / bias_correction1));
  s.bias_correction2_sqrt = static_cast<T>(sqrt_host_device(bias_correction2));
  s.eps = static_cast<T>(eps);
  s.amsgrad = amsgrad;
  s.lerp_small_weight = lerp_weight_is_small(s.one_minus_beta1);
  return s;
}

// One element. `max_v` is read and written only when amsgrad is set.
template <typename T>
FUSEDOPT_HD void adamw_update(T& p, T g, T& m, T& v, T& max_v, const AdamWScalars<T>& s) {
  // Adam's L2 decay, on the (maximize-negated) gradient and the pre-update param; a select, so the loop
  // stays branch-free, and skipped at 0 like torch (0 * inf would turn an inf param's gradient into NaN)
  g = s.l2_weight_decay != T(0) ? g + s.l2_weight_decay * p : g;
  p = p * s.decay;
  m = lerp(m, g, s.one_minus_beta1, s.lerp_small_weight);
  v = v * s.beta2;
  v = v + s.one_minus_beta2 * g * g;
  T second_moment = v;
  if (s.amsgrad) {
    max_v = max_v > v ? max_v : v;  // torch.maximum; a NaN in v propagates through the else branch
    second_moment = max_v;
  }
  const T denom = sqrt_host_device(second_moment) / s.bias_correction2_sqrt + s.eps;
  p = p + s.neg_step_size * (m / denom);
}

// ---------------------------------------------------------------------------------------------------------
// SGD with momentum, dampening and Nesterov (torch.optim.SGD, single-tensor)
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct SGDScalars {
  T neg_lr;
  T weight_decay;
  T momentum;
  T one_minus_dampening;
  bool use_momentum;  // a momentum buffer exists for this group
  bool first_step;    // the buffer is being created: torch copies the gradient into it, without dampening
  bool nesterov;
};

template <typename T>
FUSEDOPT_HD SGDScalars<T> make_sgd_scalars(double lr, double momentum, double dampening,
                                           double weight_decay, bool use_momentum, bool first_step,
                                           bool nesterov) {
  SGDScalars<T> s;
  s.neg_lr = static_cast<T>(-lr);
  s.weight_decay = static_cast<T>(weight_decay);
  s.momentum = static_cast<T>(momentum);
  s.one_minus_dampening = static_cast<T>(1.0 - dampening);
  s.use_momentum = use_momentum;
  s.first_step = first_step;
  s.nesterov = nesterov;
  return s;
}

// One element. `buf` is read and written only when use_momentum is set.
template <typename T>
FUSEDOPT_HD void sgd_update(T& p, T g, T& buf, const SGDScalars<T>& s) {
  if (s.weight_decay != T(0)) g = g + s.weight_decay * p;
  if (s.use_momentum) {
    buf = s.first_step ? g : buf * s.momentum + s.one_minus_dampening * g;
    g = s.nesterov ? g + s.momentum * buf : buf;
  }
  p = p + s.neg_lr * g;
}

// ---------------------------------------------------------------------------------------------------------
// Lion (lion-pytorch's Lion; weight decay multiplies the parameter by 1 - lr * wd)
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct LionScalars {
  T decay;  // 1 - lr * wd (wd already divided by the initial lr when decoupled_weight_decay is set)
  T neg_lr;
  T beta1;
  T one_minus_beta1;
  T beta2;
  T one_minus_beta2;
};

template <typename T>
FUSEDOPT_HD LionScalars<T> make_lion_scalars(double lr, double beta1, double beta2, double weight_decay) {
  LionScalars<T> s;
  s.decay = static_cast<T>(1.0 - lr * weight_decay);
  s.neg_lr = static_cast<T>(-lr);
  s.beta1 = static_cast<T>(beta1);
  s.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  s.beta2 = static_cast<T>(beta2);
  s.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  return s;
}

template <typename T>
FUSEDOPT_HD void lion_update(T& p, T g, T& m, const LionScalars<T>& s) {
  p = p * s.decay;
  const T blended = m * s.beta1 + s.one_minus_beta1 * g;
  p = p + s.neg_lr * sign(blended);
  m = m * s.beta2;
  m = m + s.one_minus_beta2 * g;
}

}  // namespace fusedopt
