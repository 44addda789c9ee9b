"""Schedule bookkeeping of the fused optimizers: the resolved per-group tables (host and device copies), the
device-side step counters (``group["schedule_step"]``), their host mirror (``schedule_step``, ``get_last_lr()``,
``get_last_momentum()``), what the param groups show, and the past-the-end warning.

The kernels read the lr (and momentum, and weight decay) of step t from the table on the device at the group's
counter, which step() advances on the device; the host mirror counts the same steps without reading the device.

With a table, the table drives the lr: ``group["initial_lr"]`` holds the base it multiplies, and after every
step ``group["lr"]`` (and the momentum / ``betas[0]`` a momentum column drives, and the weight decay a
weight-decay column drives, its base kept in ``group["initial_weight_decay"]``) shows the value the table gives
the next step, from the host mirror (no sync), so loops and loggers that read ``param_groups`` see the schedule.
The optimizer remembers what it showed; a different value found there at the next step was written by
something else (a torch LR scheduler attached to the same optimizer, a hand edit), and step() raises instead of
silently ignoring it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch


def _check_resolved(schedule, group_index: int, what: str, values: torch.Tensor) -> None:
    """A resolved per-step table (factor x the group's base lr, or momentum) must hold finite values >= 0 (no
    upper bound on momentum: torch's step takes momentum >= 1, and so does fusedopt's)."""
    bad = ~torch.isfinite(values) | (values < 0)
    if bool(bad.any()):
        t = int(bad.nonzero()[0])
        raise ValueError(f"schedule {getattr(schedule, 'name', '')!r}: the {what} of param group {group_index} at step "
                         f"{t} is {values[t].item()} (must be finite and >= 0)")


def upload(host: torch.Tensor, device: torch.device, keep_alive: list) -> torch.Tensor:
    """A host table on `device`. To a GPU it goes from pinned memory with an asynchronous copy: a pageable copy
    would synchronize with the device, and is not allowed while a CUDA graph is being captured. A captured copy
    re-reads its pinned source at every replay, so the source is kept alive in `keep_alive`."""
    if device.type != "cuda":
        return host.to(device)
    pinned = host.pin_memory()
    keep_alive.append(pinned)
    return torch.empty_like(host, device=device).copy_(pinned, non_blocking=True)


@dataclass
class GroupTables:
    key: tuple  # the hyperparameters the tables were resolved from; re-resolved when they change
    lr: torch.Tensor  # host float64, absolute lr per step
    momentum: Optional[torch.Tensor]  # host float64 or None
    weight_decay: Optional[torch.Tensor] = None  # host float64 or None: the weight decay per step (shown)
    kernel_weight_decay: Optional[torch.Tensor] = None  # what the kernel reads (FusedLion: see _kernel_weight_decay)
    on_device: Dict[torch.device, Tuple] = field(default_factory=dict)  # device -> (lr, momentum, weight decay)
    pinned: list = field(default_factory=list)  # the pinned sources of uploads to GPUs (see upload)

    @staticmethod
    def _at(column: Optional[torch.Tensor], step: int) -> Optional[float]:
        return None if column is None else float(column[min(step, column.numel() - 1)])

    def lr_at(self, step: int) -> float:
        return self._at(self.lr, step)

    def momentum_at(self, step: int) -> Optional[float]:
        return self._at(self.momentum, step)

    def weight_decay_at(self, step: int) -> Optional[float]:
        return self._at(self.weight_decay, step)


def _same(a, b) -> bool:
    """Whether a param-group value is still the number the optimizer wrote there (NaN included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b or (a != a and b != b)


class ScheduleBookkeeping:
    """Mixin of FusedOptimizer: everything about the schedule table except the kernels' reading of it.

    Host-side bookkeeping lives in one dict, ``self._host``: under torch.compile, Dynamo drops plain attribute
    assignments on an Optimizer object in a frame that ends without a graph break, but replays mutations of a
    dict."""

    schedule = None
    # where a schedule table's momentum goes: ("momentum",) for SGD, ("betas", 0) for Adam and Lion
    momentum_slot: Tuple = ()

    def _init_schedule_bookkeeping(self) -> None:
        self._host = {
            "step": 0,  # host mirror of the device schedule counters (completed steps)
            "warned": False,  # the past-the-end warning was given
            "last_grad_norm": None,
            "shown": {},  # group index -> (lr, momentum or None) written into the group from the table
            "scalars": {},  # id(tensor) -> (tensor, version, value): device hyperparameters read once per version
            "one_entry": {},  # (group, name, device) -> (value, device tensor): tensor hyperparameters uploaded
        }
        self._tables: Dict[int, GroupTables] = {}

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
    def schedule_step(self) -> int:
        """Completed steps as the host mirror counts them (the device counters are authoritative; they do not
        advance on steps that GradScaler skips, which the host cannot see without a sync).

        Settable: ``opt.schedule_step = k`` moves the schedule to k completed steps (the host mirror and every
        group's device counter), e.g. to a torch scheduler's ``last_epoch`` when resuming from a torch.optim.SGD
        checkpoint, which has no per-param step to restore it from."""
        return self._host_step

    @schedule_step.setter
    def schedule_step(self, step: int) -> None:
        if self.schedule is None:
            raise ValueError(f"{type(self).__name__} has no schedule table (schedule=None): there is no "
                             f"schedule_step to set")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"schedule_step must be an integer >= 0, got {step!r}")
        self._host_step = step
        self._warned_past_end = False
        for group in self.param_groups:
            group["schedule_step"].fill_(step)
        self._resolve_tables()
        self._show_schedule()

    # ------------------------------------------------------------------------------------------------------
    # Reading hyperparameters on the host
    # ------------------------------------------------------------------------------------------------------
    def _number(self, value) -> float:
        """A hyperparameter as a Python float, for a kernel argument or a table key. A CPU tensor is read (free);
        a tensor on a device is read once per in-place version (``Tensor._version``), not at every step: each
        read would synchronize with the device and is not allowed inside CUDA-graph capture."""
        if not isinstance(value, torch.Tensor):
            return float(value)
        if value.device.type == "cpu":
            return float(value)
        cache = self._host["scalars"]
        entry = cache.get(id(value))
        if entry is not None and entry[0] is value and entry[1] == value._version:
            return entry[2]
        if len(cache) > 64:  # tensors replaced every step (new objects): keep the cache small
            cache.clear()
        number = float(value)
        cache[id(value)] = (value, value._version, number)
        return number

    def _group_momentum(self, group: dict):
        value = group[self.momentum_slot[0]]
        return value[self.momentum_slot[1]] if len(self.momentum_slot) > 1 else value

    def _set_group_momentum(self, group: dict, value: float) -> None:
        if len(self.momentum_slot) > 1:
            pair = group[self.momentum_slot[0]]
            group[self.momentum_slot[0]] = (value, *pair[1:])
        else:
            group[self.momentum_slot[0]] = value

    # ------------------------------------------------------------------------------------------------------
    # Tables
    # ------------------------------------------------------------------------------------------------------
    def _base_lr(self, group: dict):
        """The lr a table multiplies: group["initial_lr"] (as torch's schedulers keep it). A tensor lr is kept
        there as a CPU copy (made once, in add_param_group / load_state_dict), so reading it is free."""
        return group.get("initial_lr", group["lr"])

    def _table_key(self, index: int, group: dict) -> tuple:
        old = self._tables.get(index)
        # a momentum column replaces the group's momentum (which then shows the column): not part of the key
        momentum = None if old is not None and old.momentum is not None else self._number(self._group_momentum(group))
        # the weight decay a column multiplies (a baked torch scheduler may read the group's, too)
        weight_decay = self._number(group.get("initial_weight_decay", group.get("weight_decay", 0.0)))
        return (self._number(self._base_lr(group)), momentum, weight_decay)

    def _kernel_weight_decay(self, weight_decay: torch.Tensor) -> torch.Tensor:
        """The weight-decay column as the kernel reads it (FusedLion's decoupled decay divides it)."""
        return weight_decay

    def _resolve_tables(self) -> bool:
        """Resolve the schedule into absolute per-group tables; redone only when a group's base lr / momentum
        changed or groups were added (cheap host comparisons, no device work on the common path). Returns
        whether it resolved anew."""
        keys = [self._table_key(i, g) for i, g in enumerate(self.param_groups)]
        if len(self._tables) == len(keys) and all(self._tables[i].key == k for i, k in enumerate(keys)):
            return False
        resolved = self.schedule.resolve_columns(self.param_groups, self.defaults)
        for i, (lr, mom, wd) in enumerate(resolved):
            _check_resolved(self.schedule, i, "learning rate", lr)
            if mom is not None:
                _check_resolved(self.schedule, i, "momentum", mom)
            if wd is not None:
                _check_resolved(self.schedule, i, "weight decay", wd)
        tables = {}
        for i, (lr, mom, wd) in enumerate(resolved):
            group = self.param_groups[i]
            if mom is not None:
                keys[i] = (keys[i][0], None, keys[i][2])
            if wd is not None and "initial_weight_decay" not in group:
                group["initial_weight_decay"] = group["weight_decay"]  # the base; "weight_decay" shows the column
            tables[i] = GroupTables(keys[i], lr, mom, wd, None if wd is None else self._kernel_weight_decay(wd))
        self._tables = tables
        return True

    def _device_tables(self, group_index: int, device: torch.device):
        tables = self._tables[group_index]
        if device not in tables.on_device:
            tables.on_device[device] = tuple(
                None if column is None else upload(column, device, tables.pinned)
                for column in (tables.lr, tables.momentum, tables.kernel_weight_decay))
        return tables.on_device[device]

    def _table_has_momentum(self, group_index: int) -> bool:
        tables = self._tables.get(group_index)
        return tables is not None and tables.momentum is not None

    # ------------------------------------------------------------------------------------------------------
    # What the groups show; who else writes there
    # ------------------------------------------------------------------------------------------------------
    def _show_schedule(self) -> None:
        """Write into each group the lr (and the momentum a momentum column drives) that the table gives the
        next step, from the host mirror, and remember what was written."""
        step = self._host_step
        shown = self._host["shown"]
        for i, group in enumerate(self.param_groups):
            tables = self._tables[i]
            lr, momentum, weight_decay = tables.lr_at(step), tables.momentum_at(step), tables.weight_decay_at(step)
            group["lr"] = lr
            if momentum is not None:
                self._set_group_momentum(group, momentum)
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
            shown[i] = (lr, momentum, weight_decay)

    def _check_schedule_drivers(self) -> None:
        """Raise when a group's lr (or table-driven momentum) is not what the table put there: something else
        tries to drive it, and the kernels would ignore it."""
        what = "momentum" if self.momentum_slot == ("momentum",) else "betas[0]"
        for i, group in enumerate(self.param_groups):
            seen = self._host["shown"].get(i)
            if seen is None:
                continue
            lr, momentum, weight_decay = seen
            if not _same(group["lr"], lr):
                self._raise_two_drivers(i, "lr", group["lr"], lr)
            if momentum is not None and not _same(self._group_momentum(group), momentum):
                self._raise_two_drivers(i, what, self._group_momentum(group), momentum)
            if weight_decay is not None and not _same(group["weight_decay"], weight_decay):
                self._raise_two_drivers(i, "weight_decay", group["weight_decay"], weight_decay)

    def _raise_two_drivers(self, index: int, key: str, found, expected) -> None:
        name = type(self).__name__
        raise RuntimeError(
            f"{name}: param group {index}'s {key} is {found!r}, but this optimizer's schedule table set it to "
            f"{expected!r}: something else writes it (a torch LR scheduler attached to the optimizer, or an "
            f"assignment). With schedule=..., the table drives the lr and momentum and param_groups only show its "
            f"values. Keep one of the two: either build {name}(..., schedule=None) and keep the torch scheduler "
            f"(it then works as on torch.optim), or drop the scheduler - to run it as a table instead, bake it: "
            f"schedule=fusedopt.schedules.from_lr_scheduler(lambda opt: <the scheduler>(opt, ...), total_steps). "
            f"To change the base lr the table multiplies, set param_groups[{index}]['initial_lr'] (the groups' "
            f"'lr' entries are written back after every step; a weight-decay column's base is "
            f"'initial_weight_decay'). fusedopt.TableScheduler(opt) gives Trainer / "
            f"Lightning a scheduler object that follows the table.")

    # ------------------------------------------------------------------------------------------------------
    # Accessors (values, never the live tensors)
    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _detached(value):
        # like torch's schedulers: a logged value must not change when the group's tensor is written in place
        return value.detach().clone() if isinstance(value, torch.Tensor) else float(value)

    def get_last_lr(self) -> List:
        """Each group's lr for the next step: floats from the table's host mirror (no device sync); without a
        schedule the groups' lrs, a tensor lr as a copy (as torch's schedulers return it)."""
        if self.schedule is None:
            return [self._detached(g["lr"]) for g in self.param_groups]
        self._resolve_tables()
        return [self._tables[i].lr_at(self._host_step) for i in range(len(self.param_groups))]

    def get_last_momentum(self) -> List:
        """Each group's momentum (SGD) or beta1 (Adam, Lion) for the next step, from the host mirror; a tensor
        momentum as a copy."""
        if self.schedule is None:
            return [self._detached(self._group_momentum(g)) for g in self.param_groups]
        self._resolve_tables()
        out = []
        for i, g in enumerate(self.param_groups):
            mom = self._tables[i].momentum_at(self._host_step)
            out.append(self._detached(self._group_momentum(g)) if mom is None else mom)
        return out

    # ------------------------------------------------------------------------------------------------------
    # Counters
    # ------------------------------------------------------------------------------------------------------
    def _new_counter(self, device: torch.device) -> torch.Tensor:
        return torch.full((), self._host_step, dtype=torch.int64, device=device)

    def _counter_on(self, group: dict, device: torch.device) -> torch.Tensor:
        """The group's counter on the params' device, moved there when the params moved (model.cuda() after the
        optimizer was built): the value is read on the host where that is free (a CPU counter), taken from the
        host mirror for a counter that holds no data (meta), and copied device-to-host otherwise."""
        counter = group["schedule_step"]
        if counter.device == device:
            return counter
        if counter.device.type == "meta":
            moved = self._new_counter(device)
        elif counter.device.type == "cpu":
            moved = torch.full((), int(counter), dtype=torch.int64, device=device)
        else:
            moved = counter.to(device)
        group["schedule_step"] = moved
        return moved

    def _advance_counters(self, found_inf: Optional[torch.Tensor]) -> None:
        """Add one to every group's device counter, or, under GradScaler, one unless it found inf/NaN grads (a
        device op: a skipped step does not count, and no sync is needed to know)."""
        by_device: Dict[torch.device, List[torch.Tensor]] = {}
        for group in self.param_groups:
            by_device.setdefault(group["schedule_step"].device, []).append(group["schedule_step"])
        for device, counters in by_device.items():
            if found_inf is None:
                torch._foreach_add_(counters, 1)
            else:
                stepped = (found_inf.to(device) == 0).to(torch.int64)
                torch._foreach_add_(counters, stepped)

    def _advance_host_mirror(self, found_inf: Optional[torch.Tensor]) -> None:
        """Count the step on the host, warn once when it read past the table's end, and show the next values."""
        if found_inf is not None and found_inf.device.type == "cpu":
            skipped = bool(found_inf.item())  # free on CPU; on CUDA the mirror assumes the step was taken
        else:
            skipped = False
        length = len(self.schedule)
        if self._host_step >= length and not self._warned_past_end:  # this step read past the end
            self._warned_past_end = True
            held = [t.lr_at(length - 1) for _, t in sorted(self._tables.items())]
            warnings.warn(
                f"fusedopt: the schedule table {getattr(self.schedule, 'name', '')!r} has {length} "
                f"{'entry' if length == 1 else 'entries'}, one per optimizer step, and step {self._host_step + 1} read past its end: from now on its last entry holds, "
                f"lr = {', '.join(f'{v:.6g}' for v in held)} (per param group). Build the table for the number of "
                f"optimizer steps you run (total_steps=len(loader) * epochs // gradient_accumulation_steps).",
                stacklevel=5)  # the caller of step()
        if not skipped:
            self._host_step += 1
        self._show_schedule()
