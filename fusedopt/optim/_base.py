"""What the three fused optimizers share: argument checks, state, grouping, schedules, clipping and AMP.

Data flows one way:
    step() -> validate every grad (nothing modified yet; one C++ call per group in the common case)
           -> create missing state -> global grad norm (optional)
           -> one backend op call per (param group, device, dtype) -> advance the device-side schedule counters

A subclass names its update rule and state keys and implements three small hooks: `_check_group` (the rule's
argument checks), `_new_state` (the rule's state tensors) and `_call_backend` (one op call for one batch).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

from fusedopt import _ops, backends
from fusedopt.schedules import ScheduleTable

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The classes of params and grads that step()'s whole-group check takes (None: a param without grad, which the
# check itself turns down); anything else, DTensor included, goes the per-param way.
_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter, type(None)})


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


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill its memory span with no gaps or overlaps (any dimension order), so one
    flat index walks param, grad and states alike."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _dtensor_class():
    """torch.distributed.tensor.DTensor once that module is loaded, else None (no DTensor can exist before
    it is), without importing it: a torch built without distributed support has no such module."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


class _LocalState(dict):
    """The kernels' view of a DTensor param's state: each DTensor value as its local shard. A value that the
    update rule sets (SGD's first momentum buffer, created from the local param) is stored in the real state
    as a DTensor with the param's mesh and placements, which torch.distributed.checkpoint expects."""

    __slots__ = ("_state", "_param")

    def __init__(self, state: dict, param):
        dtensor = _dtensor_class()
        super().__init__((k, v.to_local() if isinstance(v, dtensor) else v) for k, v in state.items())
        self._state = state
        self._param = param

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        p = self._param
        if isinstance(value, torch.Tensor) and key != "step" and value.shape == p.to_local().shape:
            value = _dtensor_class().from_local(value, p.device_mesh, p.placements, run_check=False,
                                                shape=p.shape, stride=p.stride())
        self._state[key] = value


def _check_resolved(schedule, group_index: int, what: str, values: torch.Tensor, below) -> None:
    """A resolved per-step table (factor x the group's lr, or momentum) must hold finite values in range."""
    bad = ~torch.isfinite(values) | (values < 0)
    if below is not None:
        bad |= values >= below
    if bool(bad.any()):
        t = int(bad.nonzero()[0])
        bound = f"in [0, {below})" if below is not None else "finite and >= 0"
        raise ValueError(f"schedule {getattr(schedule, 'name', '')!r}: the {what} of param group {group_index} at step "
                         f"{t} is {values[t].item()} (must be {bound})")


@dataclass
class Batch:
    """The tensors of one op call: one param group, one device, one dtype (and for SGD one first-step flag)."""

    group_index: int
    device: torch.device
    params: List[torch.Tensor] = field(default_factory=list)
    grads: List[torch.Tensor] = field(default_factory=list)
    states: List[dict] = field(default_factory=list)
    # (original param, contiguous stand-in) for params that are strided views: updated on the copy, copied back
    write_back: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    first_step: bool = False
    # True when fusedopt::grads_ready vouched for the whole group: every grad is dense with its param's layout
    ready: bool = False
    # set when the batch holds DTensor shards: per grad, the process groups its norm is summed over (clipping)
    shard_groups: Optional[List[tuple]] = None


@dataclass
class _GroupTables:
    key: tuple  # the hyperparameters the tables were resolved from; re-resolved when they change
    lr: torch.Tensor  # host float64, absolute lr per step
    momentum: Optional[torch.Tensor]  # host float64 or None
    on_device: Dict[torch.device, Tuple[torch.Tensor, Optional[torch.Tensor]]] = field(default_factory=dict)


