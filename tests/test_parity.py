"""Parity of every rule, dtype and scheduler with the independent eager oracles, on the CPU backend.

Each run: 300 steps, a mixed list of shapes (empty, scalar, odd sizes, one longer than a CPU work item,
a non-contiguous grad) in two param groups with different hyperparameters, the oracle driven by a torch
scheduler and fusedopt by the same scheduler baked into an on-device table.
"""

from __future__ import annotations

import pytest
import torch

from oracles import assert_close_normwise, run_pair, scheduler_factories, state_pairs

STEPS = 300

# Hyperparameter sets per rule: (options, per-group overrides). Group 2 has its own lr and decay so that a
# table that applied one group's values to another would show.
CONFIGS = {
    "adamw": {
        "default": (dict(lr=1e-3), [{}, dict(lr=3e-4, weight_decay=0.1, betas=(0.8, 0.99))]),
        "amsgrad_maximize": (dict(lr=1e-3, amsgrad=True, maximize=True, eps=1e-6), [{}, dict(lr=2e-3, weight_decay=0.0)]),
    },
    "adam": {  # torch.optim.Adam: L2 weight decay (and, per group, AdamW's decoupled decay)
        "l2": (dict(lr=1e-3, weight_decay=1e-2), [{}, dict(lr=3e-4, weight_decay=0.1, betas=(0.8, 0.99))]),
        "amsgrad_maximize_mixed_decay": (dict(lr=1e-3, amsgrad=True, maximize=True, eps=1e-6, weight_decay=0.05),
                                         [{}, dict(lr=2e-3, decoupled_weight_decay=True)]),
    },
    "sgd": {
        "plain": (dict(lr=1e-2), [{}, dict(lr=5e-3)]),
        "momentum_dampening_wd": (dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-3),
                                  [{}, dict(lr=5e-3, weight_decay=0.0)]),
        "nesterov": (dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-4), [{}, dict(lr=2e-2)]),
        "momentum_maximize": (dict(lr=1e-2, momentum=0.8, maximize=True), [{}, dict(lr=5e-3)]),
    },
    "lion": {
        "weight_decay": (dict(lr=1e-4, weight_decay=0.1), [{}, dict(lr=3e-5, betas=(0.95, 0.98))]),
        "no_decay": (dict(lr=3e-4), [{}, dict(lr=1e-4, weight_decay=0.5)]),
    },
}

CASES = [(rule, name) for rule, configs in CONFIGS.items() for name in configs]
SCHEDULERS = list(scheduler_factories(STEPS))

# float32: both sides compute the same float32 operations in the same order with scalars rounded the same
# way; what remains is the CPU's vectorized vs scalar evaluation of a few of them (lerp, addcmul), about one
# ulp per step, accumulated over 300 steps: well under 1e-6 relative. float64 shows the same at 1e-14.
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


def check_lion_params(ours_params, oracle_params, oracle, tol, what):
    """Lion moves an element by lr_t * sign(blend_t) at step t (after the decay p *= 1 - lr_t*wd, a factor in
    (0, 1]). Our kernel rounds every operation as lion-pytorch does, so the two runs agree to rounding unless
    a blend sits so close to 0 that its sign differs; then that step's moves differ by at most
    |lr_t * (s - s')| <= 2 * lr_t (signs in {-1, 0, 1}), and the difference is never fed back (the momentum
    does not depend on the param) but only shrunk by later decays. So an element's total disagreement is at
    most 2 * (sum of lr_t over its flipped steps) <= 2 * sum_t lr_t of its group, plus rounding. Flips need
    a blend within an ulp of 0, so they must also be rare: at most 0.1% of the elements (with the rules
    rounding as lion-pytorch does, none are expected; tests/test_eager_closeness.py checks Lion bit for bit)."""
    total = sum(b.numel() for b in oracle_params)
    differing = 0
    lr_sums = [sum(lrs) for lrs in oracle.lr_history]
    group_of = {id(p): gi for gi, g in enumerate(oracle.param_groups) for p in g["params"]}
    for i, (a, b) in enumerate(zip(ours_params, oracle_params)):
        if b.numel() == 0:
            continue
        diff = (a.detach().double() - b.detach().double()).abs()
        scale = tol * b.detach().double().abs().max()
        differing += int((diff > scale).sum())
        bound = 2 * lr_sums[group_of[id(b)]] + scale
        assert float(diff.max()) <= bound, f"{what} param {i}: off by {float(diff.max()):.3e} > {float(bound):.3e}"
    assert differing <= max(2, total // 1000), f"{what}: {differing} of {total} Lion elements differ"


@pytest.mark.parametrize("rule,config", CASES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_oracle(rule, config, scheduler, dtype):
    options, groups = CONFIGS[rule][config]
    ours_params, oracle_params, ours, oracle = run_pair(
        rule, dtype, options, groups, scheduler_factories(STEPS)[scheduler], STEPS)
    tol = TOLERANCE[dtype]
    if rule == "lion":
        check_lion_params(ours_params, oracle_params, oracle, tol, f"lion/{config}/{scheduler}")
    else:
        for i, (a, b) in enumerate(zip(ours_params, oracle_params)):
            assert_close_normwise(a, b, tol, f"{rule}/{config}/{scheduler} param {i} {tuple(a.shape)}")
    for what, a, b in state_pairs(rule, ours, oracle, ours_params, oracle_params):
        assert b is not None and a is not None, what
        assert_close_normwise(a, b, max(tol, 1e-6 if dtype == torch.float32 else 1e-12), what)
    assert ours.get_last_lr() == pytest.approx([g["lr"] for g in oracle.param_groups], rel=1e-12)


# bfloat16 / float16 (with and without master weights) on every backend: tests/test_low_precision.py, each step
# against a float64 oracle fed that step's inputs.


@pytest.mark.parametrize("rule", ["adamw", "adam", "sgd", "lion"])
def test_params_without_grad_are_untouched_and_counted_like_torch(rule):
    """A param whose grad is None skips the step (no state, no decay), like torch.optim."""
    options, groups = CONFIGS[rule][next(iter(CONFIGS[rule]))]
    from oracles import RULE_CLASSES, make_params

    ours_cls, oracle_factory = RULE_CLASSES[rule]
    base = make_params(torch.float32)
    ours_params = [p.clone().requires_grad_() for p in base]
    oracle_params = [p.clone().requires_grad_() for p in base]
    ours = ours_cls(ours_params, **options, backend="cpu")
    oracle = oracle_factory(oracle_params, **options)
    for t in range(20):
        for k, (a, b) in enumerate(zip(ours_params, oracle_params)):
            use = (k + t) % 3 != 0  # each param sits out every third step
            g = torch.randn(a.shape) if use else None
            a.grad = None if g is None else g.clone()
            b.grad = None if g is None else g.clone()
        ours.step()
        oracle.step()
    for i, (a, b) in enumerate(zip(ours_params, oracle_params)):
        assert_close_normwise(a, b, 1e-6, f"{rule} param {i}")
