// The host side of fusedopt's CUDA ops: argument checks, the dtype switch, the step counters and the
// address tables, written once against a `Launcher` so that the CUDA ops (csrc/cuda/cuda_ops.cpp, which
// launches kernels) and the host test harness (tests/cuda_host/hostsim.cpp, which runs the kernel bodies
// on the CPU) share every line except the launch itself.
//
// Launcher interface:
//   template <class Rule> PlanLimits limits() const;      chunk size and table capacities for Rule
//   int steps_per_launch() const;                         step counters per step-kernel launch
//   template <class Rule, class P, class S>
//   void launch(const typename Rule::Args&, int blocks);  one update-kernel launch
//   void launch_steps(const StepArgs&);                   one step-kernel launch
//
// The semantics are those of the CPU ops (csrc/cpu): same checks (fusedopt/op_args.h), same dtype pairs,
// same per-element rules; only where the controls are read differs (on the device, in every block,
// instead of on the host once), so nothing here reads device memory and the ops never synchronize.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "cuda/block_bodies.h"
#include "cuda/launch_plan.h"
#include "fusedopt/op_args.h"

namespace fusedopt {
namespace cuda {

inline Controls make_controls(const OptionalTensor& lr_table, double lr, const OptionalTensor& momentum_table,
                              double momentum, const OptionalTensor& schedule_step,
                              const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                              const OptionalTensor& clip_coef, const OptionalTensor& weight_decay_table,
                              double weight_decay) {
  Controls c;
  c.found_inf = optional_ptr<float>(found_inf);
  c.grad_scale = optional_ptr<float>(grad_scale);
  c.clip_coef = optional_ptr<float>(clip_coef);
  c.schedule_step = optional_ptr<int64_t>(schedule_step);
  c.lr = table_view(lr_table, lr);
  c.momentum = table_view(momentum_table, momentum);
  c.weight_decay = table_view(weight_decay_table, weight_decay);
  c.chunk_size = kChunkSize;
  return c;
}

inline void* ptr_or_null(TensorList list, std::size_t i) {
  return list.empty() ? nullptr : list[i].data_ptr();
}

// The (params x lists) pointer table and the element counts, for apply_plan.
struct PointerTable {
  std::vector<int64_t> numels;
  std::vector<void*> ptrs;
  int lists;
  PointerTable(TensorList params, int lists_) : numels(params.size()), ptrs(params.size() * lists_), lists(lists_) {
    for (std::size_t i = 0; i < params.size(); ++i) numels[i] = params[i].numel();
  }
  void set(std::size_t tensor, int list, void* p) { ptrs[tensor * static_cast<std::size_t>(lists) + list] = p; }
};

template <typename Rule, typename P, typename S, typename Launcher>
int64_t run_rule(Launcher& launcher, const typename Rule::Args& args, const PointerTable& table) {
  return apply_plan(args, table.numels, table.ptrs, launcher.template limits<Rule>(),
                    [&](const typename Rule::Args& a, int blocks) { launcher.template launch<Rule, P, S>(a, blocks); });
}

// ---------------------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------------------
template <typename Launcher>
void adamw_impl(Launcher& launcher, TensorList params, TensorList grads, TensorList exp_avgs,
                TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList steps, TensorList master_params,
                double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                bool maximize, const OptionalTensor& lr_table, const OptionalTensor& beta1_table,
                const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
                const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
                const OptionalTensor& weight_decay_table, bool decoupled_weight_decay) {
  if (!check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, amsgrad,
                        lr_table, beta1_table, schedule_step, grad_scale, found_inf, clip_coef,
                        weight_decay_table)) {
    return;
  }

  AdamWArgs args{};
  args.ctl = make_controls(lr_table, lr, beta1_table, beta1, schedule_step, grad_scale, found_inf, clip_coef,
                           weight_decay_table, weight_decay);
  args.hyper = AdamWHyper{beta2, eps, amsgrad, maximize, decoupled_weight_decay};

  // 1. The step counters (+1 unless found_inf), before the update kernel that reads them.
  std::vector<int64_t*> step_ptrs(steps.size());
  for (std::size_t i = 0; i < steps.size(); ++i) step_ptrs[i] = steps[i].data_ptr<int64_t>();
  apply_steps(step_ptrs, args.ctl.found_inf, launcher.steps_per_launch(),
              [&](const StepArgs& a) { launcher.launch_steps(a); });

