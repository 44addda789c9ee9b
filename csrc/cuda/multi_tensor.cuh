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
