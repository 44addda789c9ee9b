// The one list of fusedopt's operator schemas. Backends register implementations for these in
// csrc/cpu (CPU dispatch key) and csrc/cuda (CUDA dispatch key); fake implementations for tracing live in
// fusedopt/_ops.py. Every op updates whole lists of tensors (one param group, one dtype) in one call.
//
// Shared arguments of the three update ops:
//   lr, beta1/momentum      the group's hyperparameters, used when no table is given (schedule=None)
//   lr_table, *_table       float64 per-step tables on the params' device (absolute values); read at
//                           *schedule_step (completed steps), the last entry holding past the end; a
//                           one-entry table (a tensor lr) needs no schedule_step
//   weight_decay_table      (last but one / last argument, default None) a float64 table of absolute weight
//                           decay values read like lr_table; when given it replaces `weight_decay`
//   grad_scale              AMP loss scale (float32, 1 element): grads are multiplied by 1/grad_scale
//   found_inf               float32, 1 element: when nonzero the whole call is a no-op (params, states and
//                           step counts unchanged), which is how GradScaler skips a step
//   clip_coef               float32, 1 element: grads are multiplied by it (global-norm clipping)
//   master_params           empty, or float32 copies of bf16/fp16 params that the update is applied to;
//                           the params then receive the rounded result
// adamw_ only:
//   decoupled_weight_decay  true (default): torch.optim.AdamW, p *= 1 - lr * wd; false: torch.optim.Adam's L2
//                           decay, g = g + wd * p after maximize's negation, no decoupled decay
// Small state (the last three arguments; state_precision / stochastic_rounding, csrc/fusedopt/state_codec.h):
//   state_absmaxes          None, or one tensor per state list and param in the op's state order (adamw_: 3 per
//                           param, exp_avgs / exp_avg_sqs / max_exp_avg_sqs; sgd_ and lion_: 1): the float32
//                           absmax (one per 256-element block) of a uint8 (8-bit) state, any tensor (empty) for
//                           the others; when given, states may be float32, bfloat16 or 8-bit (one format per param)
//   rounding, rounding_step empty / None: round to nearest; else [seed, (param index, element offset of the local
//                           shard in the full tensor) per param] and the int64 step counter: bfloat16 params
//                           without master copies and bfloat16 states are rounded stochastically
//                           (counter-based bits, identical on every backend)
// The trailing arguments have defaults, so calls written for the older schemas keep working.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An importable module with no Python functions: the ops are reached through torch.ops.fusedopt, so the
// extension needs only the limited Python API and one wheel serves every CPython >= 3.9.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fusedopt, m) {
  // Metadata only, for any device: true when every param has a grad that the update ops can read as it is
  // (see csrc/grads_ready.cpp). The optimizers' step() asks it once per param group instead of looking at
  // every grad from Python.
  m.def("grads_ready(Tensor[] params, Tensor?[] grads) -> bool");
  // The norm of all grads together, as clip_grad_norm_ defines it (float32 scalar on the grads' device);
  // CPU only: on GPUs torch._foreach_norm is already one multi-tensor launch.
  m.def("grad_norm(Tensor[] grads, float norm_type) -> Tensor");
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor(f!)[] master_params, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, Tensor? lr_table, "
      "Tensor? beta1_table, Tensor? schedule_step, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? clip_coef, Tensor? weight_decay_table=None, bool decoupled_weight_decay=True, "
      "Tensor(g!)[]? state_absmaxes=None, int[] rounding=[], Tensor? rounding_step=None) -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] master_params, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_step, Tensor? lr_table, Tensor? momentum_table, Tensor? schedule_step, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef, Tensor? weight_decay_table=None, "
      "Tensor(d!)[]? state_absmaxes=None, int[] rounding=[], Tensor? rounding_step=None) -> ()");
  m.def(
      "lion_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] master_params, "
      "float lr, float beta1, float beta2, float weight_decay, Tensor? lr_table, Tensor? beta1_table, "
      "Tensor? schedule_step, Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef, "
      "Tensor? weight_decay_table=None, Tensor(d!)[]? state_absmaxes=None, int[] rounding=[], "
      "Tensor? rounding_step=None) -> ()");
}
