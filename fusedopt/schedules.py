"""Schedule tables: per-step learning-rate factors (and optional momentum values) that live on the device.

A :class:`ScheduleTable` holds, for steps ``0 .. len-1``, a float64 **lr factor** that multiplies each param
group's ``lr`` (so layer-wise learning rates share one shape; for :func:`one_cycle` the group's ``lr`` is the
peak, like OneCycleLR's ``max_lr``) and optionally an absolute **momentum** value that replaces the group's
SGD ``momentum`` / Adam and Lion ``betas[0]`` (as OneCycleLR does), and optionally a **weight-decay factor**
that multiplies each group's weight decay (:func:`with_weight_decay`: DINO's weight decay rising from 0.04 to
0.4 beside the lr). Step ``t`` (the number of completed optimizer steps) reads entry ``t``; past the end the last
entry holds (the optimizer warns once, naming the held lr).

**Length rule.** A builder that takes ``total_steps`` returns exactly ``total_steps`` entries: one per optimizer
step of a ``total_steps``-step run, entry ``t`` being the value the mirrored torch scheduler (or Hugging Face
schedule) gives step ``t``. A run of ``total_steps`` steps never reads past the end; size the table with the
number of optimizer steps you run (``len(loader) * epochs``, divided by gradient-accumulation steps). Builders
without ``total_steps`` describe a schedule that ends on a value held forever and end with that value:
``linear_warmup(W)`` has ``W + 1`` entries (the ramp, then 1), ``step_decay`` without ``total_steps`` decays
until the factor underflows, ``constant()`` has one entry. ``sequential`` has ``milestones[-1] + len(last)``.

The optimizers copy the table to the parameters' device once and their kernels read it there at a
device-side step counter: there is no Python scheduler and no host sync per step.

This module is the bottom of the package: it imports nothing from the rest of fusedopt.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = [
    "ScheduleTable",
    "GroupSchedule",
    "constant",
    "linear_warmup",
    "warmup_cosine",
    "warmup_linear",
    "one_cycle",
    "step_decay",
    "exponential",
    "polynomial",
    "warmup_stable_decay",
    "cosine_restarts",
    "cosine",
    "sequential",
    "with_weight_decay",
    "from_lr_scheduler",
    "BakedSchedule",
    "NoStandaloneTable",
    "Columns",
]

# A param group's resolved schedule: absolute lrs per step, and absolute momentum values or None.
GroupSchedule = Tuple[torch.Tensor, Optional[torch.Tensor]]


class Columns(NamedTuple):
    """A param group's resolved schedule: float64 host tensors of absolute per-step values (None: the group's
    own hyperparameter holds)."""

    lr: torch.Tensor
    momentum: Optional[torch.Tensor]
    weight_decay: Optional[torch.Tensor]


def _base_weight_decay(group: dict) -> float:
    # the weight decay a weight-decay column multiplies: kept in initial_weight_decay once the optimizer shows
    # the column's values in group["weight_decay"] (as initial_lr keeps the base lr)
    value = group.get("initial_weight_decay", group.get("weight_decay", 0.0))
    return float(value)


def _as_table_tensor(values, what: str, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).detach().to("cpu").reshape(-1).clone()
    if t.numel() == 0:
        raise ValueError(f"{name}: the {what} table is empty; a schedule needs at least one step")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}: {what} entry {i} is {t[i].item()}; every entry must be finite")
    if bool((t < 0).any()):
        i = int((t < 0).nonzero()[0])
        raise ValueError(f"{name}: {what} entry {i} is {t[i].item()}; entries must be >= 0")
    return t


class ScheduleTable:
    """Per-step lr factors, and optional momentum values and weight-decay factors.

    Args:
        lr_factors: 1-D sequence of finite, non-negative factors, one per optimizer step (entry t is read by
            the step that follows t completed steps; a run longer than the table holds the last entry).
        momentum: optional 1-D sequence of finite, non-negative momentum (SGD) / beta1 (Adam, Lion) values,
            same length. As for torch's schedulers there is no upper bound: OneCycleLR / CyclicLR write
            ``max_momentum=5`` if asked to, and torch's step (and fusedopt's) uses it.
        name: a label for plots and error messages.
        weight_decay: optional 1-D sequence of finite, non-negative factors, same length, that multiply each
            group's weight decay (so a group with ``weight_decay=0``, e.g. biases, stays undecayed). The
            optimizer keeps a group's base weight decay in ``group["initial_weight_decay"]`` and shows the
            scheduled one in ``group["weight_decay"]``, as it does for the lr. See :func:`with_weight_decay`.

    Raises ValueError naming the first bad entry (empty table, non-finite or negative entry, lengths differ).
    """

    # True for tables whose values depend on each param group (from_lr_scheduler): they cannot be spliced
    per_group = False

    def __init__(self, lr_factors, momentum=None, name: str = "custom", weight_decay=None):
        self.name = name
        self.lr_factors = _as_table_tensor(lr_factors, "lr factor", name)
        self.momentum = self._column(momentum, "momentum")
        self.weight_decay = self._column(weight_decay, "weight-decay factor")

    def _column(self, values, what: str) -> Optional[torch.Tensor]:
        if values is None:
            return None
        column = _as_table_tensor(values, what, self.name)
        if column.numel() != self.lr_factors.numel():
            raise ValueError(f"{self.name}: {what} table has {column.numel()} entries but the lr table has "
                             f"{self.lr_factors.numel()}")
        return column

    def __len__(self) -> int:
        return self.lr_factors.numel()

    def __repr__(self) -> str:
        mom = ", with momentum" if self.momentum is not None else ""
        wd = ", with weight decay" if self.weight_decay is not None else ""
        return f"ScheduleTable({self.name!r}, {len(self)} steps{mom}{wd})"

    def lr_at(self, step: int) -> float:
        """The lr factor used by step ``step`` (0-based count of completed steps)."""
        return float(self.lr_factors[min(max(step, 0), len(self) - 1)])

    def momentum_at(self, step: int) -> Optional[float]:
        if self.momentum is None:
            return None
        return float(self.momentum[min(max(step, 0), len(self) - 1)])

    def weight_decay_at(self, step: int) -> Optional[float]:
        """The weight-decay factor used by step ``step``, or None without a weight-decay column."""
        if self.weight_decay is None:
            return None
        return float(self.weight_decay[min(max(step, 0), len(self) - 1)])

    def resolve_columns(self, param_groups: Sequence[dict], defaults: dict) -> List[Columns]:
        """Absolute per-step values for each param group: ``lr_factors * group['initial_lr']`` (else its
        ``lr``), the momentum, and ``weight_decay factors * group['initial_weight_decay']`` (else its
        ``weight_decay``). ``defaults`` is the optimizer's defaults dict."""
        out = []
        for group in param_groups:
            base_lr = float(group.get("initial_lr", group["lr"]))
            out.append(Columns(
                self.lr_factors * base_lr,
                None if self.momentum is None else self.momentum.clone(),
                None if self.weight_decay is None else self.weight_decay * _base_weight_decay(group)))
        return out

    def resolve(self, param_groups: Sequence[dict], defaults: dict) -> List[GroupSchedule]:
        """Absolute per-step lrs and momentum values for each param group (see :meth:`resolve_columns`)."""
        return [(c.lr, c.momentum) for c in self.resolve_columns(param_groups, defaults)]


