"""The Triton backend (fusedopt/triton) against independent oracles and against the C++ ops.

Without CUDA the kernels run on CPU tensors through the Triton interpreter: TRITON_INTERPRET=1 is set before
fusedopt.triton's kernel modules are imported (tests/conftest.py sets it for the whole session already; it
stays set, because triton consults it again lazily). With CUDA the same tests run the compiled kernels on
CUDA tensors, and the tests marked `gpu` add CUDA-graph capture, the no-sync check, large tensors and the
comparison with the CUDA backend.

Oracles: torch.optim.AdamW / SGD (foreach=False) and lion_pytorch.Lion, which share no code with fusedopt,
plus the C++ CPU ops (torch.ops.fusedopt.*), which implement the same rules.h and must agree bit for bit.
"""

import importlib
import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything below imports triton's kernels

from conftest import expected_backends, missing, require_backend, require_lion  # noqa: E402

try:
    import triton
except ImportError as e:  # a skip where Triton must exist (CI, a GPU) would hide a broken install
    if "triton" in expected_backends():
        raise
    pytest.skip(f"triton is not installed ({e})", allow_module_level=True)
import triton.language as tl  # noqa: E402

import fusedopt.triton as ft  # noqa: E402
from fusedopt.triton import _jit as J  # noqa: E402
from fusedopt.triton import adamw as ft_adamw, launcher, lion as ft_lion, sgd as ft_sgd  # noqa: E402

if launcher.INTERPRET == CUDA:  # pragma: no cover - the kernels were imported in the other mode before us
    raise RuntimeError(f"fusedopt.triton was imported with TRITON_INTERPRET={int(launcher.INTERPRET)} but this "
                       f"machine {'has' if CUDA else 'has no'} CUDA; set TRITON_INTERPRET before importing it")


def Lion(*args, **kwargs):  # the oracle, or a skip (a failure where lion-pytorch is expected)
    return require_lion()(*args, **kwargs)


DEVICE = torch.device("cuda" if CUDA else "cpu")

try:
    importlib.import_module("fusedopt._C")
    HAS_CPU_OPS = True
except ImportError:
    HAS_CPU_OPS = False


@pytest.fixture
def cpu_ops():
    require_backend("cpu")  # skips, or fails where _C must exist (CI, a GPU)


needs_cpu_ops = pytest.mark.usefixtures("cpu_ops")


@pytest.fixture(autouse=True)
def _no_autotuning(monkeypatch):
    """Compiled runs use the default config unless a test turns autotuning on: tuning every kernel variant
    the suite meets (6 configs each) would dominate a GPU run. test_gpu_large_tensors_bitwise_vs_cpu_op and
    test_autotune_benchmarks_only_on_scratch_buffers cover the tuning path."""
    monkeypatch.setattr(launcher, "AUTOTUNE", False)


# Sizes: empty, one element, tiny, odd (one masked block), and a full block plus a one-element tail under the
# interpreter (block 1024). test_many_rows_and_blocks_bitwise shrinks rows and blocks to cross many of both.
SIZES = [(0,), (1,), (3,), (97,), (1025,)]
SIZES_BIG = SIZES + [(3 * 4096 + 5,)]  # several compiled rows (launcher.CHUNK is 4096 compiled); GPU tests
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LOW = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# Problem setup
# ---------------------------------------------------------------------------------------------------------


def make_params(sizes, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).to(device) for s in sizes]


def make_grads(params, step, seed=0):
    """Deterministic grads with ~5% exact zeros (sign(0) for Lion), generated in float32 on the CPU."""
    g = torch.Generator().manual_seed(1_000_003 * seed + step)
    out = []
    for p in params:
        x = torch.randn(p.shape, generator=g) * (torch.rand(p.shape, generator=g) > 0.05)
        out.append(x.to(p.dtype).to(p.device))
    return out


def schedule_table(n, lo, hi, device=DEVICE):
    """A float64 table of n absolute values going from lo to hi and back (shorter than the runs below, so
    that they read it past its end)."""
    t = torch.linspace(0, math.pi, n, dtype=torch.float64)
    return (lo + (hi - lo) * torch.sin(t)).to(device)


def at(table, t):
    return float(table[min(t, table.numel() - 1)])


def normwise_error(actual, expected):
    """max|actual - expected| / max|expected| (as tests/oracles.py): relative to the tensor's scale, so that
    elements passing near zero do not turn one ulp into a huge elementwise ratio."""
    if expected.numel() == 0:
        return 0.0
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_bitwise(actual, expected, what):
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert a.dtype == e.dtype and a.shape == e.shape, what
    same = (a == e) | (a.isnan() & e.isnan()) if a.is_floating_point() else a == e
    bad = (~same).sum().item()
    assert bad == 0, f"{what}: {bad} of {a.numel()} elements differ (first: {a[~same][:3]} vs {e[~same][:3]})"


# ---------------------------------------------------------------------------------------------------------
# Functional runners: hold the states of one rule over several groups and call an implementation of the op
# (ours, or torch.ops.fusedopt.*) with the schedule step a trainer would keep on the device.
# ---------------------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, rule, impl, groups, *, lr_tables=None, mom_tables=None, wd_tables=None, master=False,
                 device=DEVICE):
        self.rule, self.impl, self.groups = rule, impl, groups
        self.lr_tables = lr_tables or [None] * len(groups)
        self.mom_tables = mom_tables or [None] * len(groups)
        self.wd_tables = wd_tables or [None] * len(groups)
        self.schedule_step = torch.zeros((), dtype=torch.int64, device=device)
        self.grad_bufs = None  # grads are copied into fixed buffers, as a trainer's .grad tensors stay put
        self.state = []
        for g in groups:
            ps = g["params"]
            masters = [p.float().clone() for p in ps] if master else []
            sd = torch.float32 if master else (ps[0].dtype if ps else torch.float32)
            z = lambda: [torch.zeros(p.shape, dtype=sd, device=p.device) for p in ps]  # noqa: E731
            st = {"master": masters}
            if rule == "adamw":
                st.update(exp_avgs=z(), exp_avg_sqs=z(), max_exp_avg_sqs=z() if g.get("amsgrad") else [],
                          steps=[torch.zeros((), dtype=torch.int64, device=p.device) for p in ps])
            elif rule == "sgd":
                st.update(bufs=z() if g.get("momentum", 0.0) != 0.0 else [], first=True)
            else:
                st.update(exp_avgs=z())
            self.state.append(st)

    def step(self, grads, *, grad_scale=None, found_inf=None, clip_coef=None, skipped=False):
        if self.grad_bufs is None:
            self.grad_bufs = [[g.clone() for g in gg] for gg in grads]
        else:
            for bufs, gg in zip(self.grad_bufs, grads):
                for b, g in zip(bufs, gg):
                    b.copy_(g)
        grads = self.grad_bufs
        for g, st, grad, lr_t, mom_t, wd_t in zip(self.groups, self.state, grads, self.lr_tables, self.mom_tables,
                                                  self.wd_tables):
            sched = self.schedule_step if any(t is not None for t in (lr_t, mom_t, wd_t)) else None
            if self.rule == "adamw":
                self.impl(g["params"], grad, st["exp_avgs"], st["exp_avg_sqs"], st["max_exp_avg_sqs"],
                          st["steps"], st["master"], g["lr"], g["betas"][0], g["betas"][1], g["eps"],
                          g["weight_decay"], g.get("amsgrad", False), g.get("maximize", False), lr_t, mom_t, sched,
                          grad_scale, found_inf, clip_coef, wd_t, g.get("decoupled_weight_decay", True))
            elif self.rule == "sgd":
                self.impl(g["params"], grad, st["bufs"], st["master"], g["lr"], g.get("momentum", 0.0),
                          g.get("dampening", 0.0), g.get("weight_decay", 0.0), g.get("nesterov", False),
                          g.get("maximize", False), st["first"], lr_t, mom_t, sched, grad_scale, found_inf,
                          clip_coef, wd_t)
                if not skipped:
                    st["first"] = False
            else:
                self.impl(g["params"], grad, st["exp_avgs"], st["master"], g["lr"], g["betas"][0], g["betas"][1],
                          g["weight_decay"], lr_t, mom_t, sched, grad_scale, found_inf, clip_coef, wd_t)
        self.schedule_step += 1  # the trainer's counter; the ops never touch it

    def states(self):
        """(name, tensor) of every state the rule keeps, for comparisons."""
        keys = {"adamw": ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"], "sgd": ["bufs"],
                "lion": ["exp_avgs"]}[self.rule]
        for gi, st in enumerate(self.state):
            for k in keys + ["master"]:
                for i, t in enumerate(st[k]):
                    yield f"group {gi} {k}[{i}]", t


OURS = {"adamw": ft.adamw_, "sgd": ft.sgd_, "lion": ft.lion_}


