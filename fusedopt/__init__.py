"""fusedopt: fused Adam, AdamW, SGD (Nesterov) and Lion for PyTorch, with schedule tables read on the device.

    opt = fusedopt.FusedAdamW(model.parameters(), lr=3e-4, schedule=fusedopt.schedules.warmup_cosine(10_000, 500))
"""

__version__ = "0.1.0"

from fusedopt import _ops  # noqa: F401  (loads the compiled ops and their fake implementations)
from fusedopt import schedules
from fusedopt.backends import BackendUnavailable
from fusedopt.optim import FusedAdam, FusedAdamW, FusedLion, FusedSGD
from fusedopt.optim.decay_groups import param_groups
from fusedopt.lr_finder import find_lr
from fusedopt.table_scheduler import TableScheduler

__all__ = ["FusedAdam", "FusedAdamW", "FusedSGD", "FusedLion", "TableScheduler", "find_lr", "param_groups",
           "schedules", "BackendUnavailable", "__version__"]
