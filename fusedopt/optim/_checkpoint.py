"""Checkpoint interop of the fused optimizers: state_dict checks, loading (torch.optim and lion-pytorch
checkpoints included, in both directions) and the schedule counter's restore.

State keys are torch.optim's (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``)
plus ``master_param`` and, for 8-bit states, ``<key>_absmax`` (fusedopt.optim._small_state: states are
converted to this optimizer's formats on load, quantized or dequantized as needed); param-group keys are torch's (torch's implementation flags ``foreach``, ``fused``,
``capturable``, ``differentiable`` and ``param_names`` included); the schedule position is the
``schedule_step`` tensor of each param group.

Group keys that torch's LR schedulers write (``initial_lr``, ``max_lr``, ``min_lr``, ``base_momentum``,
``max_momentum``, ``swa_lr``, ...) mean what that scheduler means by them. Only ``initial_lr`` means something to
a schedule table too (the base lr it multiplies), and only in a checkpoint of a table-scheduled fusedopt
optimizer, recognised by its ``schedule_step``. A checkpoint without one (torch.optim, or fusedopt with
``schedule=None``) loaded into a table-scheduled optimizer keeps the optimizer's own base lr: OneCycleLR's
``initial_lr`` is ``max_lr / div_factor``, not the peak ``one_cycle`` multiplies. The other keys are kept as
they are (for a later move back to torch) and the table ignores them.
"""

from __future__ import annotations

import warnings
from typing import Dict

import torch

from fusedopt.optim._small_state import (QUANTIZABLE_KEYS, _like, _local, _strided_like, absmax_key, is_absmax_key,
                                         layout_differs)
from fusedopt.optim._validation import TORCH_FLAGS


