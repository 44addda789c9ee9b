"""FusedAdamW: torch.optim.AdamW's update in one kernel per param group, with an optional on-device schedule."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fusedopt.optim._base import FusedOptimizer, check_betas, check_number
from fusedopt.schedules import ScheduleTable


class FusedAdamW(FusedOptimizer):
    """AdamW with decoupled weight decay; same defaults, state keys and update as ``torch.optim.AdamW``.

    Args beyond torch's:
        schedule: a :class:`fusedopt.schedules.ScheduleTable`; its lr factors multiply each group's ``lr`` and
            its momentum values (if any) replace ``betas[0]``. Read on the device at every step.
        backend: "auto", "cpu", "cuda" or "triton" (see fusedopt.backends).
        max_grad_norm, norm_type: clip the global grad norm inside the step (like clip_grad_norm_).
        master_weights: keep float32 master params and states for bfloat16 / float16 params.
    """

    rule = "adamw"
    state_keys = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    momentum_slot = ("betas", 0)

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False, *,
                 schedule: Optional[ScheduleTable] = None, backend: str = "auto",
                 max_grad_norm: Optional[float] = None, norm_type: float = 2.0, master_weights: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults, schedule=schedule, backend=backend, max_grad_norm=max_grad_norm,
                         norm_type=norm_type, master_weights=master_weights)

    def _check_group(self, group: dict) -> None:
        check_number("learning rate", group["lr"], minimum=0.0, allow_tensor=True)
        check_betas(group["betas"])
        check_number("epsilon value", group["eps"], minimum=0.0)
        check_number("weight_decay value", group["weight_decay"], minimum=0.0)
        for flag in ("amsgrad", "maximize"):
            if not isinstance(group[flag], bool):
                raise ValueError(f"{flag} must be a bool, got {group[flag]!r}")

    def _new_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        dtype = self._state_dtype(p)
        state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _call_backend(self, backend, batch, group, lr, lr_table, momentum_table, schedule_step, grad_scale,
                      found_inf, clip_coef) -> None:
        states = batch.states
        amsgrad = group["amsgrad"]
        if amsgrad:
            for s, p in zip(states, batch.params):  # amsgrad switched on mid-training: start the max at 0
                if "max_exp_avg_sq" not in s:
                    s["max_exp_avg_sq"] = torch.zeros_like(s["exp_avg_sq"])
        beta1, beta2 = group["betas"]
        backend.adamw_(
            batch.params, batch.grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if amsgrad else [], [s["step"] for s in states],
            [s["master_param"] for s in states if "master_param" in s],
            lr, float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]), amsgrad,
            group["maximize"], lr_table, momentum_table, schedule_step, grad_scale, found_inf, clip_coef,
            decoupled_weight_decay=self._decoupled_weight_decay(group))

    def _decoupled_weight_decay(self, group: dict) -> bool:
        """AdamW's decay (p *= 1 - lr*wd) always; FusedAdam reads its group's decoupled_weight_decay."""
        return True
