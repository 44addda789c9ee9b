// Host-side argument checks and extraction shared by the CPU and CUDA implementations of the ops in
// csrc/ops.cpp. The Python optimizers validate user input with friendlier messages before calling an op;
// these checks protect direct calls of torch.ops.fusedopt.* and keep the kernels' assumptions explicit.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "fusedopt/schedule.h"

namespace fusedopt {

using at::Tensor;
using at::TensorList;
using OptionalTensor = std::optional<Tensor>;
using OptionalTensorList = std::optional<TensorList>;

// True when one flat index walks t and the (dense) param alike: the same strides, or both contiguous (two
// contiguous tensors walk their elements in the same order even where strides of size-1 dims differ).
inline bool walks_like(const Tensor& param, const Tensor& t) {
  return t.numel() <= 1 || t.strides() == param.strides() || (t.is_contiguous() && param.is_contiguous());
}

// Every tensor the kernels walk must be dense with the param's strides, so one flat index addresses the
// same element of param, grad and states.
inline void check_same_layout(const char* op, const char* list_name, const Tensor& param, const Tensor& t,
                              size_t i) {
  TORCH_CHECK(t.device() == param.device(), op, ": ", list_name, "[", i, "] is on ", t.device(),
              " but params[", i, "] is on ", param.device());
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", list_name, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", param.sizes());
  TORCH_CHECK(walks_like(param, t), op, ": ", list_name, "[", i, "] has strides ", t.strides(), " but params[", i,
              "] has strides ", param.strides());
}

// Checks one tensor list against the params. `expect` may be empty (feature off) unless `required`.
inline void check_list(const char* op, const char* list_name, TensorList params, TensorList list,
                       bool required, std::optional<at::ScalarType> dtype) {
  if (list.empty() && !required) return;
  TORCH_CHECK(list.size() == params.size(), op, ": ", list_name, " has ", list.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    check_same_layout(op, list_name, params[i], list[i], i);
    if (dtype.has_value()) {
      TORCH_CHECK(list[i].scalar_type() == *dtype, op, ": ", list_name, "[", i, "] has dtype ",
                  list[i].scalar_type(), ", expected ", *dtype);
    }
  }
}

inline void check_params(const char* op, TensorList params) {
  if (params.empty()) return;
  const auto dtype = params[0].scalar_type();
  const auto device = params[0].device();
  TORCH_CHECK(at::isFloatingType(dtype), op, ": params must be floating point, got ", dtype);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == dtype, op, ": params[", i, "] has dtype ", params[i].scalar_type(),
                " but params[0] has ", dtype, " (call once per dtype)");
    TORCH_CHECK(params[i].device() == device, op, ": params[", i, "] is on ", params[i].device(),
                " but params[0] is on ", device, " (call once per device)");
    TORCH_CHECK(params[i].is_non_overlapping_and_dense(), op, ": params[", i,
                "] is not dense (a strided view); update a contiguous copy instead");
  }
}

// The dtype states and master params must have: float32 in master-weight mode, else the params' dtype.
inline at::ScalarType state_dtype(TensorList params, TensorList master_params) {
  if (!master_params.empty()) return at::kFloat;
  return params.empty() ? at::kFloat : params[0].scalar_type();
}

// A scalar control tensor (grad_scale, found_inf, clip_coef, schedule_step) on the params' device.
inline void check_scalar_tensor(const char* op, const char* name, const OptionalTensor& t,
                                const at::Device& device, std::optional<at::ScalarType> dtype) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have exactly one element, got ", t->numel());
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), " but params are on ", device);
  if (dtype.has_value()) {
    TORCH_CHECK(t->scalar_type() == *dtype, op, ": ", name, " must be ", *dtype, ", got ", t->scalar_type());
  }
}

inline void check_table(const char* op, const char* name, const OptionalTensor& t, const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->numel() > 0, op, ": ", name, " must be a non-empty 1-D tensor, got shape ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kDouble, op, ": ", name, " must be float64, got ", t->scalar_type());
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), " but params are on ", device);
  TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
}