class CheckpointInterop:
    """Mixin of FusedOptimizer: ``load_state_dict`` and what it checks and restores."""

    def _allowed_state_keys(self) -> set:
        return (set(self.state_keys) | {"master_param"}
                | {absmax_key(k) for k in self.state_keys if k in QUANTIZABLE_KEYS})

    def _check_state_dict(self, state_dict: dict) -> Dict[int, torch.Tensor]:
        """Reject a state_dict of another optimizer, or one whose tensors do not fit the params, before
        anything is loaded. Returns the map from the state_dict's param indices to this optimizer's params."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from Optimizer.state_dict())")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for k, saved in enumerate(saved_groups):
            # torch's flags are optional: older checkpoints and lion-pytorch's have none (set to defaults below)
            missing = sorted(key for key in self.defaults if key not in saved and key not in TORCH_FLAGS)
            if missing:
                raise ValueError(f"state_dict is not from a {type(self).__name__}-compatible optimizer: its param "
                                 f"group {k} lacks {missing}")
            # values a run wrote (a scheduler's momentum of 5, a tensor beta): the step-time rule, as torch
            self._check_group({**self.defaults, **saved}, strict=False)
        index_to_param = {}
        for saved, group in zip(saved_groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                                 "optimizer's group")
            index_to_param.update(zip(saved["params"], group["params"]))
        allowed = self._allowed_state_keys()
        for index, pstate in state_dict["state"].items():
            p = index_to_param.get(index)
            if p is None or not isinstance(pstate, dict):
                continue
            unknown = set(pstate) - allowed
            if unknown:
                raise ValueError(f"state_dict is not from a {type(self).__name__}-compatible optimizer: param "
                                 f"{index} has state {sorted(pstate)}, expected keys among {sorted(allowed)}")
            for key, value in pstate.items():
                if key == "step" or is_absmax_key(key) or not isinstance(value, torch.Tensor):
                    continue
                if value.shape != p.shape:
                    raise ValueError(f"state_dict does not fit the params: state '{key}' of param {index} has shape "
                                     f"{tuple(value.shape)}, the param has {tuple(p.shape)}")
                if key != "master_param":
                    self._small_state_for_load(p, key, value, pstate, index)
        return index_to_param

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load_state_dict, after checking that the state_dict fits (nothing is loaded otherwise),
        keeping float32 master weights and states, and restoring the schedule position (see the module
        docstring for which base lr a table keeps)."""
        index_to_param = self._check_state_dict(state_dict)
        from_table = bool(state_dict["param_groups"]) and all(
            "schedule_step" in g for g in state_dict["param_groups"])
        own_bases = [(g.get("initial_lr"), g.get("initial_weight_decay")) for g in self.param_groups]
        # torch casts every state to the param dtype on load; float32 master weights, states kept in another
        # dtype than the param's (state_precision, master weights), 8-bit codes and their absmax must survive
        # that, so they are set aside and put back afterwards (then converted to this optimizer's formats).
        kept = {}
        for index, pstate in state_dict["state"].items():
            p = index_to_param.get(index)
            if p is None or not isinstance(pstate, dict):
                continue
            keep = {k: v for k, v in pstate.items()
                    if isinstance(v, torch.Tensor) and k != "step" and (v.dtype != p.dtype or is_absmax_key(k))}
            if keep:
                kept[id(p)] = keep
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for k, v in kept.get(id(p), {}).items():
                    state[k] = v.detach().to(device=v.device if _is_dtensor(v) else p.device, copy=True)
                self._normalize_state(p, state)
        for group in self.param_groups:
            for flag in TORCH_FLAGS:
                if flag in self.defaults:
                    group.setdefault(flag, self.defaults[flag])
        if self.schedule is not None and not from_table:
            for group, bases in zip(self.param_groups, own_bases):
                for key, base in zip(("initial_lr", "initial_weight_decay"), bases):
                    if base is not None:
                        group[key] = base
        self._after_load()

    def _normalize_state(self, p: torch.Tensor, state: dict) -> None:
        """Bring loaded state to what the kernels read: int64 steps and states on the param's device, states in
        this optimizer's formats (a checkpoint from torch.optim, from a run with(out) master weights, or with
        other state precisions)."""
        for key, value in list(state.items()):
            if not isinstance(value, torch.Tensor):
                continue
            if key == "step":
                if value.dtype != torch.int64 or value.device != p.device or value.dim() != 0:
                    state[key] = value.detach().reshape(()).to(device=p.device, dtype=torch.float64).round().to(torch.int64)
            elif key == "master_param":
                if not self._uses_master(p):
                    del state[key]
                elif value.dtype != torch.float32 or value.device != p.device or layout_differs(value, p):
                    # laid out like p (the kernels walk param, grad and master copy in one memory order)
                    state[key] = _like(p, _strided_like(_local(value.detach()), _local(p)))
        self._convert_loaded(p, state)
        if self._uses_master(p) and state and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)

    def _after_load(self) -> None:
        self._restore_rounding_counters()
        self._tables = {}
        self._backend_cache = {}
        self._warned_past_end = False
        self._host["shown"].clear()
        self._host["one_entry"].clear()
        if self.schedule is None:
            for group in self.param_groups:
                group.pop("schedule_step", None)
            return
        step = None
        for group in self.param_groups:
            if isinstance(group.get("schedule_step"), torch.Tensor):
                step = int(group["schedule_step"])  # a sync, once per checkpoint load
                break
        if step is None:
            # a checkpoint from torch.optim (or from a run without a schedule): the largest per-param step
            steps = [int(s["step"]) for s in self.state.values() if isinstance(s, dict) and "step" in s]
            step = max(steps) if steps else 0
            if not steps and self.state:
                warnings.warn(f"{type(self).__name__}.load_state_dict: the checkpoint has no schedule counter and no "
                              f"per-param 'step' (e.g. from torch.optim.SGD or Lion); the schedule restarts at step 0 "
                              f"(to resume at step k, e.g. a torch scheduler's last_epoch, set opt.schedule_step = k "
                              f"after loading)", stacklevel=2)
        self._host_step = step
        for group in self.param_groups:
            if "initial_lr" not in group:
                group["initial_lr"] = self._initial_lr_of(group["lr"])
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            group["schedule_step"] = self._new_counter(device)
        self._resolve_tables()
        self._show_schedule()

    def _restore_rounding_counters(self) -> None:
        """stochastic_rounding: the checkpoint's seed and rounding step continue the same random stream; a
        checkpoint without them (torch.optim, a run without stochastic rounding) keeps this optimizer's seed and
        starts its step at 0. Without stochastic rounding the keys are dropped."""
        for group in self.param_groups:
            if not self.stochastic_rounding:
                group.pop("rounding_seed", None)
                group.pop("rounding_step", None)
                continue
            seed = group.setdefault("rounding_seed", self._rounding_seed)
            self._rounding_seed = seed
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            step = group.get("rounding_step")
            group["rounding_step"] = (step.detach().to(device=device, dtype=torch.int64).reshape(()).clone()
                                      if isinstance(step, torch.Tensor) else
                                      torch.zeros((), dtype=torch.int64, device=device))


def _is_dtensor(t) -> bool:
    from fusedopt.optim._batch import dtensor_class

    dtensor = dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)
