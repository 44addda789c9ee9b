"""The optimizer classes. Each rule's per-element math lives in csrc/fusedopt/rules.h."""

from fusedopt.optim.adam import FusedAdam
from fusedopt.optim.adamw import FusedAdamW
from fusedopt.optim.lion import FusedLion
from fusedopt.optim.sgd import FusedSGD

__all__ = ["FusedAdam", "FusedAdamW", "FusedSGD", "FusedLion"]
