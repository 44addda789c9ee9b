// fusedopt::adamw_ / sgd_ / lion_ on CUDA: the CUDA dispatch-key implementations of the ops that
// csrc/ops.cpp defines (this extension never defines ops itself).
//
// Each call enqueues, on the current stream of the params' device, at most a few launches (AdamW: the
// step-counter kernel, then the update kernel, one launch per ~20 Mi elements or per table of tensors) and
// never reads device memory on the host: found_inf, grad_scale, clip_coef, the schedule tables and the step
// counters are all read by the kernels, so a call can be captured in a CUDA graph and replayed. Small states
// (state_absmaxes / rounding: 8-bit and bfloat16 states, stochastic rounding) are loaded and stored by the
// kernels themselves in the same pass (csrc/cuda/block_bodies.h small_rule_block); the rounding_step counter is
// read on the device too (the optimizers advance it on the device after the step, as on the CPU).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "cuda/ops_host.h"

namespace fusedopt {
namespace cuda {
namespace {

struct CudaLauncher {
  cudaStream_t stream;

  template <typename Rule>
  PlanLimits limits() const {
    return PlanLimits{kChunkSize, Rule::Args::Table::max_tensors, kMaxBlocks};
  }
  int steps_per_launch() const { return kMaxStepsPerLaunch; }
  template <typename Rule, typename P, typename S>
  void launch(const typename Rule::Args& args, int num_blocks) {
    launch_rule_kernel<Rule, P, S>(args, num_blocks, stream);
  }
  void launch_steps(const StepArgs& args) { launch_step_kernel(args, stream); }
  template <typename Rule>
  PlanLimits small_limits() const {
    return PlanLimits{kChunkSize, Rule::SmallArgs::Table::max_tensors, kMaxBlocks};
  }
  template <typename Rule, typename P, typename Fmt>
  void launch_small(const typename Rule::SmallArgs& args, int num_blocks) {
    launch_small_rule_kernel<Rule, P, Fmt>(args, num_blocks, stream);
  }
};

// The dispatcher sends a call here when any tensor argument is on CUDA; the params must be.
void check_cuda_params(const char* op, TensorList params) {
  TORCH_CHECK(params.empty() || params[0].is_cuda(), op, ": the CUDA kernels need CUDA params, but params[0] is on ",
              params[0].device());
}

void adamw_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList max_exp_avg_sqs, TensorList steps, TensorList master_params, double lr, double beta1,
                double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                const OptionalTensor& lr_table, const OptionalTensor& beta1_table,
                const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
                const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
                const OptionalTensor& weight_decay_table, bool decoupled_weight_decay, const OptionalTensorList& state_absmaxes,
                c10::IntArrayRef rounding, const OptionalTensor& rounding_step) {
  check_cuda_params("fusedopt::adamw_", params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  CudaLauncher launcher{c10::cuda::getCurrentCUDAStream().stream()};
  adamw_impl(launcher, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr, beta1,
             beta2, eps, weight_decay, amsgrad, maximize, lr_table, beta1_table, schedule_step, grad_scale,
             found_inf, clip_coef, weight_decay_table, decoupled_weight_decay, state_absmaxes, rounding, rounding_step);
}

void sgd_cuda(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList master_params,
              double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
              bool first_step, const OptionalTensor& lr_table, const OptionalTensor& momentum_table,
              const OptionalTensor& schedule_step, const OptionalTensor& grad_scale,
              const OptionalTensor& found_inf, const OptionalTensor& clip_coef,
              const OptionalTensor& weight_decay_table, const OptionalTensorList& state_absmaxes, c10::IntArrayRef rounding,
              const OptionalTensor& rounding_step) {
  check_cuda_params("fusedopt::sgd_", params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  CudaLauncher launcher{c10::cuda::getCurrentCUDAStream().stream()};
  sgd_impl(launcher, params, grads, momentum_buffers, master_params, lr, momentum, dampening, weight_decay,
           nesterov, maximize, first_step, lr_table, momentum_table, schedule_step, grad_scale, found_inf,
           clip_coef, weight_decay_table, state_absmaxes, rounding, rounding_step);
}

void lion_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList master_params, double lr,
               double beta1, double beta2, double weight_decay, const OptionalTensor& lr_table,
               const OptionalTensor& beta1_table, const OptionalTensor& schedule_step,
               const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
               const OptionalTensor& clip_coef, const OptionalTensor& weight_decay_table,
               const OptionalTensorList& state_absmaxes, c10::IntArrayRef rounding, const OptionalTensor& rounding_step) {
  check_cuda_params("fusedopt::lion_", params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  CudaLauncher launcher{c10::cuda::getCurrentCUDAStream().stream()};
  lion_impl(launcher, params, grads, exp_avgs, master_params, lr, beta1, beta2, weight_decay, lr_table,
            beta1_table, schedule_step, grad_scale, found_inf, clip_coef, weight_decay_table, state_absmaxes, rounding,
            rounding_step);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("adamw_", &adamw_cuda);
  m.impl("sgd_", &sgd_cuda);
  m.impl("lion_", &lion_cuda);
}

}  // namespace cuda
}  // namespace fusedopt
