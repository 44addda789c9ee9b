"""bfloat16 / float16 params, without and with master weights: every step of every rule, on every backend that
runs here, against a float64 run of the oracle fed that step's inputs.

What is compared. Before each step the test takes what our kernel reads (the 16-bit param, or its float32
master copy, and the states) and hands exactly those values, widened to float64, to the oracle
(torch.optim.AdamW / Adam / SGD single-tensor, lion-pytorch's Lion) with the same grad and the same lr /
momentum; the oracle steps once in float64. Our result after the step must then be the oracle's result
rounded to the storage dtype, up to the bound below: the per-step update ``p_after - p_before`` and every state,
element by element. Comparing single steps from identical inputs (instead of two trajectories that drift apart
by rounding) is what makes the bound tight enough to see a wrong update: a trajectory comparison has to allow
torch's own low-precision drift, and a param that never moves stays inside that allowance.

The bound (per element, for a stored value x with the oracle's float64 value y):
    |x - y| <= ulp_D(max(|x|, |y|)) / 2  +  2**-18 * M
  - Our kernels compute a step in float32 from the stored inputs and round the result to the storage dtype D
    once (round to nearest even): that rounding is at most half an ulp of D at the result's binade (taking the
    larger binade of x and y covers a result that rounds up into the next power of two).
  - The float32 arithmetic before that rounding (~15 roundings and the float32 scalars 1 - lr*wd,
    lr / bias_correction1, ...) differs from float64 by a few 2**-24 of the magnitudes it combines:
    M = |x_before| + |y| + |y - x_before| + |g| + g**2 + 16 * lr * (1 + |g| + sum of |states_before|), which
    covers cancellations inside the step (lerp, m / denom); 2**-18 is 64 float32 ulps of M.
  - With master weights the master copy and the states are float32 (D = float32), and the 16-bit param must
    equal the master copy rounded, bit for bit.
  - Lion only: where beta1*m + (1-beta1)*g is within float32 rounding of 0 the sign may come out differently
    in float32 and float64; such elements may differ by up to 2*lr (a flipped sign), no more.
For bfloat16 half an ulp is 2**-9..2**-8 of |x| (float16: 2**-12..2**-11) while 2**-18 * M is ~2**-17 of |x| for
params away from 0: the bound is the rounding itself plus a few percent (measured: the largest errors of the
correct kernels reach 0.98 (float16) to 0.998 (bfloat16) of it; with master weights 0.016, the float32 error being
far below its 64-ulp allowance).

What the bound rules out (the hyperparameters are chosen so that every term of every update is resolvable in
16 bits, and param / grad magnitudes are spread over decades so that small params show small updates): a
param left unchanged or a doubled lr misses by the whole update (lr .. 2*lr per step for Adam and Lion, far
above half an ulp of params below ~0.5); ``1 + lr*wd`` instead of ``1 - lr*wd`` misses by 2*lr*wd*|p| with
lr*wd >= 0.01, i.e. >= 2.5 bfloat16 ulps of every param; a dropped eps turns 0/(0+eps) into 0/0 at the
exact-zero grads (and m/(sqrt(v)+eps) into m/sqrt(v) where |g| ~ eps = 1e-4); a Lion step of lr/2 misses by lr/2.
Each of those bugs, planted in rules.h (CPU kernels and CUDA bodies) or in the Triton kernels, fails these
tests in both dtypes, with and without master weights, on every backend (checked for issue 15).

Backends: the C++ CPU kernels and the Triton kernels (under the interpreter) through the optimizer classes,
with the oracle's torch scheduler baked into a schedule table; the CUDA kernels' per-block bodies executed on
the host (tests/test_cuda_host.py's harness) through the ops, with that step's lr / momentum as scalars.
FusedAdam is included when fusedopt exports it.
"""

from __future__ import annotations

import math
import os
from typing import Dict

import pytest
import torch
from lion_pytorch import Lion

import fusedopt
from conftest import usable_backends
from fusedopt import schedules

LOW = [torch.bfloat16, torch.float16]
STEPS = 8
SIZES = [(0,), (), (33, 31), (2049,)]  # empty, scalar, a masked tail, full blocks + a tail
SLACK = 2.0 ** -18  # 64 float32 ulps of the magnitudes a step combines (see the module docstring)