// The checks common to all three update ops: the control tensors and the schedule tables.
inline void check_controls(const char* op, TensorList params, const OptionalTensor& lr_table,
                           const OptionalTensor& momentum_table, const OptionalTensor& schedule_step,
                           const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                           const OptionalTensor& clip_coef, const OptionalTensor& weight_decay_table) {
  if (params.empty()) return;
  const auto device = params[0].device();
  check_table(op, "lr_table", lr_table, device);
  check_table(op, "momentum table", momentum_table, device);
  check_table(op, "weight_decay_table", weight_decay_table, device);
  // Without a counter a table is read at entry 0: right for a one-entry table (a tensor lr), a bug otherwise.
  const auto stepped = [](const OptionalTensor& t) { return t.has_value() && t->numel() > 1; };
  TORCH_CHECK(!(stepped(lr_table) || stepped(momentum_table) || stepped(weight_decay_table)) ||
                  schedule_step.has_value(),
              op, ": a schedule table of more than one entry needs schedule_step");
  check_scalar_tensor(op, "schedule_step", schedule_step, device, at::kLong);
  check_scalar_tensor(op, "grad_scale", grad_scale, device, at::kFloat);
  check_scalar_tensor(op, "found_inf", found_inf, device, at::kFloat);
  check_scalar_tensor(op, "clip_coef", clip_coef, device, at::kFloat);
}

template <typename T>
inline const T* optional_ptr(const OptionalTensor& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

inline TableView table_view(const OptionalTensor& table, double fallback) {
  if (!table.has_value()) return TableView{nullptr, 0, fallback};
  return TableView{table->data_ptr<double>(), table->numel(), fallback};
}

// ---------------------------------------------------------------------------------------------------------
// The argument checks of each op, shared by its CPU and CUDA implementations. Each returns false when the
// call has no tensors (nothing to do).
// ---------------------------------------------------------------------------------------------------------
inline bool check_adamw_args(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                             TensorList max_exp_avg_sqs, TensorList steps, TensorList master_params, bool amsgrad,
                             const OptionalTensor& lr_table, const OptionalTensor& beta1_table,
                             const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
                             const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
                             const OptionalTensor& weight_decay_table,
                             bool small_state = false) {
  constexpr const char* op = "fusedopt::adamw_";
  check_params(op, params);
  if (params.empty()) return false;
  // small state: the states' dtypes are checked by check_small_states
  const auto sdtype_or_any = small_state ? std::optional<at::ScalarType>()
                                         : std::optional<at::ScalarType>(state_dtype(params, master_params));
  check_list(op, "grads", params, grads, true, params[0].scalar_type());
  check_list(op, "exp_avgs", params, exp_avgs, true, sdtype_or_any);
  check_list(op, "exp_avg_sqs", params, exp_avg_sqs, true, sdtype_or_any);
  check_list(op, "max_exp_avg_sqs", params, max_exp_avg_sqs, amsgrad, sdtype_or_any);
  check_list(op, "master_params", params, master_params, false, at::kFloat);
  TORCH_CHECK(steps.size() == params.size(), op, ": steps has ", steps.size(), " tensors but params has ",
              params.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kLong &&
                    steps[i].device() == params[0].device(),
                op, ": steps[", i, "] must be a one-element int64 tensor on the params' device");
  }
  check_controls(op, params, lr_table, beta1_table, schedule_step, grad_scale, found_inf, clip_coef,
                 weight_decay_table);
  return true;
}

inline bool check_sgd_args(TensorList params, TensorList grads, TensorList momentum_buffers,
                           TensorList master_params, const OptionalTensor& lr_table,
                           const OptionalTensor& momentum_table, const OptionalTensor& schedule_step,
                           const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                           const OptionalTensor& clip_coef, const OptionalTensor& weight_decay_table,
                             bool small_state = false) {
  constexpr const char* op = "fusedopt::sgd_";
  check_params(op, params);
  if (params.empty()) return false;
  // small state: the states' dtypes are checked by check_small_states
  const auto sdtype_or_any = small_state ? std::optional<at::ScalarType>()
                                         : std::optional<at::ScalarType>(state_dtype(params, master_params));
  check_list(op, "grads", params, grads, true, params[0].scalar_type());
  check_list(op, "momentum_buffers", params, momentum_buffers, false, sdtype_or_any);
  check_list(op, "master_params", params, master_params, false, at::kFloat);
  check_controls(op, params, lr_table, momentum_table, schedule_step, grad_scale, found_inf, clip_coef,
                 weight_decay_table);
  return true;
}

