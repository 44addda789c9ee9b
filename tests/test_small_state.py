"""state_precision ("fp32", "bf16", "8bit") and stochastic_rounding through the optimizer classes, on every backend
that runs here (the C++ CPU kernels; Triton under its interpreter; the CUDA kernels' block bodies executed on
the host live in tests/test_cuda_host.py).

Oracles and tolerances:
* One step of each rule on 8-bit states against tests/quant_reference.py's float64 implementation of the same
  scheme, started from the optimizer's own codes and absmax: each param agrees to 2e-6 of its update plus four
  float32 ulps of itself (the kernels' float32 arithmetic against float64: a few roundings of the param, and
  relative errors of a few 1e-7 in the update); the new absmax to 2e-6 relative (the float32 update's rounding); a
  code may differ from the float64 one only by one step and only where the float64 q lies within 1e-5 of the
  midpoint between the two (the float32 rounding of the state decides there).
* Everything else is exact: backends bitwise equal to each other, schedules / clipping / master weights /
  GradScaler skips / checkpoints bitwise equal to the run they must equal, codes as fusedopt.quantization
  computes them.
* Stochastic rounding: unbiased (the mean of 4,096 stochastically rounded updates of 1/8 of a bf16 ulp is 1/8 ulp
  within 4 standard errors), reproducible from the seed, continued across a checkpoint, and on Triton exactly the
  rounding quant_reference's generator gives.
* The Triton kernels read and write the formats themselves (fusedopt/triton/_codec.py): bit for bit the CPU
  kernels over every format / param-rounding / rule-flag combination they compile separately.

Takes about 40 s (most of it the Triton interpreter).
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import quant_reference as R
import fusedopt
from fusedopt import quantization as Q
from fusedopt import schedules
from fusedopt.optim._small_state import memory_order
from conftest import backend_device, require_backend, usable_backends

BACKENDS = usable_backends()
RULES = {
    "adamw": (fusedopt.FusedAdamW, dict(lr=1e-2, weight_decay=0.1), ("exp_avg", "exp_avg_sq")),
    "adam": (fusedopt.FusedAdam, dict(lr=1e-2, weight_decay=0.1), ("exp_avg", "exp_avg_sq")),  # L2 decay
    "sgd": (fusedopt.FusedSGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.01), ("momentum_buffer",)),
    "lion": (fusedopt.FusedLion, dict(lr=1e-3, weight_decay=0.1), ("exp_avg",)),
}
# 8-bit states for the first three (>= 4,096 elements; one not a multiple of 256, one permuted), float32 for
# the small ones
SHAPES = [(4099,), (64, 80), (96, 48), (3,), (97,), (0,)]


def make_params(dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in SHAPES]
    params[2] = params[2].t().contiguous().t()  # dense, not contiguous: blocks follow memory order
    return params


def grads_for(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [(torch.randn(p.shape, generator=g) * (0.1 + step % 3)).to(device=p.device, dtype=p.dtype) for p in params]


def run(opt, params, steps, first=0):
    for t in range(first, first + steps):
        for p, g in zip(params, grads_for(params, t)):
            p.grad = g
        opt.step()


def build(rule, params, backend="cpu", **kw):
    cls, hp, _ = RULES[rule]
    return cls(params, backend=backend, **{**hp, **kw})


def through_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def state_tensors(opt, params):
    return [{k: v.detach().clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params]


def assert_bitwise(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if a.dtype.is_floating_point:
        a, b = a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    assert torch.equal(a.cpu(), b.cpu()), what


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("bad", ["int8", "FP32", "4bit", 8, torch.bfloat16])
def test_unknown_state_precision(rule, bad):
    with pytest.raises(ValueError, match=r"state_precision must be one of None, 'fp32', 'bf16', '8bit'"):
        build(rule, [torch.zeros(3)], state_precision=bad)


def test_stochastic_rounding_must_be_a_bool():
    with pytest.raises(ValueError, match="stochastic_rounding must be a bool"):
        fusedopt.FusedAdamW([torch.zeros(3)], stochastic_rounding=1)


@pytest.mark.parametrize("precision", ["bf16", "8bit"])
def test_float64_params_say_what_is_supported(precision):
    with pytest.raises(ValueError, match=r"params\[0\] is float64: state_precision='.*' supports float32, "
                                         r"bfloat16 and float16 params"):
        fusedopt.FusedAdamW([torch.zeros(5000, dtype=torch.float64)], state_precision=precision)
    opt = fusedopt.FusedAdamW([torch.zeros(5000)], state_precision=precision)
    with pytest.raises(ValueError, match=r"params\[1\] of param group 1 is float64"):  # the group is named
        opt.add_param_group({"params": [torch.zeros(3), torch.zeros(3, dtype=torch.float64)]})
    assert len(opt.param_groups) == 1  # nothing added
    fusedopt.FusedAdamW([torch.zeros(5, dtype=torch.float64)], state_precision="fp32")  # fine


def test_stochastic_rounding_float16_needs_master_weights():
    with pytest.raises(ValueError, match="is float16: stochastic_rounding rounds bfloat16 values"):
        fusedopt.FusedAdamW([torch.zeros(5, dtype=torch.float16)], stochastic_rounding=True)
    fusedopt.FusedAdamW([torch.zeros(5, dtype=torch.float16)], stochastic_rounding=True, master_weights=True)


@pytest.mark.parametrize("change,kw,match", [
    ("double", dict(state_precision="8bit"), "is float64: state_precision='8bit'"),
    ("half", dict(stochastic_rounding=True), "is float16: stochastic_rounding rounds bfloat16 values"),
])
def test_param_dtype_changed_after_construction_is_checked_at_step(change, kw, match):
    """model.double() / .half() after construction (the optimizer follows params that change dtype) meets the
    constructor's check at the next step, before anything is modified."""
    model = torch.nn.Linear(80, 64)
    opt = fusedopt.FusedAdamW(model.parameters(), lr=1e-2, **kw)
    getattr(model, change)()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and not opt.state


