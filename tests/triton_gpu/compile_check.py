"""Compiles the Triton backend's kernels for an NVIDIA target without a GPU and checks the generated PTX.

Run as a script (TRITON_INTERPRET must be unset: the interpreter does not compile); prints one JSON object
per kernel variant. tests/test_triton_backend.py runs it in a subprocess, so that CPU-only CI still checks
that every compiled variant builds and keeps the numerics the C++ kernels have:
  * fused multiply-adds only where the rules ask for one (_jit.fma -> fma.rn, as rules.h's fma_host_device);
    no contraction of any other a*b+c (the C++ kernels are built with -ffp-contract=off),
  * IEEE-rounded division and square root (div.rn / sqrt.rn, never div.full / div.approx / sqrt.approx),
  * round-to-nearest-even float conversions (the static_casts of the C++ kernels),
  * 128-bit global loads and stores when every address is 16-byte aligned,
  * in AdamW, a block-wide barrier between the last global memory access of the update (every warp's read of
    its step included) and the atomic increment of the done-counter (PyTorch's mark_block_finished pattern).
"""

import json
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile_check needs the compiler, not the interpreter"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusedopt.triton import _codec, adamw, lion, sgd  # noqa: E402

POINTERS = {
    "rows_ptr": "*i64", "grad_addrs_ptr": "*i64", "step_table_ptr": "*i64", "done_ptr": "*i32",
    "lr_table_ptr": "*fp64", "beta1_table_ptr": "*fp64", "momentum_table_ptr": "*fp64",
    "schedule_step_ptr": "*i64", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "clip_coef_ptr": "*fp32",
    "wd_table_ptr": "*fp64", "rounding_step_ptr": "*i64", "codec_ptr": "*fp32",
}
ANNOTATED = {"n_tensors": "i64", "lr_table_len": "i64", "beta1_table_len": "i64", "momentum_table_len": "i64",
             "wd_table_len": "i64", "SIZE_CLASS": "i32", "first_step": "i32", "rounding_seed": "i64"}


def signature(kernel, constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = POINTERS[name]
        elif name in ANNOTATED:
            sig[name] = ANNOTATED[name]
        else:
            sig[name] = "fp64"  # the hyperparameters
    return sig


def check(kernel, constexprs, capability=90, num_warps=4):
    src = ASTSource(kernel, signature=signature(kernel, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"enable_fp_fusion": False, "num_warps": num_warps})
    ptx = compiled.asm["ptx"]

    def count(pattern):
        return len(re.findall(pattern, ptx))

    # the PTX up to the first atomic: its last barrier must come after its last global load or store
    before_atom = ptx.split("atom.", 1)[0] if "atom." in ptx else ""
    barriers = [m.end() for m in re.finditer(r"\b(bar|barrier)\.sync\b", before_atom)]
    accesses = [m.end() for m in re.finditer(r"\b(ld|st)\.global\b", before_atom)]

    return {
        "kernel": kernel.__name__,
        "constexprs": {k: str(v) for k, v in constexprs.items()},
        "fma_rn": count(r"\bfma\.rn\.f(32|64)\b"),  # the explicit ones
        "fma_other": count(r"\bfma\.(?!rn\.f(32|64)\b)") + count(r"\bmad\.(rn\.)?f"),
        "div_approx": count(r"\bdiv\.(full|approx)"),
        "sqrt_approx": count(r"\bsqrt\.approx") + count(r"\brsqrt\."),
        "div_rn": count(r"\bdiv\.rn\."),
        "sqrt_rn": count(r"\bsqrt\.rn\."),
        "ld_v4": count(r"\bld\.global(\.[a-z0-9_]+)*\.v4"),
        "st_v4": count(r"\bst\.global(\.[a-z0-9_]+)*\.v4"),
        "ld_v2": count(r"\bld\.global(\.[a-z0-9_]+)*\.v2"),
        "atom": count(r"\batom\."),
        "barrier_before_atom": bool(barriers) and (not accesses or barriers[-1] > accesses[-1]),
        # float conversions must round to nearest (even): no cvt.rz / cvt.rm / cvt.rp
        "cvt_not_rn": count(r"\bcvt\.r[zmp]\b"),
        # float add/sub/mul without an explicit rounding mode may be contracted into an FMA by ptxas
        "contractible": count(r"\b(add|sub|mul)(\.(ftz|sat))*\.f(32|64)\b"),
    }


def variants():
    f32, bf16, f16, f64, u8 = tl.float32, tl.bfloat16, tl.float16, tl.float64, tl.uint8
    PLAIN, SR, Q8 = int(_codec.FMT_PLAIN), int(_codec.FMT_BF16_SR), int(_codec.FMT_8BIT)
    for p, s, t, master in ((f32, f32, f32, False), (bf16, f32, f32, True), (f16, f16, f32, False),
                            (f64, f64, f64, False)):
        dt = dict(P_DTYPE=p, S_DTYPE=s, T_DTYPE=t, HAS_MASTER=master, ALIGNED=True, SOFT_BF16=False,
                  STATE_FORMAT=PLAIN, PARAM_SR=False, BLOCK=1024)
        yield adamw.adamw_kernel, dict(dt, AMSGRAD=True, MAXIMIZE=True, DECOUPLED=True)
        yield adamw.adamw_kernel, dict(dt, AMSGRAD=False, MAXIMIZE=True, DECOUPLED=False)
        yield sgd.sgd_kernel, dict(dt, USE_MOMENTUM=True, NESTEROV=True, MAXIMIZE=False)
        yield lion.lion_kernel, dict(dt)
    dt = dict(P_DTYPE=f32, S_DTYPE=f32, T_DTYPE=f32, HAS_MASTER=False, ALIGNED=False, SOFT_BF16=False,
              STATE_FORMAT=PLAIN, PARAM_SR=False, BLOCK=512)
    yield adamw.adamw_kernel, dict(dt, AMSGRAD=False, MAXIMIZE=False, DECOUPLED=True)
    yield sgd.sgd_kernel, dict(dt, USE_MOMENTUM=False, NESTEROV=False, MAXIMIZE=True)
    yield sgd.sgd_kernel, dict(dt, USE_MOMENTUM=True, NESTEROV=False, MAXIMIZE=False)
    # small state (fusedopt/triton/_codec.py): 8-bit states (float32 params; bfloat16 params rounded
    # stochastically), bfloat16 states and params rounded stochastically
    small = dict(T_DTYPE=f32, HAS_MASTER=False, ALIGNED=True, SOFT_BF16=False, BLOCK=1024)
    yield adamw.adamw_kernel, dict(small, P_DTYPE=f32, S_DTYPE=u8, STATE_FORMAT=Q8, PARAM_SR=False, AMSGRAD=True,
                                   MAXIMIZE=False, DECOUPLED=True)
    yield sgd.sgd_kernel, dict(small, P_DTYPE=bf16, S_DTYPE=u8, STATE_FORMAT=Q8, PARAM_SR=True, USE_MOMENTUM=True,
                               NESTEROV=True, MAXIMIZE=False)
    yield lion.lion_kernel, dict(small, P_DTYPE=bf16, S_DTYPE=bf16, STATE_FORMAT=SR, PARAM_SR=True)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    for kernel, constexprs in variants():
        if which == "quick" and constexprs["BLOCK"] != 1024:
            continue
        print(json.dumps(check(kernel, constexprs)), flush=True)