def cpu_op(rule):
    return getattr(torch.ops.fusedopt, rule + "_")


def split(params, n_groups):
    return [params[i::n_groups] for i in range(n_groups)]


# ---------------------------------------------------------------------------------------------------------
# Runs against torch.optim / lion-pytorch with a schedule: the oracle's group hyperparameters are set from
# the same tables before every step (the value at min(t, len - 1)), which is what our kernels read on device.
# ---------------------------------------------------------------------------------------------------------


def oracle_for(rule, groups):
    if rule == "adamw":  # groups with decoupled_weight_decay=False are torch.optim.Adam's (L2 decay)
        if any(g.get("decoupled_weight_decay", True) is False for g in groups):
            return torch.optim.Adam(groups, foreach=False)
        return torch.optim.AdamW(groups, foreach=False)
    if rule == "sgd":
        return torch.optim.SGD(groups, foreach=False)
    return Lion(groups)


def run_vs_oracle(rule, dtype, group_hparams, steps, *, oracle_dtypes=None, tables=True, seed=0, sizes=SIZES,
                  master=False, device=DEVICE):
    """Runs ours (on `device`) and one oracle per entry of `oracle_dtypes` (on the CPU; default: the params'
    dtype, float32 with master weights) from the same start with the same grads.
    Returns (our runner, our params per group, [oracle params per group, ...], [oracle optimizer, ...])."""
    n = len(group_hparams)
    base = make_params(sizes, dtype, seed, device="cpu")
    oracle_dtypes = oracle_dtypes or [torch.float32 if master else dtype]
    ours_groups, oracle_groups = [], [[] for _ in oracle_dtypes]
    lr_tables, mom_tables = [], []
    for hp, idx in zip(group_hparams, split(list(range(len(base))), n)):
        ours_groups.append(dict(hp, params=[base[i].clone().to(device) for i in idx]))
        for og, odt in zip(oracle_groups, oracle_dtypes):
            og.append(dict(hp, params=[base[i].clone().to(odt).requires_grad_() for i in idx]))
        if tables:
            # tables shorter than the runs: read at every step, then past their end
            lr_tables.append(schedule_table(60, 0.1 * hp["lr"], 2 * hp["lr"], device))
            mom = hp.get("momentum", hp.get("betas", (None,))[0])
            mom_tables.append(None if not mom else schedule_table(45, 0.8 * mom, mom, device))
    runner = Runner(rule, OURS[rule], ours_groups, lr_tables=lr_tables if tables else None,
                    mom_tables=mom_tables if tables else None, master=master, device=device)
    oracles = [oracle_for(rule, groups) for groups in oracle_groups]
    for t in range(steps):
        grads = split_like(make_grads([p for g in ours_groups for p in g["params"]], t, seed), ours_groups)
        for oracle in oracles:
            for og, gg, lr_t, mom_t in zip(oracle.param_groups, grads, lr_tables or [None] * n,
                                           mom_tables or [None] * n):
                if lr_t is not None:
                    og["lr"] = at(lr_t, t)
                if mom_t is not None:
                    if rule == "sgd":
                        og["momentum"] = at(mom_t, t)
                    else:
                        og["betas"] = (at(mom_t, t), og["betas"][1])
                for p, g in zip(og["params"], gg):
                    p.grad = g.detach().cpu().to(p.dtype)
            oracle.step()
        runner.step(grads)
    params = [g["params"] for g in ours_groups]
    return runner, params, [[g["params"] for g in o.param_groups] for o in oracles], oracles


def split_like(flat, groups):
    out, k = [], 0
    for g in groups:
        out.append(flat[k:k + len(g["params"])])
        k += len(g["params"])
    return out


ADAMW_GROUPS = {
    "plain": [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
              dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)],
    "amsgrad_maximize": [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=True,
                              maximize=True),
                         dict(lr=2e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.0, amsgrad=True,
                              maximize=True)],
}
ADAMW_GROUPS["adam_l2"] = [dict(g, decoupled_weight_decay=False, weight_decay=0.05) for g in ADAMW_GROUPS["plain"]]
ADAMW_GROUPS["adam_l2_amsgrad_maximize"] = [dict(g, decoupled_weight_decay=False)
                                            for g in ADAMW_GROUPS["amsgrad_maximize"]]
SGD_GROUPS = {
    "plain": [dict(lr=1e-2), dict(lr=3e-2, weight_decay=1e-2)],
    "momentum": [dict(lr=1e-2, momentum=0.9), dict(lr=5e-3, momentum=0.8, weight_decay=1e-3)],
    "dampening_wd": [dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-2),
                     dict(lr=2e-2, momentum=0.5, dampening=0.5)],
    "nesterov_maximize": [dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True),
                          dict(lr=3e-3, momentum=0.95, nesterov=True, maximize=True)],
}
LION_GROUPS = [dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-2), dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.0)]


def compare_states_adamw(runner, oracle, oracle_params, tol, what):
    for gi, (st, ops) in enumerate(zip(runner.state, oracle_params)):
        for i, q in enumerate(ops):
            s = oracle.state[q]
            assert int(st["steps"][i]) == int(s["step"]), f"{what}: group {gi} step[{i}]"
            assert normwise_error(st["exp_avgs"][i], s["exp_avg"]) <= tol, f"{what}: exp_avg {gi}/{i}"
            assert normwise_error(st["exp_avg_sqs"][i], s["exp_avg_sq"]) <= tol, f"{what}: exp_avg_sq {gi}/{i}"
            if st["max_exp_avg_sqs"]:
                assert normwise_error(st["max_exp_avg_sqs"][i], s["max_exp_avg_sq"]) <= tol, what


# float32 against torch.optim: both round every intermediate to float32 the same way (fused multiply-adds where
# torch's CPU ops fuse) and use the same double-precision scalars rounded to float once (rules.h); what
# remains is torch's CPU sqrt in AdamW's denominator (one ulp off the correctly rounded value for ~20% of
# float32 inputs) and the rare (beta, step) where Python's pow is not correctly rounded. Measured over these
# 100-step runs before the roundings were aligned: <= 1.7e-7 normwise (1-2 ulps of the tensor's scale,
# 2**-23 = 1.2e-7). 1e-6 (8 ulps) leaves room for other seeds and is far below any real error: reading the
# schedule table one step off already moves params by 7e-3 (AdamW) / 3.6e-2 (SGD) here.
F32_TOL = 1e-6
F64_TOL = 1e-12  # the same argument with 2**-52 ulps (measured: ~1e-15)


# ---------------------------------------------------------------------------------------------------------
# Against the oracles
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, variant", [(torch.float32, "plain"), (torch.float32, "amsgrad_maximize"),
                                            (torch.float64, "amsgrad_maximize"), (torch.float32, "adam_l2"),
                                            (torch.float64, "adam_l2_amsgrad_maximize")])
def test_adamw_vs_torch(dtype, variant):
    """AdamW, and torch.optim.Adam (the same kernel with decoupled_weight_decay=False: the adam_* variants)."""
    steps = 100
    runner, ours, (ref,), (oracle,) = run_vs_oracle("adamw", dtype, ADAMW_GROUPS[variant], steps)
    tol = F32_TOL if dtype == torch.float32 else F64_TOL
    for gi, (a, b) in enumerate(zip(ours, ref)):
        for i, (p, q) in enumerate(zip(a, b)):
            err = normwise_error(p, q)
            assert err <= tol, f"group {gi} param {i} {tuple(p.shape)}: normwise error {err:.2e}"
    compare_states_adamw(runner, oracle, ref, tol, f"adamw {variant} {dtype}")


@pytest.mark.parametrize("dtype, variant", [(torch.float32, v) for v in SGD_GROUPS] +
                         [(torch.float64, "nesterov_maximize")])
def test_sgd_vs_torch(dtype, variant):
    steps = 100
    runner, ours, (ref,), (oracle,) = run_vs_oracle("sgd", dtype, SGD_GROUPS[variant], steps)
    tol = F32_TOL if dtype == torch.float32 else F64_TOL
    for gi, (a, b, st) in enumerate(zip(ours, ref, runner.state)):
        for i, (p, q) in enumerate(zip(a, b)):
            assert normwise_error(p, q) <= tol, f"group {gi} param {i}: {normwise_error(p, q):.2e}"
            if st["bufs"]:
                buf = oracle.state[q]["momentum_buffer"]
                assert normwise_error(st["bufs"][i], buf) <= tol, f"group {gi} momentum_buffer {i}"