@pytest.mark.parametrize("option,value", [("state_precision", "8bit"), ("stochastic_rounding", True)])
def test_small_state_options_are_not_param_group_keys(option, value):
    """They are options of the whole optimizer; a group key with another value would be silently ignored by the
    step. A group repeating the optimizer's own value is accepted: ZeroRedundancyOptimizer copies every
    constructor keyword into each param group of the optimizer it builds."""
    with pytest.raises(ValueError, match=f"{option} is an option of the whole optimizer"):
        fusedopt.FusedAdamW([{"params": [torch.zeros(3)], option: value}])
    opt = fusedopt.FusedAdamW([torch.zeros(3)])
    with pytest.raises(ValueError, match=f"{option} is an option of the whole optimizer"):
        opt.add_param_group({"params": [torch.zeros(4)], option: value})
    assert len(opt.param_groups) == 1
    dtype = torch.bfloat16 if option == "stochastic_rounding" else torch.float32
    same = fusedopt.FusedAdamW([{"params": [torch.zeros(3, dtype=dtype)], option: value}], **{option: value})
    same.add_param_group({"params": [torch.zeros(4, dtype=dtype)], option: value})
    assert len(same.param_groups) == 2


def test_8bit_states_of_another_memory_format_are_requantized_in_the_params_order():
    """A checkpoint of a channels_last model loaded into a contiguous one: the codes' blocks follow the memory
    order of the checkpoint's layout, so they are decoded and quantized again in the param's order (values
    within two quantizations of the source: the signed map's gaps are at most 1/64 of the block absmax near
    it, halved by rounding to nearest, twice), and the step runs."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 16, 3, 3, generator=g).to(memory_format=torch.channels_last)
    opt_a = fusedopt.FusedAdamW([a], lr=1e-2, state_precision="8bit")
    for _ in range(2):
        a.grad = torch.randn(a.shape, generator=g).to(memory_format=torch.channels_last)
        opt_a.step()
    b = a.detach().contiguous()
    opt_b = fusedopt.FusedAdamW([b], lr=1e-2, state_precision="8bit")
    opt_b.load_state_dict(through_bytes(opt_a.state_dict()))
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt_b.state[b][key].stride() == b.stride()
        want = through_bytes(opt_a.state_dict(dequantize=True))["state"][0][key]
        got = opt_b.state_dict(dequantize=True)["state"][0][key]
        torch.testing.assert_close(got, want, rtol=0, atol=float(want.abs().max()) / 64)
    b.grad = torch.randn(b.shape, generator=g)
    opt_b.step()
    assert torch.isfinite(b).all()


# ----------------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", list(RULES))
def test_8bit_layout_and_bytes_per_param(rule):
    params = make_params()
    opt = build(rule, params, state_precision="8bit")
    run(opt, params, 1)
    _, _, keys = RULES[rule]
    for p in params:
        st = opt.state[p]
        for key in keys:
            if Q.is_quantized_size(p.numel()):
                assert st[key].dtype == torch.uint8 and st[key].shape == p.shape and st[key].stride() == p.stride()
                assert st[key + "_absmax"].dtype == torch.float32
                assert st[key + "_absmax"].shape == (Q.num_blocks(p.numel()),)
            else:
                assert st[key].dtype == torch.float32 and key + "_absmax" not in st
    big = [p for p in params if Q.is_quantized_size(p.numel())]
    state_bytes = sum(v.numel() * v.element_size() for p in big for k, v in opt.state[p].items() if k != "step")
    per_param = state_bytes / sum(p.numel() for p in big)
    # the bounds: <= 2.05 B/param for AdamW, <= 1.05 for Lion and SGD momentum (2 or 1 codes + 4/256 each)
    assert per_param <= (2.05 if rule in ("adamw", "adam") else 1.05), per_param


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_float_precisions(precision, dtype):
    params = make_params(torch.bfloat16)
    opt = fusedopt.FusedAdamW(params, state_precision=precision)
    run(opt, params, 2)
    assert all(opt.state[p]["exp_avg"].dtype == dtype for p in params if p.numel())


# ----------------------------------------------------------------------------------------------------------------
# Against the float64 reference of the scheme
# ----------------------------------------------------------------------------------------------------------------
def reference_step(rule, hp, p, g, state, step):
    """One step of `rule` in float64 from the optimizer's own 8-bit states: decode, update, re-quantize."""
    def decoded(key):
        return R.dequantize64(state[key].reshape(-1), state[key + "_absmax"], Q.dynamic_map(key != "exp_avg_sq"))

    p64, g64 = p.reshape(-1).double(), g.reshape(-1).double()
    lr, wd = hp["lr"], hp["weight_decay"]
    new = {}
    if rule in ("adamw", "adam"):
        b1, b2, eps = 0.9, 0.999, 1e-8
        if rule == "adam":
            g64 = g64 + wd * p64  # torch.optim.Adam's L2 decay
        m = decoded("exp_avg") * b1 + (1 - b1) * g64
        v = decoded("exp_avg_sq") * b2 + (1 - b2) * g64 * g64
        if rule == "adamw":
            p64 = p64 * (1 - lr * wd)
        p64 = p64 - lr / (1 - b1 ** step) * m / (v.sqrt() / math.sqrt(1 - b2 ** step) + eps)
        new = {"exp_avg": m, "exp_avg_sq": v}
    elif rule == "sgd":
        g64 = g64 + wd * p64
        buf = decoded("momentum_buffer") * hp["momentum"] + g64 if step > 1 else g64
        p64 = p64 - lr * buf
        new = {"momentum_buffer": buf}
    else:
        m = decoded("exp_avg")
        p64 = p64 * (1 - lr * wd) - lr * torch.sign(0.9 * m + 0.1 * g64)
        new = {"exp_avg": 0.99 * m + 0.01 * g64}
    return p64, new


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", list(RULES))
def test_steps_match_float64_reference(backend, rule):
    require_backend(backend)
    device = backend_device(backend)
    params = make_params(device=device)[:2]
    _, hp, keys = RULES[rule]
    opt = build(rule, params, backend=backend, state_precision="8bit")
    for t in range(6):
        grads = grads_for(params, t)
        before = [(p.detach().cpu().clone(), {k: v.detach().cpu().clone() for k, v in opt.state[p].items()})
                  for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        if t == 0:
            continue  # the first step creates the states (from zeros): compared from the second on
        for (p0, st0), p, g in zip(before, params, grads):
            want_p, want_states = reference_step(rule, hp, p0, g.cpu(), st0, t + 1)
            got_p = p.detach().cpu().reshape(-1).double()
            update = (want_p - p0.reshape(-1).double()).abs()
            # per element: 2e-6 of the update, plus the float32 roundings of the param itself (a few ulps)
            bound = 2e-6 * update + 4 * 2.0 ** -24 * want_p.abs()
            assert bool(((got_p - want_p).abs() <= bound).all()), float(((got_p - want_p).abs() - bound).max())
            for key in keys:
                codes = opt.state[p][key].cpu().reshape(-1).long()
                absmax = opt.state[p][key + "_absmax"].cpu().double()
                want_codes, want_absmax = R.quantize64(want_states[key], Q.dynamic_map(key != "exp_avg_sq"))
                assert torch.allclose(absmax, want_absmax, rtol=2e-6, atol=0), key
                differ = codes != want_codes
                if differ.any():
                    qmap = Q.dynamic_map(key != "exp_avg_sq").double()
                    scale_e = torch.repeat_interleave(want_absmax, Q.BLOCK_SIZE)[: codes.numel()]
                    q = want_states[key] / scale_e
                    lo, hi = torch.minimum(codes, want_codes), torch.maximum(codes, want_codes)
                    mid = (qmap[lo] + qmap[hi.clamp(max=255)]) / 2
                    assert bool(((hi - lo)[differ] == 1).all()), key
                    assert bool(((q - mid).abs()[differ] <= 1e-5).all()), key


# ----------------------------------------------------------------------------------------------------------------
# Backends agree bit for bit
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule,precision,dtype,sr", [
    ("adamw", "8bit", torch.float32, False), ("sgd", "8bit", torch.float32, False),
    ("lion", "8bit", torch.float32, False), ("adamw", "bf16", torch.bfloat16, True),
    ("adamw", "8bit", torch.bfloat16, True),
])
def test_backends_bitwise_equal(rule, precision, dtype, sr):
    names = [b.values[0] if hasattr(b, "values") else b for b in BACKENDS]
    if len(names) < 2:
        pytest.skip("one backend here")
    results = []
    for backend in names:
        require_backend(backend)
        torch.manual_seed(7)  # the rounding seed
        params = make_params(dtype, device=backend_device(backend))
        opt = build(rule, params, backend=backend, state_precision=precision, stochastic_rounding=sr)
        run(opt, params, 3)
        results.append((params, state_tensors(opt, params)))
    (p_a, s_a), (p_b, s_b) = results[0], results[1]
    for k, (a, b) in enumerate(zip(p_a, p_b)):
        assert_bitwise(a.detach(), b.detach(), f"param {k}")
        for key in s_a[k]:
            assert_bitwise(s_a[k][key], s_b[k][key], f"param {k} {key}")


