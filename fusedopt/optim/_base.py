"""What the fused optimizers share: the step pipeline, param groups and state.

Data flows one way:
    step() -> validate every grad (nothing modified yet; one C++ call per group in the common case)
           -> create missing state -> global grad norm (optional)
           -> one backend op call per (param group, device, dtype) -> advance the device-side schedule counters

A subclass names its update rule and state keys and implements three small hooks: `_check_group` (the rule's
argument checks, construction rule and step-time rule), `_new_state` (the rule's state tensors) and
`_call_backend` (one op call for one batch).

Tensors we create follow the params to their device and dtype, the way torch.optim's state does: state is
created at a param's first step, on its device; a counter or state left behind by a move of the params after
the optimizer was built (``model.cuda()``, ``model.double()``) is moved at the next step.

The other concerns live in their own modules:
    _validation.py  argument checks (torch's wording)        _clipping.py    global grad-norm clipping
    _schedule.py    tables, counters, host mirror, get_last_lr
    _checkpoint.py  state_dict checks, load_state_dict, torch-checkpoint interop
    _batch.py       the tensors of one op call, DTensor shards
    _small_state.py state_precision (float32 / bfloat16 / 8-bit states) and stochastic rounding
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch.optim import Optimizer

from fusedopt import _ops, backends
from fusedopt.optim import _clipping
from fusedopt.optim._batch import (PLAIN_TYPES, Batch, LocalState, RealViewState, dtensor_class, is_dense,
                                   to_local)
from fusedopt.optim._checkpoint import CheckpointInterop
from fusedopt.optim._schedule import ScheduleBookkeeping
from fusedopt.optim._small_state import SmallState, layout_differs
from fusedopt.optim._validation import (  # noqa: F401 (check_betas, check_number: re-exported for the rules)
    check_betas, check_fused_options, check_number, check_torch_flags, split_named)
from fusedopt.schedules import ScheduleTable

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class FusedOptimizer(ScheduleBookkeeping, CheckpointInterop, SmallState, Optimizer):
    """Base class of FusedAdamW, FusedSGD and FusedLion (not used directly)."""

    # torch.amp.GradScaler hands grad_scale / found_inf to such optimizers instead of unscaling grads itself.
    _step_supports_amp_scaling = True
    rule: str = ""
    torch_name: str = ""  # the torch.optim class this one replaces (named in messages)
    # complex params, as torch.optim: the kernels update torch.view_as_real of param, grad and states
    supports_complex: bool = True
    state_keys: Tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, *, schedule: Optional[ScheduleTable], backend: str,
                 max_grad_norm: Optional[float], norm_type: float, master_weights: bool,
                 state_precision: Optional[str] = None, stochastic_rounding: bool = False):
        # torch's order: the hyperparameters, then the params (so params=None with a bad lr says "lr"), then
        # the implementation flags
        self._check_group(defaults, strict=True)
        check_fused_options(schedule, backend, max_grad_norm, norm_type, master_weights)
        self._init_small_state(state_precision, stochastic_rounding)
        self.schedule = schedule
        self.backend = backend
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.norm_type = float(norm_type)
        self.master_weights = master_weights
        self._init_schedule_bookkeeping()
        self._backend_cache: Dict[torch.device, backends.Backend] = {}
        super().__init__(params, defaults)
        check_torch_flags(type(self).__name__, self.torch_name or type(self).__name__, defaults)
        if self.schedule is not None:
            # param_groups show the table's values from the start (torch schedulers set lr at construction too)
            self._resolve_tables()
            self._show_schedule()

    # ------------------------------------------------------------------------------------------------------
    # Pickling and copy.deepcopy
    # ------------------------------------------------------------------------------------------------------
    # torch.optim.Optimizer.__getstate__ keeps defaults, state and param_groups only; a fusedopt optimizer also
    # needs its options and the schedule's host mirror (without them a copy's step() fails). Caches keyed by
    # device or by id() stay behind: a copy rebuilds them at its first step.
    _pickled_attributes: Tuple[str, ...] = ("schedule", "backend", "max_grad_norm", "norm_type", "master_weights",
                                            "state_precision", "stochastic_rounding", "_rounding_seed", "_host")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for name in self._pickled_attributes:
            if name in self.__dict__:
                state[name] = self.__dict__[name]
        if "_host" in state:
            state["_host"] = {**state["_host"], "scalars": {}, "one_entry": {}}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._backend_cache = {}
        self._tables = {}
        self._no_absmax = {}

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
    def _check_group(self, group: dict, strict: bool = True) -> None:
        """The rule's hyperparameter checks (see _validation). strict: the construction rule, for the
        constructor's arguments and for groups being added; otherwise the step-time rule, for the values a
        group holds at step() and in a checkpoint (any value torch's step takes; only what the kernels cannot
        read is refused)."""
        raise NotImplementedError

    @staticmethod
    def _initial_lr_of(lr):
        """The base lr a table keeps in group["initial_lr"]: the lr itself, or a CPU copy of a tensor lr (read at
        every step for free; torch's schedulers keep a clone there too)."""
        return lr.detach().to("cpu", copy=True) if isinstance(lr, torch.Tensor) else lr

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's add_param_group (named params, torch's errors), after fusedopt's checks of the group's
        hyperparameters and params, which raise before the group is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                            "of tensors in sets will change between runs. Please use a list instead.")
        for option in ("state_precision", "stochastic_rounding"):
            # A group may repeat the optimizer's own value (ZeroRedundancyOptimizer copies every constructor
            # keyword into each group); another value would be silently ignored by the step, so it raises.
            if option in param_group and not _same_option(param_group[option], getattr(self, option)):
                raise ValueError(f"{option} is an option of the whole optimizer (a keyword of "
                                 f"{type(self).__name__}(...), here {getattr(self, option)!r}), not of a param "
                                 f"group: a group cannot set it to {param_group[option]!r}")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        tensors, names = split_named(params)
        merged = {**self.defaults, **param_group, "params": tensors}
        self._check_group(merged, strict=True)
        devices = set()
        # the group is named from the second one on (the first one's messages keep their shape)
        group = f" of param group {len(self.param_groups)}" if self.param_groups else ""
        for i, p in enumerate(tensors):
            where = f"params[{i}]" + (f" ({names[i]!r})" if names else "") + group
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where}{'' if group else ' of a param group'} is a {type(p).__name__}, not a Tensor "
                                f"(optimizer can only optimize Tensors)")
            if p.is_complex():
                if not self.supports_complex:
                    raise ValueError(f"{where} is complex ({p.dtype}); {type(self).__name__} supports real floating "
                                     f"params")
                if self.state_precision is not None or self.stochastic_rounding:
                    raise ValueError(f"{where} is complex ({p.dtype}): complex params keep states of their dtype "
                                     f"(state_precision=None, stochastic_rounding=False)")
            elif p.dtype not in _SUPPORTED_DTYPES:
                raise ValueError(f"{where} has dtype {p.dtype}; supported: float32, float64, bfloat16, float16")
            self._check_param_precision(p, where)
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(f"the params of one param group must be on one device, got {sorted(map(str, devices))}; "
                             f"put the params of each device in their own group")
        for device in devices:  # fail now, not at the first step, when no backend can run there
            self._check_backend(device)
        # the list, not the caller's iterable: a generator (model.parameters()) was consumed above
        param_group["params"] = params
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        device = next(iter(devices)) if devices else torch.device("cpu")
        if self.schedule is not None:
            if "initial_lr" not in group:
                group["initial_lr"] = self._initial_lr_of(group["lr"])
            group["schedule_step"] = self._new_counter(device)
        self._add_rounding_counter(group, device)

    def _check_backend(self, device: torch.device) -> None:
        """Raise BackendUnavailable now when the chosen backend can never run these params. One case waits for
        the first step: a GPU backend (backend="cuda" / "triton", built) given CPU params on a machine with a
        CUDA device, since torch.optim lets an optimizer be built before model.cuda() (the Parameter objects stay
        the same); the step resolves the backend for the params' device then, with the same message if they
        are still on the CPU."""
        try:
            self._backend_for(device)
        except backends.BackendUnavailable:
            may_still_move = (self.backend in ("cuda", "triton") and device.type == "cpu"
                              and backends.available()[self.backend][0] and torch.cuda.is_available())
            if not may_still_move:
                raise

    def _backend_for(self, device: torch.device) -> backends.Backend:
        backend = self._backend_cache.get(device)
        if backend is None:
            backend = backends.resolve(self.backend, device)
            self._backend_cache[device] = backend
        return backend

    # ------------------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------------------
    def _uses_master(self, p: torch.Tensor) -> bool:
        # master_weights on float32 / float64 params is accepted as a no-op: they are their own master copy
        return self.master_weights and p.dtype in _LOW_PRECISION

    def _new_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """Create the rule's state tensors for a param that has none (with self._zeros_state: the storage format
        state_precision asks for)."""
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
            group_splits = split_first and self._group_splits_first_step(gi, group)
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
        if not params or not PLAIN_TYPES.issuperset(map(type, params)) or params[0].is_complex():
            return False  # (one dtype per ready group: a complex first param means complex params, viewed as real)
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

    def _group_splits_first_step(self, group_index: int, group: dict) -> bool:
        return False

    @staticmethod
    def _is_first_step(state) -> bool:
        return False

    def _prepare(self, batch: Batch) -> None:
        """Create missing state and give the kernels dense tensors with matching strides."""
        group = self.param_groups[batch.group_index]
        params, grads, states = batch.params, batch.grads, batch.states
        batch.originals = list(params)
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
            if params[k].is_complex():  # real and imaginary parts as two elements (torch.optim's complex rule)
                params[k] = torch.view_as_real(params[k])
                grads[k] = torch.view_as_real(grads[k])
                states[k] = RealViewState(states[k])

    def _follow_params(self, batch: Batch) -> None:
        """Move what this optimizer created for the batch's params to where the params are now (they moved after
        the optimizer was built or after they got state: model.cuda(), model.to(dtype), to_empty): the group's
        schedule counter, and states and master copies in the wrong place or dtype (the load path's
        normalization; torch.optim moves state to the params' device on load only). One cheap look per batch:
        the states of a batch were created, loaded and moved together."""
        group = self.param_groups[batch.group_index]
        if self.schedule is not None:
            self._counter_on(group, batch.device)
        counter = group.get("rounding_step")
        if isinstance(counter, torch.Tensor) and counter.device != batch.device:
            group["rounding_step"] = counter.to(batch.device)
        k = next((k for k, state in enumerate(batch.states) if state), None)
        if k is None:
            return
        p = batch.params[k]
        if ("master_param" in batch.states[k]) != self._uses_master(p):  # e.g. bf16 params made float32
            for q, state in zip(batch.params, batch.states):
                if state:
                    self._normalize_state(q, state)
            return
        for key, value in batch.states[k].items():
            if key == "step" or not isinstance(value, torch.Tensor):
                continue
            expected = self._expected_dtype(p, key)
            if value.device != p.device or value.dtype != expected or layout_differs(value, p):
                for q, state in zip(batch.params, batch.states):
                    if state:
                        self._normalize_state(q, state)
            return

    def _one_entry_table(self, group_index: int, name: str, value: torch.Tensor, device: torch.device):
        """A tensor hyperparameter (lr, momentum / beta1) as a one-entry float64 table on the params' device,
        which the kernels read there (no sync; an in-place change of a device tensor is seen at the next step).
        A CPU tensor with params elsewhere is read on the host (free) and, when its value changed, written into
        a device buffer with fill_: the value travels as a kernel argument, never as a (synchronizing, and
        under CUDA-graph capture illegal) copy from pageable memory; a captured graph keeps the value it saw."""
        if value.device == device:
            return value.detach().reshape(1).to(torch.float64)
        if value.device.type != "cpu":
            return value.detach().reshape(1).to(device=device, dtype=torch.float64)
        number = float(value)
        key = (group_index, name, device)
        cached = self._host["one_entry"].get(key)
        if cached is not None and _same_number(cached[0], number):
            return cached[1]
        buffer = cached[1] if cached is not None else torch.empty(1, dtype=torch.float64, device=device)
        buffer.fill_(number)
        self._host["one_entry"][key] = (number, buffer)
        return buffer

    def _clip_coefficient(self, batches: List[Batch], grad_scale: Optional[torch.Tensor]):
        """{device: clip coefficient} for this step (see _clipping); sets self.last_grad_norm."""
        coefs, total = _clipping.clip_coefficients(batches, self.max_grad_norm, self.norm_type, grad_scale)
        self.last_grad_norm = total
        return coefs

    def _call_backend(self, backend: backends.Backend, batch: Batch, group: dict, lr: float,
                      lr_table, momentum_table, schedule_step, grad_scale, found_inf, clip_coef, *,
                      weight_decay_table=None) -> None:
        """One op call for one batch. lr: the group's lr as a number (0.0 where lr_table carries it);
        lr_table / momentum_table / weight_decay_table: float64 tables on the batch's device (the schedule's,
        or a tensor hyperparameter's one entry), read at schedule_step (None for a one-entry table)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimizer step (and advances the schedule, unless GradScaler found inf/NaN grads).

        Raises (before anything is modified) for grads the kernels cannot take, hyperparameters of a type they
        cannot read, and, with a schedule table, an lr / momentum that something else wrote into a param group
        (see fusedopt.optim._schedule)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = self._amp_tensors()
        self._step_param_index = None  # _rounding_streams' map of this step (param_groups may change between steps)
        for group in self.param_groups:
            self._check_group(group, strict=False)
        # With a table, every lr set to 0 before the first step asks for a step that only creates the state
        # (torch.distributed.checkpoint's get_optimizer_state_dict does this on a fresh optimizer): it runs at
        # lr 0 and does not advance the schedule. Any other lr written into a group is a second driver.
        scheduled = self.schedule is not None and not self._is_state_creating_step()
        if scheduled:
            self._check_schedule_drivers()
            self._resolve_tables()
        batches = self._collect()
        for device in {batch.device for batch in batches}:  # a backend that cannot run here: before any change
            self._backend_for(device)
        if self.state_precision is not None or self.stochastic_rounding:
            for batch in batches:  # params whose dtype changed since construction (model.double(), .half())
                self._check_param_precision(batch.params[0], f"a param of param_groups[{batch.group_index}]")
        for batch in batches:
            self._follow_params(batch)
            self._prepare(batch)
            self._complete_states(batch, self.param_groups[batch.group_index])
        coefs = self._clip_coefficient(batches, grad_scale) if self.max_grad_norm is not None else {}
        for batch in batches:
            gi = batch.group_index
            group = self.param_groups[gi]
            device = batch.device
            lr_table = momentum_table = weight_decay_table = schedule_step = None
            if scheduled:
                lr_table, momentum_table, weight_decay_table = self._device_tables(gi, device)
                schedule_step = group["schedule_step"]
            lr = 0.0
            if lr_table is None:
                lr = group["lr"]
                if isinstance(lr, torch.Tensor):  # read on the device, as a one-entry table
                    lr_table, lr = self._one_entry_table(gi, "lr", lr, device), 0.0
            if momentum_table is None and self.momentum_slot:
                momentum = self._group_momentum(group)
                if isinstance(momentum, torch.Tensor):  # a scheduler's tensor momentum / beta1, read likewise
                    momentum_table = self._one_entry_table(gi, "momentum", momentum, device)
            backend = self._backend_for(device)
            batch_found_inf = None if found_inf is None else found_inf.to(device=device, dtype=torch.float32)
            call_args = (float(lr), lr_table, momentum_table, schedule_step,
                         None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32),
                         batch_found_inf, coefs.get(device))

            def call(b, backend=backend, group=group, call_args=call_args, weight_decay_table=weight_decay_table):
                self._call_backend(backend, b, group, *call_args, weight_decay_table=weight_decay_table)

            try:
                self._run_batch(backend, batch, group, batch_found_inf, call)
            except RuntimeError:
                # The ops check every tensor before they modify any. A state laid out unlike its param, which
                # _follow_params' one look per batch misses (model.to(memory_format=...) after the first step
                # changes only the 4-d params, maybe not the batch's first), is the one refusal this can mend.
                if not self._relayout_states(batch):
                    raise
                self._run_batch(backend, batch, group, batch_found_inf, call)
            for original, stand_in in batch.write_back:
                original.copy_(stand_in)
        if scheduled:
            self._advance_counters(found_inf)
            self._advance_host_mirror(found_inf)
        self._advance_rounding_counters(found_inf)
        return loss

    def _run_batch(self, backend: backends.Backend, batch: Batch, group: dict, found_inf, call) -> None:
        """The batch's op call: plain, with the kernels loading and storing the small-state formats, or staged."""
        if self._needs_staging(batch):
            if self._fused_small_state(backend, batch):  # the kernels load and store the formats
                batch.small_state = self._small_state_args(batch, group)
                call(batch)
            else:
                self._call_staged(backend, batch, group, found_inf, call)
        else:
            call(batch)

    def _relayout_states(self, batch: Batch) -> bool:
        """Lay out every state of the batch whose strides differ from its param's like the param (the load
        path's normalization, per tensor); False when none differs."""
        changed = False
        for k, (p, state) in enumerate(zip(batch.originals or batch.params, batch.states)):
            if isinstance(state, LocalState):  # a DTensor's shard view (not re-laid out: the op's error stands)
                continue
            real = state._state if isinstance(state, RealViewState) else state  # a complex param's own state
            if real and any(isinstance(value, torch.Tensor) and key != "step" and layout_differs(value, p)
                            for key, value in real.items()):
                self._normalize_state(p, real)
                if real is not state:
                    batch.states[k] = RealViewState(real)
                changed = True
        return changed

    def _is_state_creating_step(self) -> bool:
        """No state yet and every group's lr set to 0 (a number, or a CPU tensor) by someone else than the table."""
        if self.state or not self._host["shown"]:
            return False
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
                return False
            if float(lr) != 0.0:
                return False
        return any(self._host["shown"].get(i, (0.0,))[0] != 0.0 for i in range(len(self.param_groups)))


def _same_option(a, b) -> bool:
    return type(a) is type(b) and a == b  # stochastic_rounding=1 is not True (the constructor refuses it too)


def _same_number(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)
