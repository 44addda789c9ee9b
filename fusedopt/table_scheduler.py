"""TableScheduler: a torch LRScheduler face for a fused optimizer's on-device schedule table.

The optimizer itself runs the schedule: its kernels read the lr (and momentum) for each step from the table on
the device, at the group's device counter ``group["schedule_step"]``, which the optimizer advances inside
``step()``. Code that expects a scheduler object (Hugging Face ``Trainer``, PyTorch Lightning, logging
callbacks, checkpoint code) gets one from ``TableScheduler(opt)``::

    opt = fusedopt.FusedAdamW(model.parameters(), lr=3e-4, schedule=fusedopt.schedules.warmup_cosine(1000, 100))
    trainer = transformers.Trainer(..., optimizers=(opt, fusedopt.TableScheduler(opt)))

Its ``step()`` changes nothing the kernels read. The optimizer itself keeps ``group["lr"]`` equal to the lr the
table gives the next optimizer step (so loggers that read ``param_groups[i]["lr"]`` show the scheduled value);
the scheduler's ``step()`` refreshes the same values (for a ZeroRedundancyOptimizer's outer groups too) and its
``get_last_lr()`` returns them. All come from the optimizer's host mirror of the counter
(``opt.schedule_step``) and the table held on the host: no device sync. The base lr stays in
``group["initial_lr"]``, which is what the optimizer resolves the table against.

Because it reads the optimizer's counter rather than counting its own calls, ``step()`` is idempotent: calling
it twice for one optimizer step (accelerate with several processes does so), or not at all on a step, never
moves the schedule ahead of or behind the optimizer.
"""

from __future__ import annotations

from typing import List

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from fusedopt.optim._base import FusedOptimizer

__all__ = ["TableScheduler"]


def _fused_of(optimizer: Optimizer) -> FusedOptimizer:
    """The fused optimizer that runs the schedule: the optimizer itself, or the local optimizer of a
    torch.distributed.optim.ZeroRedundancyOptimizer built with optimizer_class=FusedAdamW/FusedSGD/FusedLion."""
    if isinstance(optimizer, FusedOptimizer):
        return optimizer
    inner = getattr(optimizer, "optim", None)  # ZeroRedundancyOptimizer.optim: this rank's local optimizer
    if isinstance(inner, FusedOptimizer):
        return inner
    raise TypeError(f"TableScheduler needs a fusedopt optimizer (FusedAdamW, FusedSGD, FusedLion, or a "
                    f"ZeroRedundancyOptimizer of one), got {type(optimizer).__name__}; for torch.optim optimizers "
                    f"use a torch.optim.lr_scheduler class")


class TableScheduler(LRScheduler):
    """Mirror of a fused optimizer's schedule table as a ``torch.optim.lr_scheduler.LRScheduler``.

    Args:
        optimizer: a FusedAdamW / FusedSGD / FusedLion built with ``schedule=`` (or a ZeroRedundancyOptimizer
            wrapping one).
        last_epoch: accepted for LRScheduler compatibility and ignored: the position in the table is always the
            optimizer's own step counter (restored by ``optimizer.load_state_dict``).

    ``step()`` never advances the schedule (the optimizer's ``step()`` does); it only refreshes
    ``group["lr"]`` and ``get_last_lr()`` from the table for display and logging. ``last_epoch`` equals the
    optimizer's completed steps (``optimizer.schedule_step``).
    """

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1):
        fused = _fused_of(optimizer)
        if fused.schedule is None:
            raise ValueError(f"TableScheduler needs an optimizer built with a schedule table; this "
                             f"{type(fused).__name__} has schedule=None (pass schedule=fusedopt.schedules...)")
        self._fused = fused
        # LRScheduler.__init__ requires initial_lr when last_epoch != -1; the fused optimizer always set it, so
        # resuming never depends on the scheduler's own bookkeeping.
        super().__init__(optimizer, -1)

    def get_lr(self) -> List[float]:
        """The lr the table gives each param group's next optimizer step (host values, no device sync)."""
        return self._fused.get_last_lr()

    def step(self, epoch=None) -> None:  # noqa: D401 - LRScheduler's signature
        """Refresh ``group["lr"]`` and ``get_last_lr()`` from the table at the optimizer's step counter.

        Does not advance the schedule: the optimizer's ``step()`` advances its device counters itself.
        """
        if epoch is not None:
            raise ValueError("TableScheduler.step() takes no epoch: the schedule position is the optimizer's own "
                             "step counter (restore it with optimizer.load_state_dict)")
        self._step_count += 1
        self.last_epoch = self._fused.schedule_step
        values = self.get_lr()
        self._fused._resolve_tables()
        self._fused._show_schedule()  # the fused optimizer's own groups, and what it remembers showing there
        if self.optimizer is not self._fused:  # a ZeroRedundancyOptimizer: its outer groups too
            for group, lr in zip(self.optimizer.param_groups, values):
                group["lr"] = lr
        self._last_lr = list(values)

    def state_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "_fused")}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the bookkeeping and re-read the table at the optimizer's counter (the optimizer's own
        load_state_dict restores the counter; the order of the two loads does not matter)."""
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in ("optimizer", "_fused")})
        self.step()
        self._step_count -= 1  # a refresh, not a step
