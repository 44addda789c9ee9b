// The Lion update kernels, one per dtype pair.
#include "cuda/multi_tensor.cuh"

namespace fusedopt {
namespace cuda {

FUSEDOPT_INSTANTIATE_RULE_KERNELS(LionRule)
FUSEDOPT_INSTANTIATE_SMALL_KERNELS(LionRule)

}  // namespace cuda
}  // namespace fusedopt