# ----------------------------------------------------------------------------------------------------------
# Builders. Each returns a ScheduleTable; lengths are in optimizer steps.
# ----------------------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_float(name: str, value, lo: float = -math.inf, hi: float = math.inf, lo_open=False, hi_open=False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        lo_b = "(" if lo_open else "["
        hi_b = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lo_b}{lo}, {hi}{hi_b}, got {value!r}")
    return v


def constant(total_steps: int = 1) -> ScheduleTable:
    """The group's lr at every step (a one-entry table holds forever)."""
    _check_int("total_steps", total_steps, 1)
    return ScheduleTable(torch.ones(total_steps, dtype=torch.float64), name="constant")


def _steps(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float64)


def _ramp(t: int, warmup_steps: int) -> float:
    # HF convention: step t of a warmup of W steps uses t / W (so step 0 has lr 0 and step W has the full lr).
    return t / warmup_steps


def linear_warmup(warmup_steps: int, start_factor: float = 0.0) -> ScheduleTable:
    """Linear ramp from ``start_factor`` (step 0) to 1 (step ``warmup_steps``), then 1.

    Entry by entry equal to ``LinearLR(opt, start_factor, end_factor=1.0, total_iters=warmup_steps)`` (which
    cannot take ``start_factor=0``; here 0 gives the common ``t / warmup_steps``). ``warmup_steps=0`` is no
    warmup: a one-entry table of 1.
    """
    _check_int("warmup_steps", warmup_steps, 0)
    s = _check_float("start_factor", start_factor, 0.0, 1.0)
    vals = [s + (1.0 - s) * (t / warmup_steps) for t in range(warmup_steps)] + [1.0]
    return ScheduleTable(vals, name="linear_warmup")


def _check_warmup_total(total_steps: int, warmup_steps: int) -> None:
    _check_int("total_steps", total_steps, 1)
    _check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps must be < total_steps (there must be a decay phase), got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}; use linear_warmup() for a warmup alone"
        )