# The CPU kernels load and store the formats themselves (one pass: decode, rule, absmax, encode; csrc/cpu/state_io.h);
# the staged path (states widened to float32 around the float32 kernel, re-encoded in plain torch) is the
# reference of the same scheme: bit for bit, over the combinations the kernels instantiate separately.
@pytest.mark.parametrize("rule,precision,dtype,sr,extra", [
    ("adamw", "8bit", torch.float32, False, dict(amsgrad=True)),
    ("adamw", "8bit", torch.float32, False, dict(maximize=True)),
    ("adam", "8bit", torch.float32, False, dict(amsgrad=True)),
    ("adamw", "8bit", torch.bfloat16, False, dict(master_weights=True)),
    ("adamw", "bf16", torch.float32, False, {}),
    ("adamw", "bf16", torch.float32, True, {}),
    ("adamw", "fp32", torch.bfloat16, True, {}),
    ("adamw", None, torch.bfloat16, True, {}),
    ("sgd", "8bit", torch.bfloat16, True, dict(nesterov=True, dampening=0.0)),
    ("sgd", None, torch.bfloat16, True, dict(momentum=0.0)),
    ("lion", "bf16", torch.bfloat16, True, {}),
])
def test_cpu_kernels_equal_the_staged_path(rule, precision, dtype, sr, extra):
    results = []
    for fused in (True, False):
        torch.manual_seed(11)  # the rounding seed
        params = make_params(dtype)
        opt = build(rule, params, state_precision=precision, stochastic_rounding=sr, **extra)
        if fused:
            def no_staging(*args, **kwargs):
                raise AssertionError("the CPU kernels should read these states themselves")
            opt._call_staged = no_staging
        else:
            opt._fused_small_state = lambda backend, batch: False
        run(opt, params, 3)
        results.append((params, state_tensors(opt, params)))
    (p_a, s_a), (p_b, s_b) = results
    for k, (a, b) in enumerate(zip(p_a, p_b)):
        assert_bitwise(a.detach(), b.detach(), f"param {k}")
        assert s_a[k].keys() == s_b[k].keys()
        for key in s_a[k]:
            assert_bitwise(s_a[k][key], s_b[k][key], f"param {k} {key}")


