"""Leslie Smith's learning-rate range test, driven by a fusedopt schedule table.

    from fusedopt.lr_finder import find_lr

    result = find_lr(model, torch.nn.functional.mse_loss, loader,
                     lambda params, schedule: fusedopt.FusedAdamW(params, schedule=schedule))
    result.suggested_lr        # steepest descent of the smoothed loss
    result.plot("lr_range.png")

The lr grows exponentially from ``start_lr`` to ``end_lr`` over ``num_steps`` steps. The ramp is a
:class:`fusedopt.schedules.ScheduleTable` whose lr factors are relative to ``start_lr`` (factor 1 at step 0,
``end_lr / start_lr`` at the last step), so a fusedopt optimizer reads it on the device like any other schedule.

The optimizer factory receives ``(params, schedule)``: pass ``schedule`` on to a fusedopt optimizer. Every
param group's lr is then set to ``start_lr`` (the lr given to the factory does not matter) and the table scales
it. A factory that does not hand the table to its optimizer (any ``torch.optim`` optimizer, or a factory taking
only ``params``) works too: find_lr then writes each step's lr into the param groups before the step.

Each step: forward on the next batch, backward, optimizer step; batches are ``(inputs, targets)`` pairs and the
loss is ``loss_fn(model(inputs), targets)`` (the batches are cycled if they run out). The test stops after
``num_steps`` steps, or once the smoothed loss exceeds ``diverge_factor`` (4) times its minimum, or the loss is not
finite. Afterwards the model's parameters and buffers, its grads, its train/eval mode, the optimizer's state and
the RNG states are restored exactly as they were (the result is a measurement, not training).

The suggestion is the lr at the steepest descent of the smoothed loss against log(lr), not the lr of the minimum
loss (which is already too large to train at). The smoothing for the suggestion is an exponential moving average
run forwards and backwards (no lag; a one-way average would shift the curve towards larger lrs by
~1/(1-beta) steps) over the losses before the run diverged for good (from where every loss exceeds
``diverge_factor`` times the smallest before it); the divergence check during the run uses the causal average,
which is all that is known then.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional

import torch

from fusedopt._extras import require
from fusedopt.schedules import ScheduleTable

__all__ = ["find_lr", "LRFinderResult", "exponential_ramp"]


@dataclass
class LRFinderResult:
    """lrs[i] is the lr of step i; losses[i] the loss computed before that step (on batch i)."""

    lrs: List[float]
    losses: List[float]
    smoothed_losses: List[float]
    suggested_lr: Optional[float]
    suggested_index: Optional[int]
    stop_reason: str  # "num_steps", "diverged" or "non-finite loss"
    min_loss: float
    min_loss_lr: float
    skip_start: int = 0
    skip_end: int = 0
    extra: dict = field(default_factory=dict)

    def plot(self, path: Optional[str] = None, ax=None, log_loss: bool = False):
        """Loss (raw and smoothed) against lr on a log axis, with the suggested lr and the lr of the minimum loss
        marked. Saves a PNG to ``path`` when given; returns the matplotlib Axes.

        Args:
            path: the image to write (the extension picks the format); None: not saved.
            ax: draw into this Axes (the figure is then the caller's: not closed, backend left as it is);
                None: a new figure on matplotlib's Agg backend, closed after saving.
            log_loss: a log-scaled loss axis.

        Raises:
            fusedopt._extras.MissingDependency: matplotlib is not installed (an ImportError naming
                ``pip install "fusedopt[plot]"``).
        """
        matplotlib = require("matplotlib", "LRFinderResult.plot")
        if ax is None:
            matplotlib.use("Agg")
        plt = require("matplotlib.pyplot", "LRFinderResult.plot")

        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(self.lrs, self.losses, color="0.7", lw=1, label="loss")
        ax.plot(self.lrs, self.smoothed_losses, color="C0", lw=2, label="smoothed loss")
        if self.suggested_lr is not None:
            i = self.suggested_index
            ax.axvline(self.suggested_lr, color="C3", ls="--", lw=1)
            ax.plot([self.suggested_lr], [self.smoothed_losses[i]], "o", color="C3",
                    label=f"suggested lr {self.suggested_lr:.2e} (steepest descent)")
        ax.axvline(self.min_loss_lr, color="0.4", ls=":", lw=1, label=f"min loss at {self.min_loss_lr:.2e}")
        ax.set_xscale("log")
        if log_loss:
            ax.set_yscale("log")
        finite = [v for v in self.smoothed_losses if math.isfinite(v)]
        if finite:  # keep the divergence spike from squashing the interesting part
            lo, hi = min(finite), min(max(finite), 4 * min(finite) if min(finite) > 0 else max(finite))
            pad = 0.05 * (hi - lo if hi > lo else abs(hi) + 1e-12)
            if not log_loss:
                ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.set_title(f"LR range test ({len(self.lrs)} steps, stopped: {self.stop_reason})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        if own:
            fig.tight_layout()
            if path:
                fig.savefig(path, dpi=110)
                plt.close(fig)
        elif path:
            ax.figure.savefig(path, dpi=110)
        return ax


def exponential_ramp(start_lr: float, end_lr: float, num_steps: int) -> ScheduleTable:
    """lr factors relative to ``start_lr``: ``(end_lr / start_lr) ** (t / (num_steps - 1))`` for t < num_steps,
    plus one entry that holds the last value (so the table is not exhausted after the last step)."""
    ratio = end_lr / start_lr
    n = max(num_steps - 1, 1)
    factors = [ratio ** (t / n) for t in range(num_steps)]
    factors.append(factors[-1])
    return ScheduleTable(factors, name=f"lr range {start_lr:g}..{end_lr:g}")


def _check_args(start_lr, end_lr, num_steps, diverge_factor, beta):
    for name, v in (("start_lr", start_lr), ("end_lr", end_lr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if end_lr <= start_lr:
        raise ValueError(f"end_lr must be > start_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    if not (isinstance(diverge_factor, (int, float)) and diverge_factor > 1):
        raise ValueError(f"diverge_factor must be > 1, got {diverge_factor!r}")
    if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")


def _takes_schedule(factory: Callable) -> bool:
    """True unless the factory can only be called with one positional argument."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return True
    params = list(sig.parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params) or "schedule" in sig.parameters:
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


class _BatchCycler:
    def __init__(self, batches: Iterable):
        self.batches = batches
        self.it = iter(batches)
        self.reiterable = self.it is not batches  # a list or DataLoader, not a one-shot iterator
        self.seen: list = []
        self.replay: Optional[int] = None

    def next(self):
        if self.replay is not None:
            batch = self.seen[self.replay % len(self.seen)]
            self.replay += 1
            return batch
        try:
            batch = next(self.it)
        except StopIteration:
            if self.reiterable:
                self.it = iter(self.batches)
                try:
                    return next(self.it)
                except StopIteration:
                    raise ValueError("batches is empty") from None
            if not self.seen:
                raise ValueError("batches is empty") from None
            self.replay = 1
            return self.seen[0]
        if not self.reiterable:
            self.seen.append(batch)
        return batch


def _ema(values: List[float], beta: float) -> List[float]:
    """Bias-corrected exponential moving average (fastai's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def zero_phase_smooth(values: List[float], beta: float) -> List[float]:
    """The mean of a forward and a backward bias-corrected EMA: smooth, and without the lag of either."""
    if not values:
        return []
    fwd = _ema(values, beta)
    bwd = _ema(values[::-1], beta)[::-1]
    return [(a + b) / 2 for a, b in zip(fwd, bwd)]


def divergence_start(losses: List[float], factor: float, beta: float) -> int:
    """The first index from which every loss exceeds ``factor`` times the smallest causal average (the
    bias-corrected EMA, as the in-run check) before it: the run has diverged for good; else len(losses). A spike
    that comes back below does not count, and one lucky batch barely moves the average it is compared with."""
    best, start = math.inf, len(losses)
    for i, (v, avg) in enumerate(zip(losses, _ema(losses, beta))):
        if v > factor * best:
            start = min(start, i)
        else:
            start = len(losses)
        best = min(best, avg)
    return start


def steepest_descent(lrs: List[float], smoothed: List[float], skip_start: int, skip_end: int) -> Optional[int]:
    """Index of the most negative d(loss)/d(log lr) (central differences) within [skip_start, n - skip_end)."""
    n = len(lrs)
    lo, hi = skip_start, n - skip_end
    if hi - lo < 3:
        return None
    logs = [math.log(x) for x in lrs]
    best, best_i = math.inf, None
    for i in range(lo, hi):
        a, b = max(i - 1, 0), min(i + 1, n - 1)
        if logs[b] == logs[a]:
            continue
        slope = (smoothed[b] - smoothed[a]) / (logs[b] - logs[a])
        if math.isfinite(slope) and slope < best:
            best, best_i = slope, i
    return best_i


def find_lr(model: torch.nn.Module, loss_fn: Callable, batches: Iterable, optimizer_factory: Callable,
            start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100, *, diverge_factor: float = 4.0,
            beta: float = 0.9, skip_start: Optional[int] = None, skip_end: Optional[int] = None,
            restore: bool = True) -> LRFinderResult:
    """Run an LR range test and return the lrs, losses and a suggested lr (see the module docstring).

    Args:
        model: the model; its parameters (``model.parameters()``) are what the optimizer gets.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar loss tensor.
        batches: an iterable of ``(inputs, targets)``; cycled when exhausted.
        optimizer_factory: ``factory(params, schedule) -> optimizer``; pass ``schedule`` to a fusedopt optimizer.
            A one-argument ``factory(params)`` is accepted too (its lr is then set per step on the host).
        start_lr, end_lr, num_steps: the exponential ramp (step 0 uses start_lr, step num_steps-1 end_lr).
        diverge_factor: stop once the (causal) smoothed loss exceeds this many times its minimum.
        beta: smoothing of the loss curve (exponential moving average coefficient).
        skip_start, skip_end: points ignored at either end when looking for the steepest descent
            (default: 10% of the points at the start, 5% at the end).
        restore: put the model, its grads, the optimizer state and the RNG states back afterwards.
    """
    _check_args(start_lr, end_lr, num_steps, diverge_factor, beta)
    if not callable(optimizer_factory):
        raise TypeError(f"optimizer_factory must be callable, got {type(optimizer_factory).__name__}")
    params = [p for p in model.parameters()]
    if not params:
        raise ValueError("the model has no parameters")

    # Snapshot everything the run changes.
    model_state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    training = {m: m.training for m in model.modules()}
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    schedule = exponential_ramp(start_lr, end_lr, num_steps)
    factors = schedule.lr_factors.tolist()
    optimizer = optimizer_factory(params, schedule) if _takes_schedule(optimizer_factory) else optimizer_factory(params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer_factory must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
    opt_state = copy.deepcopy(optimizer.state_dict()) if restore else None
    on_device = getattr(optimizer, "schedule", None) is schedule
    for group in optimizer.param_groups:
        if on_device:
            group["initial_lr"] = start_lr  # the base the table's factors multiply (the table then shows "lr")
        else:
            group["lr"] = start_lr

    lrs: List[float] = []
    losses: List[float] = []
    cycler = _BatchCycler(batches)
    stop_reason = "num_steps"
    best = math.inf
    avg = 0.0
    try:
        for t in range(num_steps):
            lr = start_lr * factors[t]
            if not on_device:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            batch = cycler.next()
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}")
            inputs, targets = batch
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            lrs.append(lr)
            losses.append(value)
            if not math.isfinite(value):
                stop_reason = "non-finite loss"
                break
            avg = beta * avg + (1 - beta) * value
            smooth = avg / (1 - beta ** (t + 1))
            best = min(best, smooth)
            if t > 0 and smooth > diverge_factor * best:
                stop_reason = "diverged"
                break
    finally:
        if restore:
            with torch.no_grad():
                model.load_state_dict(model_state)
                for p, g in zip(params, grads):
                    p.grad = g
            for m, mode in training.items():
                m.training = mode
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optimizer.load_state_dict(opt_state)
            torch.random.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    finite = [v if math.isfinite(v) else math.nan for v in losses]
    curve = [v for v in finite if not math.isnan(v)]
    usable = len(curve)
    # The backward average must not see the divergence that stopped the run: its memory (~1/(1-beta) steps) can
    # be as long as a short run, and the spike then lifts the start of the curve (a 30-step run suggested its
    # first lr). The losses after the run diverged for good keep the causal average (plotted, never suggested).
    n = usable if stop_reason == "num_steps" else divergence_start(curve, diverge_factor, beta)
    smoothed = zero_phase_smooth(curve[:n], beta) + _ema(curve, beta)[n:] + [math.nan] * (len(losses) - usable)
    s0 = max(1, n // 10) if skip_start is None else skip_start
    s1 = max(1, n // 20) if skip_end is None else skip_end
    if stop_reason != "num_steps" and skip_end is None:
        s1 = max(s1, 1)
    idx = steepest_descent(lrs[:n], smoothed[:n], s0, s1)
    if idx is None and n >= 3:  # too few points to skip any: use them all
        idx = steepest_descent(lrs[:n], smoothed[:n], 0, 0)
    min_i = min(range(n), key=lambda i: curve[i]) if n else 0
    return LRFinderResult(
        lrs=lrs, losses=losses, smoothed_losses=smoothed,
        suggested_lr=None if idx is None else lrs[idx], suggested_index=idx, stop_reason=stop_reason,
        min_loss=curve[min_i] if n else math.nan, min_loss_lr=lrs[min_i] if n else math.nan,
        skip_start=s0, skip_end=s1, extra=dict(schedule_on_device=on_device))
