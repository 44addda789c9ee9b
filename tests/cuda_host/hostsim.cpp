// Host simulator of fusedopt's CUDA backend, for tests/test_cuda_host.py (no GPU needed).
//
// Compiled by g++ (torch.utils.cpp_extension.load) from the very sources the CUDA extension is built from:
// the op code (csrc/cuda/ops_host.h: checks, dtype switch, step counters, address tables), the launch
// plan (csrc/cuda/launch_plan.h) and the kernel bodies (csrc/cuda/block_bodies.h). Only the launcher
// differs: instead of enqueuing a kernel, HostLauncher runs prepare() and then rule_block() for every
// block and every thread, one after another, on the CPU tensors' memory. The chunk size, the table
// capacities and the block size are parameters, so small tensors exercise chunk boundaries, carry-over
// of half-done tensors and many launches.
//
// Ops (namespace fusedopt_hostsim): adamw_ / sgd_ / lion_ with the schemas of fusedopt's ops (every argument,
// the defaulted trailing ones included, without defaults) plus the simulation parameters, returning statistics;
// plan() exposes the launch plan; capacities() the constants.
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda/ops_host.h"

namespace fusedopt {
namespace cuda {
namespace {

struct SimParams {
  int64_t chunk_size;        // <= 0: kChunkSize
  int64_t max_tensors;       // <= 0: the rule's address-table capacity
  int64_t max_blocks;        // <= 0: kMaxBlocks
  int64_t block_dim;         // <= 0: kBlockSize
  int64_t steps_per_launch;  // <= 0: kMaxStepsPerLaunch
  bool reverse;              // run blocks and threads in reverse order (blocks must be independent)
};

// small_rule_block's executor on the host: a phase runs for thread 0, 1, ... (or in reverse) in turn, each with its
// own registers; a barrier is the end of a phase (every thread has finished it), counted.
template <int K>
struct HostThreads {
  int bdim;
  bool reverse;
  std::vector<SmallRegs<K>> regs;
  int64_t barriers = 0;
  int block_dim() const { return bdim; }
  template <typename Fn>
  void threads(Fn&& fn) {
    for (int i = 0; i < bdim; ++i) {
      const int t = reverse ? bdim - 1 - i : i;
      fn(t, regs[static_cast<size_t>(t)]);
    }
  }
  void sync() { ++barriers; }
};

struct HostLauncher {
  SimParams sim;
  // launches, step launches, blocks on the vectorized path, on the scalar path, skipped (found_inf), threads
  int64_t launches = 0, step_launches = 0, vector_blocks = 0, scalar_blocks = 0, skipped_blocks = 0;
  // small-state blocks run, block barriers passed in them
  int64_t small_blocks = 0, barriers = 0;

  int block_dim() const { return sim.block_dim > 0 ? static_cast<int>(sim.block_dim) : kBlockSize; }

  template <typename Rule>
  PlanLimits limits() const {
    return PlanLimits{sim.chunk_size > 0 ? sim.chunk_size : kChunkSize,
                      sim.max_tensors > 0 ? static_cast<int>(sim.max_tensors) : Rule::Args::Table::max_tensors,
                      sim.max_blocks > 0 ? static_cast<int>(sim.max_blocks) : kMaxBlocks};
  }
  int steps_per_launch() const {
    return sim.steps_per_launch > 0 ? static_cast<int>(sim.steps_per_launch) : kMaxStepsPerLaunch;
  }

  template <typename Rule, typename P, typename S>
  void launch(const typename Rule::Args& args, int num_blocks) {
    using T = at::opmath_type<P>;
    TORCH_CHECK(num_blocks >= 1 && num_blocks <= kMaxBlocks, "hostsim: launch of ", num_blocks, " blocks");
    ++launches;
    const int bdim = block_dim();
    for (int k = 0; k < num_blocks; ++k) {
      const int b = sim.reverse ? num_blocks - 1 - k : k;
      // The kernel: thread 0 prepares into shared memory, __syncthreads, every thread runs the body.
      typename Rule::template Prep<T> prep;
      if (!Rule::template prepare<T>(args, b, &prep)) {
        ++skipped_blocks;
        continue;
      }
      if (block_is_vectorized<Rule, P, S>(args, b)) {
        ++vector_blocks;
      } else {
        ++scalar_blocks;
      }
      for (int i = 0; i < bdim; ++i) {
        const int t = sim.reverse ? bdim - 1 - i : i;
        rule_block<Rule, P, S>(args, prep, b, t, bdim);
      }
    }
  }