inline bool check_lion_args(TensorList params, TensorList grads, TensorList exp_avgs, TensorList master_params,
                            const OptionalTensor& lr_table, const OptionalTensor& beta1_table,
                            const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
                            const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
                            const OptionalTensor& weight_decay_table,
                             bool small_state = false) {
  constexpr const char* op = "fusedopt::lion_";
  check_params(op, params);
  if (params.empty()) return false;
  // small state: the states' dtypes are checked by check_small_states
  const auto sdtype_or_any = small_state ? std::optional<at::ScalarType>()
                                         : std::optional<at::ScalarType>(state_dtype(params, master_params));
  check_list(op, "grads", params, grads, true, params[0].scalar_type());
  check_list(op, "exp_avgs", params, exp_avgs, true, sdtype_or_any);
  check_list(op, "master_params", params, master_params, false, at::kFloat);
  check_controls(op, params, lr_table, beta1_table, schedule_step, grad_scale, found_inf, clip_coef,
                 weight_decay_table);
  return true;
}

// ---------------------------------------------------------------------------------------------------------
// Small state (state_precision / stochastic_rounding, csrc/fusedopt/state_codec.h). With state_absmaxes given
// (one tensor per state list and tensor, in the op's state order: the float32 absmax of 8-bit codes, read only for
// uint8 states, any tensor -- an empty one -- for the others), a tensor's states may also be float32, bfloat16
// or uint8 codes, whatever the params' dtype: all states of one tensor share one format, and
// uint8 codes come with an absmax of at least one entry per 256-element block. `rounding` (empty, or
// [seed, (param index, offset) per tensor]) with `rounding_step` selects stochastic rounding of bfloat16.
// ---------------------------------------------------------------------------------------------------------
// Checks the state lists (already checked for layout) of a small-state call; `lists` in the op's state order.
inline void check_small_states(const char* op, TensorList params, const std::vector<TensorList>& lists,
                               const std::vector<const char*>& names, TensorList absmaxes,
                               at::ScalarType sdtype) {
  const size_t n = params.size();
  TORCH_CHECK(absmaxes.size() == lists.size() * n, op, ": state_absmaxes has ", absmaxes.size(),
              " entries, expected ", lists.size() * n, " (one per state list and tensor)");
  for (size_t i = 0; i < n; ++i) {
    std::optional<at::ScalarType> shared;
    for (size_t l = 0; l < lists.size(); ++l) {
      if (lists[l].empty()) continue;
      const Tensor& absmax = absmaxes[l * n + i];
      const Tensor& t = lists[l][i];
      const auto dtype = t.scalar_type();
      TORCH_CHECK(dtype == sdtype || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kByte, op, ": ",
                  names[l], "[", i, "] has dtype ", dtype, ", expected ", sdtype,
                  ", float32, bfloat16 or uint8 (8-bit codes)");
      TORCH_CHECK(!shared.has_value() || *shared == dtype, op, ": the states of params[", i,
                  "] must share one dtype, got ", *shared, " and ", dtype);
      shared = dtype;
      if (dtype == at::kByte) {
        const int64_t blocks = (t.numel() + 255) / 256;
        TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.dim() == 1 && absmax.numel() >= blocks &&
                        absmax.is_contiguous() && absmax.device() == t.device(),
                    op, ": ", names[l], "[", i, "] holds 8-bit codes and needs a contiguous float32 absmax of at "
                    "least ", blocks, " entries on its device");
      }
    }
  }
}

inline void check_rounding(const char* op, TensorList params, c10::IntArrayRef rounding,
                           const OptionalTensor& rounding_step) {
  if (rounding.empty()) return;
  TORCH_CHECK(rounding.size() == 1 + 2 * params.size(), op, ": rounding must be [seed, (param index, offset) per "
              "tensor], ", 1 + 2 * params.size(), " entries, got ", rounding.size());
  TORCH_CHECK(rounding_step.has_value(), op, ": stochastic rounding needs rounding_step");
  check_scalar_tensor(op, "rounding_step", rounding_step, params[0].device(), at::kLong);
}

template <typename X>
struct TypeTag {
  using type = X;
};

// Calls fn(TypeTag<param_t>{}, TypeTag<state_t>{}) for the params' dtype; states (and master params) are
// float32 in master-weight mode, else the params' dtype. The one dtype switch of the CPU and CUDA ops.
template <typename Fn>
void dispatch_param_state(at::ScalarType param_dtype, bool master, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "fusedopt", [&] {
    if (master) {
      fn(TypeTag<scalar_t>{}, TypeTag<float>{});
    } else {
      fn(TypeTag<scalar_t>{}, TypeTag<scalar_t>{});
    }
  });
}

}  // namespace fusedopt
