// The launch functions of the CUDA kernels, callable from host C++ (csrc/cuda/cuda_ops.cpp).
//
// They are defined in csrc/cuda/multi_tensor.cuh and explicitly instantiated, one per (rule, param dtype,
// state dtype), in csrc/cuda/{adamw,sgd,lion}.cu, so that the ATen-heavy op code is compiled once by the
// host compiler and nvcc only sees the kernels.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/launch_plan.h"

namespace fusedopt {
namespace cuda {

struct AdamWRule;
struct SGDRule;
struct LionRule;
struct F32State;
struct Bf16State;
struct Q8State;

// Launches the update kernel of `Rule` for params of type P and states / master params of type S on
// `num_blocks` blocks of kBlockSize threads, and checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
template <typename Rule, typename P, typename S>
void launch_rule_kernel(const typename Rule::Args& args, int num_blocks, cudaStream_t stream);

// Launches the small-state update kernel of `Rule` (csrc/cuda/block_bodies.h small_rule_block) for params of
// type P (float32 or bfloat16) and states of format Fmt (csrc/cuda/state_slots.h), and checks the launch.
template <typename Rule, typename P, typename Fmt>
void launch_small_rule_kernel(const typename Rule::SmallArgs& args, int num_blocks, cudaStream_t stream);

// Launches the AdamW step-counter kernel (one block) and checks the launch.
void launch_step_kernel(const StepArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedopt
