"""step()'s two ways of collecting a param group: the whole-group check in C++ (fusedopt::grads_ready) and the
per-param Python path it falls back to.

The fast path exists for speed only (a step over 10,000 small tensors spent most of its time checking grads
from Python), so these tests pin down three things: grads_ready accepts exactly the groups the kernels can read
as they are, step() takes the fast path in the common case and falls back in every other, and both paths give
the oracle's results (and bit-identical results to each other).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import fusedopt
from fusedopt.optim._base import FusedOptimizer
from oracles import RULE_CLASSES, assert_close_normwise

grads_ready = torch.ops.fusedopt.grads_ready


def _pairs(*shapes, dtype=torch.float32):
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    return params, [torch.randn_like(p) for p in params]


# ----------------------------------------------------------------------------------------------------------
# The op's truth table
# ----------------------------------------------------------------------------------------------------------
def test_grads_ready_accepts_dense_matching_grads():
    params, grads = _pairs((3,), (4, 5), (), (0,), (2, 0, 3))
    assert grads_ready(params, grads) is True


def test_grads_ready_accepts_a_permuted_dense_param_with_a_grad_of_the_same_strides():
    p = torch.randn(4, 6).t()  # dense, not contiguous
    g = torch.randn(4, 6).t()
    assert grads_ready([p], [g]) is True


def test_grads_ready_accepts_contiguous_tensors_whose_size_one_strides_differ():
    p = torch.randn(3, 1)
    g = torch.randn(1, 3).t()  # contiguous too, stride of the size-1 dim differs
    assert p.stride() != g.stride() and g.is_contiguous()
    assert grads_ready([p], [g]) is True


@pytest.mark.parametrize("case", [
    "empty group", "missing grad", "grad dtype", "mixed param dtypes", "grad shape", "grad device",
    "transposed grad", "strided view param", "sparse grad", "length mismatch",
])
def test_grads_ready_rejects(case):
    params, grads = _pairs((4, 6), (5,))
    if case == "empty group":
        params, grads = [], []
    elif case == "missing grad":
        grads[1] = None
    elif case == "grad dtype":
        grads[1] = grads[1].double()
    elif case == "mixed param dtypes":
        params[1], grads[1] = params[1].double(), grads[1].double()
    elif case == "grad shape":
        grads[1] = torch.randn(6)
    elif case == "grad device":
        grads[1] = torch.empty(5, device="meta")
    elif case == "transposed grad":
        grads[0] = torch.randn(6, 4).t()
    elif case == "strided view param":
        params[0], grads[0] = torch.randn(4, 12)[:, ::2], torch.randn(4, 6)
    elif case == "sparse grad":
        grads[1] = grads[1].to_sparse()
    elif case == "length mismatch":
        grads = grads[:1]
    assert grads_ready(params, grads) is False


# ----------------------------------------------------------------------------------------------------------
# Which path step() takes
# ----------------------------------------------------------------------------------------------------------
def _collected(opt):
    """Runs one step of opt and returns the batches its _collect produced."""
    seen = []
    original = FusedOptimizer._collect

    def spy(self):
        batches = original(self)
        seen.extend(batches)
        return batches

    with mock.patch.object(FusedOptimizer, "_collect", spy):
        opt.step()
    return seen


@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_common_case_is_one_ready_batch_per_group(rule):
    cls = RULE_CLASSES[rule][0]
    a, b = _pairs((3,), (4, 5))
    c, d = _pairs((7,))
    for p, g in zip(a + c, b + d):
        p.grad = g
    kwargs = {"momentum": 0.9} if rule == "sgd" else {}
    opt = cls([{"params": a}, {"params": c, "weight_decay": 0.0}], lr=1e-3, **kwargs)
    for _ in range(2):  # SGD's first step and a later one are both whole-group steps
        batches = _collected(opt)
        assert [(bt.group_index, bt.ready, len(bt.params)) for bt in batches] == [(0, True, 2), (1, True, 1)]


class _TaggedTensor(torch.Tensor):
    """A tensor subclass (as quantization and sharding libraries make): its ops go through its own
    __torch_function__, so step() must not hand it to the whole-group check."""


@pytest.mark.parametrize("case", ["missing grad", "transposed grad", "mixed dtypes", "sgd half first step",
                                  "subclass param"])
def test_other_cases_take_the_per_param_path(case):
    params, grads = _pairs((3,), (4, 6))
    cls = fusedopt.FusedSGD
    if case == "transposed grad":
        grads[1] = torch.randn(6, 4).t()
    elif case == "mixed dtypes":
        params[0], grads[0] = params[0].double(), grads[0].double()
    elif case == "subclass param":
        params[0] = params[0].as_subclass(_TaggedTensor)
    for p, g in zip(params, grads):
        p.grad = g
    opt = cls(params, lr=1e-3, momentum=0.9)
    if case == "missing grad":
        params[0].grad = None
    elif case == "sgd half first step":
        params[1].grad = None
        opt.step()  # param 0 now has a momentum buffer, param 1 has none
        params[1].grad = grads[1]
    batches = _collected(opt)
    assert not any(bt.ready for bt in batches)
    assert sum(len(bt.params) for bt in batches) == sum(p.grad is not None for p in params)


# ----------------------------------------------------------------------------------------------------------
# Both paths against the oracles, and against each other
# ----------------------------------------------------------------------------------------------------------
_OPTIONS = {"adamw": dict(lr=1e-2, weight_decay=0.1), "sgd": dict(lr=1e-2, momentum=0.9, nesterov=True,
                                                                  weight_decay=1e-3),
            "lion": dict(lr=1e-3, weight_decay=0.1)}


def _train(rule, make_opt, steps=30, seed=0):
    """Trains 5 params in 2 groups; the grad pattern switches between the fast path and the fallback: some
    steps leave a param without grad, SGD params join late (mixed first steps), one step has a transposed grad."""
    torch.manual_seed(seed)
    shapes = [(3,), (40, 50), (97,), (1025,), (8, 8)]
    params = [torch.randn(s).requires_grad_() for s in shapes]
    opt = make_opt([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}])
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(steps):
        for k, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g)
            if k == 1 and t == 7:
                grad = torch.randn(50, 40, generator=g).t()  # a transposed grad
            p.grad = None if (k + t) % 4 == 0 or (k == 4 and t < 5) else grad
        opt.step()
    return params


@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_both_paths_match_the_oracle_and_each_other(rule):
    ours_cls, oracle_factory = RULE_CLASSES[rule]
    options = _OPTIONS[rule]
    fast = _train(rule, lambda groups: ours_cls(groups, **options, backend="cpu"))
    with mock.patch.object(FusedOptimizer, "_whole_group_check_usable", staticmethod(lambda: False)):
        slow = _train(rule, lambda groups: ours_cls(groups, **options, backend="cpu"))
    oracle = _train(rule, lambda groups: oracle_factory(groups, **options))
    for i, (a, b, ref) in enumerate(zip(fast, slow, oracle)):
        assert torch.equal(a, b), f"{rule} param {i}: the whole-group path and the per-param path differ"
        if rule == "lion":  # sign(): a last-bit difference can flip an element, see test_parity
            assert (a != ref).float().mean().item() <= 1e-3, f"lion param {i}"
        else:
            assert_close_normwise(a, ref, 1e-6, f"{rule} param {i}")  # float32 rounding over 30 steps
