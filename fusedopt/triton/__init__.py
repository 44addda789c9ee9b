"""fusedopt's Triton backend: fused AdamW / SGD / Lion updates as Triton kernels.

The three functions have the signatures of the ops in csrc/ops.cpp (``adamw_``, ``sgd_``, ``lion_``; the
trailing ``weight_decay_table`` / ``decoupled_weight_decay`` with the same defaults, positional or by keyword)
and their in-place semantics, and are plugged in by fusedopt.backends. One call is one kernel
launch over every tensor of the lists (a cached device-side work table, see launcher.py); the schedule
tables, the schedule step, the AdamW step counts, found_inf, grad_scale and clip_coef are all read on the
device, so a call never synchronizes with the host and can be captured in a CUDA graph.

Compiled kernels run on CUDA tensors. With TRITON_INTERPRET=1 (set before triton is imported) the same
kernels run on CPU tensors through the Triton interpreter, which is how the CPU-only test suite exercises
them. The per-element math mirrors csrc/fusedopt/rules.h line by line (see _jit.py for the numerics). Small
states (state_precision="bf16" / "8bit", stochastic_rounding) are loaded and stored by the kernels themselves
through _codec.py, the Triton spelling of csrc/fusedopt/state_codec.h, bit for bit the CPU kernels.

Importing this package does not import triton; the kernels are compiled on first use.
"""

import os
from typing import Tuple

__all__ = ["is_available", "adamw_", "sgd_", "lion_"]


def is_available() -> Tuple[bool, str]:
    """(True, "") when the kernels can run here: triton imports, and CUDA is available or TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton is not importable ({type(e).__name__}: {e}); `pip install triton`"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ""
    import torch

    if torch.cuda.is_available():
        return True, ""
    return False, ("no CUDA device (torch.cuda.is_available() is False); the Triton kernels need a GPU, or "
                   "TRITON_INTERPRET=1 (set before triton is imported) to run them on CPU tensors for testing")


def adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr, beta1, beta2, eps,
           weight_decay, amsgrad, maximize, lr_table, beta1_table, schedule_step, grad_scale, found_inf,
           clip_coef, weight_decay_table=None, decoupled_weight_decay=True, state_absmaxes=None, rounding=(),
           rounding_step=None) -> None:
    from fusedopt.triton import adamw

    adamw.adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr, beta1, beta2,
                 eps, weight_decay, amsgrad, maximize, lr_table, beta1_table, schedule_step, grad_scale,
                 found_inf, clip_coef, weight_decay_table, decoupled_weight_decay, state_absmaxes, rounding,
                 rounding_step)


def sgd_(params, grads, momentum_buffers, master_params, lr, momentum, dampening, weight_decay, nesterov,
         maximize, first_step, lr_table, momentum_table, schedule_step, grad_scale, found_inf, clip_coef,
         weight_decay_table=None, state_absmaxes=None, rounding=(), rounding_step=None) -> None:
    from fusedopt.triton import sgd

    sgd.sgd_(params, grads, momentum_buffers, master_params, lr, momentum, dampening, weight_decay, nesterov,
             maximize, first_step, lr_table, momentum_table, schedule_step, grad_scale, found_inf, clip_coef,
             weight_decay_table, state_absmaxes, rounding, rounding_step)


def lion_(params, grads, exp_avgs, master_params, lr, beta1, beta2, weight_decay, lr_table, beta1_table,
          schedule_step, grad_scale, found_inf, clip_coef, weight_decay_table=None, state_absmaxes=None,
          rounding=(), rounding_step=None) -> None:
    from fusedopt.triton import lion

    lion.lion_(params, grads, exp_avgs, master_params, lr, beta1, beta2, weight_decay, lr_table, beta1_table,
               schedule_step, grad_scale, found_inf, clip_coef, weight_decay_table, state_absmaxes, rounding,
               rounding_step)