def warmup_cosine(total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0) -> ScheduleTable:
    """Linear warmup ``t / warmup_steps``, then a half cosine from 1 down to ``min_factor`` at ``total_steps``.

    ``factor = min + (1 - min) * 0.5 * (1 + cos(pi * progress))``, ``progress = (t - W) / (total - W)``
    (HF ``get_cosine_schedule_with_warmup`` plus a floor), ``total_steps`` entries (steps ``0..total_steps-1``,
    see the length rule in the module docstring): the factor would reach ``min_factor`` at step
    ``total_steps``, the first step after the run. Without warmup and with ``min_factor * lr == eta_min`` this is
    ``CosineAnnealingLR(T_max=total_steps)`` for steps ``0..total_steps-1``.
    """
    _check_warmup_total(total_steps, warmup_steps)
    m = _check_float("min_factor", min_factor, 0.0, 1.0)
    span = total_steps - warmup_steps
    vals = [_ramp(t, warmup_steps) for t in range(warmup_steps)]
    vals += [
        m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * ((t - warmup_steps) / span)))
        for t in range(warmup_steps, total_steps)
    ]
    return ScheduleTable(vals, name="warmup_cosine")


def warmup_linear(total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0) -> ScheduleTable:
    """Linear warmup ``t / warmup_steps``, then a straight line from 1 down to ``min_factor`` at ``total_steps``.

    HF ``get_linear_schedule_with_warmup`` plus a floor; ``total_steps`` entries (the line reaches ``min_factor`` at
    step ``total_steps``, the first step after the run).
    """
    _check_warmup_total(total_steps, warmup_steps)
    m = _check_float("min_factor", min_factor, 0.0, 1.0)
    span = total_steps - warmup_steps
    vals = [_ramp(t, warmup_steps) for t in range(warmup_steps)]
    vals += [m + (1.0 - m) * ((total_steps - t) / span) for t in range(warmup_steps, total_steps)]
    return ScheduleTable(vals, name="warmup_linear")


def _anneal_cos(start: float, end: float, pct: float) -> float:
    # Same expression (and evaluation order) as OneCycleLR._annealing_cos, so the tables match it to rounding.
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _anneal_linear(start: float, end: float, pct: float) -> float:
    return (end - start) * pct + start


def one_cycle(
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
    cycle_momentum: bool = True,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
) -> ScheduleTable:
    """The 1cycle policy of ``OneCycleLR``, with the group's ``lr`` as ``max_lr``.

    Factors are relative to the peak (they start at ``1 / div_factor`` and end at
    ``1 / (div_factor * final_div_factor)``); with ``cycle_momentum`` the table also carries absolute momentum
    (SGD ``momentum`` / Adam ``betas[0]``) cycled inversely between ``max_momentum`` and ``base_momentum``.
    Exactly ``total_steps`` entries, like OneCycleLR (which raises past its end; the table holds its last
    entry). The phase boundaries use OneCycleLR's own arithmetic; where OneCycleLR would divide by zero (a
    warm-up phase ending at step 0, e.g. ``pct_start * total_steps == 1``) that phase counts as completed.
    """
    _check_int("total_steps", total_steps, 1)
    pct_start = _check_float("pct_start", pct_start, 0.0, 1.0)
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    div_factor = _check_float("div_factor", div_factor, 0.0, lo_open=True)
    final_div_factor = _check_float("final_div_factor", final_div_factor, 0.0, lo_open=True)
    if cycle_momentum:
        # no upper bound, as OneCycleLR has none (torch's step takes momentum >= 1 too)
        base_momentum = _check_float("base_momentum", base_momentum, 0.0)
        max_momentum = _check_float("max_momentum", max_momentum, 0.0)
    anneal = _anneal_cos if anneal_strategy == "cos" else _anneal_linear

    init_f = 1.0 / div_factor
    min_f = init_f / final_div_factor
    # (end_step, start_lr, end_lr, start_momentum, end_momentum), as OneCycleLR._schedule_phases.
    if three_phase:
        phases = [
            (float(pct_start * total_steps) - 1, init_f, 1.0, max_momentum, base_momentum),
            (float(2 * pct_start * total_steps) - 2, 1.0, init_f, base_momentum, max_momentum),
            (total_steps - 1, init_f, min_f, max_momentum, max_momentum),
        ]
    else:
        phases = [
            (float(pct_start * total_steps) - 1, init_f, 1.0, max_momentum, base_momentum),
            (total_steps - 1, 1.0, min_f, base_momentum, max_momentum),
        ]
    lrs, moms = [], []
    for step in range(total_steps):
        start_step = 0.0
        for i, (end_step, lr0, lr1, m0, m1) in enumerate(phases):
            if step <= end_step or i == len(phases) - 1:
                span = end_step - start_step
                pct = (step - start_step) / span if span != 0 else 1.0
                lrs.append(anneal(lr0, lr1, pct))
                if cycle_momentum:
                    moms.append(anneal(m0, m1, pct))
                break
            start_step = end_step
    return ScheduleTable(lrs, moms if cycle_momentum else None, name="one_cycle")


