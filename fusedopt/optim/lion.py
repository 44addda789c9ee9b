"""FusedLion: lion-pytorch's Lion in one kernel per param group."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fusedopt.optim._base import FusedOptimizer
from fusedopt.optim._validation import check_betas, check_number, check_step_pair, check_step_value
from fusedopt.schedules import ScheduleTable


class FusedLion(FusedOptimizer):
    """Lion (Chen et al., 2023) with the update of lion-pytorch's ``Lion``:
    ``p *= 1 - lr*wd``; ``p -= lr * sign(beta1*m + (1-beta1)*g)``; ``m = beta2*m + (1-beta2)*g``
    (``sign(0) == 0``). With ``decoupled_weight_decay`` the weight decay is divided by the initial lr, as
    lion-pytorch does, so that ``lr*wd`` stays fixed when the lr is scheduled. State key ``exp_avg``.
    See :class:`fusedopt.FusedAdamW` for ``schedule``, ``backend``, ``max_grad_norm``, ``master_weights``,
    ``state_precision`` (with "8bit", ``exp_avg`` uses the signed dynamic map: 1 byte per param) and
    ``stochastic_rounding``.
    lion-pytorch's ``use_triton`` is accepted as a keyword and changes nothing (the update is always fused).
    """

    _pickled_attributes = FusedOptimizer._pickled_attributes + ("decoupled_weight_decay", "initial_lr")
    supports_complex = False  # sign() of a complex number is not a per-component rule (lion-pytorch has none)

    rule = "lion"
    torch_name = "Lion"
    state_keys = ("exp_avg",)
    momentum_slot = ("betas", 0)

    def __init__(self, params, lr: float = 1e-4, betas: Tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False, *, use_triton: bool = False,
                 schedule: Optional[ScheduleTable] = None, backend: str = "auto",
                 max_grad_norm: Optional[float] = None, norm_type: float = 2.0, master_weights: bool = False,
                 state_precision: Optional[str] = None, stochastic_rounding: bool = False):
        if not isinstance(decoupled_weight_decay, bool):
            raise ValueError(f"decoupled_weight_decay must be a bool, got {decoupled_weight_decay!r}")
        check_number("learning rate", lr, minimum=0.0, allow_tensor=True, tensor_name="lr")
        # lion-pytorch's _init_lr, a number: a tensor lr (torch.compile's idiom) is read once here (on a GPU, one
        # sync at construction, never per step)
        initial_lr = float(lr)
        if decoupled_weight_decay and initial_lr == 0:
            raise ValueError("Invalid learning rate: 0.0 (decoupled_weight_decay divides weight_decay by it)")
        self.decoupled_weight_decay = decoupled_weight_decay
        self.initial_lr = initial_lr
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, weight_decay=weight_decay)
        super().__init__(params, defaults, schedule=schedule, backend=backend, max_grad_norm=max_grad_norm,
                         norm_type=norm_type, master_weights=master_weights, state_precision=state_precision,
                         stochastic_rounding=stochastic_rounding)

    def _check_group(self, group: dict, strict: bool = True) -> None:
        if not strict:
            check_step_value("learning rate", group["lr"])
            check_step_pair("beta parameter", group["betas"])
            check_step_value("weight_decay value", group["weight_decay"])
            return
        check_number("learning rate", group["lr"], minimum=0.0, allow_tensor=True, tensor_name="lr")
        check_betas(group["betas"])
        check_number("weight_decay value", group["weight_decay"], minimum=0.0)

    def _new_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        self._zeros_state(p, "exp_avg", state)

    def _kernel_weight_decay(self, weight_decay: torch.Tensor) -> torch.Tensor:
        # lion-pytorch's decoupled decay divides the weight decay by the initial lr, scheduled or not
        return weight_decay / self.initial_lr if self.decoupled_weight_decay else weight_decay

    def _call_backend(self, backend, batch, group, lr, lr_table, momentum_table, schedule_step, grad_scale,
                      found_inf, clip_coef, *, weight_decay_table=None) -> None:
        states = batch.states
        weight_decay = 0.0 if weight_decay_table is not None else self._number(group["weight_decay"])
        if self.decoupled_weight_decay:
            weight_decay /= self.initial_lr
        beta1, beta2 = group["betas"]
        # beta1 is read from momentum_table when there is one (a schedule column, or a tensor beta1)
        beta1 = 0.0 if momentum_table is not None else self._number(beta1)
        backend.lion_(
            batch.params, batch.grads, [s["exp_avg"] for s in states],
            [s["master_param"] for s in states if "master_param" in s],
            lr, beta1, self._number(beta2), weight_decay, lr_table, momentum_table, schedule_step, grad_scale,
            found_inf, clip_coef, weight_decay_table=weight_decay_table, **(batch.small_state or {}))