def check_lion(ours, ref, group_hparams, tol, what):
    """Lion's update is lr * sign(blended): the blend is one fused multiply-add in lion-pytorch (torch's CPU
    add(alpha=)) and in our rules, so both agree to the bit; where a blend is within an ulp of zero any other
    rounding (a GPU run, the master copy of a low-precision param) can give a different sign, and that
    element's param then differs by lr or 2 lr and keeps the offset (params do not feed back into Lion's
    momentum). Such near-ties are rare with Gaussian grads, so: count the elements that differ beyond
    rounding and bound the count (1% of the elements, at least 1), and bound how far a differing element may
    be off (a few flips' worth of lr)."""
    total = differing = 0
    for gi, (a, b, hp) in enumerate(zip(ours, ref, group_hparams)):
        for i, (p, q) in enumerate(zip(a, b)):
            if p.numel() == 0:
                continue
            diff = (p.detach().cpu().double() - q.detach().cpu().double()).abs()
            bad = diff > tol * q.detach().double().abs().max().clamp_min(1.0)
            differing += int(bad.sum())
            total += p.numel()
            assert diff.max().item() <= 4 * 2 * hp["lr"] + tol, f"{what}: group {gi} param {i}"
    assert differing <= max(1, total // 100), f"{what}: {differing} of {total} params differ from lion-pytorch"
    return differing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lion_vs_lion_pytorch(dtype):
    steps = 100
    runner, ours, (ref,), (oracle,) = run_vs_oracle("lion", dtype, LION_GROUPS, steps)
    tol = F32_TOL if dtype == torch.float32 else F64_TOL
    check_lion(ours, ref, LION_GROUPS, tol, f"lion {dtype}")
    for st, qs in zip(runner.state, ref):  # the momentum never depends on a sign: rounding only
        for m, q in zip(st["exp_avgs"], qs):
            assert normwise_error(m, oracle.state[q]["exp_avg"]) <= tol


# bfloat16 / float16 params without master weights (and with them): tests/test_low_precision.py runs these
# kernels step by step against a float64 oracle fed each step's inputs.


# Master weights: bf16 / fp16 params with float32 master copies and float32 states. The master copy follows
# the float32 oracle run from the same (16-bit) start with the same grads, and the param is the master rounded
# to nearest-even.
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("dtype", LOW)
def test_master_weights_vs_float32_oracle(rule, dtype):
    steps = 60
    hparams = {"adamw": ADAMW_GROUPS["amsgrad_maximize"], "sgd": SGD_GROUPS["dampening_wd"],
               "lion": LION_GROUPS}[rule]
    runner, ours, (ref,), _ = run_vs_oracle(rule, dtype, hparams, steps, master=True)
    masters = [st["master"] for st in runner.state]
    for gi, (ps, ms) in enumerate(zip(ours, masters)):
        for p, m in zip(ps, ms):
            assert p.dtype == dtype and m.dtype == torch.float32
            assert_bitwise(p, m.to(dtype), f"group {gi}: param == master rounded")
    for _, t in runner.states():
        assert t.dtype in (torch.float32, torch.int64)
    if rule == "lion":
        check_lion(masters, ref, hparams, F32_TOL, f"lion master {dtype}")
    else:
        for gi, (ms, qs) in enumerate(zip(masters, ref)):
            for i, (m, q) in enumerate(zip(ms, qs)):
                assert normwise_error(m, q) <= F32_TOL, f"{rule} group {gi} master {i}: {normwise_error(m, q):.2e}"


# ---------------------------------------------------------------------------------------------------------
# Against the C++ CPU ops: the same rules.h, so every dtype must agree bit for bit, with every feature on
# (schedule tables read past their end, AMP scale, clip coefficient, skipped steps, per-tensor step counts,
# master weights).
# ---------------------------------------------------------------------------------------------------------

CPU_OP_GROUPS = {
    "adamw": [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=True),
              dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)],
    "sgd": [dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-2, maximize=True),
            dict(lr=2e-2, momentum=0.9, nesterov=True), dict(lr=1e-2)],
    "lion": LION_GROUPS,
}


def run_pair_vs_cpu_op(rule, dtype, steps, *, master=False, sizes=SIZES, skip_steps=(3, 7), seed=1,
                       device=DEVICE, groups=None, wd_tables=False):
    """wd_tables: every group also gets a weight-decay table (absolute values, shorter than the run)."""
    groups = groups or CPU_OP_GROUPS[rule]
    base = make_params(sizes, dtype, seed, device="cpu")
    idx = split(list(range(len(base))), len(groups))
    runners = []
    for impl, dev in ((OURS[rule], device), (cpu_op(rule), torch.device("cpu"))):
        gs = [dict(hp, params=[base[i].clone().to(dev) for i in ix]) for hp, ix in zip(groups, idx)]
        lr_t = [schedule_table(7, 0.5 * hp["lr"], 2 * hp["lr"], dev) for hp in groups]
        mom_t = [None if not hp.get("momentum", hp.get("betas", (0,))[0]) else
                 schedule_table(5, 0.8, 0.9, dev) for hp in groups]
        wd_t = [schedule_table(6, 0.0, 0.2, dev) for _ in groups] if wd_tables else None
        r = Runner(rule, impl, gs, lr_tables=lr_t, mom_tables=mom_t, wd_tables=wd_t, master=master, device=dev)
        if rule == "adamw":  # per-tensor step counts that differ (params added at different times)
            for st in r.state:
                for k, s in enumerate(st["steps"]):
                    s.fill_(5 * k)
        runners.append(r)
    scale = 1024.0
    controls = [(torch.full((1,), scale, device=r.schedule_step.device),
                 torch.zeros(1, device=r.schedule_step.device),
                 torch.full((1,), 0.7, device=r.schedule_step.device)) for r in runners]
    for t in range(steps):
        grads = make_grads([p for g in runners[1].groups for p in g["params"]], t, seed)
        skipped = t in skip_steps
        for r, (gscale, found_inf, clip) in zip(runners, controls):
            found_inf.fill_(1.0 if skipped else 0.0)
            scaled = [(g.float() * scale).to(g.dtype).to(r.schedule_step.device) for g in grads]
            r.step(split_like(scaled, r.groups), grad_scale=gscale, found_inf=found_inf, clip_coef=clip,
                   skipped=skipped)
    return runners


@needs_cpu_ops
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bitwise_equal_to_cpu_op(rule, dtype):
    ours, ref = run_pair_vs_cpu_op(rule, dtype, 16, master=dtype in LOW and rule != "sgd")
    for g_ours, g_ref in zip(ours.groups, ref.groups):
        for p, q in zip(g_ours["params"], g_ref["params"]):
            assert_bitwise(p, q, f"{rule} {dtype} param")
    for (name, a), (_, b) in zip(ours.states(), ref.states()):
        assert_bitwise(a, b, f"{rule} {dtype} {name}")


# torch.optim.Adam's L2 decay: the same kernel with decoupled_weight_decay=False
ADAM_L2_GROUPS = [dict(g, decoupled_weight_decay=False) for g in CPU_OP_GROUPS["adamw"]]


