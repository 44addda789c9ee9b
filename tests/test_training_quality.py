"""Training quality of the small optimizer states (issue 13): does a real model train as well with them?

Two models, both from tests/training_runs.py (data shipped with installed packages, no downloads):
  * the scikit-learn digits MLP (64-128-128-10), 300 minibatch steps, seeds 0, 1, 2;
  * a character-level transformer LM (2 pre-LN blocks, d=64, context 32: 0.12M params, every weight matrix
    >= 4,096 elements so it is 8-bit quantized) trained 200 steps on torch's own Python sources, seed 0.
Every run ends with the float32 cross-entropy of the trained weights on fixed data (all digits; held-out text).

Claims (the issue's), each compared within one run of this file, never with a written-down loss (the losses
depend on the torch release: its sources are the LM's text, its kernels the arithmetic):
  * ``state_precision="8bit"`` (AdamW, float32 params) ends within 5% of float32 AdamW, whose oracle is
    torch.optim.AdamW(foreach=False);
  * bfloat16 params with ``stochastic_rounding=True`` and no master copy end within 5% of bfloat16 params with
    ``master_weights=True`` (float32 master and states);
  * bfloat16 params without either (round-to-nearest) end visibly worse: the reason the feature exists.
"Within 5%" is on the mean over the seeds of the loss ratio of paired runs (same seed: same init, same batches).

Measured here (2026-11-30, torch 2.14.1, fusedopt's CPU backend; per seed 0 / 1 / 2; a ratio is the mean of the
per-seed ratios):
  digits  fp32 AdamW (torch)  0.0604 0.0559 0.0557
          8bit                0.0551 0.0549 0.0565   ratio to fp32 0.970 (per seed 0.91 .. 1.01)
          bf16 + master       0.0585 0.0568 0.0559
          bf16 + SR           0.0581 0.0561 0.0560   ratio to master 0.994
          bf16 (nearest)      0.0693 0.0665 0.0677   ratio to master 1.189 (per seed 1.17 .. 1.21)
  LM      fp32 2.7612, 8bit 2.7555 (0.998), bf16 + master 2.7612, bf16 + SR 2.7625 (1.0005), bf16 2.8340 (1.026;
          seeds 1 and 2: 1.025, 1.026)
Runs that should train alike differ by up to 3% per seed on the digits (fp32 torch vs bf16 + master, seed 0:
the trajectories diverge chaotically), 0.4% in the 3-seed mean, and 0.05% on the LM. Hence the margins of
"visibly worse": bf16 without SR must exceed both bf16 + SR and bf16 + master by 8% (digits mean; each seed
by 5%) and by 1% (LM): under half of the measured gaps (18.9%, 2.6%), and 20x the noise between runs that
should agree. A mutation that makes stochastic rounding round to nearest (or drops it) makes "bf16 + SR" equal
"bf16" and fails the SR claim; one that leaves states in float32 fails the dtype checks below.

The peers, measured on the issue's own digits set-up (not this one; recorded in docs/notes, not asserted):
fp32 0.0383, bnb 8-bit 0.0378, torchao 8-bit 0.0379, bf16 without master 0.0478, master 0.0383, torchao bf16
SR 0.0387.

Cost (measured 2026-11-30 with fusedopt's CPU kernels reading the small states, one torch thread): ~0.9 CPU s
per digits run (15 runs) and ~2.7 CPU s per LM run (5 runs), ~27 CPU s in all; pytest --durations on the shared
2-core VM: 20.7 s (digits) + 18.1 s (LM) = 39 s wall at moderate load (71 s at load 8).
Every run is made once (cached) and shared by the tests that read it, so the first test of each
model carries its cost. Triton and CUDA are not run here: the CPU kernels share the state codec with them and
tests/test_small_state.py checks the backends bitwise against each other.
"""

from __future__ import annotations

import functools
from statistics import mean

import pytest
import torch

import training_runs as R
from conftest import require_backend

SEEDS = {"digits": (0, 1, 2), "lm": (0,)}
FP32, EIGHT_BIT, MASTER, SR, NEAREST = "adamw fp32", "adamw 8bit", "adamw bf16 master", "adamw bf16 sr", "adamw bf16"
# see the module docstring: half the measured gap between bf16 (nearest) and bf16 + SR / master, far above the
# noise between runs that should agree
WORSE_MARGIN = {"digits": 0.08, "lm": 0.01}
WORSE_MARGIN_PER_SEED = {"digits": 0.05, "lm": 0.01}
WITHIN = 0.05  # the target


@functools.lru_cache(maxsize=None)
def runs(task: str, name: str):
    return tuple(R.TASKS[task](R.CONFIGS[name], seed) for seed in SEEDS[task])


def losses(task: str, name: str):
    return [r.loss for r in runs(task, name)]


def mean_ratio(task: str, name: str, reference: str) -> float:
    return mean(a / b for a, b in zip(losses(task, name), losses(task, reference)))


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread while this file runs (restored after): the models are tiny (GEMMs of 8x64x64 .. 128x128),
    so a second thread only adds the start-up of every parallel region, and on a shared runner a descheduled
    worker thread stalls each of them; the losses do not depend on it (every configuration runs in the same
    process with the same thread count)."""
    require_backend("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("task", ["digits", "lm"])
def test_configurations_train_what_they_name(task):
    """The runs hold the dtypes their names say (a silently ignored option would make the claims vacuous)."""
    expected = {
        FP32: (("torch.float32",), ("torch.float32",)),
        # tensors under 4,096 elements (biases, LayerNorms; the digits' output layer) keep float32 states
        EIGHT_BIT: (("torch.float32",), ("torch.float32", "torch.uint8")),
        MASTER: (("torch.bfloat16",), ("torch.float32",)),  # float32 master copy and states
        SR: (("torch.bfloat16",), ("torch.bfloat16",)),
        NEAREST: (("torch.bfloat16",), ("torch.bfloat16",)),
    }
    for name, (params, states) in expected.items():
        for run in runs(task, name):
            assert (run.param_dtypes, run.state_dtypes) == (params, states), name
    assert R.CONFIGS[SR].kwargs() == {"stochastic_rounding": True}
    assert R.CONFIGS[NEAREST].kwargs() == {}


@pytest.mark.parametrize("task", ["digits", "lm"])
def test_8bit_adamw_within_5_percent_of_fp32(task):
    ratio = mean_ratio(task, EIGHT_BIT, FP32)
    assert abs(ratio - 1) <= WITHIN, (ratio, losses(task, EIGHT_BIT), losses(task, FP32))


@pytest.mark.parametrize("task", ["digits", "lm"])
def test_bf16_stochastic_rounding_within_5_percent_of_master_weights(task):
    ratio = mean_ratio(task, SR, MASTER)
    assert abs(ratio - 1) <= WITHIN, (ratio, losses(task, SR), losses(task, MASTER))


@pytest.mark.parametrize("task", ["digits", "lm"])
def test_bf16_without_stochastic_rounding_is_visibly_worse(task):
    nearest = losses(task, NEAREST)
    for better in (SR, MASTER):
        ratio = mean_ratio(task, NEAREST, better)
        assert ratio >= 1 + WORSE_MARGIN[task], (better, ratio, nearest, losses(task, better))
        for seed, a, b in zip(SEEDS[task], nearest, losses(task, better)):
            assert a >= b * (1 + WORSE_MARGIN_PER_SEED[task]), (better, seed, a, b)
