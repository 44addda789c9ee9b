"""FusedAdam: torch.optim.Adam's update (L2 weight decay added to the gradient) by FusedAdamW's kernels."""

from __future__ import annotations

from typing import Optional, Tuple

from fusedopt.optim._base import FusedOptimizer
from fusedopt.optim.adamw import FusedAdamW, _scalar_betas
from fusedopt.schedules import ScheduleTable


class FusedAdam(FusedAdamW):
    """Adam with the defaults, state keys and update of ``torch.optim.Adam`` (single-tensor form).

    The update (Kingma & Ba, arXiv:1412.6980, as ``torch.optim.Adam`` computes it), per element, with ``g``
    the gradient (negated when ``maximize``) and ``t`` the param's step counted from 1:

        g = g + weight_decay * p                   (L2 decay; only when weight_decay != 0)
        m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    (``amsgrad`` uses the running maximum of ``v``.) With ``decoupled_weight_decay=True`` the decay is
    AdamW's ``p *= 1 - lr * weight_decay`` instead, as in ``torch.optim.Adam``. Both run through the one
    fused kernel of :class:`fusedopt.FusedAdamW` (the op's ``decoupled_weight_decay`` flag), on every backend.

    Args:
        params: tensors or param groups (float32, float64, bfloat16 or float16), as for torch.optim.
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as ``torch.optim.Adam``;
            ``decoupled_weight_decay`` may also differ per param group (the group key torch uses).
        foreach, capturable, differentiable, fused: torch's implementation switches, accepted and recorded as
            :class:`fusedopt.FusedAdamW` does (``differentiable=True`` raises RuntimeError).
        schedule, backend, max_grad_norm, norm_type, master_weights, state_precision, stochastic_rounding
            (keyword-only): as :class:`fusedopt.FusedAdamW` (``state_precision="8bit"``: ``exp_avg`` in the signed,
            ``exp_avg_sq`` / ``max_exp_avg_sq`` in the unsigned 8-bit map).

    State keys: ``step``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad), as torch's, so
    checkpoints move between ``torch.optim.Adam`` and ``FusedAdam`` in both directions.

    Raises:
        ValueError: for a hyperparameter torch.optim.Adam rejects (its type and message), or a non-bool
            decoupled_weight_decay; TypeError / RuntimeError / fusedopt.BackendUnavailable as FusedAdamW.
    """

    torch_name = "Adam"

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
                 decoupled_weight_decay: bool = False, *, foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 schedule: Optional[ScheduleTable] = None, backend: str = "auto",
                 max_grad_norm: Optional[float] = None, norm_type: float = 2.0, master_weights: bool = False,
                 state_precision: Optional[str] = None, stochastic_rounding: bool = False):
        # decoupled_weight_decay is a param-group key, as in torch.optim.Adam (add_param_group takes it from the
        # defaults); the rest is FusedAdamW's construction (FusedOptimizer's, with Adam's defaults)
        defaults = dict(lr=lr, betas=_scalar_betas(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        FusedOptimizer.__init__(self, params, defaults, schedule=schedule, backend=backend,
                                max_grad_norm=max_grad_norm, norm_type=norm_type, master_weights=master_weights,
                                state_precision=state_precision, stochastic_rounding=stochastic_rounding)

    def _check_group(self, group: dict, strict: bool = True) -> None:
        super()._check_group(group, strict)
        # torch.optim.Adam does not check it; a non-bool would silently pick a rule here
        _check_flag(group.get("decoupled_weight_decay", False))

    def _decoupled_weight_decay(self, group: dict) -> bool:
        return group["decoupled_weight_decay"]

    def load_state_dict(self, state_dict: dict) -> None:
        # A checkpoint of a torch.optim.Adam from before the key existed means L2 decay, as
        # torch.optim.Adam.__setstate__ assumes (setdefault False).
        if isinstance(state_dict, dict) and isinstance(state_dict.get("param_groups"), list):
            groups = [dict(g) if isinstance(g, dict) else g for g in state_dict["param_groups"]]
            for g in groups:
                if isinstance(g, dict):
                    g.setdefault("decoupled_weight_decay", False)
            state_dict = dict(state_dict, param_groups=groups)
        # FusedOptimizer's load, as FusedAdam is built by FusedOptimizer.__init__: not FusedAdamW's, which forces
        # decoupled decay
        FusedOptimizer.load_state_dict(self, state_dict)


def _check_flag(value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"decoupled_weight_decay must be a bool, got {value!r}")
