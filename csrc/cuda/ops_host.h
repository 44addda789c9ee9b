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
//   template <class Rule> PlanLimits small_limits() const;  the same for the small-state launches
//   template <class Rule, class P, class Fmt>
//   void launch_small(const typename Rule::SmallArgs&, int blocks);  one small-state update-kernel launch
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
// Small states (state_absmaxes / rounding given): the same arguments and checks as the CPU ops (csrc/cpu,
// fusedopt/op_args.h check_small_states / check_rounding), read on the device by small_rule_block.
// ---------------------------------------------------------------------------------------------------------
struct SmallCall {
  std::vector<TensorList> states;  // per rule state, in the op's order (an empty list: the state is absent)
  TensorList absmaxes;             // state_absmaxes (one per state list and tensor), or empty
  RoundingControls rounding{nullptr, 0};
  std::vector<int64_t> stream_index;   // per tensor: the param index of its rounding streams
  std::vector<int64_t> stream_offset;  // per tensor: the local shard's first element in the full tensor
};

inline SmallCall make_small_call(std::vector<TensorList> states, const OptionalTensorList& state_absmaxes,
                                 c10::IntArrayRef rounding, const OptionalTensor& rounding_step, size_t num_tensors) {
  SmallCall c;
  c.states = std::move(states);
  if (state_absmaxes.has_value()) c.absmaxes = *state_absmaxes;
  c.stream_index.assign(num_tensors, 0);
  c.stream_offset.assign(num_tensors, 0);
  if (!rounding.empty()) {  // sizes checked by check_rounding; the counter is read on the device
    c.rounding.step = rounding_step->data_ptr<int64_t>();
    c.rounding.seed = static_cast<uint64_t>(rounding[0]);
    for (size_t i = 0; i < num_tensors; ++i) {
      c.stream_index[i] = rounding[1 + 2 * i];
      c.stream_offset[i] = rounding[2 + 2 * i];
    }
  }
  return c;
}

// float16 / float64 params take states of their own dtype only (as on the CPU, whose message this is): the
// optimizers send their small states through the staged path. Checked before anything is modified.
inline void check_small_state_params(TensorList params, TensorList master_params, const SmallCall& c) {
  const auto pdtype = params[0].scalar_type();
  if (pdtype == at::kFloat || pdtype == at::kBFloat16) return;
  const auto plain = state_dtype(params, master_params);
  for (const auto& list : c.states) {
    for (const auto& t : list) {
      TORCH_CHECK(t.scalar_type() == plain, "fusedopt: ", pdtype, " params take states of their own dtype (small "
                  "states run through the optimizers' staged path)");
    }
  }
}

// Chunks must start on quantization blocks (kChunkSize does on the device; the host harness may choose others).
inline void check_small_chunks(const PlanLimits& limits) {
  TORCH_CHECK(limits.chunk_size % kSmallQuantBlock == 0, "fusedopt: small-state launches need chunks of a multiple "
              "of ", kSmallQuantBlock, " elements, got ", limits.chunk_size);
}

enum class SmallFormat { kF32 = 0, kBf16 = 1, kQ8 = 2 };

// The format of tensor i's states (all of them share one: check_small_states); float32 when it has none.
inline SmallFormat small_format(const SmallCall& c, size_t i) {
  for (const auto& list : c.states) {
    if (list.empty()) continue;
    const auto dtype = list[i].scalar_type();
    if (dtype == at::kByte) return SmallFormat::kQ8;
    if (dtype == at::kBFloat16) return SmallFormat::kBf16;
    return SmallFormat::kF32;
  }
  return SmallFormat::kF32;
}