def test_cpu_encoder_equals_the_reference_on_float32_patterns():
    """The CPU kernels' vectorized encoder and decoder (AVX2 where the CPU has it) against the plain-torch quantizer:
    SGD's first step stores the gradient itself in the 8-bit momentum buffer (lr 0: the param stays), so the codes
    and absmax are quantize_blockwise(grad). Every block holds 1.0 (absmax 1, so q = x exactly) and 255 float32
    patterns of |x| < 1, every 997th bit pattern of both signs (2.1M values: all exponents, mantissas of every
    residue); then blocks of zeros, subnormals, infinities and NaNs. The second step decodes them (momentum 1,
    dampening 1: buf = buf * 1 + 0 * g): the codes of finite blocks come back unchanged, and every block is the
    reference's decode + encode."""
    bits = torch.arange(0, 0x3F800000, 997, dtype=torch.int64)
    finite = torch.cat([bits, bits | 0x80000000]).to(torch.uint32).view(torch.float32) if hasattr(torch, "uint32") \
        else torch.cat([bits, bits - 2 ** 32 + 0x80000000]).to(torch.int32).view(torch.float32)
    pad = (-finite.numel()) % 255
    finite = torch.cat([finite, torch.zeros(pad)]).view(-1, 255)
    blocks = torch.cat([finite, torch.ones(finite.shape[0], 1)], dim=1)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-39, float("inf"), float("-inf"), float("nan")])
    tail = torch.cat([torch.zeros(256), special.repeat(32), torch.full((256,), 1e-40), torch.tensor([3.0, -5.0])])
    grad = torch.cat([blocks.reshape(-1), tail])
    param = torch.zeros_like(grad)
    opt = fusedopt.FusedSGD([param], lr=0.0, momentum=1.0, dampening=1.0, state_precision="8bit")
    param.grad = grad
    opt.step()
    codes, absmax = Q.quantize_blockwise(grad, signed=True)
    state = opt.state[param]
    assert_bitwise(state["momentum_buffer"], codes, "codes")
    assert_bitwise(state["momentum_buffer_absmax"], absmax, "absmax")
    param.grad = torch.zeros_like(grad)
    opt.step()
    decoded = Q.dequantize_blockwise(codes, absmax, signed=True)
    codes2, absmax2 = Q.quantize_blockwise(decoded * 1.0 + 0.0 * param.grad, signed=True)  # torch SGD's buf update
    assert_bitwise(state["momentum_buffer"], codes2, "codes after decode + encode")
    assert_bitwise(state["momentum_buffer_absmax"], absmax2, "absmax after decode + encode")
    finite = absmax.isfinite().repeat_interleave(Q.BLOCK_SIZE)[: codes.numel()]
    assert torch.equal(codes2[finite], codes[finite])  # finite blocks: decoding and re-encoding is the identity


def test_cpu_unsigned_encoder_equals_the_reference():
    """The unsigned map's vectorized encoder (AdamW's second moment) against the plain-torch quantizer, as the test
    above does for the signed map. AdamW with beta1 = beta2 = 0 and lr = 0 stores exp_avg = grad (lerp weight 1)
    and exp_avg_sq = grad * grad (one float32 rounding) on its first step. The grads are the square roots of every
    997th float32 pattern below 1 (so the squares land on or next to those patterns: all exponents, mantissas of
    every residue), 255 per block next to a 1.0 (absmax 1: q is the square itself), then zeros, subnormals,
    squares that overflow to infinity, and NaNs."""
    bits = torch.arange(0, 0x3F800000, 997, dtype=torch.int64)
    patterns = bits.to(torch.int32).view(torch.float32)
    roots = torch.cat([patterns.sqrt(), -patterns.sqrt()])
    pad = (-roots.numel()) % 255
    roots = torch.cat([roots, torch.zeros(pad)]).view(-1, 255)
    blocks = torch.cat([roots, torch.ones(roots.shape[0], 1)], dim=1)
    # (no infinities: lerp with weight 1 turns an infinite grad into a NaN exp_avg, as torch's lerp does)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-20, 1e-22, 3e38, float("nan")])
    grad = torch.cat([blocks.reshape(-1), torch.zeros(256), special.repeat(32), torch.full((256,), 1e-40)])
    param = torch.zeros_like(grad)
    opt = fusedopt.FusedAdamW([param], lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, state_precision="8bit")
    param.grad = grad
    opt.step()
    state = opt.state[param]
    for key, value, signed in (("exp_avg", grad, True), ("exp_avg_sq", grad * grad, False)):
        codes, absmax = Q.quantize_blockwise(value, signed=signed)
        assert_bitwise(state[key], codes, f"{key} codes")
        assert_bitwise(state[f"{key}_absmax"], absmax, f"{key} absmax")