@needs_cpu_ops
@pytest.mark.parametrize("rule,variant", [("adamw", "decoupled"), ("adamw", "l2"), ("sgd", ""), ("lion", "")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weight_decay_table_and_l2_bitwise_equal_to_cpu_op(rule, variant, dtype):
    """weight_decay_table (read at the schedule step, past its end too) and Adam's L2 mode, with every other
    control on: bit-equal to the CPU op."""
    groups = ADAM_L2_GROUPS if variant == "l2" else None
    ours, ref = run_pair_vs_cpu_op(rule, dtype, 9, master=dtype in LOW, groups=groups, wd_tables=True)
    for g_ours, g_ref in zip(ours.groups, ref.groups):
        for p, q in zip(g_ours["params"], g_ref["params"]):
            assert_bitwise(p, q, f"{rule} {variant} {dtype} param")
    for (name, a), (_, b) in zip(ours.states(), ref.states()):
        assert_bitwise(a, b, f"{rule} {variant} {dtype} {name}")


@needs_cpu_ops
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_many_rows_and_blocks_bitwise(rule, monkeypatch):
    """Rows of 64 elements and blocks of 16 (interpreted) so that every tensor spans several rows, rows hold
    several full blocks and tails of every length show up; still bit-equal to the CPU op."""
    monkeypatch.setattr(launcher, "CHUNK", 64)
    monkeypatch.setattr(launcher, "INTERPRET_BLOCK", 16)
    sizes = [(0,), (1,), (63,), (64,), (65,), (129,), (7, 30)]
    ours, ref = run_pair_vs_cpu_op(rule, torch.float32, 5, sizes=sizes, skip_steps=(2,))
    assert ours.groups[0]["params"]  # non-trivial
    for g_ours, g_ref in zip(ours.groups, ref.groups):
        for p, q in zip(g_ours["params"], g_ref["params"]):
            assert_bitwise(p, q, f"{rule} param")
    for (name, a), (_, b) in zip(ours.states(), ref.states()):
        assert_bitwise(a, b, f"{rule} {name}")


@needs_cpu_ops
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_unaligned_views_bitwise(rule):
    """Params, grads and states that are views at odd element offsets of larger buffers: addresses are not
    16-byte aligned, so the kernel runs without the alignment hint (ALIGNED=False)."""
    sizes = [(5,), (97,), (300,)]

    def views(dtype, device, fill=None):
        out, buf = [], torch.zeros(1 + sum(math.prod(s) + 1 for s in sizes), dtype=dtype, device=device)
        off = 1
        for s in sizes:
            n = math.prod(s)
            out.append(buf[off:off + n].view(s))
            off += n + 1
        return out

    results, aligned = [], []
    for impl, dev in ((OURS[rule], DEVICE), (cpu_op(rule), torch.device("cpu"))):
        params = views(torch.float32, dev)
        for p, src in zip(params, make_params(sizes, torch.float32, 3, device="cpu")):
            p.copy_(src)
        s0, s1, s2 = views(torch.float32, dev), views(torch.float32, dev), views(torch.float32, dev)
        steps = [torch.zeros((), dtype=torch.int64, device=dev) for _ in sizes]
        for t in range(4):
            grads = views(torch.float32, dev)
            for g, src in zip(grads, make_grads(params, t, 3)):
                g.copy_(src)
            if rule == "adamw":
                impl(params, grads, s0, s1, s2, steps, [], 1e-2, 0.9, 0.999, 1e-8, 0.01, True, False,
                     None, None, None, None, None, None)
            elif rule == "sgd":
                impl(params, grads, s0, [], 1e-2, 0.9, 0.0, 0.01, True, False, t == 0,
                     None, None, None, None, None, None)
            else:
                impl(params, grads, s0, [], 1e-3, 0.9, 0.99, 0.01, None, None, None, None, None, None)
        results.append(params + s0 + s1 + s2 + steps)
        if impl is OURS[rule]:
            layout = next(reversed(launcher._LAYOUTS.values()))
            aligned.append(layout.aligned and next(reversed(layout.grad_vectors.values())).aligned)
    assert aligned == [False]
    for a, b in zip(*results):
        assert_bitwise(a, b, rule)


# ---------------------------------------------------------------------------------------------------------
# found_inf, grad_scale, clip_coef
# ---------------------------------------------------------------------------------------------------------


def _snapshot(runner):
    return [t.clone() for g in runner.groups for t in g["params"]] + [t.clone() for _, t in runner.states()]


@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("value", [1.0, float("inf"), float("nan")])
def test_found_inf_skips_everything(rule, value):
    groups = [dict(CPU_OP_GROUPS[rule][0], params=make_params(SIZES, torch.float32, 4))]
    runner = Runner(rule, OURS[rule], groups, master=False)
    runner.step([make_grads(groups[0]["params"], 0, 4)])  # create SGD buffers, advance AdamW steps
    before = _snapshot(runner)
    found_inf = torch.full((1,), value, device=DEVICE)
    runner.step([make_grads(groups[0]["params"], 1, 4)], found_inf=found_inf, skipped=True)
    for a, b in zip(before, _snapshot(runner)):
        assert_bitwise(b, a, f"{rule}: found_inf={value} must leave everything unchanged")
    found_inf.zero_()
    runner.step([make_grads(groups[0]["params"], 1, 4)], found_inf=found_inf)
    changed = sum(int((a != b).any()) for a, b in zip(before, _snapshot(runner)))
    assert changed > 0, "found_inf=0 must update"
    if rule == "adamw":
        assert [int(s) for s in runner.state[0]["steps"]] == [2] * len(SIZES)


@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_grad_scale_and_clip_equal_unscaling_the_grads(rule):
    """grad_scale and clip_coef must act exactly like GradScaler.unscale_ (multiply by the float32 reciprocal
    of the scale, computed in double) followed by clip_grad_norm_ (multiply by the coefficient)."""
    scale, clip = 3.0, 0.37  # 1/3 is inexact: float32(1/3.0) must be what multiplies
    runs = []
    for use_controls in (True, False):
        groups = [dict(CPU_OP_GROUPS[rule][0], params=make_params(SIZES, torch.float32, 5))]
        runner = Runner(rule, OURS[rule], groups)
        gs = torch.full((1,), scale, device=DEVICE)
        cc = torch.full((1,), clip, device=DEVICE)
        inv = torch.tensor(scale, dtype=torch.float64).reciprocal().float().to(DEVICE)  # GradScaler's inv_scale
        for t in range(6):
            grads = [g * scale for g in make_grads(groups[0]["params"], t, 5)]
            if use_controls:
                runner.step([grads], grad_scale=gs, clip_coef=cc)
            else:
                runner.step([[(g * inv) * cc for g in grads]])
        runs.append(_snapshot(runner))
    for a, b in zip(*runs):
        assert_bitwise(a, b, rule)


@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_real_grad_scaler_and_clip_grad_norm(rule):
    """grad_scale and clip_coef against torch's own code instead of (g * inv) * coef: the oracle steps with a
    real torch.amp.GradScaler (scale, unscale_, step, update; the scale doubles every 2 steps) and
    clip_grad_norm_ in between; our kernel gets the scaled grads with the scale and the coefficient
    clip_grad_norm_ applied. The grads grow over the steps, so some steps are clipped and some are not."""
    from oracles import torch_amp_clip_step

    hp = CPU_OP_GROUPS[rule][0]
    groups = [dict(hp, params=make_params(SIZES, torch.float32, 5))]
    ref = [p.detach().cpu().clone().requires_grad_() for p in groups[0]["params"]]
    oracle = oracle_for(rule, [dict(hp, params=ref)])
    runner = Runner(rule, OURS[rule], groups)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    clipped = []
    for t in range(6):
        grads = [g.cpu() * (0.5 + 0.3 * t) for g in make_grads(groups[0]["params"], t, 5)]
        scaled, scale, coef, total = torch_amp_clip_step(scaler, oracle, ref, grads, max_norm=25.0)
        clipped.append(total > 25.0)
        runner.step([[x.to(DEVICE) for x in scaled]], grad_scale=scale.to(DEVICE), clip_coef=coef.to(DEVICE))
    assert any(clipped) and not all(clipped), clipped
    assert scaler.get_scale() == 2.0 ** 13
    if rule == "lion":
        check_lion([groups[0]["params"]], [ref], [hp], F32_TOL, "lion with GradScaler and clip_grad_norm_")
    else:
        for i, (p, q) in enumerate(zip(groups[0]["params"], ref)):
            assert normwise_error(p, q) <= F32_TOL, f"{rule} param {i}: {normwise_error(p, q):.2e}"


# ---------------------------------------------------------------------------------------------------------
# The fused multiply-add of the rules (_jit.fma): one rounding, compiled and interpreted
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0)
    b = tl.load(b_ptr + offs, mask=mask, other=0)
    c = tl.load(c_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, J.fma(a, b, c), mask=mask)


def _correctly_rounded(q, dtype):
    """The Fraction q rounded to nearest (ties to even) in float32 / float64."""
    import numpy as np

    if dtype == torch.float64:
        return float(q)  # Fraction.__float__ rounds correctly
    near = np.float32(float(q))  # may be off by the double rounding; pick the nearest neighbour exactly
    cands = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
    return float(min(cands, key=lambda c: (abs(Fraction(float(c)) - q), int(np.float32(c).view(np.int32)) & 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fma_rounds_once(dtype):
    """J.fma(a, b, c) == a * b + c rounded once, checked against exact rational arithmetic, on inputs where
    rounding a * b first changes the result: random values, near-cancellations (c ~ -a * b, where the
    product's rounding error is the whole result) and mixed magnitudes. (Under the interpreter, whose tl.fma
    rounds twice, this tests the exact emulation.)"""
    gen = torch.Generator().manual_seed(0)
    n = 3000
    a = torch.randn(n, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    c = torch.randn(n, generator=gen, dtype=torch.float64)
    a, b = a.to(dtype), b.to(dtype)
    third = n // 3
    c[:third] = -(a[:third].double() * b[:third].double()) * (1 + 1e-7 * torch.randn(third, generator=gen,
                                                                                       dtype=torch.float64))
    c[third:2 * third] *= 1e-6
    c = c.to(dtype)
    out = torch.empty_like(a)
    dev = [t.to(DEVICE) for t in (a, b, c, out)]
    _fma_kernel[(triton.cdiv(n, 1024),)](*dev, n, BLOCK=1024)
    got = dev[3].cpu().tolist()
    want = [_correctly_rounded(Fraction(x) * Fraction(y) + Fraction(z), dtype)
            for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, f"{len(bad)} of {n} differ; first: index {bad[0]}: {got[bad[0]]!r} vs {want[bad[0]]!r}"
    twice = (a * b + c).tolist()  # two roundings: these inputs must tell the two apart
    assert sum(t != w for t, w in zip(twice, want)) > n // 10


# ---------------------------------------------------------------------------------------------------------
# AdamW step counts, the work table and its cache, argument checks
# ---------------------------------------------------------------------------------------------------------


def test_adamw_steps_increment_once_per_call_and_per_tensor():
    params = make_params([(1025,), (0,), (3,), (1025,)], torch.float32, 6)
    st = [torch.full((), v, dtype=torch.int64, device=DEVICE) for v in (0, 7, 41, 1000)]
    z = [torch.zeros_like(p) for p in params]
    z2 = [torch.zeros_like(p) for p in params]
    for _ in range(3):
        ft.adamw_(params, make_grads(params, 0), z, z2, [], st, [], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False,
                  None, None, None, None, None, None)
    assert [int(s) for s in st] == [3, 10, 44, 1003]


def test_adamw_all_empty_tensors_still_count_steps():
    params = [torch.zeros(0, device=DEVICE), torch.zeros(2, 0, device=DEVICE)]
    st = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in params]
    z = [torch.zeros_like(p) for p in params]
    ft.adamw_(params, [torch.zeros_like(p) for p in params], z, z, [], st, [], 1e-3, 0.9, 0.999, 1e-8, 0.0,
              False, False, None, None, None, None, None, None)
    assert [int(s) for s in st] == [1, 1]
    # and found_inf still stops them
    ft.adamw_(params, [torch.zeros_like(p) for p in params], z, z, [], st, [], 1e-3, 0.9, 0.999, 1e-8, 0.0,
              False, False, None, None, None, None, torch.ones(1, device=DEVICE), None)
    assert [int(s) for s in st] == [1, 1]


def test_empty_param_list_is_a_no_op(monkeypatch):
    """No params: nothing is launched, no work table is built, the controls are not touched (a found_inf of 1
    and a schedule counter stay as they are), and no error."""
    launched = []
    monkeypatch.setattr(launcher, "launch", lambda *args, **kw: launched.append(args))
    plans_before = list(launcher._LAYOUTS.values())
    found_inf = torch.ones(1, device=DEVICE)
    counter = torch.full((), 3, dtype=torch.int64, device=DEVICE)
    table = torch.ones(4, dtype=torch.float64, device=DEVICE)
    assert ft.adamw_([], [], [], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, table, None, counter,
                     None, found_inf, None) is None
    assert ft.sgd_([], [], [], [], 1e-3, 0.0, 0.0, 0.0, False, False, True, table, None, counter, None, found_inf,
                   None) is None
    assert ft.lion_([], [], [], [], 1e-3, 0.9, 0.99, 0.0, table, None, counter, None, found_inf, None) is None
    assert launched == []
    assert list(launcher._LAYOUTS.values()) == plans_before
    assert float(found_inf) == 1.0 and int(counter) == 3


class _LaunchCounter:
    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _plan_of(params, grads, bufs):
    return launcher.get_plan("fusedopt::sgd_", {launcher.F_PARAM: params, launcher.F_STATE0: bufs}, None, grads,
                             lambda: None)


def test_one_launch_per_call_and_cached_work_table(monkeypatch):
    counter = _LaunchCounter(ft_sgd.sgd_kernel)
    monkeypatch.setattr(ft_sgd, "sgd_kernel", counter)
    monkeypatch.setattr(launcher, "AUTOTUNE", False)  # a GPU run counts launches of the kernel itself
    params = make_params(SIZES, torch.float32, 7)
    bufs = [torch.zeros_like(p) for p in params]
    grads = make_grads(params, 0)

    def call(grads):
        ft.sgd_(params, grads, bufs, [], 1e-2, 0.9, 0.0, 0.0, False, False, False, None, None, None, None,
                None, None)

    call(grads)
    layout, vector = _plan_of(params, grads, bufs)
    n_rows = sum(-(-p.numel() // launcher.CHUNK) for p in params)
    assert counter.grids == [(n_rows,)] and layout.n_rows == n_rows
    call(grads)
    assert len(counter.grids) == 2
    again = _plan_of(params, grads, bufs)
    assert again[0] is layout and again[1] is vector  # same tensors: the cached tables, nothing rebuilt or copied
    # the rows: param and state addresses offset to each row's first element, the tensor's index, the row's
    # byte offset in the grad and its element count; the grad vector: each grad's address
    rows = layout.rows.cpu()
    assert vector.addrs.cpu().tolist() == [g.data_ptr() for g in grads]
    r = 0
    for i, (p, b) in enumerate(zip(params, bufs)):
        for start in range(0, p.numel(), launcher.CHUNK):
            n = min(launcher.CHUNK, p.numel() - start)
            assert rows[r, launcher.F_PARAM] == p.data_ptr() + 4 * start
            assert rows[r, launcher.F_STATE0] == b.data_ptr() + 4 * start
            assert rows[r, launcher.F_TENSOR] == i and rows[r, launcher.F_GRAD_OFFSET] == 4 * start
            assert rows[r, launcher.F_NUMEL] == n
            r += 1
    # new grad tensors (zero_grad(set_to_none=True) + backward): the same table, a new grad vector, and the
    # update reads the new grads
    grads2 = [g.clone() * 2 for g in grads]
    expected = [p.cpu().clone() for p in params]
    expected_bufs = [b.cpu().clone() for b in bufs]
    if HAS_CPU_OPS:
        torch.ops.fusedopt.sgd_(expected, [g.cpu() for g in grads2], expected_bufs, [], 1e-2, 0.9, 0.0, 0.0, False,
                                False, False, None, None, None, None, None, None)
    call(grads2)
    other = _plan_of(params, grads2, bufs)
    assert other[0] is layout and other[1] is not vector and len(counter.grids) == 3
    if HAS_CPU_OPS:
        for p, q in zip(params, expected):
            assert_bitwise(p, q, "the update after the grads moved")


def test_plan_cache_is_bounded_and_keeps_captured_tables(monkeypatch):
    monkeypatch.setattr(launcher, "_LAYOUTS", type(launcher._LAYOUTS)())
    tensors = [[torch.zeros(5 + k, device=DEVICE)] for k in range(4)]

    def plan(t):
        return launcher.get_plan("test::cache", {launcher.F_PARAM: t}, None, t, lambda: None)

    first = plan(tensors[0])
    one_entry = launcher.cache_bytes()
    monkeypatch.setattr(launcher, "MAX_CACHE_BYTES", 2 * one_entry)
    first[0].captured = first[1].captured = True  # as get_plan marks a table used while a graph is captured
    plans = [first] + [plan(t) for t in tensors[1:]]
    cached = list(launcher._LAYOUTS.values())
    assert plans[0][0] in cached and plans[3][0] in cached and len(cached) == 2
    assert launcher.cache_bytes() <= 2 * one_entry
    launcher.clear_caches()
    assert list(launcher._LAYOUTS.values()) == [plans[0][0]]


@needs_cpu_ops
def test_grad_vectors_stay_bounded_when_grads_move_every_step(monkeypatch):
    """Grads reallocated at every step (zero_grad(set_to_none=True) with activations of varying size): one
    layout, at most MAX_GRAD_VECTORS grad vectors, whatever the number of steps, and every step bit-equal to
    the CPU op."""
    monkeypatch.setattr(launcher, "_LAYOUTS", type(launcher._LAYOUTS)())
    params = make_params([(3,), (40,)], torch.float32, 21)
    ref = [p.cpu().clone() for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    rm, rv = [torch.zeros_like(p) for p in ref], [torch.zeros_like(p) for p in ref]
    steps = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in params]
    rsteps = [torch.zeros((), dtype=torch.int64) for _ in params]
    held, addresses = [], set()
    for t in range(3 * launcher.MAX_GRAD_VECTORS):
        held.append(torch.empty(t * 7 + 1, device=DEVICE))  # shifts where the next grads land
        grads = make_grads(params, t, 21)
        addresses.add(tuple(g.data_ptr() for g in grads))
        ft.adamw_(params, grads, m, v, [], steps, [], 1e-2, 0.9, 0.999, 1e-8, 0.1, False, False, None, None, None,
                  None, None, None)
        torch.ops.fusedopt.adamw_(ref, [g.cpu() for g in grads], rm, rv, [], rsteps, [], 1e-2, 0.9, 0.999, 1e-8,
                                  0.1, False, False, None, None, None, None, None, None)
    assert len(addresses) > launcher.MAX_GRAD_VECTORS  # the grads did move
    assert len(launcher._LAYOUTS) == 1
    layout = next(iter(launcher._LAYOUTS.values()))
    assert len(layout.grad_vectors) == launcher.MAX_GRAD_VECTORS
    for p, q in zip(params + m + v + steps, ref + rm + rv + rsteps):
        assert_bitwise(p, q, "moving grads")


@needs_cpu_ops
@pytest.mark.parametrize("case", ["grads_len", "state_dtype", "shape", "strides", "table_without_step",
                                  "table_dtype", "found_inf_dtype", "steps_dtype", "mixed_params",
                                  "wd_table_without_step", "wd_table_dtype", "wd_table_shape", "wd_table_empty",
                                  "wd_table_strided"])
def test_bad_arguments_raise_like_the_cpu_op(case):
    """The same checks as op_args.h, with the same messages (compared against the CPU op on CPU tensors)."""

    def args(dev):
        params = make_params([(3,), (4, 5)], torch.float32, 8, device=dev)
        a = dict(params=params, grads=[torch.zeros_like(p) for p in params],
                 exp_avgs=[torch.zeros_like(p) for p in params], exp_avg_sqs=[torch.zeros_like(p) for p in params],
                 steps=[torch.zeros((), dtype=torch.int64, device=dev) for _ in params], lr_table=None,
                 schedule_step=None, found_inf=None, wd_table=None)
        step = torch.zeros((), dtype=torch.int64, device=dev)
        if case == "grads_len":
            a["grads"] = a["grads"][:1]
        elif case == "state_dtype":
            a["exp_avgs"][1] = a["exp_avgs"][1].double()
        elif case == "shape":
            a["exp_avg_sqs"][1] = torch.zeros(5, 4, device=dev)
        elif case == "strides":
            a["grads"][1] = torch.zeros(5, 4, device=dev).t()
        elif case == "table_without_step":
            a["lr_table"] = torch.ones(3, dtype=torch.float64, device=dev)
        elif case == "table_dtype":
            a["lr_table"] = torch.ones(3, device=dev)
            a["schedule_step"] = torch.zeros((), dtype=torch.int64, device=dev)
        elif case == "found_inf_dtype":
            a["found_inf"] = torch.zeros(1, dtype=torch.float64, device=dev)
        elif case == "steps_dtype":
            a["steps"][0] = torch.zeros((), device=dev)
        elif case == "mixed_params":
            a["params"][1] = a["params"][1].double()
        elif case == "wd_table_without_step":
            a["wd_table"] = torch.ones(3, dtype=torch.float64, device=dev)
        elif case == "wd_table_dtype":
            a["wd_table"], a["schedule_step"] = torch.ones(3, device=dev), step
        elif case == "wd_table_shape":
            a["wd_table"], a["schedule_step"] = torch.ones(2, 3, dtype=torch.float64, device=dev), step
        elif case == "wd_table_empty":
            a["wd_table"], a["schedule_step"] = torch.ones(0, dtype=torch.float64, device=dev), step
        elif case == "wd_table_strided":
            a["wd_table"], a["schedule_step"] = torch.ones(6, dtype=torch.float64, device=dev)[::2], step
        return a

    def call(impl, a):
        impl(a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], [], a["steps"], [], 1e-3, 0.9, 0.999,
             1e-8, 0.0, False, False, a["lr_table"], None, a["schedule_step"], None, a["found_inf"], None,
             weight_decay_table=a["wd_table"])

    with pytest.raises(RuntimeError) as expected:
        call(torch.ops.fusedopt.adamw_, args("cpu"))
    with pytest.raises(RuntimeError) as ours:
        call(ft.adamw_, args(DEVICE))
    # the C++ message, minus TORCH_CHECK's trailer and the device names
    want = str(expected.value).splitlines()[0].replace("cpu", "")
    got = str(ours.value).splitlines()[0].replace(str(DEVICE), "").replace("cpu", "")
    assert got == want


@needs_cpu_ops
@pytest.mark.parametrize("case", ["absmaxes_len", "absmax_short", "absmax_dtype", "mixed_state_dtypes",
                                  "state_dtype", "rounding_len", "rounding_without_step", "rounding_step_dtype",
                                  "half_params_8bit"])
def test_small_state_bad_arguments_raise_like_the_cpu_op(case):
    """The small-state checks (op_args.h check_small_states / check_rounding, state_io.h's dtype rule) with the
    C++ messages, before anything is modified."""

    def args(dev):
        dtype = torch.float16 if case == "half_params_8bit" else torch.float32
        params = make_params([(300,), (4, 5)], dtype, 8, device=dev)
        codes = [torch.full(p.shape, 127, dtype=torch.uint8, device=dev) for p in params]
        a = dict(params=params, grads=[torch.zeros_like(p) for p in params], exp_avgs=codes,
                 exp_avg_sqs=[torch.zeros_like(c) for c in codes],
                 absmaxes=[torch.zeros(2, device=dev), torch.zeros(1, device=dev)] * 2 + [torch.empty(0, device=dev)] * 2,
                 steps=[torch.zeros((), dtype=torch.int64, device=dev) for _ in params], rounding=[],
                 rounding_step=None)
        if case == "absmaxes_len":
            a["absmaxes"] = a["absmaxes"][:4]
        elif case == "absmax_short":
            a["absmaxes"][0] = torch.zeros(1, device=dev)
        elif case == "absmax_dtype":
            a["absmaxes"][1] = torch.zeros(1, dtype=torch.float64, device=dev)
        elif case == "mixed_state_dtypes":
            a["exp_avg_sqs"][1] = torch.zeros(4, 5, device=dev)
        elif case == "state_dtype":
            a["exp_avgs"][0] = torch.zeros(300, dtype=torch.int32, device=dev)
        elif case == "rounding_len":
            a["rounding"], a["rounding_step"] = [7, 0, 0], torch.zeros((), dtype=torch.int64, device=dev)
        elif case == "rounding_without_step":
            a["rounding"] = [7, 0, 0, 1, 0]
        elif case == "rounding_step_dtype":
            a["rounding"], a["rounding_step"] = [7, 0, 0, 1, 0], torch.zeros((), device=dev)
        return a

    def call(impl, a):
        impl(a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], [], a["steps"], [], 1e-3, 0.9, 0.999,
             1e-8, 0.0, False, False, None, None, None, None, None, None, state_absmaxes=a["absmaxes"],
             rounding=a["rounding"], rounding_step=a["rounding_step"])

    with pytest.raises(RuntimeError) as expected:
        call(torch.ops.fusedopt.adamw_, args("cpu"))
    a = args(DEVICE)
    before = [t.clone() for t in a["params"] + a["exp_avgs"] + a["exp_avg_sqs"] + a["absmaxes"] + a["steps"]]
    with pytest.raises(RuntimeError) as ours:
        call(ft.adamw_, a)
    want = str(expected.value).splitlines()[0].replace("cpu", "")
    got = str(ours.value).splitlines()[0].replace(str(DEVICE), "").replace("cpu", "")
    assert got == want
    for t, b in zip(a["params"] + a["exp_avgs"] + a["exp_avg_sqs"] + a["absmaxes"] + a["steps"], before):
        assert_bitwise(t, b, "nothing modified")


@needs_cpu_ops
def test_one_entry_table_without_a_counter_is_a_tensor_lr():
    """step() passes a tensor lr as a one-entry lr table with no schedule_step: read at entry 0, bitwise as the
    CPU op reads it, and as the same lr given as a number."""
    def run(impl, dev, as_table=True):
        params = make_params([(3,), (4, 5), (1030,)], torch.float32, 8, device=dev)
        grads = make_params([(3,), (4, 5), (1030,)], torch.float32, 9, device=dev)
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), dtype=torch.int64, device=dev) for _ in params]
        lr_table = torch.tensor([3e-3], dtype=torch.float64, device=dev) if as_table else None
        for _ in range(3):
            impl(params, grads, m, v, [], steps, [], 99.0 if as_table else 3e-3, 0.9, 0.999, 1e-8, 0.1, False, False, lr_table, None,
                 None, None, None, None)
        return [p.cpu() for p in params]

    number = run(torch.ops.fusedopt.adamw_, "cpu", as_table=False)
    for ours, expected, plain in zip(run(ft.adamw_, DEVICE), run(torch.ops.fusedopt.adamw_, "cpu"), number):
        assert torch.equal(ours, expected) and torch.equal(expected, plain)


def test_is_available(monkeypatch):
    if CUDA:
        assert ft.is_available() == (True, "")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ft.is_available() == (True, "")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = ft.is_available()
    assert not ok and "TRITON_INTERPRET=1" in why and "CUDA" in why


@pytest.mark.gpu
def test_wrong_device_for_the_mode_is_an_error():
    p = [torch.zeros(3)]  # compiled kernels refuse CPU tensors
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        ft.lion_(p, p, p, [], 1e-3, 0.9, 0.99, 0.0, None, None, None, None, None, None)


def test_autotune_benchmarks_only_on_scratch_buffers():
    """The GPU launch path's tuning step, driven here through triton.autotune (under the interpreter when
    there is no GPU, with a stand-in for the timer): the benchmark runs every config, on scratch buffers only
    (the pre-hook guard refuses anything else), leaves the caller's tensors untouched, and the real launch
    then runs once with the cached config."""
    runs = []

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        runs.append(1)
        return [float(len(runs)), 0.0, 0.0]  # the first config "wins"

    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 256}), triton.Config({"BLOCK": 512})],
                            key=launcher.TUNE_KEY + ["AMSGRAD", "DECOUPLED"], pre_hook=launcher.tuning_guard,
                            do_bench=fake_bench)(ft_adamw.adamw_kernel)
    params = make_params([(3,), (1025,)], torch.float32, 15)
    grads = make_grads(params, 0, 15)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in params]
    found_inf = torch.ones(1, device=DEVICE)  # set: a tuning run on live data would not even show otherwise
    plan = launcher.get_plan("test::adamw", {launcher.F_PARAM: params, launcher.F_STATE0: m, launcher.F_STATE1: v},
                             steps, grads, lambda: None)
    ctrl = launcher.controls("test", DEVICE, None, None, None, None, found_inf, None)
    scalars = (1e-2, 0.9, 0.999, 1e-8, 0.0)
    meta = launcher.kernel_meta(*plan, dict(launcher.common_meta(params, []), AMSGRAD=False, MAXIMIZE=False,
                                            DECOUPLED=True))
    before = [t.clone() for t in params + m + v + steps]
    with pytest.raises(Exception, match="benchmark on live tensors"):  # no tuning on a caller's tensors
        tuned[(plan[0].n_rows,)](*launcher.kernel_args(*plan, ctrl, scalars), **meta)
    runs.clear()
    launcher._tune(tuned, *plan, ctrl, scalars, meta)
    assert len(runs) == 2  # both configs benchmarked
    for a, b in zip(before, params + m + v + steps):
        assert_bitwise(b, a, "tuning must not touch the caller's tensors")
    found_inf.zero_()
    tuned[(plan[0].n_rows,)](*launcher.kernel_args(*plan, ctrl, scalars), **meta)  # cached: no benchmark
    assert len(runs) == 2 and [int(s) for s in steps] == [1, 1]
    ref = [p.clone() for p in before[:2]]
    ft.adamw_(ref, grads, [torch.zeros_like(p) for p in ref], [torch.zeros_like(p) for p in ref], [],
              [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in ref], [], *scalars, False, False,
              None, None, None, None, None, None)
    for p, q in zip(params, ref):
        assert_bitwise(p, q, "the tuned launch is the same update")


