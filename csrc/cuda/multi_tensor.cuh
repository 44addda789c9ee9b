// fusedopt's multi-tensor apply on CUDA: the __global__ kernels and their launch functions.
//
// The launch plan (tensor lists -> chunks of kChunkSize elements -> blocks, packed into a 4 KB kernel
// argument, carry-over of half-done tensors) is plain host C++ in csrc/cuda/launch_plan.h; the per-block
// work is __host__ __device__ code in csrc/cuda/block_bodies.h. The kernels here only map blockIdx /
// threadIdx onto those bodies, so the host test harness executes exactly what the GPU executes.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "cuda/block_bodies.h"
#include "cuda/launch.h"

namespace fusedopt {
namespace cuda {

// The whole launch description is one kernel parameter. __grid_constant__ lets the bodies take it by
// reference without each thread copying 4 KB into local memory.
template <typename Rule, typename P, typename S>
__global__ void __launch_bounds__(kBlockSize) rule_kernel(const __grid_constant__ typename Rule::Args args) {
  using T = at::opmath_type<P>;
  using Prep = typename Rule::template Prep<T>;
  // Thread 0 reads the controls and the schedule and builds the block's scalars once; the others read
  // them from shared memory. (Prep is a plain aggregate, so it may live in shared memory.)
  __shared__ Prep prep;
  __shared__ bool active;
  if (threadIdx.x == 0) active = Rule::template prepare<T>(args, blockIdx.x, &prep);
  __syncthreads();
  if (!active) return;  // found_inf: the whole block is a no-op
  rule_block<Rule, P, S>(args, prep, blockIdx.x, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
}

template <typename Rule, typename P, typename S>
void launch_rule_kernel(const typename Rule::Args& args, int num_blocks, cudaStream_t stream) {
  rule_kernel<Rule, P, S><<<num_blocks, kBlockSize, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The executor of small_rule_block's phases on the device: each thread runs its own part of a phase, a
// barrier is __syncthreads(); the registers that live across a barrier are this thread's.
// (__host__ __device__ like the body that calls them; only ever run on the device.)
template <int K>
struct DeviceThreads {
  SmallRegs<K> regs;
  FUSEDOPT_HD int block_dim() const {
#if defined(__CUDA_ARCH__)
    return static_cast<int>(blockDim.x);
#else
    return 0;
#endif
  }
  template <typename Fn>
  FUSEDOPT_HD void threads(Fn&& fn) {
#if defined(__CUDA_ARCH__)
    fn(static_cast<int>(threadIdx.x), regs);
#endif
  }
  FUSEDOPT_HD void sync() {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
};

// The small-state kernel of one (rule, param dtype, state format): see small_rule_block.
template <typename Rule, typename P, typename Fmt>
__global__ void __launch_bounds__(kBlockSize) small_rule_kernel(const __grid_constant__ typename Rule::SmallArgs args) {
  using Prep = typename Rule::template Prep<float>;
  __shared__ Prep prep;
  __shared__ bool active;
  __shared__ SmallShared sh;
  if (threadIdx.x == 0) active = Rule::template prepare<float>(args, blockIdx.x, &prep);
  __syncthreads();
  if (!active) return;  // found_inf: the whole block is a no-op
  DeviceThreads<Rule::kStates> ex;
  small_rule_block<Rule, P, Fmt>(ex, args, prep, sh, blockIdx.x);
}

template <typename Rule, typename P, typename Fmt>
void launch_small_rule_kernel(const typename Rule::SmallArgs& args, int num_blocks, cudaStream_t stream) {
  small_rule_kernel<Rule, P, Fmt><<<num_blocks, kBlockSize, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// float32 / bfloat16 params with float32, bfloat16 or 8-bit states (master or not, stochastic rounding or not:
// runtime choices of the body, uniform per block).
#define FUSEDOPT_INSTANTIATE_SMALL_KERNELS(Rule)                                                                   \
  template void launch_small_rule_kernel<Rule, float, F32State>(const Rule::SmallArgs&, int, cudaStream_t);         \
  template void launch_small_rule_kernel<Rule, float, Bf16State>(const Rule::SmallArgs&, int, cudaStream_t);        \
  template void launch_small_rule_kernel<Rule, float, Q8State>(const Rule::SmallArgs&, int, cudaStream_t);          \
  template void launch_small_rule_kernel<Rule, c10::BFloat16, F32State>(const Rule::SmallArgs&, int, cudaStream_t); \
  template void launch_small_rule_kernel<Rule, c10::BFloat16, Bf16State>(const Rule::SmallArgs&, int, cudaStream_t); \
  template void launch_small_rule_kernel<Rule, c10::BFloat16, Q8State>(const Rule::SmallArgs&, int, cudaStream_t);

// The float32 / float64 / bf16 / fp16 params, with states of the param dtype or float32 states and
// float32 master params: the dtype pairs the CPU backend supports.
#define FUSEDOPT_INSTANTIATE_RULE_KERNELS(Rule)                                                            \
  template void launch_rule_kernel<Rule, float, float>(const Rule::Args&, int, cudaStream_t);              \
  template void launch_rule_kernel<Rule, double, double>(const Rule::Args&, int, cudaStream_t);            \
  template void launch_rule_kernel<Rule, double, float>(const Rule::Args&, int, cudaStream_t);             \
  template void launch_rule_kernel<Rule, c10::BFloat16, c10::BFloat16>(const Rule::Args&, int, cudaStream_t); \
  template void launch_rule_kernel<Rule, c10::BFloat16, float>(const Rule::Args&, int, cudaStream_t);      \
  template void launch_rule_kernel<Rule, c10::Half, c10::Half>(const Rule::Args&, int, cudaStream_t);      \
  template void launch_rule_kernel<Rule, c10::Half, float>(const Rule::Args&, int, cudaStream_t);

}  // namespace cuda
}  // namespace fusedopt
