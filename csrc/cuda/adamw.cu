// The AdamW update kernels (one per dtype pair) and the step-counter kernel.
#include "cuda/multi_tensor.cuh"

namespace fusedopt {
namespace cuda {

FUSEDOPT_INSTANTIATE_RULE_KERNELS(AdamWRule)
FUSEDOPT_INSTANTIATE_SMALL_KERNELS(AdamWRule)

namespace {
__global__ void step_kernel(const __grid_constant__ StepArgs args) {
  increment_steps(args, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
}
}  // namespace

void launch_step_kernel(const StepArgs& args, cudaStream_t stream) {
  if (args.count <= 0) return;
  const int threads = args.count < kBlockSize ? ((args.count + 31) / 32) * 32 : kBlockSize;
  step_kernel<<<1, threads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fusedopt