L = torch.optim.lr_scheduler


def _decay_sched(steps):
    return lambda opt: L.LambdaLR(opt, lambda t: 1.0 - 0.5 * t / steps)


def _one_cycle(steps):
    # momentum cycled too (OneCycleLR's cycle_momentum): the 16-bit kernels read beta1 / momentum per step
    return lambda opt: L.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps + 1,
                                    pct_start=0.4, div_factor=4.0, final_div_factor=2.0, base_momentum=0.8,
                                    max_momentum=0.95)


# rule -> (our class, oracle factory, state keys, {config: (options, per-group overrides, scheduler factory)})
# Every config has lr * weight_decay >= 0.01 in some group (a flipped decay sign moves params by >= 2% per
# step, several 16-bit ulps) and an lr large enough that an update is seen on params below ~0.5.
RULES = {
    "adamw": (fusedopt.FusedAdamW, lambda groups, **kw: torch.optim.AdamW(groups, foreach=False, **kw),
              ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), {
                  "decay": (dict(lr=1e-2, weight_decay=1.0),
                            [{}, dict(lr=5e-3, weight_decay=2.0, betas=(0.8, 0.99))], _decay_sched),
                  "amsgrad_maximize_eps": (dict(lr=1e-2, eps=1e-4, weight_decay=1.0, amsgrad=True, maximize=True),
                                           [{}, dict(lr=2e-2, weight_decay=0.0)], _one_cycle),
              }),
    "sgd": (fusedopt.FusedSGD, lambda groups, **kw: torch.optim.SGD(groups, foreach=False, **kw),
            ("momentum_buffer",), {
                "plain": (dict(lr=1e-2, weight_decay=0.5), [{}, dict(lr=2e-2, weight_decay=0.0)], _decay_sched),
                "momentum_dampening": (dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.5),
                                       [{}, dict(lr=3e-2, weight_decay=0.0)], _one_cycle),
                "nesterov_maximize": (dict(lr=1e-2, momentum=0.9, nesterov=True, maximize=True, weight_decay=0.5),
                                      [{}, dict(lr=5e-3, momentum=0.8)], _decay_sched),
            }),
    "lion": (fusedopt.FusedLion, lambda groups, **kw: Lion(groups, **kw), ("exp_avg",), {
        "decay": (dict(lr=1e-2, weight_decay=1.0), [{}, dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=4.0)],
                  _one_cycle),
    }),
}
if hasattr(fusedopt, "FusedAdam"):  # torch.optim.Adam's L2 weight decay (added to the grad)
    RULES["adam"] = (fusedopt.FusedAdam, lambda groups, **kw: torch.optim.Adam(groups, foreach=False, **kw),
                     ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), {
                         "l2": (dict(lr=1e-2, weight_decay=0.5), [{}, dict(lr=5e-3, weight_decay=0.0)], _decay_sched),
                         "amsgrad_maximize": (dict(lr=1e-2, weight_decay=0.5, amsgrad=True, maximize=True),
                                              [{}, dict(lr=2e-2)], _one_cycle),
                     })

CASES = [(rule, config) for rule, (_, _, _, configs) in RULES.items() for config in configs]
BACKENDS = usable_backends() + ["cuda_host"]


# ---------------------------------------------------------------------------------------------------------
# Inputs: log-uniform magnitudes with random signs, so that params and grads span several decades
# ---------------------------------------------------------------------------------------------------------
def _log_uniform(shape, lo, hi, gen):
    mag = torch.pow(10.0, lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64))
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    return mag * sign


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [_log_uniform(s, -2.5, 0.5, gen).to(dtype) for s in SIZES]


def make_grads(dtype, step, seed=0):
    """~5% exact zeros (sign(0) for Lion; 0 / (0 + eps) for Adam), the rest log-uniform. float16 grads stay
    above 0.03 so that (1 - beta2) * g**2 does not underflow float16 states (it would in torch too: a float16
    AdamW without master weights is then 0 / 0)."""
    gen = torch.Generator().manual_seed(10_007 * seed + step + 1)
    lo = -4.0 if dtype == torch.bfloat16 else -1.5
    out = []
    for s in SIZES:
        g = _log_uniform(s, lo, 0.5, gen) * (torch.rand(s, generator=gen) > 0.05)
        out.append(g.to(dtype))
    return out


