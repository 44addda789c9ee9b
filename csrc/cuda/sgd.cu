// The SGD (momentum, dampening, Nesterov) update kernels, one per dtype pair.
#include "cuda/multi_tensor.cuh"

namespace fusedopt {
namespace cuda {

FUSEDOPT_INSTANTIATE_RULE_KERNELS(SGDRule)
FUSEDOPT_INSTANTIATE_SMALL_KERNELS(SGDRule)

}  // namespace cuda
}  // namespace fusedopt
