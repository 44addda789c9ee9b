// Reading the on-device schedule table, and the few portability helpers every kernel header needs.
//
// A schedule table is a float64 vector of per-step values (absolute learning rates, or momentum / beta1
// values) living on the parameters' device. The step counter is an int64 scalar on the same device that
// counts completed optimizer steps; step t reads entry t and the last entry holds past the end.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDOPT_HD __host__ __device__ __forceinline__
#else
#define FUSEDOPT_HD inline
#endif

namespace fusedopt {

FUSEDOPT_HD float sqrt_host_device(float x) {
#if defined(__CUDA_ARCH__)
  return ::sqrtf(x);  // IEEE-rounded (nvcc's default -prec-sqrt=true), like std::sqrt on the host
#else
  return std::sqrt(x);
#endif
}

FUSEDOPT_HD double sqrt_host_device(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// a * b + c rounded once (IEEE fusedMultiplyAdd), on every compiler and machine. The rules call it exactly
// where torch's CPU ops fuse; every other a*b+c rounds twice (-ffp-contract=off on the host, --fmad=false
// for nvcc). On the host std::fma becomes one vfmadd instruction in the AVX2 / AVX-512 clones of the CPU
// loops (both x86-64-v3 or later) and a libm call in the baseline clone.
FUSEDOPT_HD float fma_host_device(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

FUSEDOPT_HD double fma_host_device(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// A view of one table: `values` may be null, in which case `fallback` (the param group's own
// hyperparameter, passed by value) is used. This is how schedule=None runs through the same kernels.
struct TableView {
  const double* values;
  int64_t length;
  double fallback;
};

FUSEDOPT_HD int64_t table_index(int64_t step, int64_t length) {
  // Negative steps cannot happen through the Python API; clamp anyway so a corrupted counter reads
  // entry 0 instead of memory before the table.
  if (step < 0) return 0;
  return step < length ? step : length - 1;
}

FUSEDOPT_HD double read_table(const TableView& table, const int64_t* step) {
  if (table.values == nullptr || table.length <= 0) return table.fallback;
  return table.values[table_index(step == nullptr ? 0 : *step, table.length)];
}

}  // namespace fusedopt