def split_groups(items, group_options):
    groups = [dict(opts, params=[]) for opts in group_options]
    for i, x in enumerate(items):
        groups[i % len(groups)]["params"].append(x)
    return groups


# ---------------------------------------------------------------------------------------------------------
# Ours, behind one interface: step(grads), and per param what the update read / wrote
# ---------------------------------------------------------------------------------------------------------
def backend_device(backend):
    """CPU tensors for the C++ kernels and for Triton under its interpreter; CUDA tensors otherwise."""
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    return torch.device("cpu" if backend == "cpu" or interpreted else "cuda")


class ClassRun:
    """Our optimizer class on a backend of usable_backends(), schedule baked from the oracle's torch scheduler."""

    def __init__(self, rule, config, dtype, backend, master, base, oracle_sched_factory):
        cls, _, self.keys, configs = RULES[rule]
        options, groups, _ = configs[config]
        self.device = backend_device(backend)
        self.params = [p.clone().to(self.device) for p in base]
        table = schedules.from_lr_scheduler(oracle_sched_factory, total_steps=STEPS + 1)
        self.opt = cls(split_groups(self.params, groups), **options, schedule=table, backend=backend,
                       master_weights=master)
        self.master = master

    def step(self, grads, hparams):
        for p, g in zip(self.params, grads):
            p.grad = g.to(self.device, copy=True)
        self.opt.step()

    def read(self, i) -> Dict[str, torch.Tensor]:
        """What the next update reads for param i: "param" (master copy if any) and the states."""
        p = self.params[i]
        state = self.opt.state.get(p, {})
        out = {"param": state["master_param"] if "master_param" in state else p}
        out.update((k, state[k]) for k in self.keys if k in state)
        if "step" in state:
            out["step"] = state["step"]
        return {k: v.detach().cpu().clone() for k, v in out.items()}

    def visible(self, i):
        return self.params[i].detach().cpu()


class HostRun:
    """The CUDA kernels' block bodies, executed on the host (tests/test_cuda_host.py), one op call per group."""

    def __init__(self, rule, config, dtype, master, base):
        import test_cuda_host as H

        self.H, self.sim = H, H.load_sim()
        _, _, self.keys, configs = RULES[rule]
        options, group_opts, _ = configs[config]
        self.rule, self.master = rule, master
        self.groups = []
        sdtype = torch.float32 if master else dtype
        for opts in split_groups(list(range(len(base))), group_opts):
            idx = opts.pop("params")
            hp = dict(options, **opts)
            g = type("SimGroup", (), {})()
            g.rule, g.index, g.hp = "adamw" if rule == "adam" else rule, idx, hp
            g.params = [base[i].clone() for i in idx]
            g.grads = [torch.zeros_like(p) for p in g.params]
            g.master_params = [p.float() for p in g.params] if master else []
            n_states = {"adamw": 3 if hp.get("amsgrad") else 2, "adam": 3 if hp.get("amsgrad") else 2, "lion": 1,
                        "sgd": 1 if hp.get("momentum", 0) else 0}[rule]
            g.states = [[torch.zeros(p.shape, dtype=sdtype) for p in g.params] for _ in range(n_states)]
            g.steps = [torch.zeros((), dtype=torch.int64) for _ in g.params] if g.rule == "adamw" else []
            self.groups.append(g)
        self.where = {i: (g, k) for g in self.groups for k, i in enumerate(g.index)}
        self.t = 0

    def step(self, grads, hparams):
        no_controls = dict(lr_table=None, mom_table=None, schedule_step=None, grad_scale=None, found_inf=None,
                           clip_coef=None, wd_table=None)
        for g, hp_now in zip(self.groups, hparams):
            for dst, i in zip(g.grads, g.index):
                dst.copy_(grads[i])
            hp = dict(lr=hp_now["lr"], weight_decay=g.hp.get("weight_decay", 0.0))
            if self.rule == "sgd":
                hp.update(momentum=hp_now["momentum"], dampening=g.hp.get("dampening", 0.0),
                          nesterov=g.hp.get("nesterov", False), maximize=g.hp.get("maximize", False))
            else:
                hp.update(beta1=hp_now["betas"][0], beta2=hp_now["betas"][1])
                if self.rule in ("adamw", "adam"):
                    hp.update(eps=g.hp.get("eps", 1e-8), amsgrad=g.hp.get("amsgrad", False),
                              maximize=g.hp.get("maximize", False), decoupled=self.rule == "adamw")
            self.H.call(self.sim, g, hp, no_controls, first_step=self.t == 0, extra=self.H.sim_args())
        self.t += 1

    def read(self, i):
        g, k = self.where[i]
        out = {"param": g.master_params[k] if self.master else g.params[k]}
        if self.t > 0 or self.rule != "sgd":  # torch's SGD has no momentum buffer before the first step
            for key, lst in zip(self.keys, g.states):
                out[key] = lst[k]
        if self.rule in ("adamw", "adam"):
            out["step"] = g.steps[k]
        return {key: v.detach().clone() for key, v in out.items()}

    def visible(self, i):
        g, k = self.where[i]
        return g.params[k]