  template <typename Rule>
  PlanLimits small_limits() const {
    return PlanLimits{sim.chunk_size > 0 ? sim.chunk_size : kChunkSize,
                      sim.max_tensors > 0 ? static_cast<int>(sim.max_tensors) : Rule::SmallArgs::Table::max_tensors,
                      sim.max_blocks > 0 ? static_cast<int>(sim.max_blocks) : kMaxBlocks};
  }

  // The small-state kernel (csrc/cuda/multi_tensor.cuh small_rule_kernel): thread 0 prepares, barrier, then
  // small_rule_block with an executor that runs each phase for every thread of the block in turn (each thread
  // with its own registers), so every barrier of the device code is where the device has it.
  template <typename Rule, typename P, typename Fmt>
  void launch_small(const typename Rule::SmallArgs& args, int num_blocks) {
    TORCH_CHECK(num_blocks >= 1 && num_blocks <= kMaxBlocks, "hostsim: launch of ", num_blocks, " blocks");
    const int bdim = block_dim();
    TORCH_CHECK(bdim % kThreadsPerQuantBlock == 0 && bdim <= kBlockSize, "hostsim: small-state blocks have a multiple "
                "of ", kThreadsPerQuantBlock, " threads, at most ", kBlockSize, "; got ", bdim);
    ++launches;
    for (int k = 0; k < num_blocks; ++k) {
      const int b = sim.reverse ? num_blocks - 1 - k : k;
      typename Rule::template Prep<float> prep;
      if (!Rule::template prepare<float>(args, b, &prep)) {
        ++skipped_blocks;
        continue;
      }
      ++small_blocks;
      SmallShared sh;
      std::memset(&sh, 0xA5, sizeof(sh));  // shared memory starts with garbage: the body must zero what it uses
      HostThreads<Rule::kStates> ex{bdim, sim.reverse,
                                    std::vector<SmallRegs<Rule::kStates>>(static_cast<size_t>(bdim))};
      small_rule_block<Rule, P, Fmt>(ex, args, prep, sh, b);
      barriers += ex.barriers;
    }
  }

  void launch_steps(const StepArgs& args) {
    ++step_launches;
    const int bdim = block_dim();
    for (int t = 0; t < bdim; ++t) increment_steps(args, t, bdim);
  }