# A table longer than this is almost certainly a mistake (it is copied to every device that holds params).
_MAX_IMPLICIT_STEPS = 1 << 22
_UNDERFLOW = 1e-30


def step_decay(step_size: int, gamma: float = 0.1, total_steps: Optional[int] = None) -> ScheduleTable:
    """``StepLR``: the factor is multiplied by ``gamma`` every ``step_size`` steps.

    With ``total_steps`` the table has ``total_steps`` entries (steps ``0..total_steps-1``; later steps hold the
    last one). Without it, the table runs until the factor first drops below 1e-30 (after that the lr is
    zero for any practical purpose, and the last entry is held); ``gamma == 1`` gives a constant table, and
    ``gamma > 1`` (or a table over 4M entries) needs an explicit ``total_steps``.
    """
    _check_int("step_size", step_size, 1)
    gamma = _check_float("gamma", gamma, 0.0)
    if total_steps is None:
        if gamma > 1.0:
            raise ValueError(f"total_steps is required when gamma > 1 (the factor grows without bound), got gamma={gamma}")
        n_decays = 0
        f = 1.0
        while gamma < 1.0 and f >= _UNDERFLOW:
            f *= gamma
            n_decays += 1
        length = n_decays * step_size + 1
        if length > _MAX_IMPLICIT_STEPS:
            raise ValueError(
                f"step_decay(step_size={step_size}, gamma={gamma}) needs {length} steps to decay below "
                f"{_UNDERFLOW}; pass total_steps"
            )
    else:
        length = _check_int("total_steps", total_steps, 1)
    n_blocks = (length - 1) // step_size + 1
    # Repeated multiplication, like StepLR's chainable form.
    block_vals = [1.0]
    for _ in range(n_blocks - 1):
        block_vals.append(block_vals[-1] * gamma)
    vals = torch.tensor(block_vals, dtype=torch.float64).repeat_interleave(step_size)[:length]
    return ScheduleTable(vals, name="step_decay")


def exponential(gamma: float, total_steps: int) -> ScheduleTable:
    """``ExponentialLR``: factor ``gamma ** t`` for steps ``0..total_steps-1`` (then held)."""
    gamma = _check_float("gamma", gamma, 0.0)
    _check_int("total_steps", total_steps, 1)
    vals = []
    for t in range(total_steps):
        try:
            vals.append(gamma**t)
        except OverflowError:  # gamma > 1 over many steps: let the table report the first inf entry
            vals.append(math.inf)
    return ScheduleTable(vals, name="exponential")


def polynomial(total_steps: int, power: float = 1.0, min_factor: float = 0.0) -> ScheduleTable:
    """``(1 - min) * (1 - t / total_steps) ** power + min`` for steps ``0..total_steps-1`` (``total_steps`` entries).

    With ``min_factor=0`` this is ``PolynomialLR(total_iters=total_steps, power=power)``.
    """
    _check_int("total_steps", total_steps, 1)
    power = _check_float("power", power, 0.0, lo_open=True)
    m = _check_float("min_factor", min_factor, 0.0, 1.0)
    vals = [(1.0 - m) * (1.0 - t / total_steps) ** power + m for t in range(total_steps)]
    return ScheduleTable(vals, name="polynomial")


def warmup_stable_decay(
    total_steps: int, warmup_steps: int, decay_steps: int, min_factor: float = 0.0
) -> ScheduleTable:
    """Warmup-stable-decay (WSD): ``t / warmup_steps``, then 1, then a straight line to ``min_factor``.

    The decay takes the last ``decay_steps`` steps and would reach ``min_factor`` at step ``total_steps``, the
    first step after the run (``total_steps`` entries). ``decay_steps=0`` means no decay (the table ends at 1).
    """
    _check_int("total_steps", total_steps, 1)
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("decay_steps", decay_steps, 0)
    m = _check_float("min_factor", min_factor, 0.0, 1.0)
    if warmup_steps + decay_steps > total_steps:
        raise ValueError(
            f"warmup_steps + decay_steps must be <= total_steps, got {warmup_steps} + {decay_steps} > {total_steps}"
        )
    decay_start = total_steps - decay_steps
    vals = []
    for t in range(total_steps):
        if t < warmup_steps:
            vals.append(_ramp(t, warmup_steps))
        elif t < decay_start or decay_steps == 0:
            vals.append(1.0)
        else:
            vals.append(m + (1.0 - m) * ((total_steps - t) / decay_steps))
    return ScheduleTable(vals, name="warmup_stable_decay")


