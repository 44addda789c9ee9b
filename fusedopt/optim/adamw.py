"""FusedAdamW: torch.optim.AdamW's update in one kernel per param group, with an optional on-device schedule."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fusedopt.optim._base import FusedOptimizer
from fusedopt.optim._validation import (check_adam_step_betas, check_betas, check_bool, check_number,
                                        check_step_pair, check_step_value, check_tensor_hyperparameter_flags)
from fusedopt.schedules import ScheduleTable


def _scalar_betas(betas):
    """torch.optim.Adam's handling: a list becomes a tuple, a one-element tensor a 0-dim one."""
    if isinstance(betas, (tuple, list)):
        return tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() else b for b in betas)
    return betas


class FusedAdamW(FusedOptimizer):
    """AdamW with decoupled weight decay; same defaults, state keys and update as ``torch.optim.AdamW``.

    Takes every argument of ``torch.optim.AdamW`` (same positions and keywords). ``lr`` and ``betas`` may be
    one-element tensors, as in torch (read on the device at every step; a CPU tensor with GPU params is read on
    the host). torch's implementation switches ``foreach``, ``fused`` and ``capturable`` are accepted and
    recorded in the param groups (fusedopt always runs one fused, capturable kernel per group) with torch's
    checks of their combinations; ``differentiable=True`` raises RuntimeError (the kernels update params in
    place outside autograd).

    Args beyond torch's (keyword-only):
        schedule: a :class:`fusedopt.schedules.ScheduleTable`; its lr factors multiply each group's base lr
            (``initial_lr``) and its momentum values (if any) replace ``betas[0]``. Read on the device at every
            step; ``param_groups`` show the values of the next step.
        backend: "auto", "cpu", "cuda" or "triton" (see fusedopt.backends).
        max_grad_norm, norm_type: clip the global grad norm inside the step (like clip_grad_norm_).
        master_weights: keep float32 master params and states for bfloat16 / float16 params.
        state_precision: None (states in the param dtype; float32 with master weights), "fp32", "bf16", or
            "8bit": blockwise 8-bit states (Dettmers et al., "8-bit Optimizers via Block-wise Quantization",
            arXiv:2110.02861): ``exp_avg`` in the signed and ``exp_avg_sq`` / ``max_exp_avg_sq`` in the unsigned
            dynamic map, uint8 codes plus a float32 ``<key>_absmax`` per 256 elements (2 bytes per param and
            2 * 4/256 = 1/32 for the two absmax); tensors under 4,096 elements keep float32 states. "bf16" and
            "8bit" need float32, bfloat16 or float16 params. See :mod:`fusedopt.quantization` for the exact format.
        stochastic_rounding: round bfloat16 params without a master copy, and bfloat16 states, stochastically
            (unbiased; random bits from a counter-based hash of the optimizer's seed, the step, the tensor and
            the element, so a run is reproducible and every backend rounds alike; the seed is drawn from torch's
            default generator and saved in ``state_dict()``). Rounds nothing (and changes nothing) when no
            bfloat16 value is written: float32 params with states other than "bf16". float16 params need
            master weights.

    ``state_dict(dequantize=True)`` returns float32 states under torch's keys (loadable by torch.optim.AdamW);
    loading a float checkpoint into an 8-bit optimizer quantizes it.

    Raises ValueError (torch's messages: ``Invalid learning rate: -1.0``, ``Invalid beta parameter at index 0``,
    ...) for bad hyperparameters at construction, for an unknown ``state_precision``, for "bf16" / "8bit" with
    float64 params, TypeError for params that are not an iterable of tensors, dicts or (name, tensor) pairs,
    fusedopt.BackendUnavailable when no backend runs on the params' device.
    """

    rule = "adamw"
    torch_name = "AdamW"
    state_keys = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    momentum_slot = ("betas", 0)

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False, *,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None,
                 schedule: Optional[ScheduleTable] = None, backend: str = "auto",
                 max_grad_norm: Optional[float] = None, norm_type: float = 2.0, master_weights: bool = False,
                 state_precision: Optional[str] = None, stochastic_rounding: bool = False):
        # decoupled_weight_decay=True: the group key torch.optim.AdamW carries (as a subclass of Adam), always True
        defaults = dict(lr=lr, betas=_scalar_betas(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                        fused=fused, decoupled_weight_decay=True)
        super().__init__(params, defaults, schedule=schedule, backend=backend, max_grad_norm=max_grad_norm,
                         norm_type=norm_type, master_weights=master_weights, state_precision=state_precision,
                         stochastic_rounding=stochastic_rounding)

    def _check_group(self, group: dict, strict: bool = True) -> None:
        if not strict:
            check_step_value("learning rate", group["lr"])
            check_step_pair("beta parameter", group["betas"])
            check_step_value("epsilon value", group["eps"])
            check_step_value("weight_decay value", group["weight_decay"])
            check_adam_step_betas(group["betas"])
        else:  # torch.optim.Adam.__init__'s checks, in its order
            check_tensor_hyperparameter_flags("lr", group["lr"], group)
            check_number("learning rate", group["lr"], minimum=0.0, allow_tensor=True, tensor_name="lr")
            check_number("epsilon value", group["eps"], minimum=0.0)
            check_betas(group["betas"])
            check_number("weight_decay value", group["weight_decay"], minimum=0.0)
            for i, beta in enumerate(group["betas"]):
                check_tensor_hyperparameter_flags(f"betas[{i}]", beta, group)
        for flag in ("amsgrad", "maximize"):
            check_bool(flag, group[flag])

    def _new_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
        self._zeros_state(p, "exp_avg", state)
        self._zeros_state(p, "exp_avg_sq", state)
        if group["amsgrad"]:
            self._zeros_state(p, "max_exp_avg_sq", state)

    def _complete_states(self, batch, group: dict) -> None:
        if group["amsgrad"]:
            for s, p in zip(batch.states, batch.originals or batch.params):  # amsgrad switched on mid-training
                if "max_exp_avg_sq" not in s:
                    self._zeros_state(p, "max_exp_avg_sq", s)  # the max starts at 0

    def _call_backend(self, backend, batch, group, lr, lr_table, momentum_table, schedule_step, grad_scale,
                      found_inf, clip_coef, *, weight_decay_table=None) -> None:
        states = batch.states
        amsgrad = group["amsgrad"]
        beta1, beta2 = group["betas"]
        # beta1 is read from momentum_table when there is one (a schedule column, or a tensor beta1)
        beta1 = 0.0 if momentum_table is not None else self._number(beta1)
        # likewise the weight decay, from a table's weight-decay column when there is one
        weight_decay = 0.0 if weight_decay_table is not None else self._number(group["weight_decay"])
        backend.adamw_(
            batch.params, batch.grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if amsgrad else [], [s["step"] for s in states],
            [s["master_param"] for s in states if "master_param" in s],
            lr, beta1, self._number(beta2), self._number(group["eps"]), weight_decay,
            amsgrad, group["maximize"], lr_table, momentum_table, schedule_step, grad_scale, found_inf, clip_coef,
            weight_decay_table=weight_decay_table, decoupled_weight_decay=self._decoupled_weight_decay(group), **(batch.small_state or {}))

    def _decoupled_weight_decay(self, group: dict) -> bool:
        """AdamW's decay (p *= 1 - lr*wd) always; FusedAdam reads its group's decoupled_weight_decay."""
        return True

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # As torch.optim.AdamW.__setstate__: an Adam checkpoint (decoupled_weight_decay False, L2 decay) loaded
        # into AdamW still decays decoupled, and its groups say so. (FusedAdam loads past this method.)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