  std::vector<int64_t> stats() const {
    return {launches, step_launches, vector_blocks, scalar_blocks, skipped_blocks, small_blocks, barriers};
  }
};

HostLauncher make_launcher(int64_t chunk_size, int64_t max_tensors, int64_t max_blocks, int64_t block_dim,
                           int64_t steps_per_launch, bool reverse) {
  return HostLauncher{SimParams{chunk_size, max_tensors, max_blocks, block_dim, steps_per_launch, reverse}};
}

std::vector<int64_t> sim_adamw(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                               TensorList max_exp_avg_sqs, TensorList steps, TensorList master_params, double lr,
                               double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                               bool maximize, const OptionalTensor& lr_table, const OptionalTensor& beta1_table,
                               const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
                               const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
                               const OptionalTensor& weight_decay_table, bool decoupled_weight_decay,
                               const OptionalTensorList& state_absmaxes, c10::IntArrayRef rounding,
                               const OptionalTensor& rounding_step, int64_t chunk_size, int64_t max_tensors,
                               int64_t max_blocks, int64_t block_dim, int64_t steps_per_launch, bool reverse) {
  HostLauncher launcher = make_launcher(chunk_size, max_tensors, max_blocks, block_dim, steps_per_launch, reverse);
  adamw_impl(launcher, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr, beta1,
             beta2, eps, weight_decay, amsgrad, maximize, lr_table, beta1_table, schedule_step, grad_scale,
             found_inf, clip_coef, weight_decay_table, decoupled_weight_decay, state_absmaxes, rounding, rounding_step);
  return launcher.stats();
}

std::vector<int64_t> sim_sgd(TensorList params, TensorList grads, TensorList momentum_buffers,
                             TensorList master_params, double lr, double momentum, double dampening,
                             double weight_decay, bool nesterov, bool maximize, bool first_step,
                             const OptionalTensor& lr_table, const OptionalTensor& momentum_table,
                             const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
                             const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
                             const OptionalTensor& weight_decay_table, const OptionalTensorList& state_absmaxes,
                             c10::IntArrayRef rounding, const OptionalTensor& rounding_step, int64_t chunk_size,
                             int64_t max_tensors, int64_t max_blocks, int64_t block_dim, int64_t steps_per_launch,
                             bool reverse) {
  HostLauncher launcher = make_launcher(chunk_size, max_tensors, max_blocks, block_dim, steps_per_launch, reverse);
  sgd_impl(launcher, params, grads, momentum_buffers, master_params, lr, momentum, dampening, weight_decay,
           nesterov, maximize, first_step, lr_table, momentum_table, schedule_step, grad_scale, found_inf,
           clip_coef, weight_decay_table, state_absmaxes, rounding, rounding_step);
  return launcher.stats();
}

std::vector<int64_t> sim_lion(TensorList params, TensorList grads, TensorList exp_avgs, TensorList master_params,
                              double lr, double beta1, double beta2, double weight_decay,
                              const OptionalTensor& lr_table, const OptionalTensor& beta1_table,
                              const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
                              const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
                              const OptionalTensor& weight_decay_table, const OptionalTensorList& state_absmaxes,
                              c10::IntArrayRef rounding, const OptionalTensor& rounding_step, int64_t chunk_size,
                              int64_t max_tensors, int64_t max_blocks, int64_t block_dim, int64_t steps_per_launch,
                              bool reverse) {
  HostLauncher launcher = make_launcher(chunk_size, max_tensors, max_blocks, block_dim, steps_per_launch, reverse);
  lion_impl(launcher, params, grads, exp_avgs, master_params, lr, beta1, beta2, weight_decay, lr_table,
            beta1_table, schedule_step, grad_scale, found_inf, clip_coef, weight_decay_table, state_absmaxes, rounding,
            rounding_step);
  return launcher.stats();
}

// The launch plan, flattened: per launch [n_tensors, n_blocks, tensor..., slot..., chunk...].
std::vector<int64_t> sim_plan(c10::ArrayRef<int64_t> numels, int64_t chunk_size, int64_t max_tensors,
                              int64_t max_blocks) {
  std::vector<int64_t> out;
  const std::vector<int64_t> n(numels.begin(), numels.end());
  const PlanLimits limits{chunk_size, static_cast<int>(max_tensors), static_cast<int>(max_blocks)};
  try {
    plan_launches(n, limits, [&](const PlannedLaunch& plan) {
      out.push_back(static_cast<int64_t>(plan.tensors.size()));
      out.push_back(static_cast<int64_t>(plan.block_slot.size()));
      out.insert(out.end(), plan.tensors.begin(), plan.tensors.end());
      out.insert(out.end(), plan.block_slot.begin(), plan.block_slot.end());
      out.insert(out.end(), plan.block_chunk.begin(), plan.block_chunk.end());
    });
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  return out;
}

std::vector<int64_t> sim_capacities() {
  return {kChunkSize,
          kBlockSize,
          kILP,
          kMaxBlocks,
          AdamWArgs::Table::max_tensors,
          SGDArgs::Table::max_tensors,
          LionArgs::Table::max_tensors,
          kMaxStepsPerLaunch,
          static_cast<int64_t>(sizeof(AdamWArgs)),
          static_cast<int64_t>(sizeof(SGDArgs)),
          static_cast<int64_t>(sizeof(LionArgs)),
          static_cast<int64_t>(sizeof(StepArgs)),
          AdamWSmallArgs::Table::max_tensors,
          SGDSmallArgs::Table::max_tensors,
          LionSmallArgs::Table::max_tensors,
          static_cast<int64_t>(sizeof(AdamWSmallArgs)),
          static_cast<int64_t>(sizeof(SGDSmallArgs)),
          static_cast<int64_t>(sizeof(LionSmallArgs))};
}

#define FUSEDOPT_SIM_ARGS \
  "Tensor[]? state_absmaxes, int[] rounding, Tensor? rounding_step, " \
  "int chunk_size, int max_tensors, int max_blocks, int block_dim, int steps_per_launch, bool reverse"

}  // namespace
}  // namespace cuda
}  // namespace fusedopt

TORCH_LIBRARY(fusedopt_hostsim, m) {
  using namespace fusedopt::cuda;
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor(f!)[] master_params, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, Tensor? lr_table, "
      "Tensor? beta1_table, Tensor? schedule_step, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? clip_coef, Tensor? weight_decay_table, bool decoupled_weight_decay, " FUSEDOPT_SIM_ARGS
      ") -> int[]",
      &sim_adamw);
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] master_params, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_step, Tensor? lr_table, Tensor? momentum_table, Tensor? schedule_step, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef, Tensor? weight_decay_table, " FUSEDOPT_SIM_ARGS
      ") -> int[]",
      &sim_sgd);
  m.def(
      "lion_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] master_params, "
      "float lr, float beta1, float beta2, float weight_decay, Tensor? lr_table, Tensor? beta1_table, "
      "Tensor? schedule_step, Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef, "
      "Tensor? weight_decay_table, " FUSEDOPT_SIM_ARGS ") -> int[]",
      &sim_lion);
  m.def("plan(int[] numels, int chunk_size, int max_tensors, int max_blocks) -> int[]", &sim_plan);
  m.def("capacities() -> int[]", &sim_capacities);
}
