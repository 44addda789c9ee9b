"""Argument validation of the fused optimizers, in torch.optim's order and wording.

Two rules, as torch.optim has them:

* **At construction** (the constructor's arguments, and every param group given to the constructor or to
  ``add_param_group``): the checks of ``torch.optim.AdamW.__init__`` / ``SGD.__init__`` in their order, with
  their exception types and messages (``Invalid learning rate: -1.0``, ``Tensor lr must be 1-element``,
  ``betas must be either both floats or both Tensors``, ...). fusedopt adds a few of its own, worded the same
  way: values must be finite (torch accepts ``lr=inf``), tensors must be floating, the flags must be bools.
* **At step time** torch validates nothing: whatever a scheduler or the user writes into a param group is used
  as it is (OneCycleLR's ``max_momentum=5``, CyclicLR's tensor momentum, a negative lr). fusedopt's step
  accepts every value torch's step accepts and only checks that the kernels can read it: a number or a
  one-element floating tensor where a number goes, a bool where a flag goes, a pair for ``betas``.

Every check raises before anything is modified.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

# torch.optim's implementation switches. fusedopt always runs its fused, capturable kernels: the values are
# accepted and recorded in the param groups (and so in state_dict(), for torch.optim to read back), and do not
# change the update. `differentiable=True` cannot work and is rejected (see check_torch_flags).
TORCH_FLAGS = ("foreach", "capturable", "differentiable", "fused")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def check_number(name: str, value, *, minimum: float = None, below: float = None, allow_tensor=False,
                 tensor_name: Optional[str] = None) -> None:
    """Construction rule: raise ValueError naming `name` unless `value` is a finite number in
    [minimum, below), or (with allow_tensor) a one-element floating tensor whose value is.

    A tensor is read only where that is free (on the CPU); a device tensor's value is not checked (reading it
    would synchronize with the device). `tensor_name` is torch's name in "Tensor lr must be 1-element"."""
    if allow_tensor and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {tensor_name or name} must be 1-element: the {name} must be a float or a "
                             f"one-element floating tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a one-element floating tensor, got shape "
                             f"{tuple(value.shape)} dtype {value.dtype}")
        if value.device.type == "cpu":
            check_number(name, float(value), minimum=minimum, below=below)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {_describe(value)}")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    if minimum is not None and value < minimum:
        raise ValueError(f"Invalid {name}: {value} (must be >= {minimum})")
    if below is not None and value >= below:
        raise ValueError(f"Invalid {name}: {value} (must be < {below})")


def check_betas(betas) -> None:
    """Construction rule for Adam's / Lion's betas: a pair, each in [0, 1), both floats or both one-element
    tensors (torch.optim.Adam's rule)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {_describe(betas)}")
    for i, b in enumerate(betas):
        check_number(f"beta parameter at index {i}", b, minimum=0.0, below=1.0, allow_tensor=True,
                     tensor_name=f"betas[{i}]")
    if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
        raise ValueError("betas must be either both floats or both Tensors")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {_describe(value)}")


def check_step_value(name: str, value) -> None:
    """Step-time rule: any number, or a one-element floating tensor (no range check: torch's step takes
    whatever a scheduler writes). Rejects what the kernels cannot read."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a number or a one-element floating tensor, got {_describe(value)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {_describe(value)}")


def check_step_pair(name: str, value) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {_describe(value)}")
    for i, b in enumerate(value):
        check_step_value(f"{name} at index {i}", b)


def check_adam_step_betas(betas) -> None:
    """The two betas with which torch.optim.Adam's step itself fails (single-tensor path): beta1 == 1 makes the
    bias correction 1 - beta1**t zero (ZeroDivisionError there), beta2 > 1 makes 1 - beta2**t negative and its
    square root complex (RuntimeError there). fusedopt refuses them too, before anything is modified, instead of
    returning NaNs. Device tensors are not read (that would sync)."""
    beta1, beta2 = (float(b) if not isinstance(b, torch.Tensor) or b.device.type == "cpu" else None for b in betas)
    if beta1 == 1.0:
        raise ValueError("Invalid beta parameter at index 0: 1.0 (the bias correction 1 - beta1**step would be 0; "
                         "torch.optim's step fails on it too)")
    if beta2 is not None and 1.0 < beta2 < math.inf:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2} (> 1: the bias correction 1 - beta2**step "
                         f"would be negative and its square root complex; torch.optim's step fails on it too)")


def check_tensor_hyperparameter_flags(name: str, value, defaults: dict) -> None:
    """torch.optim.Adam's rule: a tensor lr / beta needs capturable=True when foreach=True is asked for
    (torch's foreach kernels cannot read it otherwise). fusedopt could, but rejects the combination as torch
    does, so that a configuration runs on both or on neither."""
    if isinstance(value, torch.Tensor) and defaults.get("foreach") and not defaults.get("capturable"):
        raise ValueError(f"{name} as a Tensor is not supported for capturable=False and foreach=True")


def check_torch_flags(cls_name: str, torch_name: str, defaults: dict) -> None:
    """torch's checks of its implementation switches, which it makes after the params (RuntimeError, its
    wording), then fusedopt's one refusal: differentiable=True (the kernels update the params in place outside
    autograd, so there is no graph through the step to differentiate)."""
    for flag in TORCH_FLAGS:
        value = defaults.get(flag)
        if flag in defaults and value is not None and not isinstance(value, bool):
            raise ValueError(f"{flag} must be a bool or None, got {_describe(value)}")
    if defaults.get("fused"):
        if defaults.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if defaults.get("differentiable"):
        raise RuntimeError(f"{cls_name} does not support differentiable=True: its fused kernels update the params in "
                           f"place outside autograd, so the step cannot be differentiated through; use "
                           f"torch.optim.{torch_name}(..., differentiable=True) for that")


def split_named(params: list) -> Tuple[List, Optional[List[str]]]:
    """torch.optim's named params (``model.named_parameters()``: (name, tensor) pairs): the tensors and their
    names (None when the group has none). A group mixing named and unnamed params: torch's ValueError."""
    names = [p[0] for p in params if isinstance(p, tuple)]
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    if names and len(names) != len(tensors):
        raise ValueError("all optimizer params should be with/without names. Some param names are missing")
    return tensors, names or None


def check_fused_options(schedule, backend: str, max_grad_norm, norm_type, master_weights) -> None:
    """The keyword-only arguments every fused optimizer adds to torch's (see FusedOptimizer)."""
    from fusedopt import backends
    from fusedopt.schedules import schedule_type_error

    error = schedule_type_error(schedule)
    if error is not None:
        raise TypeError(error)
    if backend not in backends.NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, backends.NAMES))}; got {backend!r}")
    if max_grad_norm is not None:
        check_number("max_grad_norm", max_grad_norm)
        if max_grad_norm <= 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be > 0, or None to disable)")
    if not isinstance(norm_type, (int, float)) or isinstance(norm_type, bool) or not (
            norm_type == math.inf or (math.isfinite(norm_type) and norm_type > 0)):
        raise ValueError(f"Invalid norm_type: {norm_type!r} (must be a positive number or math.inf)")
    if not isinstance(master_weights, bool):
        raise ValueError(f"master_weights must be a bool, got {master_weights!r}")
