"""FusedSGD: torch.optim.SGD (momentum, dampening, Nesterov) in one kernel per param group."""

from __future__ import annotations

from typing import Optional

import torch

from fusedopt.optim._base import FusedOptimizer
from fusedopt.optim._validation import check_bool, check_number, check_step_value
from fusedopt.schedules import ScheduleTable


class FusedSGD(FusedOptimizer):
    """SGD with the semantics of ``torch.optim.SGD``: the momentum buffer is created on a param's first step
    as a copy of its (weight-decayed) gradient, without dampening; Nesterov needs momentum > 0 and zero
    dampening. With a schedule, its momentum values (if any) replace ``momentum``.

    Takes every argument of ``torch.optim.SGD`` (``foreach``, ``fused`` and ``differentiable`` as torch.optim.AdamW's
    are handled, see :class:`fusedopt.FusedAdamW`); ``lr``, ``momentum`` and ``weight_decay`` may be one-element
    tensors (a momentum tensor on a GPU always takes the momentum path: reading whether it is 0 would sync).
    See :class:`fusedopt.FusedAdamW` for ``schedule``, ``backend``, ``max_grad_norm``, ``master_weights``,
    ``state_precision`` (with "8bit", ``momentum_buffer`` uses the signed dynamic map: 1 byte per param) and
    ``stochastic_rounding``.
    """

    rule = "sgd"
    torch_name = "SGD"
    state_keys = ("momentum_buffer",)
    momentum_slot = ("momentum",)
    _splits_first_step = True

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False, *,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 schedule: Optional[ScheduleTable] = None, backend: str = "auto",
                 max_grad_norm: Optional[float] = None, norm_type: float = 2.0, master_weights: bool = False,
                 state_precision: Optional[str] = None, stochastic_rounding: bool = False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        super().__init__(params, defaults, schedule=schedule, backend=backend, max_grad_norm=max_grad_norm,
                         norm_type=norm_type, master_weights=master_weights, state_precision=state_precision,
                         stochastic_rounding=stochastic_rounding)

    def _check_group(self, group: dict, strict: bool = True) -> None:
        if not strict:
            for key, name in (("lr", "learning rate"), ("momentum", "momentum value"),
                              ("dampening", "dampening value"), ("weight_decay", "weight_decay value")):
                check_step_value(name, group[key])
        else:  # torch.optim.SGD.__init__'s checks, in its order (and finiteness, and dampening)
            check_number("learning rate", group["lr"], minimum=0.0, allow_tensor=True, tensor_name="lr")
            check_number("momentum value", group["momentum"], minimum=0.0, allow_tensor=True, tensor_name="momentum")
            check_number("weight_decay value", group["weight_decay"], minimum=0.0, allow_tensor=True,
                         tensor_name="weight_decay")
            check_number("dampening value", group["dampening"])
        for flag in ("nesterov", "maximize"):
            check_bool(flag, group[flag])
        if strict and group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"Nesterov momentum requires a momentum and zero dampening (got momentum="
                             f"{group['momentum']}, dampening={group['dampening']})")

    def _uses_momentum(self, group_index: int, group: dict) -> bool:
        if self._table_has_momentum(group_index):
            return True
        momentum = group["momentum"]
        if isinstance(momentum, torch.Tensor) and momentum.device.type != "cpu":
            return True
        return float(momentum) != 0

    def _group_splits_first_step(self, group_index: int, group: dict) -> bool:
        return self._uses_momentum(group_index, group)

    @staticmethod
    def _is_first_step(state) -> bool:
        return not state or state.get("momentum_buffer") is None

    def _new_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        pass  # the momentum buffer is created by _complete_states, on the param's first step with momentum

    def _complete_states(self, batch, group: dict) -> None:
        if batch.first_step and self._uses_momentum(batch.group_index, group):
            for s, p in zip(batch.states, batch.originals or batch.params):
                # zeros, not empty: if GradScaler skips this step the buffer must not hold garbage
                self._zeros_state(p, "momentum_buffer", s)

    def _call_backend(self, backend, batch, group, lr, lr_table, momentum_table, schedule_step, grad_scale,
                      found_inf, clip_coef, *, weight_decay_table=None) -> None:
        states = batch.states
        use_momentum = self._uses_momentum(batch.group_index, group)
        # momentum is read from momentum_table when there is one (a schedule column, or a tensor momentum)
        momentum = 0.0 if momentum_table is not None else self._number(group["momentum"])
        weight_decay = 0.0 if weight_decay_table is not None else self._number(group["weight_decay"])
        backend.sgd_(
            batch.params, batch.grads, [s["momentum_buffer"] for s in states] if use_momentum else [],
            [s["master_param"] for s in states if "master_param" in s],
            lr, momentum, self._number(group["dampening"]), weight_decay,
            group["nesterov"], group["maximize"], batch.first_step, lr_table, momentum_table, schedule_step,
            grad_scale, found_inf, clip_coef, weight_decay_table=weight_decay_table, **(batch.small_state or {}))