# ----------------------------------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------------------------------
def test_schedule_table_composes():
    """A table's lr at step t is exactly the lr a plain run sets by hand."""
    total = 6
    table = schedules.warmup_cosine(total_steps=total, warmup_steps=2)
    params_a, params_b = make_params(), make_params()
    opt_a = fusedopt.FusedAdamW(params_a, lr=1e-2, schedule=table, state_precision="8bit")
    opt_b = fusedopt.FusedAdamW(params_b, lr=1e-2, state_precision="8bit")
    lrs = table.resolve(opt_b.param_groups, opt_b.defaults)[0][0].tolist()
    for t in range(total):
        opt_b.param_groups[0]["lr"] = lrs[t]
        for pa, pb, g in zip(params_a, params_b, grads_for(params_a, t)):
            pa.grad, pb.grad = g, g.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(params_a, params_b):
        assert_bitwise(pa, pb, "param")
        for key in opt_a.state[pa]:
            assert_bitwise(opt_a.state[pa][key], opt_b.state[pb][key], key)


@pytest.mark.parametrize("rule", list(RULES))
def test_clipping_composes(rule):
    """max_grad_norm multiplies the grads by the clip coefficient inside the step: the same as feeding grads
    scaled by that coefficient to an unclipped run."""
    params_a, params_b = make_params(), make_params()
    opt_a = build(rule, params_a, state_precision="8bit", max_grad_norm=0.5)
    opt_b = build(rule, params_b, state_precision="8bit")
    for t in range(3):
        grads = grads_for(params_a, t)
        for pa, g in zip(params_a, grads):
            pa.grad = g
        opt_a.step()
        coef = torch.clamp(0.5 / (opt_a.last_grad_norm + 1e-6), max=1.0)
        for pb, g in zip(params_b, grads):
            pb.grad = g * coef
        opt_b.step()
    for pa, pb in zip(params_a, params_b):
        assert_bitwise(pa, pb, "param")