def cosine_restarts(T_0: int, T_mult: int = 1, min_factor: float = 0.0, *, total_steps: int) -> ScheduleTable:
    """``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min=min_factor * lr)`` for ``total_steps`` entries.

    ``total_steps`` is required: the schedule never ends, and a table holds its last entry.
    """
    _check_int("T_0", T_0, 1)
    _check_int("T_mult", T_mult, 1)
    m = _check_float("min_factor", min_factor, 0.0, 1.0)
    _check_int("total_steps", total_steps, 1)
    vals = []
    t_cur, t_i = 0, T_0
    for _ in range(total_steps):
        vals.append(m + (1.0 - m) * (1 + math.cos(math.pi * t_cur / t_i)) / 2)
        # Same bookkeeping as CosineAnnealingWarmRestarts.step().
        t_cur += 1
        if t_cur >= t_i:
            t_cur = t_cur % t_i
            t_i = t_i * T_mult
    return ScheduleTable(vals, name="cosine_restarts")


def cosine(total_steps: int, start_factor: float = 1.0, end_factor: float = 0.0) -> ScheduleTable:
    """A half cosine from ``start_factor`` (step 0) towards ``end_factor``, falling or rising:
    ``end + (start - end) * (1 + cos(pi * t / total_steps)) / 2`` for steps ``0..total_steps-1``.

    ``CosineAnnealingLR(T_max=total_steps, eta_min=end_factor * lr)`` on a group of lr ``start_factor * lr``, and
    DINO's ``cosine_scheduler(base_value, final_value, ...)`` without warmup; with :func:`with_weight_decay` it
    raises the weight decay as DINO does (``cosine(n, 1.0, 10.0)`` on a base of 0.04: 0.04 towards 0.4).
    """
    _check_int("total_steps", total_steps, 1)
    s = _check_float("start_factor", start_factor, 0.0)
    e = _check_float("end_factor", end_factor, 0.0)
    vals = [e + (s - e) * (1 + math.cos(math.pi * t / total_steps)) / 2 for t in range(total_steps)]
    return ScheduleTable(vals, name="cosine")


def sequential(tables: Sequence[ScheduleTable], milestones: Sequence[int]) -> ScheduleTable:
    """``SequentialLR``: ``tables[i]`` runs from ``milestones[i-1]`` (indexed from its own step 0).

    A table shorter than its segment holds its last entry until the next milestone. The result has
    ``milestones[-1] + len(tables[-1])`` entries. Either every table has momentum or none does.
    Tables from :func:`from_lr_scheduler` are per-group and cannot be spliced: put a ``SequentialLR``
    inside the factory instead.
    """
    if isinstance(tables, ScheduleTable) or not isinstance(tables, Sequence) or len(tables) == 0:
        raise ValueError("tables must be a non-empty sequence of ScheduleTable")
    tables = list(tables)
    for i, tab in enumerate(tables):
        if not isinstance(tab, ScheduleTable):
            raise ValueError(f"tables[{i}] must be a ScheduleTable, got {type(tab).__name__}")
        if tab.per_group:
            raise ValueError(
                f"tables[{i}] comes from from_lr_scheduler (per-group values); sequential() needs plain tables — "
                "build a SequentialLR inside the factory instead"
            )
    milestones = list(milestones)
    if len(milestones) != len(tables) - 1:
        raise ValueError(f"milestones must have len(tables) - 1 = {len(tables) - 1} entries, got {len(milestones)}")
    prev = 0
    for i, ms in enumerate(milestones):
        _check_int(f"milestones[{i}]", ms, prev + 1)
        prev = ms
    for column in ("momentum", "weight_decay"):
        has = [getattr(tab, column) is not None for tab in tables]
        if any(has) and not all(has):
            raise ValueError(
                f"{column}: tables {[i for i, w in enumerate(has) if w]} have a {column} table but tables "
                f"{[i for i, w in enumerate(has) if not w]} do not; either all or none must"
            )
    bounds = [0] + milestones
    lr_parts, mom_parts, wd_parts = [], [], []
    for i, tab in enumerate(tables):
        seg = (bounds[i + 1] - bounds[i]) if i + 1 < len(bounds) else len(tab)
        idx = torch.arange(seg).clamp_(max=len(tab) - 1)
        lr_parts.append(tab.lr_factors[idx])
        if tab.momentum is not None:
            mom_parts.append(tab.momentum[idx])
        if tab.weight_decay is not None:
            wd_parts.append(tab.weight_decay[idx])
    return ScheduleTable(
        torch.cat(lr_parts), torch.cat(mom_parts) if mom_parts else None, name="sequential",
        weight_decay=torch.cat(wd_parts) if wd_parts else None,
    )


