"""Parity of every rule, dtype and scheduler with the independent eager oracles, on the CPU backend.

Each run: 300 steps, a mixed list of shapes (empty, scalar, odd sizes, one longer than a CPU work item,
a non-contiguous grad) in two param groups with different hyperparameters, the oracle driven by a torch
scheduler and fusedopt by the same scheduler baked into an on-device table.
"""

from __future__ import annotations

import pytest
import torch

from oracles import (assert_close_normwise, normwise_error, run_pair, scheduler_factories, state_pairs)

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


@pytest.mark.parametrize("rule,config", [(r, next(iter(c))) for r, c in CONFIGS.items()])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_bounded_by_torchs_own(rule, config, dtype):
    """bf16 / fp16: torch's single-tensor path rounds to the low-precision type after every operation, ours
    computes in float32 and rounds once, so they do not agree bit for bit. Both are compared with a float64
    run of the oracle from the same start and grads: our error must not exceed torch's own error in that
    dtype (x1.5 plus 2 ulps of slack for where the two roundings land on different sides)."""
    options, groups = CONFIGS[rule][config]
    if rule in ("adamw", "adam") and dtype == torch.float16:
        # eps=1e-8 is below float16's smallest subnormal: torch's own float16 AdamW divides 0 by 0 once an
        # exp_avg_sq underflows and returns NaN (the reason float16 training keeps float32 states; see
        # master_weights). Use an eps that float16 can hold so the oracle has an error to compare with.
        options = dict(options, eps=1e-4)
    factory = scheduler_factories(STEPS)["lambda_warmup_cosine"]
    ours_params, oracle_params, _, _ = run_pair(rule, dtype, options, groups, factory, STEPS)
    _, ref_params, _, _ = run_pair(rule, dtype, options, groups, factory, STEPS, oracle_dtype=torch.float64)
    eps = torch.finfo(dtype).eps
    for i, (ours, theirs, ref) in enumerate(zip(ours_params, oracle_params, ref_params)):
        if ref.numel() == 0:
            continue
        our_err = normwise_error(ours, ref)
        torch_err = normwise_error(theirs, ref)
        assert our_err <= 1.5 * torch_err + 2 * eps, (
            f"{rule} {dtype} param {i}: our error vs float64 {our_err:.3e}, torch's {torch_err:.3e}")


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