@pytest.mark.parametrize("precision,dtype,sr", [("8bit", torch.float32, False), ("bf16", torch.bfloat16, True)])
def test_gradscaler_skip_leaves_everything(precision, dtype, sr):
    params = make_params(dtype)
    opt = fusedopt.FusedAdamW(params, lr=1e-2, state_precision=precision, stochastic_rounding=sr)
    run(opt, params, 2)
    before = state_tensors(opt, params)
    before_p = [p.detach().clone() for p in params]
    counter = opt.param_groups[0].get("rounding_step")
    counter = None if counter is None else counter.clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(torch.ones(()))  # initializes the scale, as scaling the loss does
    for p, g in zip(params, grads_for(params, 2)):
        p.grad = g * 2.0 ** 10
    params[0].grad[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    for k, p in enumerate(params):
        assert_bitwise(p.detach(), before_p[k], "param")
        for key, value in before[k].items():
            assert_bitwise(opt.state[p][key], value, key)  # codes and absmax untouched, steps not advanced
    if counter is not None:
        assert torch.equal(opt.param_groups[0]["rounding_step"], counter)


def test_master_weights_8bit_follow_the_float32_run():
    """bf16 params with float32 master weights and 8-bit states: the master copies and states are exactly those
    of a float32-param run, and the params are the masters rounded to nearest."""
    params32 = make_params()
    params16 = [p.to(torch.bfloat16) for p in params32]
    params32 = [p.to(torch.bfloat16).float() for p in params32]  # the same starting values
    opt32 = fusedopt.FusedAdamW(params32, lr=1e-2, state_precision="8bit")
    opt16 = fusedopt.FusedAdamW(params16, lr=1e-2, state_precision="8bit", master_weights=True)
    for t in range(3):
        for a, b, g in zip(params32, params16, grads_for(params32, t)):
            b.grad = g.to(torch.bfloat16)
            a.grad = b.grad.float()  # the same (bf16) grads, in float32
        opt32.step()
        opt16.step()
    for a, b in zip(params32, params16):
        assert_bitwise(opt16.state[b]["master_param"], a.detach(), "master")
        assert_bitwise(b.detach(), a.detach().to(torch.bfloat16), "param")
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
            if key in opt32.state[a]:
                assert_bitwise(opt16.state[b][key], opt32.state[a][key], key)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule,precision,dtype,sr", [
    ("adamw", "8bit", torch.float32, False), ("sgd", "8bit", torch.float32, False),
    ("lion", "8bit", torch.bfloat16, True), ("adamw", "bf16", torch.bfloat16, True),
])
def test_resume_is_bit_identical(rule, precision, dtype, sr):
    torch.manual_seed(3)
    params = make_params(dtype)
    opt = build(rule, params, state_precision=precision, stochastic_rounding=sr)
    run(opt, params, 2)
    saved = through_bytes(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    run(opt, params, 3, first=2)

    torch.manual_seed(99)  # another seed: the checkpoint's must win
    params_b = [p.clone() for p in saved_params]
    opt_b = build(rule, params_b, state_precision=precision, stochastic_rounding=sr)
    opt_b.load_state_dict(saved)
    run(opt_b, params_b, 3, first=2)
    for a, b in zip(params, params_b):
        assert_bitwise(a.detach(), b.detach(), "param")
        for key in opt.state[a]:
            assert_bitwise(opt.state[a][key], opt_b.state[b][key], key)


def test_torch_checkpoints_both_ways():
    params = make_params()
    torch_opt = torch.optim.AdamW([p.clone() for p in params], lr=1e-2, foreach=False)
    torch_params = torch_opt.param_groups[0]["params"]
    run(torch_opt, torch_params, 2)
    ours = fusedopt.FusedAdamW([p.detach().clone() for p in torch_params], lr=1e-2, state_precision="8bit")
    ours.load_state_dict(through_bytes(torch_opt.state_dict()))
    for tp, p in zip(torch_params, ours.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            st = ours.state[p]
            if Q.is_quantized_size(p.numel()):  # quantized on load, exactly as quantization.quantize_blockwise does
                # (blocks in memory order: the permuted param's states are permuted alike)
                codes, absmax = Q.quantize_blockwise(memory_order(torch_opt.state[tp][key]), key == "exp_avg")
                assert torch.equal(memory_order(st[key]), codes) and torch.equal(st[key + "_absmax"], absmax)
            else:
                assert torch.equal(st[key], torch_opt.state[tp][key])
    run(ours, ours.param_groups[0]["params"], 1, first=2)
    sd = through_bytes(ours.state_dict(dequantize=True))
    assert all(v.dtype in (torch.float32, torch.int64) and not k.endswith("_absmax")
               for st in sd["state"].values() for k, v in st.items())
    back = torch.optim.AdamW([p.detach().clone() for p in ours.param_groups[0]["params"]], lr=1e-2, foreach=False)
    back.load_state_dict(sd)
    for p, bp in zip(ours.param_groups[0]["params"], back.param_groups[0]["params"]):
        if Q.is_quantized_size(p.numel()):
            want = Q.dequantize_blockwise(memory_order(ours.state[p]["exp_avg"]), ours.state[p]["exp_avg_absmax"], True)
            assert torch.equal(memory_order(back.state[bp]["exp_avg"]), want)
    run(back, back.param_groups[0]["params"], 1, first=3)  # torch continues from it


@pytest.mark.parametrize("damage", ["missing absmax", "wrong blocks", "absmax dtype", "blocks of shards"])
def test_mismatched_blocks_are_rejected_before_loading(damage):
    """"blocks of shards": one absmax entry more than the param's blocks, as in a full state dict gathered from
    FSDP2 shards (each shard quantized in its own blocks, padded), which decoded as one tensor would be wrong."""
    params = make_params()
    opt = fusedopt.FusedAdamW(params, state_precision="8bit")
    run(opt, params, 1)
    sd = through_bytes(opt.state_dict())
    st = sd["state"][0]
    if damage == "missing absmax":
        del st["exp_avg_absmax"]
        match = "has no 'exp_avg_absmax'"
    elif damage == "wrong blocks":
        st["exp_avg_absmax"] = st["exp_avg_absmax"][:-1]
        match = "make 17 blocks of 256"
    elif damage == "blocks of shards":
        st["exp_avg_absmax"] = torch.cat([st["exp_avg_absmax"], st["exp_avg_absmax"][-1:]])
        match = "quantized per shard"
    else:
        st["exp_avg_absmax"] = st["exp_avg_absmax"].double()
        match = "blocks"
    target = make_params()
    opt_b = fusedopt.FusedAdamW(target, state_precision="8bit")
    run(opt_b, target, 1)
    before = state_tensors(opt_b, target)
    with pytest.raises(ValueError, match=match):
        opt_b.load_state_dict(sd)
    for k, p in enumerate(target):
        for key, value in before[k].items():
            assert_bitwise(opt_b.state[p][key], value, key)


# ----------------------------------------------------------------------------------------------------------------
# Stochastic rounding
# ----------------------------------------------------------------------------------------------------------------
def test_random_bits_are_the_documented_generator():
    from fusedopt.optim import _small_state as S

    key = S.rounding_key(0x123456789ABCDEF, 77, 4 * 5 + 1)
    for first, count in ((0, 5), ((1 << 32) - 2, 4), (123_456_789_012, 3)):
        got = S.random_bits(key, first, count, "cpu").tolist()
        want = [R.random_bits_reference(0x123456789ABCDEF, 77, 21, first + i) for i in range(count)]
        assert got == want


@pytest.mark.parametrize("offset", [(1 << 32) - 300, (5 << 32) + 7], ids=["crossing 2**32", "high word 5"])
def test_cpu_stochastic_rounding_bits_at_large_element_offsets(offset):
    """The CPU kernels compute a block's random bits in 32-bit lanes with the high word of the element index
    folded into the key, and fall back to the 64-bit definition for a block whose indices cross a multiple of
    2**32 (a shard offset can put one anywhere). Both against the reference generator and rounding, element by
    element: an SGD step (no momentum, lr a power of two, so p - lr * g is one float32 rounding) on 600 bfloat16
    params whose (DTensor-style) offset puts block 1 across 2**32, or every block in high word 5."""
    n, seed, step, index, lr = 600, 0x1234_5678_9ABC, 3, 2, 2.0 ** -6
    g = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=g).to(torch.bfloat16)
    grad = torch.randn(n, generator=g).to(torch.bfloat16)
    exact = (p.float() + (-lr) * grad.float()).tolist()  # the float32 update before rounding
    torch.ops.fusedopt.sgd_([p], [grad], [], [], lr, 0.0, 0.0, 0.0, False, False, False, None, None, None, None,
                            None, None, None, None, [seed, index, offset], torch.tensor(step))
    want = [R.bf16_round_stochastic_reference(x, R.random_bits_reference(seed, step, 4 * index, offset + i))
            for i, x in enumerate(exact)]
    assert p.float().tolist() == want


def test_stochastic_rounding_is_unbiased_and_plain_rounding_is_stuck():
    """bf16 params updated by SGD steps of 1/8 of their ulp: round-to-nearest never moves them, stochastic rounding
    moves them by 1/8 ulp per step on average."""
    n, steps = 4096, 8
    base = torch.full((n,), 1.0, dtype=torch.bfloat16)  # ulp 2**-7 at 1.0
    lr = 2.0 ** -10  # update = lr * grad = 2**-10 = 1/8 ulp
    finals = {}
    for sr in (False, True):
        torch.manual_seed(0)
        p = base.clone()
        opt = fusedopt.FusedSGD([p], lr=lr, stochastic_rounding=sr)
        for _ in range(steps):
            p.grad = torch.full_like(p, -1.0)
            opt.step()
        finals[sr] = p.float()
    assert torch.equal(finals[False], base.float())  # stuck
    moved = finals[True] - 1.0
    want = steps * lr
    se = 2.0 ** -7 * math.sqrt(steps * (1 / 8) * (7 / 8) / n) * 1.5  # rough binomial standard error of the mean
    assert abs(float(moved.mean()) - want) < 4 * se, (float(moved.mean()), want)


def test_stochastic_rounding_is_reproducible_and_seeded():
    out = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        params = make_params(torch.bfloat16)
        opt = fusedopt.FusedAdamW(params, lr=1e-3, stochastic_rounding=True)
        run(opt, params, 2)
        out.append(torch.cat([p.detach().float().reshape(-1) for p in params]))
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])


