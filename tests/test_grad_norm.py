"""fusedopt::grad_norm (CPU): the global grad norm that max_grad_norm clips by, in one pass over all grads.

Oracles: the norm computed in float64 from the grads' exact values (the true value, which a float32 result can
only round), and torch.nn.utils.clip_grad_norm_'s own total norm. The optimizers' clipping against
clip_grad_norm_ + step is tested in test_one_pass.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedopt  # noqa: F401  (loads the ops)

grad_norm = torch.ops.fusedopt.grad_norm
NORM_TYPES = [1.0, 2.0, 3.5, math.inf]


def _grads(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(0,), (), (1,), (7,), (97,), (33, 31), (70_001,), (5, 0, 3)]  # 70,001: three 32 Ki work items
    grads = [(torch.randn(s, generator=g) * 3).to(dtype) for s in shapes]
    grads.append(torch.randn(31, 33, generator=g).to(dtype).t())  # non-contiguous, dense
    grads.append(torch.randn(40, 50, generator=g).to(dtype)[:, ::2])  # a strided view
    return grads


def _exact(grads, p):
    flat = torch.cat([t.reshape(-1).double() for t in grads])
    return torch.linalg.vector_norm(flat, p).item()


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_the_exact_norm_and_clip_grad_norm(dtype, p):
    grads = _grads(dtype)
    ours = grad_norm(grads, p)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    exact = _exact(grads, p)
    # float64 sums rounded once to float32: within one float32 rounding (2^-24) of the exact value
    assert abs(ours.item() - exact) <= 2 ** -23 * exact, (ours.item(), exact)
    if dtype in (torch.bfloat16, torch.float16):
        # clip_grad_norm_ returns its norm in the grads' dtype (bf16: 3 significant digits; fp16 overflows at
        # 65504); the optimizers clip by a float32 norm, which torch gets with _foreach_norm(dtype=float32)
        per_tensor = torch._foreach_norm([t for t in grads if t.numel()], p, dtype=torch.float32)
        theirs = torch.linalg.vector_norm(torch.stack(per_tensor), p).item()
    else:
        theirs = _clip_grad_norm_total(grads, p)
    # the same quantity as torch's (which sums in float32: off the exact value by up to ~2e-6 for L1 over the
    # 70,001-element tensor here), and no further from the exact value than torch's own result
    assert ours.item() == pytest.approx(theirs, rel=1e-5)
    assert abs(ours.item() - exact) <= abs(theirs - exact) + 2 ** -23 * exact


def _clip_grad_norm_total(grads, p, max_norm=1e30):
    """clip_grad_norm_'s total norm for these grads (torch's inf-norm cannot reduce an empty tensor: such
    grads, which add nothing to any norm, are left out of its call)."""
    params = [torch.zeros(t.shape, dtype=t.dtype, requires_grad=True) for t in grads if t.numel()]
    for q, t in zip(params, [t for t in grads if t.numel()]):
        q.grad = t.clone()
    return torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, norm_type=p).double().item()


def test_mixed_dtypes_in_one_list():
    grads = _grads(torch.float32)[:5] + _grads(torch.bfloat16, seed=1)[:5] + _grads(torch.float64, seed=2)[:5]
    assert grad_norm(grads, 2.0).item() == pytest.approx(_exact(grads, 2.0), rel=2 ** -23)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_empty_grads_have_norm_zero(p):
    assert grad_norm([torch.empty(0), torch.empty(3, 0)], p).item() == 0.0


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_propagate_like_torch(p, bad):
    grads = _grads(torch.float32)
    grads[6][12_345] = bad  # inside the second work item of a multi-item tensor
    ours = grad_norm(grads, p).item()
    theirs = _clip_grad_norm_total(grads, p, max_norm=1.0)
    assert math.isnan(ours) == math.isnan(theirs) and math.isinf(ours) == math.isinf(theirs), (ours, theirs)
    assert math.isnan(ours) or math.isinf(ours)


def test_result_does_not_depend_on_the_thread_count():
    grads = [torch.randn(200_000) for _ in range(3)] + [torch.randn(100) for _ in range(50)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grad_norm(grads, 2.0)
        torch.set_num_threads(2)
        two = grad_norm(grads, 2.0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_rejects_integer_grads_and_a_bad_norm_type():
    with pytest.raises(RuntimeError, match=r"grads\[1\] must be floating point"):
        grad_norm([torch.randn(3), torch.ones(3, dtype=torch.int64)], 2.0)
    with pytest.raises(RuntimeError, match="norm_type must be > 0"):
        grad_norm([torch.randn(3)], 0.0)


def test_opcheck():
    grads = [torch.randn(5), torch.randn(3, 4), torch.randn(40_000)]
    torch.library.opcheck(torch.ops.fusedopt.grad_norm.default, (grads, 2.0))
