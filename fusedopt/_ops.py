"""Loads the compiled extensions and registers fake implementations for torch.ops.fusedopt.*.

The op schemas live in csrc/ops.cpp (the `_C` extension). The fake implementations below describe the ops to
torch.compile / FakeTensor tracing: the update ops mutate their inputs in place and return nothing, so their
fake implementations only have to exist; grad_norm returns a float32 scalar.
"""

from __future__ import annotations

import importlib

import torch

# module name -> why it could not be imported (shown by backends.available() and fusedopt.info)
LOAD_ERRORS: dict = {}


def _import(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError as e:  # a missing build, or a build for another torch (undefined symbols)
        LOAD_ERRORS[module] = f"{type(e).__name__}: {e}"
        return False


from fusedopt import _version_check  # noqa: E402

# A build for another torch release fails to load with "undefined symbol" (or worse); name both versions
# instead: ImportError (a RuntimeWarning with FUSEDOPT_SKIP_VERSION_CHECK=1).
_version_check.check_torch()

HAS_CPU_EXTENSION = _import("fusedopt._C")
# The CUDA kernels register under the schemas that _C defines, so _C must load first. A _cuda built for
# another CUDA major version than the running torch's is reported instead of tried.
_CUDA_MISMATCH = _version_check.cuda_mismatch()
if _CUDA_MISMATCH is not None:
    LOAD_ERRORS["fusedopt._cuda"] = _CUDA_MISMATCH
HAS_CUDA_EXTENSION = HAS_CPU_EXTENSION and _CUDA_MISMATCH is None and _import("fusedopt._cuda")

if HAS_CPU_EXTENSION:

    @torch.library.register_fake("fusedopt::adamw_")
    def _adamw_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr, beta1,
                    beta2, eps, weight_decay, amsgrad, maximize, lr_table, beta1_table, schedule_step,
                    grad_scale, found_inf, clip_coef, weight_decay_table=None, decoupled_weight_decay=True,
                    state_absmaxes=None, rounding=(), rounding_step=None):
        return None

    @torch.library.register_fake("fusedopt::sgd_")
    def _sgd_fake(params, grads, momentum_buffers, master_params, lr, momentum, dampening, weight_decay,
                  nesterov, maximize, first_step, lr_table, momentum_table, schedule_step, grad_scale, found_inf,
                  clip_coef, weight_decay_table=None, state_absmaxes=None, rounding=(), rounding_step=None):
        return None

    @torch.library.register_fake("fusedopt::grad_norm")
    def _grad_norm_fake(grads, norm_type):
        return grads[0].new_empty((), dtype=torch.float32)

    @torch.library.register_fake("fusedopt::lion_")
    def _lion_fake(params, grads, exp_avgs, master_params, lr, beta1, beta2, weight_decay, lr_table, beta1_table,
                   schedule_step, grad_scale, found_inf, clip_coef, weight_decay_table=None, state_absmaxes=None,
                   rounding=(), rounding_step=None):
        return None