# ----------------------------------------------------------------------------------------------------------------
# The Triton kernels load and store small states themselves (fusedopt/triton/_codec.py): bit for bit the CPU kernels,
# over the combinations the kernels compile separately (formats, param rounding, amsgrad, Adam's L2, Nesterov,
# master weights, no state at all) and the runtime controls (schedule table, clipping, a GradScaler-skipped step).
# Small problems (one 8-bit tensor just over the 4,096-element minimum, not a multiple of 256, and a float32-state
# one, so every call has two launches), few steps: the interpreter is slow.
# ----------------------------------------------------------------------------------------------------------------
TRITON_SHAPES = [(4099,), (97,)]
TRITON_CASES = {
    "adamw-8bit-amsgrad": (fusedopt.FusedAdamW, "8bit", torch.float32, False, dict(amsgrad=True)),
    "adam-l2-8bit": (fusedopt.FusedAdam, "8bit", torch.float32, False, dict(weight_decay=0.1)),
    "sgd-8bit-nesterov": (fusedopt.FusedSGD, "8bit", torch.float32, False,
                          dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    "lion-8bit-bf16-sr": (fusedopt.FusedLion, "8bit", torch.bfloat16, True, dict(weight_decay=0.1)),
    "adamw-bf16-bf16-sr": (fusedopt.FusedAdamW, "bf16", torch.bfloat16, True, {}),
    "sgd-bf16-states-fp32-params-sr": (fusedopt.FusedSGD, "bf16", torch.float32, True,
                                       dict(momentum=0.9, dampening=0.1)),
    "adamw-bf16-params-no-master-sr": (fusedopt.FusedAdamW, None, torch.bfloat16, True, dict(amsgrad=True)),
    "sgd-no-state-bf16-sr": (fusedopt.FusedSGD, None, torch.bfloat16, True, {}),
    "adamw-8bit-bf16-master": (fusedopt.FusedAdamW, "8bit", torch.bfloat16, False, dict(master_weights=True)),
    # lr table + max_grad_norm + a GradScaler-skipped step (the rounding counter must not advance on it)
    "adamw-8bit-bf16-sr-schedule-clip-skip": (fusedopt.FusedAdamW, "8bit", torch.bfloat16, True,
                                              dict(max_grad_norm=0.5, schedule="table")),
}


def _triton_case_run(case, backend):
    cls, precision, dtype, sr, extra = TRITON_CASES[case]
    extra = dict(extra)
    steps, skipped = 3, None
    if extra.get("schedule") == "table":
        extra["schedule"] = schedules.warmup_cosine(total_steps=4, warmup_steps=1)
        steps, skipped = 4, 2
    torch.manual_seed(5)  # the rounding seed
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(device=backend_device(backend), dtype=dtype) for s in TRITON_SHAPES]
    opt = cls(params, lr=1e-2, backend=backend, state_precision=precision, stochastic_rounding=sr, **extra)
    if backend == "triton":
        def no_staging(*args, **kwargs):
            raise AssertionError("the Triton kernels should read these states themselves")
        opt._call_staged = no_staging
    for t in range(steps):
        grads = grads_for(params, t)
        if t == skipped:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
            scaler.scale(torch.ones(()))
            for p, gr in zip(params, grads):
                p.grad = gr * 2.0 ** 4
            params[1].grad[0] = float("inf")
            scaler.step(opt)
            continue
        for p, gr in zip(params, grads):
            p.grad = gr
        opt.step()
    counter = opt.param_groups[0].get("rounding_step")
    return params, state_tensors(opt, params), None if counter is None else int(counter), steps - (skipped is not None)


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_kernels_equal_the_cpu_kernels(case, monkeypatch):
    require_backend("cpu")
    require_backend("triton")
    from fusedopt.triton import launcher

    # one block per row under the interpreter (the cost is per block); test_backends_bitwise_equal keeps the
    # default, several blocks per row
    monkeypatch.setattr(launcher, "INTERPRET_BLOCK", launcher.CHUNK)
    p_cpu, s_cpu, counter_cpu, live = _triton_case_run(case, "cpu")
    p_tri, s_tri, counter_tri, _ = _triton_case_run(case, "triton")
    for k, (a, b) in enumerate(zip(p_cpu, p_tri)):
        assert_bitwise(a.detach(), b.detach(), f"param {k}")
        assert s_cpu[k].keys() == s_tri[k].keys()
        for key in s_cpu[k]:
            assert_bitwise(s_cpu[k][key], s_tri[k][key], f"param {k} {key}")
    if TRITON_CASES[case][3]:  # the rounding counter advanced on the device once per step GradScaler did not skip
        assert counter_cpu == counter_tri == live
    if TRITON_CASES[case][1] == "8bit":
        assert s_tri[0][next(k for k in s_tri[0] if k.endswith("_absmax"))].numel() == Q.num_blocks(4099)


