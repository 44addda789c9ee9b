"""Schedule bookkeeping of the fused optimizers: the resolved per-group tables (host and device copies), the
device-side step counters (``group["schedule_step"]``) and their host mirror (``schedule_step``,
``get_last_lr()``, ``get_last_momentum()``), and the past-the-end warning.

The kernels read the lr (and momentum) of step t from the table on the device at the group's counter, which
step() advances on the device; the host mirror counts the same steps without reading the device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch


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
class GroupTables:
    key: tuple  # the hyperparameters the tables were resolved from; re-resolved when they change
    lr: torch.Tensor  # host float64, absolute lr per step
    momentum: Optional[torch.Tensor]  # host float64 or None
    on_device: Dict[torch.device, Tuple[torch.Tensor, Optional[torch.Tensor]]] = field(default_factory=dict)


class ScheduleBookkeeping:
    """Mixin of FusedOptimizer: everything about the schedule table except the kernels' reading of it.

    Host-side bookkeeping lives in one dict, ``self._host``: under torch.compile, Dynamo drops plain attribute
    assignments on an Optimizer object in a frame that ends without a graph break, but replays mutations of a
    dict."""

    schedule = None
    # where a schedule table's momentum goes: ("momentum",) for SGD, ("betas", 0) for Adam and Lion
    momentum_slot: Tuple = ()

    def _init_schedule_bookkeeping(self) -> None:
        # host mirror of the device schedule counters (completed steps), the past-the-end warning, the last norm
        self._host = {"step": 0, "warned": False, "last_grad_norm": None}
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

    def _new_counter(self, device: torch.device) -> torch.Tensor:
        return torch.full((), self._host_step, dtype=torch.int64, device=device)

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
        self._tables = {i: GroupTables(keys[i], lr, mom) for i, (lr, mom) in enumerate(resolved)}

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