class _WithWeightDecay(ScheduleTable):
    """A table (plain or baked) with a weight-decay column added (see :func:`with_weight_decay`)."""

    def __init__(self, table: ScheduleTable, factors: torch.Tensor, name: str):
        self.table = table
        self.name = name
        self.per_group = table.per_group
        self.weight_decay = factors

    lr_factors = property(lambda self: self.table.lr_factors)
    momentum = property(lambda self: self.table.momentum)

    def __len__(self) -> int:
        return len(self.table)

    def resolve_columns(self, param_groups: Sequence[dict], defaults: dict) -> List[Columns]:
        return [c._replace(weight_decay=self.weight_decay * _base_weight_decay(group))
                for c, group in zip(self.table.resolve_columns(param_groups, defaults), param_groups)]


def with_weight_decay(table: ScheduleTable, weight_decay) -> ScheduleTable:
    """``table`` with a weight-decay column: per-step factors that multiply each group's weight decay, read by
    the kernels on the device like the lr (DINO anneals weight decay from 0.04 to 0.4 beside its lr).

    Args:
        table: any table (a builder's, ``sequential``'s, ``from_lr_scheduler``'s); its lr and momentum are kept.
        weight_decay: the factors: a ScheduleTable (its ``lr_factors``, e.g. ``cosine(n, 1.0, 10.0)``) or a 1-D
            sequence; finite, >= 0, as many entries as ``table``.

    Factors, not absolute values, so param groups keep their own decay (``fusedopt.param_groups``' no-decay
    group stays at 0). A torch scheduler that writes ``weight_decay`` needs no combinator: ``from_lr_scheduler``
    bakes what it writes.

    Raises ValueError for a bad entry, a length that differs from ``table``'s, or a table that already has one.
    """
    if not isinstance(table, ScheduleTable):
        raise ValueError(f"table must be a ScheduleTable, got {type(table).__name__}")
    if getattr(table, "weight_decay", None) is not None:  # (a per-group baked table has no standalone one)
        raise ValueError(f"{table.name}: the table already has a weight-decay column")
    name = f"{table.name}+weight_decay"
    values = weight_decay.lr_factors if isinstance(weight_decay, ScheduleTable) else weight_decay
    factors = _as_table_tensor(values, "weight-decay factor", name)
    if factors.numel() != len(table):
        raise ValueError(f"{name}: the weight-decay column has {factors.numel()} entries but the table has "
                         f"{len(table)} (one per optimizer step: build both for the same total_steps)")
    return _WithWeightDecay(table, factors, name)


# ----------------------------------------------------------------------------------------------------------
# Baking an arbitrary torch LR scheduler.
# ----------------------------------------------------------------------------------------------------------


class _ShadowOptimizer(torch.optim.Optimizer):
    """A do-nothing optimizer holding copies of the real param groups, so a torch scheduler can be stepped
    ahead of time without touching the real optimizer."""

    def __init__(self, param_groups: List[dict], defaults: dict):
        super().__init__(param_groups, defaults)

    def step(self, closure=None):
        return None


class _FactoryError(ValueError):
    """The factory itself raised (e.g. it expects another number of param groups than it was given)."""


# The one group used for a BakedSchedule's own lr_factors (an SGD-like group with lr 1, so factors read as lrs).
_STANDALONE_DEFAULTS = {"lr": 1.0, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}


def _momentum_key(defaults: dict) -> Optional[str]:
    # torch's momentum-cycling schedulers (OneCycleLR, CyclicLR) prefer betas when the optimizer has them.
    if "betas" in defaults:
        return "betas"
    if "momentum" in defaults:
        return "momentum"
    return None


def _read_momentum(group: dict, key: Optional[str]) -> Optional[float]:
    if key is None:
        return None
    v = group[key][0] if key == "betas" else group[key]
    return float(v)