  // 2. The update.
  const bool master = !master_params.empty();
  PointerTable table(params, kAdamWLists);
  for (std::size_t i = 0; i < params.size(); ++i) {
    table.set(i, kParamList, params[i].data_ptr());
    table.set(i, kGradList, grads[i].data_ptr());
    table.set(i, kMasterList, ptr_or_null(master_params, i));
    table.set(i, kFirstStateList + 0, exp_avgs[i].data_ptr());
    table.set(i, kFirstStateList + 1, exp_avg_sqs[i].data_ptr());
    table.set(i, kFirstStateList + 2, amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr);
    table.set(i, kAdamWStepList, steps[i].data_ptr());
  }
  dispatch_param_state(params[0].scalar_type(), master, [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    run_rule<AdamWRule, P, S>(launcher, args, table);
  });
}

// ---------------------------------------------------------------------------------------------------------
// SGD
// ---------------------------------------------------------------------------------------------------------
template <typename Launcher>
void sgd_impl(Launcher& launcher, TensorList params, TensorList grads, TensorList momentum_buffers,
              TensorList master_params, double lr, double momentum, double dampening, double weight_decay,
              bool nesterov, bool maximize, bool first_step, const OptionalTensor& lr_table,
              const OptionalTensor& momentum_table, const OptionalTensor& schedule_step,
              const OptionalTensor& grad_scale, const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
              const OptionalTensor& weight_decay_table) {
  if (!check_sgd_args(params, grads, momentum_buffers, master_params, lr_table, momentum_table, schedule_step,
                      grad_scale, found_inf, clip_coef, weight_decay_table)) {
    return;
  }

  const bool use_momentum = !momentum_buffers.empty();
  SGDArgs args{};
  args.ctl = make_controls(lr_table, lr, momentum_table, momentum, schedule_step, grad_scale, found_inf,
                           clip_coef, weight_decay_table, weight_decay);
  args.hyper = SGDHyper{dampening, nesterov, maximize, first_step, use_momentum};

  const bool master = !master_params.empty();
  PointerTable table(params, kSGDLists);
  for (std::size_t i = 0; i < params.size(); ++i) {
    table.set(i, kParamList, params[i].data_ptr());
    table.set(i, kGradList, grads[i].data_ptr());
    table.set(i, kMasterList, ptr_or_null(master_params, i));
    table.set(i, kFirstStateList, ptr_or_null(momentum_buffers, i));
  }
  dispatch_param_state(params[0].scalar_type(), master, [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    run_rule<SGDRule, P, S>(launcher, args, table);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Lion
// ---------------------------------------------------------------------------------------------------------
template <typename Launcher>
void lion_impl(Launcher& launcher, TensorList params, TensorList grads, TensorList exp_avgs,
               TensorList master_params, double lr, double beta1, double beta2, double weight_decay,
               const OptionalTensor& lr_table, const OptionalTensor& beta1_table,
               const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
               const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
               const OptionalTensor& weight_decay_table) {
  if (!check_lion_args(params, grads, exp_avgs, master_params, lr_table, beta1_table, schedule_step, grad_scale,
                       found_inf, clip_coef, weight_decay_table)) {
    return;
  }

  LionArgs args{};
  args.ctl = make_controls(lr_table, lr, beta1_table, beta1, schedule_step, grad_scale, found_inf, clip_coef,
                           weight_decay_table, weight_decay);
  args.hyper = LionHyper{beta2};

  const bool master = !master_params.empty();
  PointerTable table(params, kLionLists);
  for (std::size_t i = 0; i < params.size(); ++i) {
    table.set(i, kParamList, params[i].data_ptr());
    table.set(i, kGradList, grads[i].data_ptr());
    table.set(i, kMasterList, ptr_or_null(master_params, i));
    table.set(i, kFirstStateList, exp_avgs[i].data_ptr());
  }
  dispatch_param_state(params[0].scalar_type(), master, [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    run_rule<LionRule, P, S>(launcher, args, table);
  });
}

}  // namespace cuda
}  // namespace fusedopt
