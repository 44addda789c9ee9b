"""What the fused optimizers share: the step pipeline, param groups and state.

Data flows one way:
    step() -> validate every grad (nothing modified yet; one C++ call per group in the common case)
           -> create missing state -> global grad norm (optional)
           -> one backend op call per (param group, device, dtype) -> advance the device-side schedule counters

A subclass names its update rule and state keys and implements three small hooks: `_check_group` (the rule's
argument checks), `_new_state` (the rule's state tensors) and `_call_backend` (one op call for one batch).

The other concerns live in their own modules:
    _validation.py  argument checks (torch's wording)        _clipping.py    global grad-norm clipping
    _schedule.py    tables, counters, host mirror, get_last_lr
    _checkpoint.py  state_dict checks, load_state_dict, torch-checkpoint interop
    _batch.py       the tensors of one op call, DTensor shards
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch.optim import Optimizer

from fusedopt import _ops, backends
from fusedopt.optim import _clipping
from fusedopt.optim._batch import PLAIN_TYPES, Batch, dtensor_class, is_dense, to_local
from fusedopt.optim._checkpoint import CheckpointInterop
from fusedopt.optim._schedule import ScheduleBookkeeping
from fusedopt.optim._validation import check_betas, check_fused_options, check_number  # noqa: F401 (re-exported)
from fusedopt.schedules import ScheduleTable

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class FusedOptimizer(ScheduleBookkeeping, CheckpointInterop, Optimizer):
    """Base class of FusedAdamW, FusedSGD and FusedLion (not used directly)."""

    # torch.amp.GradScaler hands grad_scale / found_inf to such optimizers instead of unscaling grads itself.
    _step_supports_amp_scaling = True
    rule: str = ""
    state_keys: Tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, *, schedule: Optional[ScheduleTable], backend: str,
                 max_grad_norm: Optional[float], norm_type: float, master_weights: bool):
        check_fused_options(schedule, backend, max_grad_norm, norm_type, master_weights)
        self.schedule = schedule
        self.backend = backend
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.norm_type = float(norm_type)
        self.master_weights = master_weights
        self._init_schedule_bookkeeping()
        self._backend_cache: Dict[torch.device, backends.Backend] = {}
        super().__init__(params, defaults)

    @property
    def last_grad_norm(self) -> Optional[torch.Tensor]:
        """The global grad norm of the last step with max_grad_norm set (a device tensor), else None."""
        return self._host["last_grad_norm"]

    @last_grad_norm.setter
    def last_grad_norm(self, value: Optional[torch.Tensor]) -> None:
        self._host["last_grad_norm"] = value

    # ------------------------------------------------------------------------------------------------------
    # Param groups
    # ------------------------------------------------------------------------------------------------------
    def _check_group(self, group: dict) -> None:
        """The rule's hyperparameter checks (ValueError naming the argument). Called before a group is added
        and at every step, so hyperparameters edited in param_groups are checked too."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        merged = {**self.defaults, **param_group, "params": params}
        self._check_group(merged)
        devices = set()
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] of a param group is a {type(p).__name__}, not a Tensor")
            if p.is_complex():
                raise ValueError(f"params[{i}] is complex ({p.dtype}); fusedopt supports real floating params")
            if p.dtype not in _SUPPORTED_DTYPES:
                raise ValueError(f"params[{i}] has dtype {p.dtype}; supported: float32, float64, bfloat16, float16")
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(f"the params of one param group must be on one device, got {sorted(map(str, devices))}; "
                             f"put the params of each device in their own group")
        for device in devices:  # fail now, not at the first step, when no backend can run there
            self._backend_for(device)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if self.schedule is not None:
            group.setdefault("initial_lr", group["lr"])
            device = next(iter(devices)) if devices else torch.device("cpu")
            group["schedule_step"] = self._new_counter(device)

    def _backend_for(self, device: torch.device) -> backends.Backend:
        backend = self._backend_cache.get(device)
        if backend is None:
            backend = backends.resolve(self.backend, device)
            self._backend_cache[device] = backend
        return backend

    # ------------------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------------------
    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float32 if self._uses_master(p) else p.dtype

    def _uses_master(self, p: torch.Tensor) -> bool:
        # master_weights on float32 / float64 params is accepted as a no-op: they are their own master copy
        return self.master_weights and p.dtype in _LOW_PRECISION

    def _new_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """Create the rule's state tensors for a param that has none (in self._state_dtype(p))."""
        raise NotImplementedError

    def _ensure_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            self._new_state(p, group, state)
            if self._uses_master(p):
                state["master_param"] = p.detach().to(torch.float32, copy=True)
        return state

    # ------------------------------------------------------------------------------------------------------
    # Step
    # ------------------------------------------------------------------------------------------------------
    def _amp_tensors(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
                raise TypeError(f"{name} set by GradScaler must be a one-element floating-point tensor, got "
                                f"{t!r}" if not isinstance(t, torch.Tensor) else
                                f"{name} set by GradScaler must be a one-element floating-point tensor, got "
                                f"dtype {t.dtype} shape {tuple(t.shape)}")
        return grad_scale, found_inf

    # SGD sorts params by whether their momentum buffer exists yet (torch's first-step rule)
    _splits_first_step = False

    def _collect(self) -> List[Batch]:
        """Validate every grad and sort params into batches. Modifies nothing, so a rejected step leaves
        params and state exactly as they were. A group in the common case is checked in one C++ call
        (_collect_whole_group); the loop below handles the rest, touching each tensor as few times as it can."""
        batches: Dict[tuple, Batch] = {}
        strided = torch.strided
        split_first = self._splits_first_step
        state_of = self.state
        whole_groups = self._whole_group_check_usable()
        for gi, group in enumerate(self.param_groups):
            self._check_group(group)
            group_splits = split_first and self._group_splits_first_step(group)
            if whole_groups and self._collect_whole_group(gi, group["params"], group_splits, batches):
                continue
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                device = p.device
                if g.layout is not strided or g.dtype is not p.dtype or g.shape != p.shape or g.device != device:
                    self._reject_grad(gi, i, p, g)
                state = state_of.get(p)
                first = group_splits and self._is_first_step(state)
                key = (gi, device, p.dtype, first)
                batch = batches.get(key)
                if batch is None:
                    batch = batches[key] = Batch(gi, device, first_step=first)
                batch.params.append(p)
                batch.grads.append(g)
                batch.states.append(state)  # None or empty for now: _prepare creates it
        return list(batches.values())

    @staticmethod
    def _whole_group_check_usable() -> bool:
        """fusedopt::grads_ready needs the C++ extension; under torch.compile the per-param path is traced
        instead (Dynamo turns its metadata checks into guards, while an op returning a bool would break the
        graph)."""
        return _ops.HAS_CPU_EXTENSION and not torch.compiler.is_compiling()

    def _collect_whole_group(self, gi: int, params: list, group_splits: bool, batches: Dict[tuple, Batch]) -> bool:
        """The common case in one C++ call instead of a Python loop: every param of the group has a grad of its
        dtype, device, shape and dense layout, all in one dtype on one device (and, for SGD, all past or all at
        their first step). Adds the group as one ready batch and returns True; returns False, adding nothing,
        for the per-param path to sort out (missing grads, mixed dtypes, strided views, errors, DTensors and
        other tensor subclasses, which an op call would hand to their own dispatch)."""
        if not params or not PLAIN_TYPES.issuperset(map(type, params)):
            return False
        grads = [p.grad for p in params]
        if not PLAIN_TYPES.issuperset(map(type, grads)) or not torch.ops.fusedopt.grads_ready.default(params, grads):
            return False
        states = list(map(self.state.get, params))
        first = False
        if group_splits:
            first_flags = set(map(self._is_first_step, states))
            if len(first_flags) > 1:
                return False
            first = first_flags.pop()
        p0 = params[0]
        batches[(gi, p0.device, p0.dtype, first)] = Batch(gi, p0.device, list(params), grads, states,
                                                           first_step=first, ready=True)
        return True

    def _reject_grad(self, gi: int, i: int, p: torch.Tensor, g: torch.Tensor) -> None:
        where = f"param {i} of param group {gi}"
        if g.layout != torch.strided:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({where} has a "
                               f"{g.layout} grad)")
        if g.dtype != p.dtype:
            raise RuntimeError(f"{where}: grad dtype {g.dtype} differs from param dtype {p.dtype}")
        if g.shape != p.shape:
            raise RuntimeError(f"{where}: grad shape {tuple(g.shape)} differs from param shape {tuple(p.shape)}")
        raise RuntimeError(f"{where}: grad is on {g.device} but the param is on {p.device}")

    def _group_splits_first_step(self, group: dict) -> bool:
        return False

    @staticmethod
    def _is_first_step(state) -> bool:
        return False

    def _prepare(self, batch: Batch) -> None:
        """Create missing state and give the kernels dense tensors with matching strides."""
        group = self.param_groups[batch.group_index]
        params, grads, states = batch.params, batch.grads, batch.states
        if batch.ready:  # the layout was checked in C++; only missing state is left to create
            if not all(states):
                for k, p in enumerate(params):
                    if not states[k]:
                        states[k] = self._ensure_state(p, group)
            return
        dtensor = dtensor_class()
        for k, p in enumerate(params):
            if not states[k]:
                states[k] = self._ensure_state(p, group)
            if dtensor is not None and isinstance(p, dtensor):
                p = to_local(batch, k, p, type(self).__name__)
            g = grads[k]
            if p.is_contiguous():
                if not g.is_contiguous():
                    grads[k] = g.contiguous()
            elif not is_dense(p):
                # a strided view: update a contiguous stand-in and copy it back (states of such a param were
                # created contiguous, since zeros_like falls back to that)
                stand_in = p.detach().contiguous()
                batch.write_back.append((p, stand_in))
                params[k] = stand_in
                grads[k] = g.contiguous()
            elif g.stride() != p.stride():
                grads[k] = torch.empty_like(p).copy_(g)  # dense but permuted: give the grad the param's strides

    def _clip_coefficient(self, batches: List[Batch], grad_scale: Optional[torch.Tensor]):
        """{device: clip coefficient} for this step (see _clipping); sets self.last_grad_norm."""
        coefs, total = _clipping.clip_coefficients(batches, self.max_grad_norm, self.norm_type, grad_scale)
        self.last_grad_norm = total
        return coefs

    def _call_backend(self, backend: backends.Backend, batch: Batch, group: dict, lr: float,
                      lr_table, momentum_table, schedule_step, grad_scale, found_inf, clip_coef) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimizer step (and advances the schedule, unless GradScaler found inf/NaN grads)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = self._amp_tensors()
        batches = self._collect()
        if self.schedule is not None:
            self._resolve_tables()
        for batch in batches:
            self._prepare(batch)
        coefs = self._clip_coefficient(batches, grad_scale) if self.max_grad_norm is not None else {}
        for batch in batches:
            group = self.param_groups[batch.group_index]
            device = batch.device
            lr_table = momentum_table = schedule_step = None
            if self.schedule is not None:
                lr_table, momentum_table = self._device_tables(batch.group_index, device)
                schedule_step = group["schedule_step"]
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):  # a tensor lr is read on the device, as a one-entry table
                if lr_table is None:
                    lr_table = lr.detach().reshape(1).to(device=device, dtype=torch.float64)
                lr = 0.0
            self._call_backend(
                self._backend_for(device), batch, group, float(lr), lr_table, momentum_table, schedule_step,
                None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32),
                None if found_inf is None else found_inf.to(device=device, dtype=torch.float32),
                coefs.get(device))
            for original, stand_in in batch.write_back:
                original.copy_(stand_in)
        self._advance_schedule(found_inf)
        return loss