def _bake(factory, param_groups: Sequence[dict], defaults: dict, total_steps: int, name: str) -> List[Columns]:
    shadow_groups = []
    for group in param_groups:
        sg = {k: copy.deepcopy(v) for k, v in group.items() if k not in ("params", "initial_lr")}
        base_lr = group.get("initial_lr", group["lr"])  # the same base lr as ScheduleTable.resolve
        # A tensor lr stays a tensor of its dtype: torch's schedulers then compute in that dtype (and write the
        # lr in place, rounding it to float32 for a float32 lr), so the recorded lrs are the ones they would set
        # on the user's optimizer, bit for bit. It is a CPU copy: recording it reads it.
        sg["lr"] = base_lr.detach().to("cpu", copy=True) if isinstance(base_lr, torch.Tensor) else float(base_lr)
        if "weight_decay" in group:  # a scheduler that writes weight_decay starts from the base, as for the lr
            sg["weight_decay"] = _base_weight_decay(group)
        sg.pop("initial_weight_decay", None)
        sg["params"] = [torch.zeros(())]
        shadow_groups.append(sg)
    key = _momentum_key(defaults)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shadow = _ShadowOptimizer(shadow_groups, copy.deepcopy(dict(defaults)))
        original_mom = [_read_momentum(g, key) for g in shadow.param_groups]
        original_wd = [g.get("weight_decay") for g in shadow.param_groups]
        try:
            sched = factory(shadow)
        except Exception as e:
            raise _FactoryError(
                f"{name}: the factory raised on an optimizer with {len(shadow.param_groups)} param group(s): "
                f"{type(e).__name__}: {e}"
            ) from e
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError(
                f"{name}: ReduceLROnPlateau cannot be baked into a table: its lr depends on a metric passed to "
                "step(metric) during training. Use it directly on the optimizer (which then needs a host-side lr)"
            )
        if not isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
            raise TypeError(f"{name}: the factory must return a torch LRScheduler, got {type(sched).__name__}")
        if sched.optimizer is not shadow:
            raise ValueError(
                f"{name}: the factory must build the scheduler on the optimizer it is passed, not another one"
            )
        lrs = [[] for _ in shadow.param_groups]
        moms = [[] for _ in shadow.param_groups]
        wds = [[] for _ in shadow.param_groups]
        for t in range(total_steps):
            if t:
                shadow.step()
                try:
                    sched.step()
                except Exception as e:
                    raise ValueError(
                        f"{name}: the scheduler failed on step() {t} of {total_steps - 1}: {type(e).__name__}: {e}"
                    ) from e
            for i, g in enumerate(shadow.param_groups):
                lrs[i].append(float(g["lr"]))
                moms[i].append(_read_momentum(g, key))
                wds[i].append(None if original_wd[i] is None else float(g["weight_decay"]))
    changed = key is not None and any(
        m != orig for ms, orig in zip(moms, original_mom) for m in ms
    )
    # a weight-decay column when the scheduler wrote weight_decay (absolute values, like the lrs)
    wd_changed = any(w != orig for ws, orig in zip(wds, original_wd) if orig is not None for w in ws)
    out = []
    for i in range(len(lrs)):
        tab = ScheduleTable(lrs[i], moms[i] if changed else None, name=f"{name} (param group {i})",
                            weight_decay=wds[i] if wd_changed and original_wd[i] is not None else None)
        out.append(Columns(tab.lr_factors, tab.momentum, tab.weight_decay))
    return out


class NoStandaloneTable(ValueError, AttributeError):
    """A BakedSchedule whose factory needs the real param groups has no single-group table to show. An
    AttributeError too, so that ``getattr(table, "momentum", None)`` and ``hasattr`` see no such attribute."""


class BakedSchedule(ScheduleTable):
    """A torch LR scheduler run ahead of time on a shadow optimizer (see :func:`from_lr_scheduler`).

    :meth:`resolve` bakes absolute lrs (and momentum and weight decay, if the scheduler changes them) for the
    real groups, so
    per-group lambdas, ``max_lr`` lists and the like work. ``lr_factors`` / ``momentum`` are the values for
    one SGD-like group with ``lr=1.0`` (for plots and inspection); if the factory cannot run on one group
    (``LambdaLR`` with one lambda per group, ``max_lr=[...]``), reading them raises :class:`NoStandaloneTable`
    (a ValueError and an AttributeError); ``resolve`` still works, and so do the optimizers.
    """

    def __init__(self, factory: Callable, total_steps: int, name: str = "from_lr_scheduler"):
        if not callable(factory):
            raise ValueError(f"factory must be a callable taking an optimizer, got {type(factory).__name__}")
        self.factory = factory
        self.total_steps = _check_int("total_steps", total_steps, 1)
        self.name = name
        self._standalone: Optional[Columns] = None
        self._standalone_error: Optional[Exception] = None
        # Bake once now, so a ReduceLROnPlateau, a wrong return type or a too-short OneCycleLR fail here.
        try:
            [self._standalone] = _bake(
                factory, [dict(_STANDALONE_DEFAULTS)], _STANDALONE_DEFAULTS, total_steps, name
            )
        except _FactoryError as e:  # e.g. LambdaLR with one lambda per group of the real optimizer
            self._standalone_error = e

    per_group = True

    def _standalone_values(self) -> Columns:
        if self._standalone is None:
            raise NoStandaloneTable(
                f"{self.name}: no standalone table (the factory failed on a single default group with lr=1.0: "
                f"{self._standalone_error}); use resolve(param_groups, defaults) for the real groups"
            ) from self._standalone_error
        return self._standalone

    @property
    def lr_factors(self) -> torch.Tensor:  # type: ignore[override]
        return self._standalone_values()[0]

    @property
    def momentum(self) -> Optional[torch.Tensor]:  # type: ignore[override]
        return self._standalone_values()[1]

    @property
    def weight_decay(self) -> Optional[torch.Tensor]:  # type: ignore[override]
        # absolute for the standalone group, whose weight decay is 0 unless the scheduler writes one
        return self._standalone_values()[2]

    def __len__(self) -> int:
        return self.total_steps

    def __repr__(self) -> str:
        return f"BakedSchedule({self.name!r}, {self.total_steps} steps)"

    def resolve_columns(self, param_groups: Sequence[dict], defaults: dict) -> List[Columns]:
        """Run the factory's scheduler on a shadow copy of ``param_groups``; the real groups are not touched."""
        return _bake(self.factory, param_groups, defaults, self.total_steps, self.name)


