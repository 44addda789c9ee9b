"""Argument validation shared by the fused optimizers: hyperparameter checks with torch.optim's wording.

Every check raises before anything is modified, with torch's exception type and message where torch has the
same check (``Invalid learning rate: -1.0``), naming the argument and the reason where torch has none.
"""

from __future__ import annotations

import math

import torch


def check_number(name: str, value, *, minimum: float = None, below: float = None, allow_tensor=False) -> None:
    """Raise ValueError naming `name` unless value is a finite number in [minimum, below)."""
    if allow_tensor and isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a one-element floating tensor, got shape "
                             f"{tuple(value.shape)} dtype {value.dtype}")
        if value.device.type == "cpu":  # free to read here; a device tensor is not read (that would sync)
            check_number(name, float(value), minimum=minimum, below=below)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    if minimum is not None and value < minimum:
        raise ValueError(f"Invalid {name}: {value} (must be >= {minimum})")
    if below is not None and value >= below:
        raise ValueError(f"Invalid {name}: {value} (must be < {below})")


def check_betas(betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        check_number(f"beta parameter at index {i}", b, minimum=0.0, below=1.0)


def check_fused_options(schedule, backend: str, max_grad_norm, norm_type, master_weights) -> None:
    """The keyword-only arguments every fused optimizer adds to torch's (see FusedOptimizer)."""
    from fusedopt import backends
    from fusedopt.schedules import ScheduleTable

    if schedule is not None and not isinstance(schedule, ScheduleTable):
        raise TypeError(f"schedule must be a fusedopt.schedules.ScheduleTable or None, got "
                        f"{type(schedule).__name__} (bake a torch scheduler with schedules.from_lr_scheduler)")
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