// The small-state launches of one op call: the tensors grouped by state format (one kernel each; an 8-bit call
// has float32 states for its tensors under 4,096 elements), each group planned like a plain call. set_extra(row,
// i) fills rule-specific lists (AdamW's step counters) of tensor i's pointer row.
template <typename Rule, typename P, typename Launcher, typename SetExtra>
void run_small_rule(Launcher& launcher, typename Rule::SmallArgs args, TensorList params, TensorList grads,
                    TensorList master_params, const SmallCall& c, SetExtra&& set_extra) {
  using Args = typename Rule::SmallArgs;
  constexpr int kLists = Args::Table::lists;
  const size_t n = params.size();
  const PlanLimits limits = launcher.template small_limits<Rule>();
  check_small_chunks(limits);
  args.rounding = c.rounding;
  const SmallFormat formats[] = {SmallFormat::kF32, SmallFormat::kBf16, SmallFormat::kQ8};
  for (const SmallFormat f : formats) {
    std::vector<size_t> members;
    for (size_t i = 0; i < n; ++i) {
      if (small_format(c, i) == f) members.push_back(i);
    }
    if (members.empty()) continue;
    std::vector<int64_t> numels(members.size());
    std::vector<void*> ptrs(members.size() * kLists, nullptr);
    for (size_t m = 0; m < members.size(); ++m) {
      const size_t i = members[m];
      void** row = &ptrs[m * kLists];
      numels[m] = params[i].numel();
      row[kParamList] = params[i].data_ptr();
      row[kGradList] = grads[i].data_ptr();
      row[kMasterList] = ptr_or_null(master_params, i);
      for (int k = 0; k < Rule::kStates; ++k) {
        const TensorList list = c.states[static_cast<size_t>(k)];
        row[kFirstStateList + k] = ptr_or_null(list, i);
        if (f == SmallFormat::kQ8 && !list.empty()) row[Args::kFirstAbsmaxList + k] = c.absmaxes[k * n + i].data_ptr();
      }
      set_extra(row, i);
    }
    const auto fill_slot = [&](Args& a, std::size_t s, int64_t t) {
      a.stream_index[s] = c.stream_index[members[static_cast<std::size_t>(t)]];
      a.stream_offset[s] = c.stream_offset[members[static_cast<std::size_t>(t)]];
    };
    const auto run = [&](auto fmt_tag) {
      using Fmt = decltype(fmt_tag);
      apply_plan(args, numels, ptrs, limits,
                 [&](const Args& a, int blocks) { launcher.template launch_small<Rule, P, Fmt>(a, blocks); },
                 fill_slot);
    };
    if (f == SmallFormat::kF32) run(F32State{});
    if (f == SmallFormat::kBf16) run(Bf16State{});
    if (f == SmallFormat::kQ8) run(Q8State{});
  }
}

// Copies the plain launch arguments into a small-state launch's.
template <typename SmallArgs, typename PlainArgs>
SmallArgs small_args_of(const PlainArgs& plain) {
  SmallArgs a{};
  a.ctl = plain.ctl;
  a.hyper = plain.hyper;
  return a;
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
  const bool small = small_state || !rounding.empty();
  const SmallCall small_call =
      small ? make_small_call({exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : TensorList()}, state_absmaxes,
                              rounding, rounding_step, params.size())
            : SmallCall{};
  if (small) {
    check_small_state_params(params, master_params, small_call);
    check_small_chunks(launcher.template small_limits<AdamWRule>());
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
    if constexpr (kSmallStateParam<P>) {
      if (small) {
        run_small_rule<AdamWRule, P>(launcher, small_args_of<AdamWSmallArgs>(args), params, grads, master_params,
                                     small_call, [&](void** row, size_t i) {
                                       row[kAdamWStepList] = steps[i].data_ptr();
                                     });
        return;
      }
    }
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
              const OptionalTensor& weight_decay_table, const OptionalTensorList& state_absmaxes,
              c10::IntArrayRef rounding, const OptionalTensor& rounding_step) {
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
  const bool small = small_state || !rounding.empty();
  const SmallCall small_call =
      small ? make_small_call({momentum_buffers}, state_absmaxes, rounding, rounding_step, params.size()) : SmallCall{};
  if (small) {
    check_small_state_params(params, master_params, small_call);
    check_small_chunks(launcher.template small_limits<SGDRule>());
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
    if constexpr (kSmallStateParam<P>) {
      if (small) {
        run_small_rule<SGDRule, P>(launcher, small_args_of<SGDSmallArgs>(args), params, grads, master_params,
                                   small_call, [](void**, size_t) {});
        return;
      }
    }
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
               const OptionalTensor& weight_decay_table, const OptionalTensorList& state_absmaxes,
               c10::IntArrayRef rounding, const OptionalTensor& rounding_step) {
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
  const bool small = small_state || !rounding.empty();
  const SmallCall small_call =
      small ? make_small_call({exp_avgs}, state_absmaxes, rounding, rounding_step, params.size()) : SmallCall{};
  if (small) {
    check_small_state_params(params, master_params, small_call);
    check_small_chunks(launcher.template small_limits<LionRule>());
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
    if constexpr (kSmallStateParam<P>) {
      if (small) {
        run_small_rule<LionRule, P>(launcher, small_args_of<LionSmallArgs>(args), params, grads, master_params,
                                    small_call, [](void**, size_t) {});
        return;
      }
    }
    run_rule<LionRule, P, S>(launcher, args, table);
  });
}

}  // namespace cuda
}  // namespace fusedopt