def from_lr_scheduler(factory: Callable[[torch.optim.Optimizer], "torch.optim.lr_scheduler.LRScheduler"],
                      total_steps: int) -> BakedSchedule:
    """Bake any (metric-free) torch LR scheduler into a table of ``total_steps`` entries.

    ``factory(optimizer)`` must build the scheduler on the optimizer it is given, e.g.
    ``lambda opt: OneCycleLR(opt, max_lr=[1e-3, 1e-2], total_steps=1000)``. At ``resolve`` time it is run on a
    shadow optimizer whose groups copy the real ones (one dummy param each), recording each group's lr, and
    its momentum (``betas[0]`` / ``momentum``) and its ``weight_decay`` if the scheduler changes them, before
    each of ``total_steps`` steps. ReduceLROnPlateau needs a metric and is rejected with a TypeError.
    """
    return BakedSchedule(factory, total_steps)


# ----------------------------------------------------------------------------------------------------------
# What the optimizers say when `schedule=` is given something else than a table.
# ----------------------------------------------------------------------------------------------------------
_BUILDERS = ("constant", "linear_warmup", "warmup_cosine", "warmup_linear", "one_cycle", "step_decay", "exponential",
             "polynomial", "warmup_stable_decay", "cosine_restarts", "sequential", "from_lr_scheduler")
_TORCH_SCHEDULER_HINT = ("to drive the lr with a torch LR scheduler, keep schedule=None and attach the scheduler to "
                         "the optimizer as usual (it works as on torch.optim); to run it on the device instead, bake "
                         "it: schedule=fusedopt.schedules.from_lr_scheduler(lambda opt: <scheduler>(opt, ...), "
                         "total_steps)")


def schedule_type_error(schedule) -> Optional[str]:
    """None when `schedule` is a valid ``schedule=`` argument (a ScheduleTable or None), else the message of the
    TypeError to raise: what was passed, and what to pass instead."""
    if schedule is None or isinstance(schedule, ScheduleTable):
        return None
    head = f"schedule must be a fusedopt.schedules.ScheduleTable or None, got "
    if callable(schedule) and getattr(schedule, "__module__", None) == __name__ and schedule.__name__ in _BUILDERS:
        return (head + f"the builder function fusedopt.schedules.{schedule.__name__} itself: call it, e.g. "
                f"schedule=fusedopt.schedules.{schedule.__name__}(total_steps=...)")
    if isinstance(schedule, str):
        name = schedule.strip().lower().replace("-", "_")
        match = f" (fusedopt.schedules.{name}(...))" if name in _BUILDERS else ""
        return (head + f"the string {schedule!r}: build a table with one of the builders{match}: "
                + ", ".join(f"schedules.{b}" for b in _BUILDERS))
    if isinstance(schedule, torch.optim.lr_scheduler.LRScheduler) or (
            isinstance(schedule, type) and issubclass(schedule, torch.optim.lr_scheduler.LRScheduler)):
        what = schedule.__name__ if isinstance(schedule, type) else type(schedule).__name__
        return head + f"a torch LR scheduler ({what}): " + _TORCH_SCHEDULER_HINT
    if isinstance(schedule, (list, tuple, torch.Tensor)):
        return (head + f"a {type(schedule).__name__}: wrap per-step lr factors in a table: "
                "schedule=fusedopt.schedules.ScheduleTable(lr_factors)")
    if callable(schedule):
        return (head + f"a callable ({getattr(schedule, '__name__', type(schedule).__name__)}): if it builds a torch "
                "LR scheduler, " + _TORCH_SCHEDULER_HINT + "; if it maps a step to an lr factor, tabulate it: "
                "schedule=fusedopt.schedules.ScheduleTable([f(t) for t in range(total_steps)])")
    return head + f"{type(schedule).__name__}; build one with fusedopt.schedules (e.g. warmup_cosine(total_steps))"