def test_triton_stochastic_rounding_uses_the_documented_bits():
    """bf16 params without master weights updated by the Triton kernel with stochastic rounding, against
    quant_reference's generator (Python integers, one element at a time): SGD steps whose float32 result is exact
    (1 + k * 2**-10: the update is lr * grad = 2**-10), so every stored param is the reference rounding of a
    known float32 with the bits of (seed, rounding step, 4 * param index, element)."""
    require_backend("triton")
    device = backend_device("triton")
    torch.manual_seed(3)
    params = [torch.ones(5, dtype=torch.bfloat16, device=device), torch.ones(300, dtype=torch.bfloat16, device=device)]
    opt = fusedopt.FusedSGD(params, lr=2.0 ** -10, backend="triton", stochastic_rounding=True)
    seed = opt.param_groups[0]["rounding_seed"]
    for step in range(2):
        before = [p.detach().float().cpu() for p in params]
        for p in params:
            p.grad = torch.full_like(p, -1.0)
        opt.step()
        for index, (p, b) in enumerate(zip(params, before)):
            exact = (b + 2.0 ** -10).tolist()  # b is a bf16 value near 1: b + 2**-10 is a float32, exactly
            want = [R.bf16_round_stochastic_reference(x, R.random_bits_reference(seed, step, 4 * index, e))
                    for e, x in enumerate(exact)]
            assert p.detach().float().cpu().tolist() == want, (step, index)
    assert int(opt.param_groups[0]["rounding_step"]) == 2


try:  # the Triton codec run by itself (tests/conftest.py set TRITON_INTERPRET before this import without a GPU)
    import triton
    import triton.language as tl

    from fusedopt.triton import _codec

    @triton.jit
    def _codec_kernel(q_ptr, codes_ptr, values_ptr, table_ptr, SIGNED: tl.constexpr, N: tl.constexpr):
        offs = tl.program_id(0) * N + tl.arange(0, N)
        tl.store(codes_ptr + offs, _codec.encode_8bit(tl.load(q_ptr + offs), table_ptr, SIGNED))
        tl.store(values_ptr + offs, _codec.decode_8bit(offs & 255, table_ptr, SIGNED))
except ImportError:  # no triton: require_backend("triton") decides below
    _codec_kernel = None


# (the interpreter's numpy warns about the inf - inf and overflows of the encoder's candidate for huge q, which
# `one` overrides)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_triton_codec_equals_the_definition_on_float32_patterns():
    """fusedopt/triton/_codec.py's encoder and decoder, run directly in a Triton kernel, against
    fusedopt.quantization's definition (nearest value by a search over the exact midpoints): for both maps, every
    4999th float32 bit pattern of both signs (859K values: every exponent, NaNs and infinities included), every
    midpoint (the catchment thresholds are among them) and its two float32 neighbours; and the decoder on all 256
    codes against the maps' values."""
    require_backend("triton")
    from fusedopt.triton import _codec as C

    device = backend_device("triton")
    table = torch.tensor(C.table_values(), dtype=torch.float32, device=device)
    sampled = torch.arange(0, 2 ** 32, 4999, dtype=torch.int64)
    for signed in (True, False):
        edges = Q.midpoints(signed).view(torch.int32).to(torch.int64)
        near = torch.cat([edges - 1, edges, edges + 1])
        bits = torch.cat([sampled, near, near | 0x80000000, torch.tensor([0x7F800000, 0xFF800000, 0x7FC00000])])
        per = 1 << 20  # elements per program (Triton's largest block)
        n = -(-bits.numel() // per) * per
        bits = torch.cat([bits, torch.zeros(n - bits.numel(), dtype=torch.int64)])
        q = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32).view(torch.float32)
        codes = torch.empty(n, dtype=torch.int32, device=device)
        values = torch.empty(n, dtype=torch.float32, device=device)
        _codec_kernel[(n // per,)](q.to(device), codes, values, table, SIGNED=signed, N=per)
        want = Q.encode(q, signed).to(torch.int32)
        bad = codes.cpu() != want
        assert not bad.any(), (signed, q[bad][:5].tolist(), codes.cpu()[bad][:5].tolist(), want[bad][:5].tolist())
        assert_bitwise(values[:256].cpu(), Q.dynamic_map(signed), f"decode, signed={signed}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_triton_special_blocks_equal_the_quantizer():
    """Blocks the rule cannot produce from ordinary grads, through the Triton kernel: SGD's first step stores the
    gradient in the 8-bit momentum buffer (lr 0), so codes and absmax must be quantize_blockwise(grad): blocks of
    zeros, of subnormals (absmax below 2**-126: every element encodes as 0), with infinities and NaNs (a NaN wins
    the integer absmax), ordinary values, and a partial last block."""
    require_backend("triton")
    device = backend_device("triton")
    g = torch.Generator().manual_seed(2)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-39, float("inf"), float("-inf"), float("nan")])
    grad = torch.cat([torch.zeros(256), torch.full((256,), 1e-40), torch.full((256,), -1e-39), special.repeat(32),
                      torch.randn(256, generator=g) * 1e30, special[:6].repeat(40), torch.randn(3 * 1024 + 3, generator=g)])
    param = torch.zeros_like(grad, device=device)
    opt = fusedopt.FusedSGD([param], lr=0.0, momentum=0.9, state_precision="8bit", backend="triton")
    param.grad = grad.to(device)
    opt.step()
    codes, absmax = Q.quantize_blockwise(grad, signed=True)
    assert_bitwise(opt.state[param]["momentum_buffer"], codes, "codes")
    assert_bitwise(opt.state[param]["momentum_buffer_absmax"], absmax, "absmax")