class FusedOptimizer(Optimizer):
    """Base class of FusedAdamW, FusedSGD and FusedLion (not used directly)."""

    # torch.amp.GradScaler hands grad_scale / found_inf to such optimizers instead of unscaling grads itself.
    _step_supports_amp_scaling = True
    rule: str = ""
    state_keys: Tuple[str, ...] = ()
    # where a schedule table's momentum goes: ("momentum",) for SGD, ("betas", 0) for Adam and Lion
    momentum_slot: Tuple = ()

    def __init__(self, params, defaults: dict, *, schedule: Optional[ScheduleTable], backend: str,
                 max_grad_norm: Optional[float], norm_type: float, master_weights: bool):
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
        self.schedule = schedule
        self.backend = backend
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.norm_type = float(norm_type)
        self.master_weights = master_weights
        # host mirror of the device schedule counters (completed steps), the past-the-end warning, the last norm
        self._host = {"step": 0, "warned": False, "last_grad_norm": None}
        self._tables: Dict[int, _GroupTables] = {}
        self._backend_cache: Dict[torch.device, backends.Backend] = {}
        super().__init__(params, defaults)

    # Host-side bookkeeping lives in one dict: under torch.compile, Dynamo drops plain attribute assignments
    # on an Optimizer object in a frame that ends without a graph break, but replays mutations of a dict.
    @property
    def _host_step(self) -> int:
        return self._host["step"]

    @_host_step.setter
    def _host_step(self, value: int) -> None:
        self._host["step"] = value

    @property
    def _warned_past_end(self) -> bool:
        return self._host["warned"]

    @_warned_past_end.setter
    def _warned_past_end(self, value: bool) -> None:
        self._host["warned"] = value

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
            group["schedule_step"] = torch.full((), self._host_step, dtype=torch.int64, device=device)

    def _backend_for(self, device: torch.device) -> backends.Backend:
        backend = self._backend_cache.get(device)
        if backend is None:
            backend = backends.resolve(self.backend, device)
            self._backend_cache[device] = backend
        return backend

    # ------------------------------------------------------------------------------------------------------
    # Schedule
    # ------------------------------------------------------------------------------------------------------
    def _group_momentum(self, group: dict) -> float:
        value = group[self.momentum_slot[0]]
        return value[self.momentum_slot[1]] if len(self.momentum_slot) > 1 else value

    def _table_key(self, group: dict) -> tuple:
        base = group.get("initial_lr", group["lr"])
        if isinstance(base, torch.Tensor):
            # the number the table scales, read once: reading a device tensor every step would sync (and fail
            # inside CUDA-graph capture)
            base = group["initial_lr"] = float(base)
        return (float(base), float(self._group_momentum(group)))

    def _resolve_tables(self) -> None:
        """Resolve the schedule into absolute per-group tables; redone only when a group's base lr / momentum
        changed or groups were added (cheap host comparisons, no device work on the common path)."""
        keys = [self._table_key(g) for g in self.param_groups]
        if len(self._tables) == len(keys) and all(self._tables[i].key == k for i, k in enumerate(keys)):
            return
        resolved = self.schedule.resolve(self.param_groups, self.defaults)
        for i, (lr, mom) in enumerate(resolved):
            _check_resolved(self.schedule, i, "learning rate", lr, below=None)
            if mom is not None:
                _check_resolved(self.schedule, i, "momentum", mom, below=1.0)
        self._tables = {i: _GroupTables(keys[i], lr, mom) for i, (lr, mom) in enumerate(resolved)}

    def _device_tables(self, group_index: int, device: torch.device):
        tables = self._tables[group_index]
        if device not in tables.on_device:
            lr = tables.lr.to(device)
            mom = None if tables.momentum is None else tables.momentum.to(device)
            tables.on_device[device] = (lr, mom)
        return tables.on_device[device]

    def get_last_lr(self) -> List[float]:
        """Each group's lr for the next step, from the host mirror: no device sync."""
        if self.schedule is None:
            return [float(g["lr"]) if not isinstance(g["lr"], torch.Tensor) else g["lr"] for g in self.param_groups]
        self._resolve_tables()
        return [float(t.lr[min(self._host_step, t.lr.numel() - 1)]) for _, t in sorted(self._tables.items())]

    def get_last_momentum(self) -> List[float]:
        """Each group's momentum (SGD) or beta1 (Adam, Lion) for the next step, from the host mirror."""
        if self.schedule is None:
            return [float(self._group_momentum(g)) for g in self.param_groups]
        self._resolve_tables()
        out = []
        for i, g in enumerate(self.param_groups):
            mom = self._tables[i].momentum
            out.append(float(self._group_momentum(g)) if mom is None else float(mom[min(self._host_step, mom.numel() - 1)]))
        return out

    @property
    def schedule_step(self) -> int:
        """Completed steps as the host mirror counts them (the device counters are authoritative; they do not
        advance on steps that GradScaler skips, which the host cannot see without a sync)."""
        return self._host_step

    def _advance_schedule(self, found_inf: Optional[torch.Tensor]) -> None:
        if self.schedule is None:
            return
        by_device: Dict[torch.device, List[torch.Tensor]] = {}
        for group in self.param_groups:
            by_device.setdefault(group["schedule_step"].device, []).append(group["schedule_step"])
        for device, counters in by_device.items():
            if found_inf is None:
                torch._foreach_add_(counters, 1)
            else:
                stepped = (found_inf.to(device) == 0).to(torch.int64)  # device op: a skipped step does not count
                torch._foreach_add_(counters, stepped)
        if found_inf is not None and found_inf.device.type == "cpu":
            skipped = bool(found_inf.item())  # free on CPU; on CUDA the mirror assumes the step was taken
        else:
            skipped = False
        length = len(self.schedule)
        if self._host_step >= length and not self._warned_past_end:  # this step read past the end
            self._warned_past_end = True
            warnings.warn(f"fusedopt: the schedule table has {length} steps and step {self._host_step} read past "
                          f"its end; its last entry holds from now on", stacklevel=5)  # the caller of step()
        if not skipped:
            self._host_step += 1

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

    def _normalize_state(self, p: torch.Tensor, state: dict) -> None:
        """Bring loaded state to what the kernels read: int64 steps and states on the param's device, states in
        the state dtype (a checkpoint from torch.optim, or from a run with(out) master weights)."""
        dtype = self._state_dtype(p)
        for key, value in list(state.items()):
            if not isinstance(value, torch.Tensor):
                continue
            if key == "step":
                if value.dtype != torch.int64 or value.device != p.device or value.dim() != 0:
                    state[key] = value.detach().reshape(()).to(device=p.device, dtype=torch.float64).round().to(torch.int64)
            elif key == "master_param":
                if not self._uses_master(p):
                    del state[key]
                elif value.dtype != torch.float32 or value.device != p.device:
                    state[key] = value.detach().to(device=p.device, dtype=torch.float32)
            elif value.dtype != dtype or value.device != p.device:
                state[key] = value.detach().to(device=p.device, dtype=dtype)
        if self._uses_master(p) and state and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)

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
        if not params or not _PLAIN_TYPES.issuperset(map(type, params)):
            return False
        grads = [p.grad for p in params]
        if not _PLAIN_TYPES.issuperset(map(type, grads)) or not torch.ops.fusedopt.grads_ready.default(params, grads):
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
        dtensor = _dtensor_class()
        for k, p in enumerate(params):
            if not states[k]:
                states[k] = self._ensure_state(p, group)
            if dtensor is not None and isinstance(p, dtensor):
                p = self._to_local(batch, k, p)
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

    def _to_local(self, batch: Batch, k: int, p) -> torch.Tensor:
        """Put the local shard of DTensor param k (FSDP2's fully_shard, tensor parallel) in its place in the
        batch, with its grad's and states' local shards: the kernels update the shard in place. Nothing is
        gathered; only clipping communicates (a scalar per mesh dimension, see _sharded_total_norm)."""
        g = batch.grads[k]
        if (not isinstance(g, _dtensor_class()) or g.device_mesh != p.device_mesh or g.placements != p.placements
                or any(pl.is_partial() for pl in g.placements)):
            raise RuntimeError(
                f"{type(self).__name__}: a DTensor param (placements {p.placements}) needs a DTensor grad with the "
                f"same mesh and placements, got " + (f"placements {g.placements}" if isinstance(g, _dtensor_class())
                                                     else f"a {type(g).__name__}") + "; redistribute the grad first")
        if batch.shard_groups is None:
            batch.shard_groups = [()] * len(batch.grads)
        mesh = p.device_mesh
        batch.shard_groups[k] = tuple(mesh.get_group(i) for i, pl in enumerate(p.placements) if pl.is_shard())
        local = p.to_local()
        batch.params[k] = local
        batch.grads[k] = g.to_local()
        batch.states[k] = _LocalState(batch.states[k], p)
        return local

    def _norm_of(self, grads: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The norm_type-norm of all `grads` (on `device`) together, as a float32 scalar there; 0 for no grads or
        only empty ones. CPU: fusedopt::grad_norm, one pass with float64 sums (one reduction op per tensor costs
        more than the update on small tensors). Elsewhere: _foreach_norm, one multi-tensor launch, accumulating
        in float32 (fp16 grads that GradScaler scaled up would overflow an fp16 norm); empty grads are left out,
        as they add nothing and _foreach_norm cannot take their inf-norm."""
        if device.type == "cpu" and _ops.HAS_CPU_EXTENSION and grads:
            return torch.ops.fusedopt.grad_norm(grads, self.norm_type)
        nonempty = [g for g in grads if g.numel()]
        if not nonempty:
            return torch.zeros((), dtype=torch.float32, device=device)
        return self._combine_norms(torch._foreach_norm(nonempty, self.norm_type, dtype=torch.float32), device)

    def _combine_norms(self, norms: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The norm of partial norms (clip_grad_norm_'s norm of per-tensor norms), on `device`."""
        if len(norms) == 1:
            return norms[0].to(device)
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), self.norm_type)

    def _sharded_total_norm(self, batches: Sequence[Batch], first: torch.device) -> torch.Tensor:
        """The global norm when batches hold DTensor shards: the local grads sharded over the same mesh
        dimensions are normed together, raised to the power p and summed (max for inf) over those dimensions'
        process groups, so every rank gets the norm of the full grads. Replicated dimensions are not summed."""
        import torch.distributed as dist

        norm_type = self.norm_type
        # process groups -> device -> local grads; every rank opens the same buckets in the same order, even
        # where its local shards are empty (uneven sharding), since each bucket is one collective
        buckets: Dict[tuple, Dict[torch.device, List[torch.Tensor]]] = {}
        for b in batches:
            for key, g in zip(b.shard_groups or [()] * len(b.grads), b.grads):
                buckets.setdefault(key, {}).setdefault(b.device, []).append(g)
        parts = []
        for key, by_device in buckets.items():
            part = self._combine_norms([self._norm_of(gs, d) for d, gs in by_device.items()], first)
            if key:
                if math.isinf(norm_type):
                    for pg in key:
                        dist.all_reduce(part, op=dist.ReduceOp.MAX, group=pg)
                else:
                    part = part.double().pow(norm_type)
                    for pg in key:
                        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=pg)
                    part = part.pow(1.0 / norm_type).float()
            parts.append(part)
        return self._combine_norms(parts, first)

    def _clip_coefficient(self, batches: Sequence[Batch], grad_scale: Optional[torch.Tensor]):
        """Global grad norm over all params of this optimizer, on the device: clip_grad_norm_'s formula.
        Returns {device: coef tensor} and sets self.last_grad_norm; grads are not modified."""
        grads_by_device: Dict[torch.device, List[torch.Tensor]] = {}
        for b in batches:
            grads_by_device.setdefault(b.device, []).extend(b.grads)
        if not grads_by_device:
            self.last_grad_norm = torch.zeros(())
            return {}
        first = next(iter(grads_by_device))
        if any(b.shard_groups for b in batches):
            total = self._sharded_total_norm(batches, first)
        else:
            total = self._combine_norms([self._norm_of(g, d) for d, g in grads_by_device.items()], first)
        if grad_scale is not None:
            inv_scale = grad_scale.to(device=first, dtype=torch.float64).reciprocal().to(torch.float32)
            total = total * inv_scale  # the norm of the unscaled grads, as after GradScaler.unscale_
        self.last_grad_norm = total
        coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        return {device: coef.to(device) for device in grads_by_device}

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

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------
    def _allowed_state_keys(self) -> set:
        return set(self.state_keys) | {"master_param"}

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
            missing = sorted(key for key in self.defaults if key not in saved)
            if missing:
                raise ValueError(f"state_dict is not from a {type(self).__name__}-compatible optimizer: its param "
                                 f"group {k} lacks {missing}")
            self._check_group({**saved})
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
                if key == "step" or not isinstance(value, torch.Tensor):
                    continue
                if value.shape != p.shape:
                    raise ValueError(f"state_dict does not fit the params: state '{key}' of param {index} has shape "
                                     f"{tuple(value.shape)}, the param has {tuple(p.shape)}")
        return index_to_param

    def load_state_dict(self, state_dict: dict) -> None:
        index_to_param = self._check_state_dict(state_dict)
        # torch casts floating state to the param dtype on load; float32 master weights and states must
        # survive that, so they are set aside and put back afterwards.
        kept = {}
        if self.master_weights:
            for index, pstate in state_dict["state"].items():
                p = index_to_param.get(index)
                if p is not None and self._uses_master(p):
                    kept[id(p)] = {k: v for k, v in pstate.items()
                                   if isinstance(v, torch.Tensor) and k != "step" and v.dtype == torch.float32}
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for k, v in kept.get(id(p), {}).items():
                    state[k] = v.detach().to(device=p.device, copy=True)
                self._normalize_state(p, state)
        self._after_load()

    def _after_load(self) -> None:
        self._tables = {}
        self._backend_cache = {}
        self._warned_past_end = False
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
                              f"(set param_groups[i]['schedule_step'] to resume elsewhere)", stacklevel=2)
        self._host_step = step
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            group["schedule_step"] = torch.full((), step, dtype=torch.int64, device=device)
