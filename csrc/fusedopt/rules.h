// The per-element update rules of fusedopt: the one place where the math of AdamW / Adam, SGD and Lion is
// written.
//
// Everything here is __host__ __device__ so that the CPU kernels (csrc/cpu), the CUDA kernels (csrc/cuda)
// and the host-executed CUDA block tests all run exactly this code. The Triton kernels (fusedopt/triton)
// mirror it line by line and are tested against the same oracles.
//
// Conventions
// - `T` is the math type: float for float32 / bfloat16 / float16 storage, double for float64 storage.
// - The operations and their roundings are those of torch.optim's single-tensor implementations (and
//   lion-pytorch's Lion) on torch's CPU kernels, so that float32 / float64 results are, as far as possible,
//   bit for bit the eager ones. Where torch's CPU op rounds a*b+c once, the rule calls fma() (below), an
//   explicit fused multiply-add: the results do not depend on the compiler or the machine (the kernels are
//   built with -ffp-contract=off, so no other a*b+c is fused). Measured on torch's CPU kernels (vectorized
//   body and scalar tail, float32 and float64): x.add_(y, alpha=a) == fma(a, y, x); lerp_ == fma(w, e - s, s)
//   for |w| < 0.5, else fma(-(e - s), 1 - w, e); v.addcmul_(a, b, value=c) == fma(c * a, b, v);
//   p.addcdiv_(a, b, value=c) == p + (c * a) / b (no fusion); mul_, sqrt, '/' and add_ of a scalar round
//   once each. Scalars that torch computes on the host in double (1 - lr*wd, lr / bias_correction1, ...)
//   are computed here in double too and rounded to T once, where torch rounds them when it passes a Python
//   float to a tensor op.
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

// torch's lerp (at::native lerp, vectorized as fmadd / fnmadd): two formulas so that weight 0 and weight 1
// are both exact, each one rounding of a fused multiply-add. Which one applies depends only on the weight,
// so kernels decide it once (lerp_weight_is_small) and pass it in.
template <typename T>
FUSEDOPT_HD bool lerp_weight_is_small(T weight) {
  return weight < T(0.5) && weight > T(-0.5);
}

template <typename T>
FUSEDOPT_HD T lerp(T self, T end, T weight, bool small_weight) {
  const T diff = end - self;
  // both computed, then selected: a plain select (no conditional call) keeps the CPU loops vectorizable
  const T from_self = fma_host_device(weight, diff, self);
  const T from_end = fma_host_device(-diff, T(1) - weight, end);
  return small_weight ? from_self : from_end;
}

// torch.sign: sign(0) == 0, sign(NaN) == 0 (a NaN never moves a Lion parameter).
template <typename T>
FUSEDOPT_HD T sign(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

// base^exponent correctly rounded (but for near-ties at the 2^-100 level), as Python's `beta ** step` in
// torch.optim gives it (glibc's pow is correctly rounded in all but ~0.1% of the (beta, step) pairs we
// checked): exponentiation by squaring in double-double arithmetic, whose products are exact by the fused
// multiply-add. Identical on host and device (no libm), exact in its error analysis for exponent < 2^63.
// (Plain double squaring, used before, differed from Python's pow for almost every step.)
struct DoubleDouble {
  double hi;
  double lo;  // |lo| <= ulp(hi) / 2
};

FUSEDOPT_HD DoubleDouble dd_mul(DoubleDouble a, DoubleDouble b) {
  const double p = a.hi * b.hi;
  double e = fma_host_device(a.hi, b.hi, -p);  // the exact rounding error of p
  e = e + (a.hi * b.lo + a.lo * b.hi);
  const double hi = p + e;
  return DoubleDouble{hi, e - (hi - p)};  // fast two-sum (|p| >= |e|)
}

FUSEDOPT_HD double power(double base, int64_t exponent) {
  DoubleDouble result{1.0, 0.0};
  DoubleDouble b{base, 0.0};
  int64_t e = exponent;
  while (e > 0) {
    if (e & 1) result = dd_mul(result, b);
    e >>= 1;
    if (e > 0) b = dd_mul(b, b);
  }
  return result.hi;  // hi == RN(hi + lo)
}

// ---------------------------------------------------------------------------------------------------------
// AdamW (torch.optim.AdamW, single-tensor) and Adam (torch.optim.Adam, single-tensor): one rule, the weight
// decay either decoupled (AdamW: p *= 1 - lr * wd) or added to the gradient (Adam's L2: g = g + wd * p).
// torch's ops, in order: [grad.add(param, alpha=wd)], param.mul_(1 - lr*wd), exp_avg.lerp_(grad, 1 - beta1),
// exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2), [torch.maximum], denom =
// (v.sqrt() / bias_correction2_sqrt).add_(eps), param.addcdiv_(exp_avg, denom, value=-step_size).
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
  const T g_decayed = fma_host_device(s.l2_weight_decay, p, g);  // computed, then selected (see lerp)
  g = s.l2_weight_decay != T(0) ? g_decayed : g;
  p = p * s.decay;
  m = lerp(m, g, s.one_minus_beta1, s.lerp_small_weight);
  v = v * s.beta2;
  v = fma_host_device(s.one_minus_beta2 * g, g, v);  // addcmul_: (value * grad) rounded, then fused
  T second_moment = v;
  if (s.amsgrad) {
    max_v = max_v > v ? max_v : v;  // torch.maximum; a NaN in v propagates through the else branch
    second_moment = max_v;
  }
  const T denom = sqrt_host_device(second_moment) / s.bias_correction2_sqrt + s.eps;
  p = p + (s.neg_step_size * m) / denom;  // addcdiv_: (value * exp_avg) / denom, then added
}

// ---------------------------------------------------------------------------------------------------------
// SGD with momentum, dampening and Nesterov (torch.optim.SGD, single-tensor). torch's ops, each a fused
// multiply-add: grad.add(param, alpha=wd), buf.mul_(momentum).add_(grad, alpha=1 - dampening),
// grad.add(buf, alpha=momentum), param.add_(grad, alpha=-lr).
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
  // Each choice below depends only on the scalars: both sides are computed and one is selected, a plain
  // select that keeps the CPU loops vectorizable (a conditional fused multiply-add is a call to if-convert).
  const T g_decayed = fma_host_device(s.weight_decay, p, g);
  g = s.weight_decay != T(0) ? g_decayed : g;  // skipped at 0, like torch
  if (s.use_momentum) {
    const T buf_updated = fma_host_device(s.one_minus_dampening, g, buf * s.momentum);
    buf = s.first_step ? g : buf_updated;
    const T g_nesterov = fma_host_device(s.momentum, buf, g);
    g = s.nesterov ? g_nesterov : buf;
  }
  p = fma_host_device(s.neg_lr, g, p);
}

// ---------------------------------------------------------------------------------------------------------
// Lion (lion-pytorch's Lion; weight decay multiplies the parameter by 1 - lr * wd). lion-pytorch's ops:
// p.mul_(1 - lr*wd), exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sgn_(), p.add_(update,
// alpha=-lr), exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2): the adds with alpha are fused multiply-adds.
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
  const T blended = fma_host_device(s.one_minus_beta1, g, m * s.beta1);
  p = fma_host_device(s.neg_lr, sign(blended), p);  // (-lr * +-1 is exact: the same as p + neg_lr * sign)
  m = fma_host_device(s.one_minus_beta2, g, m * s.beta2);
}

}  // namespace fusedopt