# ---------------------------------------------------------------------------------------------------------
# The compiled kernels, checked without a GPU: compile every variant for sm_90 and read the PTX.
# ---------------------------------------------------------------------------------------------------------


def _can_compile_for_nvidia():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def test_compiled_kernels_keep_the_cpu_numerics():
    """Compiles the three kernels (all dtypes, all controls on; and a variant with everything off) for sm_90
    in a subprocess without TRITON_INTERPRET, and checks the PTX: round-to-nearest FMAs (the rules' explicit
    ones, as rules.h's fma_host_device) and no other fused or contractible float add/mul (the C++ kernels are
    built with -ffp-contract=off), IEEE division and square root only, round-to-nearest
    conversions, 128-bit (or, for
    float64, 2 x 64-bit) vector accesses when the addresses are aligned, and the atomic of AdamW's last
    program, preceded by a block-wide barrier (no warp may still read its step when thread 0 signals that
    the program is done)."""
    if not _can_compile_for_nvidia():  # part of every triton wheel: a skip where Triton is expected hides breakage
        missing("triton", "triton's NVIDIA backend (ptxas) is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.join(root, "tests", "triton_gpu", "compile_check.py")],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) >= 12
    for r in results:
        what = f"{r['kernel']} {r['constexprs']}"
        assert r["fma_rn"] > 0 and r["fma_other"] == 0 and r["contractible"] == 0, what
        assert r["div_approx"] == 0 and r["sqrt_approx"] == 0 and r["cvt_not_rn"] == 0, what
        if r["constexprs"]["ALIGNED"] == "True":
            assert (r["ld_v4"] if r["constexprs"]["P_DTYPE"] != "fp64" else r["ld_v2"]) > 0, what
        if r["kernel"] == "adamw_kernel":
            assert r["atom"] == 1 and r["sqrt_rn"] > 0 and r["div_rn"] > 0, what
            assert r["barrier_before_atom"], f"{what}: no block barrier between the update and the atomic"


# ---------------------------------------------------------------------------------------------------------
# Through the optimizer classes: a warmup-cosine schedule table against torch's LambdaLR.
# ---------------------------------------------------------------------------------------------------------


def _warmup_cosine_factor(total, warmup, min_factor):
    """transformers' get_cosine_with_min_lr_schedule_with_warmup factor (what warmup_cosine mirrors), held at
    its value at step total - 1 past the end, as a table of total entries holds its last entry (the schedules'
    length rule)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    hf = get_cosine_with_min_lr_schedule_with_warmup(dummy, warmup, total, min_lr_rate=min_factor).lr_lambdas[0]
    return lambda t: hf(min(t, total - 1))


CLASS_CASES = {
    "adamw": ("FusedAdamW", lambda groups, **kw: torch.optim.AdamW(groups, foreach=False, **kw),
              [dict(lr=1e-2, weight_decay=1e-2), dict(lr=3e-3, weight_decay=0.0, amsgrad=True)],
              dict(betas=(0.9, 0.99))),
    "adam": ("FusedAdam", lambda groups, **kw: torch.optim.Adam(groups, foreach=False, **kw),
             [dict(lr=1e-2, weight_decay=1e-2), dict(lr=3e-3, weight_decay=0.0, amsgrad=True)],
             dict(betas=(0.9, 0.99))),
    "sgd": ("FusedSGD", lambda groups, **kw: torch.optim.SGD(groups, foreach=False, **kw),
            [dict(lr=1e-2, momentum=0.9, nesterov=True), dict(lr=3e-2, momentum=0.8, dampening=0.1)],
            dict(weight_decay=1e-3)),
    "lion": ("FusedLion", lambda groups, **kw: Lion(groups, **kw), [dict(lr=1e-3), dict(lr=3e-4, weight_decay=1e-2)],
             dict(betas=(0.9, 0.99))),
}


@pytest.mark.filterwarnings("ignore:fusedopt")  # "the schedule table ... read past its end": on purpose
@pytest.mark.parametrize("rule", ["adamw", "adam", "sgd", "lion"])
def test_optimizer_class_with_warmup_cosine_vs_lambdalr(rule):
    import fusedopt
    from fusedopt import schedules

    cls_name, oracle_factory, group_opts, defaults = CLASS_CASES[rule]
    cls = getattr(fusedopt, cls_name)
    total, warmup, min_factor, steps = 80, 10, 0.1, 100  # 100 steps: the table is read past its end
    base = make_params(SIZES, torch.float32, 9, device="cpu")
    idx = split(list(range(len(base))), 2)
    ours_p = [base[i].clone().to(DEVICE).requires_grad_() for i in range(len(base))]
    ref_p = [base[i].clone().requires_grad_() for i in range(len(base))]
    ours = cls([dict(o, params=[ours_p[i] for i in ix]) for o, ix in zip(group_opts, idx)], **defaults,
               schedule=schedules.warmup_cosine(total, warmup, min_factor), backend="triton")
    oracle = oracle_factory([dict(o, params=[ref_p[i] for i in ix]) for o, ix in zip(group_opts, idx)], **defaults)
    sched = torch.optim.lr_scheduler.LambdaLR(oracle, _warmup_cosine_factor(total, warmup, min_factor))
    for t in range(steps):
        grads = make_grads(base, t, 9)
        for p, q, g in zip(ours_p, ref_p, grads):
            p.grad = g.to(DEVICE)
            q.grad = g.clone()
        ours.step()
        oracle.step()
        sched.step()
    ours_groups = [[ours_p[i] for i in ix] for ix in idx]
    ref_groups = [[ref_p[i] for i in ix] for ix in idx]
    if rule == "lion":
        check_lion(ours_groups, ref_groups, [dict(lr=o["lr"]) for o in group_opts], F32_TOL, "FusedLion")
    else:
        for a, b in zip(ours_groups, ref_groups):
            for p, q in zip(a, b):
                assert normwise_error(p, q) <= F32_TOL, f"{cls_name}: {normwise_error(p, q):.2e}"


# ---------------------------------------------------------------------------------------------------------
# GPU only: CUDA graphs, no host sync, large tensors with autotuning, the CUDA backend.
# ---------------------------------------------------------------------------------------------------------


def _groups_on(rule, sizes, dtype, seed, device):
    base = make_params(sizes, dtype, seed, device="cpu")
    hp = CPU_OP_GROUPS[rule]
    return [dict(h, params=[base[i].clone().to(device) for i in ix]) for h, ix in zip(hp, split(list(range(len(base))), len(hp)))]


def _tables(rule, device):
    hp = CPU_OP_GROUPS[rule]
    lr_t = [schedule_table(7, 0.5 * h["lr"], 2 * h["lr"], device) for h in hp]
    mom_t = [None if not h.get("momentum", h.get("betas", (0,))[0]) else schedule_table(5, 0.8, 0.9, device)
             for h in hp]
    return lr_t, mom_t


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_graph_capture_and_replay(rule, dtype):
    """One captured step (the update and the schedule counter's increment) replayed with new grads, the
    schedule advancing and found_inf set on some replays: bit-equal to the same steps run eagerly."""
    dev = torch.device("cuda")
    sizes = SIZES_BIG
    runners = []
    for _ in range(2):
        lr_t, mom_t = _tables(rule, dev)
        runners.append(Runner(rule, OURS[rule], _groups_on(rule, sizes, dtype, 11, dev), lr_tables=lr_t,
                              mom_tables=mom_t, master=dtype in LOW, device=dev))
    eager, graphed = runners
    ctl = [(torch.full((1,), 8.0, device=dev), torch.zeros(1, device=dev), torch.full((1,), 0.9, device=dev))
           for _ in runners]
    flat_params = [p for g in eager.groups for p in g["params"]]

    def grads_at(t):
        return split_like(make_grads(flat_params, t, 11), eager.groups)

    # warm-up (plans built, kernels tuned) on a side stream, as torch asks before capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for t in range(2):
            graphed.step(grads_at(t), grad_scale=ctl[1][0], found_inf=ctl[1][1], clip_coef=ctl[1][2])
    torch.cuda.current_stream().wait_stream(side)
    for t in range(2):
        eager.step(grads_at(t), grad_scale=ctl[0][0], found_inf=ctl[0][1], clip_coef=ctl[0][2])

    static_grads = [[g.clone() for g in gg] for gg in grads_at(2)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step(static_grads, grad_scale=ctl[1][0], found_inf=ctl[1][1], clip_coef=ctl[1][2])
    for t in range(2, 14):
        skipped = t in (5, 9)
        for (_, found_inf, _) in ctl:
            found_inf.fill_(1.0 if skipped else 0.0)
        for sg, gg in zip(static_grads, grads_at(t)):
            for s, g in zip(sg, gg):
                s.copy_(g)
        graph.replay()
        eager.step(grads_at(t), grad_scale=ctl[0][0], found_inf=ctl[0][1], clip_coef=ctl[0][2], skipped=skipped)
    torch.cuda.synchronize()
    assert int(graphed.schedule_step) == int(eager.schedule_step) == 14  # the trainer's counter, captured too
    for ga, gb in zip(graphed.groups, eager.groups):
        for p, q in zip(ga["params"], gb["params"]):
            assert_bitwise(p, q, f"graph replay vs eager {rule} {dtype}")
    for (name, a), (_, b) in zip(graphed.states(), eager.states()):
        assert_bitwise(a, b, f"graph replay vs eager {rule} {dtype}: {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, sr", [(torch.float32, False), (torch.bfloat16, True)])
def test_gpu_8bit_adamw_cuda_graph_capture_vs_eager(dtype, sr):
    """FusedAdamW with 8-bit states on the Triton backend (bfloat16 params: rounded stochastically, the rounding
    counter advanced on the device) captured whole in a CUDA graph with torch's recipe (warm-up on a side stream,
    static grads, torch.cuda.graph) and replayed with new grads: bit-equal to the same steps run eagerly, codes,
    absmax and counters included."""
    import fusedopt

    dev = torch.device("cuda")
    sizes = [(4099,), (64, 80), (97,)]  # two 8-bit tensors (one not a multiple of 256), one with float32 states
    sides = []
    for _ in range(2):
        torch.manual_seed(0)  # the rounding seed
        params = make_params(sizes, dtype, 13)
        opt = fusedopt.FusedAdamW(params, lr=1e-2, weight_decay=0.1, backend="triton", state_precision="8bit",
                                  stochastic_rounding=sr)
        sides.append((params, opt))
    (eager_params, eager), (graph_params, graphed) = sides
    static_grads = [torch.zeros_like(p) for p in graph_params]
    for p, g in zip(graph_params, static_grads):
        p.grad = g

    def step_eager(t):
        for p, g in zip(eager_params, make_grads(eager_params, t, 13)):
            p.grad = g
        eager.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for t in range(2):
            for s, g in zip(static_grads, make_grads(graph_params, t, 13)):
                s.copy_(g)
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    for t in range(2):
        step_eager(t)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for t in range(2, 8):
        for s, g in zip(static_grads, make_grads(graph_params, t, 13)):
            s.copy_(g)
        graph.replay()
        step_eager(t)
    torch.cuda.synchronize()
    for a, b in zip(graph_params, eager_params):
        assert_bitwise(a, b, f"graph replay vs eager, 8-bit {dtype}")
        assert graphed.state[a].keys() == eager.state[b].keys()
        for key in graphed.state[a]:
            assert_bitwise(graphed.state[a][key], eager.state[b][key], f"graph replay vs eager, 8-bit {dtype}: {key}")
    assert graphed.state[graph_params[0]]["exp_avg"].dtype == torch.uint8
    if sr:
        assert int(graphed.param_groups[0]["rounding_step"]) == int(eager.param_groups[0]["rounding_step"]) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_gpu_step_does_not_sync(rule):
    dev = torch.device("cuda")
    lr_t, mom_t = _tables(rule, dev)
    runner = Runner(rule, OURS[rule], _groups_on(rule, SIZES_BIG, torch.float32, 12, dev), lr_tables=lr_t,
                    mom_tables=mom_t, device=dev)
    grads = split_like(make_grads([p for g in runner.groups for p in g["params"]], 0, 12), runner.groups)
    controls = dict(grad_scale=torch.ones(1, device=dev), found_inf=torch.zeros(1, device=dev),
                    clip_coef=torch.ones(1, device=dev))
    runner.step(grads, **controls)  # warm: plan built, kernel tuned
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            runner.step(grads, **controls)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@needs_cpu_ops
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gpu_large_tensors_bitwise_vs_cpu_op(rule, dtype, monkeypatch):
    """Compiled kernels, autotuned, on tensors of many rows (one of 1M + 3 elements): bit-equal to the CPU op."""
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(launcher, "AUTOTUNE", dtype in (torch.float32, torch.bfloat16))
    sizes = SIZES_BIG + [(1 << 20) + 3, (513, 257)]
    ours, ref = run_pair_vs_cpu_op(rule, dtype, 6, master=dtype in LOW and rule != "sgd", sizes=sizes,
                                   skip_steps=(2,), seed=13)
    for g_ours, g_ref in zip(ours.groups, ref.groups):
        for p, q in zip(g_ours["params"], g_ref["params"]):
            assert_bitwise(p, q, f"{rule} {dtype} param {tuple(p.shape)}")
    for (name, a), (_, b) in zip(ours.states(), ref.states()):
        assert_bitwise(a, b, f"{rule} {dtype} {name}")
    if launcher.AUTOTUNE:
        kernel = getattr({"adamw": ft_adamw, "sgd": ft_sgd, "lion": ft_lion}[rule], rule + "_kernel")
        assert any(k[0] is kernel for k in launcher._TUNED), "the kernel was autotuned"


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gpu_agrees_with_cuda_backend(rule, dtype):
    """Against torch.ops.fusedopt.* on CUDA tensors (the hand-written CUDA kernels). Both implement rules.h
    with the same explicit fused multiply-adds and no other contraction (nvcc --fmad=false, Triton
    enable_fp_fusion=False), with IEEE division and square root and round-to-nearest conversions, and each is
    bit-equal to the CPU op: so bit-equal to each other."""
    require_backend("cuda")
    dev = torch.device("cuda")
    runners = []
    for impl in (OURS[rule], cpu_op(rule)):  # torch.ops dispatches to the CUDA kernels for CUDA tensors
        lr_t, mom_t = _tables(rule, dev)
        runners.append(Runner(rule, impl, _groups_on(rule, SIZES_BIG, dtype, 14, dev), lr_tables=lr_t,
                              mom_tables=mom_t, master=dtype in LOW and rule == "adamw", device=dev))
    flat = [p for g in runners[0].groups for p in g["params"]]
    for t in range(20):
        grads = split_like(make_grads(flat, t, 14), runners[0].groups)
        for r in runners:
            r.step(grads)
    ours, theirs = runners
    for ga, gb in zip(ours.groups, theirs.groups):
        for p, q in zip(ga["params"], gb["params"]):
            assert_bitwise(p, q, f"{rule} {dtype} param {tuple(p.shape)} vs the CUDA backend")
    for (name, a), (_, b) in zip(ours.states(), theirs.states()):
        assert_bitwise(a, b, f"{rule} {dtype} {name} vs the CUDA backend")