# ---------------------------------------------------------------------------------------------------------
# The bound
# ---------------------------------------------------------------------------------------------------------
def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s values at |x| (float64 in, float64 out), subnormals included."""
    fi = torch.finfo(dtype)
    digits = round(-math.log2(fi.eps)) + 1  # significand bits: 8 (bfloat16), 11 (float16), 24 (float32)
    emin = round(math.log2(fi.tiny)) + 1  # frexp exponent of the smallest normal number
    _, e = torch.frexp(x)
    e = torch.where(x == 0, torch.full_like(e, emin), e).clamp(min=emin)
    return torch.ldexp(torch.ones_like(x), e - digits)


def check_value(what, ours, expected, before, slack_mag, dtype, extra_tol=None):
    """ours (stored in `dtype`) vs the float64 oracle value `expected`, per element (see the docstring)."""
    a = ours.detach().double().reshape(-1)
    y = expected.detach().double().reshape(-1)
    x0 = before.detach().double().reshape(-1)
    tol = 0.5 * ulp(torch.maximum(a.abs(), y.abs()), dtype) + SLACK * slack_mag.reshape(-1)
    if extra_tol is not None:
        tol = tol + extra_tol.reshape(-1)
    err = (a - y).abs()
    ok = (err <= tol) | (a == y)
    if bool(ok.all()):
        # (worst error / bound, elements whose oracle update exceeds the bound: a frozen value fails there)
        return (float((err / tol).max()) if a.numel() else 0.0), int(((y - x0).abs() > tol).sum())
    i = int((~ok).nonzero()[0])
    raise AssertionError(
        f"{what}: {int((~ok).sum())} of {a.numel()} elements off; first at {i}: before {x0[i].item()!r}, "
        f"ours {a[i].item()!r} (update {(a[i] - x0[i]).item():.6g}), oracle {y[i].item()!r} "
        f"(update {(y[i] - x0[i]).item():.6g}): |error| {err[i].item():.3g} > bound {tol[i].item():.3g} "
        f"({(err[i] / ulp(y[i:i + 1].abs(), dtype)[0]).item():.2f} ulps of {dtype})")


# ---------------------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------------------
def run_and_check(rule, config, dtype, backend, master):
    _, oracle_factory, keys, configs = RULES[rule]
    options, group_opts, sched_of = configs[config]
    sched_factory = sched_of(STEPS)
    base = make_params(dtype)
    oracle_params = [torch.zeros(p.shape, dtype=torch.float64, requires_grad=True) for p in base]
    oracle = oracle_factory(split_groups(oracle_params, group_opts), **options)
    sched = sched_factory(oracle)
    if backend == "cuda_host":
        ours = HostRun(rule, config, dtype, master, base)
    else:
        ours = ClassRun(rule, config, dtype, backend, master, base, sched_factory)
    stored = torch.float32 if master else dtype
    worst = 0.0
    moved = 0
    for t in range(STEPS):
        grads = make_grads(dtype, t)
        before = [ours.read(i) for i in range(len(base))]
        # feed the oracle exactly what our update reads, widened to float64
        with torch.no_grad():
            for q, b in zip(oracle_params, before):
                q.copy_(b["param"])
                if t == 0:
                    continue  # the oracle creates its state at its first step, as ours did (zeros)
                st = oracle.state[q]
                for k in keys:
                    if k in b:
                        st[k] = b[k].double()
        for q, g in zip(oracle_params, grads):
            q.grad = g.double()
        hparams = [dict(lr=g["lr"], momentum=g.get("momentum"), betas=g.get("betas")) for g in oracle.param_groups]
        lrs = {id(q): g["lr"] for g in oracle.param_groups for q in g["params"]}
        oracle.step()
        ours.step(grads, hparams)
        sched.step()
        for i, (q, g, b) in enumerate(zip(oracle_params, grads, before)):
            if q.numel() == 0:
                continue
            after = ours.read(i)
            st = oracle.state[q]
            g64, lr = g.double(), lrs[id(q)]
            states_before = sum((b[k].double().abs() for k in keys if k in b), torch.zeros_like(g64))
            lr_mag = 16 * lr * (1 + g64.abs() + states_before)
            where = f"{rule}/{config} {dtype} master={master} {backend} step {t} param {i} {tuple(q.shape)}"

            def mag(x0, y):
                return x0.double().abs() + y.abs() + (y - x0.double()).abs() + g64.abs() + g64 ** 2 + lr_mag

            extra = None
            if rule == "lion":  # a sign at a near-tie of beta1*m + (1-beta1)*g may differ: at most 2 lr
                beta1 = next(gr["betas"][0] for gr in oracle.param_groups if any(x is q for x in gr["params"]))
                m0 = b["exp_avg"].double() if "exp_avg" in b else torch.zeros_like(g64)
                blend = beta1 * m0 + (1 - beta1) * g64
                near_tie = blend.abs() <= 2.0 ** -20 * (beta1 * m0.abs() + (1 - beta1) * g64.abs())
                extra = torch.where(near_tie, 2 * lr, 0.0)
            ratio, resolvable = check_value(f"{where} update", after["param"], q.detach(), b["param"],
                                            mag(b["param"], q.detach()), stored, extra)
            worst = max(worst, ratio)
            moved += resolvable
            for k in keys:
                if k in st:
                    assert k in after, f"{where}: no state {k!r}"
                    x0 = b.get(k, torch.zeros_like(after[k]))
                    worst = max(worst, check_value(f"{where} {k}", after[k], st[k], x0, mag(x0, st[k]), stored)[0])
            if "step" in st:
                assert int(after["step"]) == int(st["step"]), f"{where}: step count"
            if master:
                vis = ours.visible(i)
                assert vis.dtype == dtype and torch.equal(vis, after["param"].to(dtype)), \
                    f"{where}: the param is not its master copy rounded"
    total = sum(p.numel() for p in base) * STEPS
    # the test has teeth only where the oracle's update exceeds the bound (a param left as it was fails there)
    assert moved > total // 4, f"only {moved} of {total} oracle updates exceed the bound"
    return worst, moved / total


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("master", [False, True], ids=["no_master", "master"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("rule,config", CASES)
def test_each_step_is_the_float64_oracle_rounded(rule, config, dtype, master, backend):
    run_and_check(rule, config, dtype, backend, master)


def test_ulp():
    x = torch.tensor([0.0, 1.0, 1.5, 2.0 ** -14, 2.0 ** -20, 3.0e38], dtype=torch.float64)
    assert ulp(x, torch.bfloat16).tolist() == [2.0 ** -133, 2.0 ** -7, 2.0 ** -7, 2.0 ** -21, 2.0 ** -27, 2.0 ** 120]
    assert ulp(x[:5], torch.float16).tolist() == [2.0 ** -24, 2.0 ** -10, 2.0 ** -10, 2.0 ** -24, 2.0 ** -24]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # against the dtype's own next value
        v = torch.tensor([1.0, 0.3, 1e-3, 7.0], dtype=dtype)
        nxt = torch.nextafter(v, torch.full_like(v, math.inf))
        assert (nxt.double() - v.double()).tolist() == ulp(v.double(), dtype).tolist()


if __name__ == "__main__":  # the margins: worst error / bound, and the share of updates a frozen param fails
    import sys

    for rule, config in CASES:
        for dtype in LOW:
            for master in (False, True):
                for backend in sys.argv[1:] or BACKENDS:
                    w, share = run_and_check(rule, config, dtype, backend, master)
                    print(f"{rule:6s} {config:22s} {str(dtype):15s} master={master!s:5s} {backend:9s} "
                          f"worst/bound {w:.3f} resolvable {share:.2f}", flush=True)
