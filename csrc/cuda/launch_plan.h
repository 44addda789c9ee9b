// The host side of fusedopt's multi-tensor apply: the kernel-argument layout and the launch plan.
//
// Plain C++ (no CUDA types, no ATen): the CUDA ops (csrc/cuda/cuda_ops.cpp) and the host test harness
// (tests/cuda_host/hostsim.cpp) build their launches with exactly this code.
//
// A param group is a list of tensors (params, grads, states, ...), all with the same per-tensor element
// counts. Each tensor is cut into chunks of `chunk_size` elements and every chunk is one CUDA block. A
// launch carries, by value in its kernel parameters, an address table (per slot: one pointer per list and
// the element count) and a block table (per block: the slot and the chunk index it works on). The plan
// fills both tables tensor by tensor, chunk by chunk; a launch fires when the block table is full, or when
// the address table is full and its last tensor is done. A tensor that is only half done when a launch
// fires stays in the next launch as slot 0 and continues with its next chunk. Empty tensors take no slot.
//
// Offsets are int64 everywhere (a tensor may have more than 2^31 elements); a chunk index is stored as
// int32 (2^31 chunks of 64 Ki elements are 2^47 elements, far beyond any device's memory; the planner
// checks it anyway).
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fusedopt/schedule.h"

namespace fusedopt {
namespace cuda {

// 64 Ki elements per block: 32 rounds of 512 threads x 4 elements; long enough to amortize the per-block
// setup (reading the controls and the schedule, building the scalars in double), short enough that a
// group of small tensors still spreads over every SM.
constexpr int64_t kChunkSize = int64_t{1} << 16;
constexpr int kBlockSize = 512;
// Elements per thread held in registers between the loads and the stores.
constexpr int kILP = 4;
// Block-table capacity of one launch (320 blocks * 64 Ki elements = 20 Mi elements per launch).
constexpr int kMaxBlocks = 320;
// The kernel-parameter budget: 4 KB works with every toolkit and driver (CUDA >= 12.1 allows 32 KB on
// Volta and newer; 4 KB keeps a launch per ~20 Mi elements, whose launch overhead is negligible).
constexpr std::size_t kKernelParamBytes = 4096;

// Which list each address-table row holds. States follow the master params; AdamW's per-param step
// counters come last.
constexpr int kParamList = 0;
constexpr int kGradList = 1;
constexpr int kMasterList = 2;  // null when the op has no master params
constexpr int kFirstStateList = 3;

// The per-call controls every block reads on the device.
struct Controls {
  const float* found_inf;         // null: never skip
  const float* grad_scale;        // null: no unscaling
  const float* clip_coef;         // null: no clipping
  const int64_t* schedule_step;   // null: no table (the TableViews then hold only fallbacks)
  TableView lr;                   // lr table, or the group's lr as fallback
  TableView momentum;             // beta1 / momentum table, or the group's value as fallback
  TableView weight_decay;         // weight-decay table, or the group's weight_decay as fallback
  int64_t chunk_size;             // kChunkSize on the device; smaller in host tests
};

// The rule-specific hyperparameters that no table replaces.
struct AdamWHyper {
  double beta2;
  double eps;
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;  // false: torch.optim.Adam's L2 decay
};

struct SGDHyper {
  double dampening;
  bool nesterov;
  bool maximize;
  bool first_step;
  bool use_momentum;
};

struct LionHyper {
  double beta2;
};

template <int kLists, int kMaxTensors>
struct TensorTable {
  static constexpr int lists = kLists;
  static constexpr int max_tensors = kMaxTensors;
  void* ptr[kLists][kMaxTensors];   // null where a list is absent (no master params, no amsgrad, ...)
  int64_t numel[kMaxTensors];
  int32_t block_chunk[kMaxBlocks];  // chunk index inside the block's tensor
  uint8_t block_slot[kMaxBlocks];   // address-table slot of the block's tensor
};

template <typename Hyper, int kLists, int kMaxTensors>
struct LaunchArgs {
  using HyperType = Hyper;
  using Table = TensorTable<kLists, kMaxTensors>;
  Controls ctl;
  Hyper hyper;
  Table table;
};

// The largest address table that keeps the whole argument struct within the kernel-parameter budget.
template <typename Hyper, int kLists>
constexpr int max_tensors_for() {
  constexpr std::size_t fixed = sizeof(Controls) + sizeof(Hyper) + kMaxBlocks * (sizeof(int32_t) + sizeof(uint8_t));
  constexpr std::size_t slack = 16;  // alignment padding
  constexpr std::size_t per_tensor = sizeof(void*) * kLists + sizeof(int64_t);
  constexpr std::size_t n = (kKernelParamBytes - fixed - slack) / per_tensor;
  return n > 255 ? 255 : static_cast<int>(n);  // slots are uint8
}

// AdamW: param, grad, master, exp_avg, exp_avg_sq, max_exp_avg_sq, step.
constexpr int kAdamWLists = 7;
constexpr int kAdamWStepList = 6;
using AdamWArgs = LaunchArgs<AdamWHyper, kAdamWLists, max_tensors_for<AdamWHyper, kAdamWLists>()>;
// SGD: param, grad, master, momentum_buffer.
constexpr int kSGDLists = 4;
using SGDArgs = LaunchArgs<SGDHyper, kSGDLists, max_tensors_for<SGDHyper, kSGDLists>()>;
// Lion: param, grad, master, exp_avg.
constexpr int kLionLists = 4;
using LionArgs = LaunchArgs<LionHyper, kLionLists, max_tensors_for<LionHyper, kLionLists>()>;

static_assert(sizeof(AdamWArgs) <= kKernelParamBytes, "AdamW kernel arguments exceed 4 KB");
static_assert(sizeof(SGDArgs) <= kKernelParamBytes, "SGD kernel arguments exceed 4 KB");
static_assert(sizeof(LionArgs) <= kKernelParamBytes, "Lion kernel arguments exceed 4 KB");
static_assert(AdamWArgs::Table::max_tensors >= 16 && SGDArgs::Table::max_tensors >= 16 &&
                  LionArgs::Table::max_tensors >= 16,
              "address tables too small");

// ---------------------------------------------------------------------------------------------------------
// Small-state launches (8-bit / bfloat16 states, stochastic rounding: csrc/fusedopt/state_codec.h)
// ---------------------------------------------------------------------------------------------------------
// The elements of one 8-bit quantization block (one float32 absmax each): codec::kQuantBlock, repeated here so
// that this header stays free of the codec. Chunks of a small-state launch are multiples of it, so every chunk
// starts on a quantization block of its tensor.
constexpr int64_t kSmallQuantBlock = 256;

// Stochastic rounding of one call: the seed, and the group's rounding_step counter, read on the device.
struct RoundingControls {
  const int64_t* step;  // null: round to nearest
  uint64_t seed;
};

// A small-state launch: the lists of the plain launch, then one absmax list per rule state (the float32
// absmaxes of 8-bit codes, null for other states), and per tensor the (param index, element offset of the
// local shard) that key its stochastic rounding streams.
template <typename Hyper, int kLists, int kStates, int kMaxTensors>
struct SmallLaunchArgs {
  using HyperType = Hyper;
  using Table = TensorTable<kLists + kStates, kMaxTensors>;
  static constexpr int kFirstAbsmaxList = kLists;
  Controls ctl;
  Hyper hyper;
  RoundingControls rounding;
  Table table;
  int64_t stream_index[kMaxTensors];
  int64_t stream_offset[kMaxTensors];
};

template <typename Hyper, int kLists>
constexpr int max_small_tensors_for() {
  constexpr std::size_t fixed = sizeof(Controls) + sizeof(Hyper) + sizeof(RoundingControls) +
                                kMaxBlocks * (sizeof(int32_t) + sizeof(uint8_t));
  constexpr std::size_t slack = 32;  // alignment padding
  constexpr std::size_t per_tensor = sizeof(void*) * kLists + 3 * sizeof(int64_t);
  constexpr std::size_t n = (kKernelParamBytes - fixed - slack) / per_tensor;
  return n > 255 ? 255 : static_cast<int>(n);
}

using AdamWSmallArgs =
    SmallLaunchArgs<AdamWHyper, kAdamWLists, 3, max_small_tensors_for<AdamWHyper, kAdamWLists + 3>()>;
using SGDSmallArgs = SmallLaunchArgs<SGDHyper, kSGDLists, 1, max_small_tensors_for<SGDHyper, kSGDLists + 1>()>;
using LionSmallArgs = SmallLaunchArgs<LionHyper, kLionLists, 1, max_small_tensors_for<LionHyper, kLionLists + 1>()>;

static_assert(sizeof(AdamWSmallArgs) <= kKernelParamBytes, "AdamW small-state kernel arguments exceed 4 KB");
static_assert(sizeof(SGDSmallArgs) <= kKernelParamBytes, "SGD small-state kernel arguments exceed 4 KB");
static_assert(sizeof(LionSmallArgs) <= kKernelParamBytes, "Lion small-state kernel arguments exceed 4 KB");
static_assert(AdamWSmallArgs::Table::max_tensors >= 16 && SGDSmallArgs::Table::max_tensors >= 16 &&
                  LionSmallArgs::Table::max_tensors >= 16,
              "small-state address tables too small");
static_assert(kChunkSize % kSmallQuantBlock == 0 && (kBlockSize * kILP) % kSmallQuantBlock == 0,
              "chunks and rounds of a block must hold whole quantization blocks");

// The AdamW step counters are incremented by their own tiny kernel before the update kernel runs (see
// csrc/cuda/block_bodies.h); its arguments are a plain pointer table.
constexpr int kMaxStepsPerLaunch = static_cast<int>((kKernelParamBytes - 32) / sizeof(int64_t*));
struct StepArgs {
  const float* found_inf;
  int32_t count;
  int64_t* steps[kMaxStepsPerLaunch];
};
static_assert(sizeof(StepArgs) <= kKernelParamBytes, "step kernel arguments exceed 4 KB");

// ---------------------------------------------------------------------------------------------------------
// The launch plan
// ---------------------------------------------------------------------------------------------------------
struct PlanLimits {
  int64_t chunk_size;  // elements per block
  int max_tensors;     // address-table slots per launch
  int max_blocks;      // block-table entries per launch
};

// One launch: the op-level tensor index held by each slot, and the (slot, chunk) of each block.
struct PlannedLaunch {
  std::vector<int64_t> tensors;
  std::vector<int32_t> block_slot;
  std::vector<int64_t> block_chunk;
};

inline void check_limits(const PlanLimits& limits, int table_capacity) {
  if (limits.chunk_size <= 0) throw std::invalid_argument("launch plan: chunk_size must be positive");
  if (limits.max_tensors < 1 || limits.max_tensors > table_capacity || limits.max_tensors > 256) {
    throw std::invalid_argument("launch plan: max_tensors must be in [1, " + std::to_string(table_capacity) +
                                "], got " + std::to_string(limits.max_tensors));
  }
  if (limits.max_blocks < 1 || limits.max_blocks > kMaxBlocks) {
    throw std::invalid_argument("launch plan: max_blocks must be in [1, " + std::to_string(kMaxBlocks) +
                                "], got " + std::to_string(limits.max_blocks));
  }
}

// Calls on_launch(const PlannedLaunch&) for each launch, in order; returns the number of launches.
template <typename OnLaunch>
int64_t plan_launches(const std::vector<int64_t>& numels, const PlanLimits& limits, OnLaunch&& on_launch) {
  check_limits(limits, 256);
  PlannedLaunch cur;
  cur.tensors.reserve(static_cast<std::size_t>(limits.max_tensors));
  cur.block_slot.reserve(static_cast<std::size_t>(limits.max_blocks));
  cur.block_chunk.reserve(static_cast<std::size_t>(limits.max_blocks));
  int64_t launches = 0;
  for (std::size_t t = 0; t < numels.size(); ++t) {
    const int64_t n = numels[t];
    if (n < 0) throw std::invalid_argument("launch plan: negative element count");
    if (n == 0) continue;  // empty tensors take no slot
    const int64_t chunks = (n - 1) / limits.chunk_size + 1;
    if (chunks > INT32_MAX) throw std::invalid_argument("launch plan: tensor has more than 2^31 chunks");
    cur.tensors.push_back(static_cast<int64_t>(t));
    for (int64_t c = 0; c < chunks; ++c) {
      // The current tensor is always the last slot (slot 0 after a carry-over).
      cur.block_slot.push_back(static_cast<int32_t>(cur.tensors.size()) - 1);
      cur.block_chunk.push_back(c);
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = static_cast<int>(cur.tensors.size()) == limits.max_tensors && last_chunk;
      const bool blocks_full = static_cast<int>(cur.block_slot.size()) == limits.max_blocks;
      if (tensors_full || blocks_full) {
        on_launch(static_cast<const PlannedLaunch&>(cur));
        ++launches;
        cur.block_slot.clear();
        cur.block_chunk.clear();
        cur.tensors.clear();
        if (!last_chunk) cur.tensors.push_back(static_cast<int64_t>(t));  // carry over, as slot 0
      }
    }
  }
  if (!cur.block_slot.empty()) {
    on_launch(static_cast<const PlannedLaunch&>(cur));
    ++launches;
  }
  return launches;
}

// Fills `args.table` launch by launch and calls launch(const Args&, int num_blocks). `ptrs[t][l]` is the
// pointer of list l for tensor t (null for an absent list); fill_slot(Args&, slot, t) sets any other per-slot
// field of the launch. Returns the number of launches.
template <typename Args, typename Launch, typename FillSlot>
int64_t apply_plan(Args args, const std::vector<int64_t>& numels, const std::vector<void*>& ptrs,
                   const PlanLimits& limits, Launch&& launch, FillSlot&& fill_slot) {
  constexpr int kLists = Args::Table::lists;
  check_limits(limits, Args::Table::max_tensors);
  if (ptrs.size() != numels.size() * kLists) throw std::invalid_argument("apply_plan: pointer table size");
  args.ctl.chunk_size = limits.chunk_size;
  return plan_launches(numels, limits, [&](const PlannedLaunch& plan) {
    for (std::size_t s = 0; s < plan.tensors.size(); ++s) {
      const int64_t t = plan.tensors[s];
      for (int l = 0; l < kLists; ++l) args.table.ptr[l][s] = ptrs[static_cast<std::size_t>(t) * kLists + l];
      args.table.numel[s] = numels[static_cast<std::size_t>(t)];
      fill_slot(args, s, t);
    }
    for (std::size_t b = 0; b < plan.block_slot.size(); ++b) {
      args.table.block_slot[b] = static_cast<uint8_t>(plan.block_slot[b]);
      args.table.block_chunk[b] = static_cast<int32_t>(plan.block_chunk[b]);
    }
    launch(static_cast<const Args&>(args), static_cast<int>(plan.block_slot.size()));
  });
}

template <typename Args, typename Launch>
int64_t apply_plan(Args args, const std::vector<int64_t>& numels, const std::vector<void*>& ptrs,
                   const PlanLimits& limits, Launch&& launch) {
  return apply_plan(args, numels, ptrs, limits, launch, [](Args&, std::size_t, int64_t) {});
}

// Splits the step counters into launches of the step kernel; calls launch(const StepArgs&).
template <typename Launch>
int64_t apply_steps(const std::vector<int64_t*>& steps, const float* found_inf, int max_per_launch,
                    Launch&& launch) {
  if (max_per_launch < 1 || max_per_launch > kMaxStepsPerLaunch) {
    throw std::invalid_argument("apply_steps: max_per_launch out of range");
  }
  StepArgs args;
  args.found_inf = found_inf;
  int64_t launches = 0;
  for (std::size_t first = 0; first < steps.size(); first += static_cast<std::size_t>(max_per_launch)) {
    const std::size_t count = std::min(steps.size() - first, static_cast<std::size_t>(max_per_launch));
    for (std::size_t i = 0; i < count; ++i) args.steps[i] = steps[first + i];
    args.count = static_cast<int32_t>(count);
    launch(static_cast<const StepArgs&>(args));
    ++launches;
  }
  return launches;
}

}  // namespace cuda
}  // namespace fusedopt
