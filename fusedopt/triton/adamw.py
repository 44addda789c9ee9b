"""fusedopt::adamw_ as one Triton launch per call (torch.optim.AdamW, single-tensor semantics; with
decoupled_weight_decay=False, torch.optim.Adam's L2 weight decay).

Mirrors csrc/fusedopt/rules.h make_adamw_scalars() / adamw_update() and csrc/cpu/adamw.cpp line by line.
Per program: read the controls and the schedule (_jit.read_controls), read this row's tensor step and add its
increment (one; the step this update uses: torch counts from 1), compute the AdamW scalars in float64 and
round each to the math type once, update the row's elements; then the last program to finish increments every
step tensor, unless found_inf is set.

The states are loaded and stored through the codec (_codec.py: plain, bfloat16 rounded stochastically, or
8-bit with exp_avg on the signed map and exp_avg_sq / max_exp_avg_sq on the unsigned one), the param to
nearest or stochastically: constexprs orthogonal to the rule, whose lines below are the same for every format.
"""

import torch
import triton
import triton.language as tl

from fusedopt.triton import _codec as C
from fusedopt.triton import _jit as J
from fusedopt.triton import launcher as L


@J.device_function
def _adamw_elements(p_addr, g_addr, m_addr, v_addr, vmax_addr, master_addr, m_absmax, v_absmax, vmax_absmax,
                    codec_ptr, start, offs, mask, seed, rstep, stream, element0,
                    inv_scale, clip_coef, decay, l2_weight_decay, beta2, one_minus_beta1, one_minus_beta2,
                    neg_step_size, bias_correction2_sqrt, eps,
                    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr,
                    HAS_MASTER: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                    DECOUPLED: tl.constexpr, ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr,
                    STATE_FORMAT: tl.constexpr, PARAM_SR: tl.constexpr, BLOCK: tl.constexpr):
    p = J.load_param(p_addr, master_addr, offs, mask, P_DTYPE, tl.float32, T_DTYPE, HAS_MASTER, ALIGNED, SOFT_BF16)
    g = J.transform_grad(J.load_elems(g_addr, offs, mask, P_DTYPE, T_DTYPE, ALIGNED, SOFT_BF16),
                         inv_scale, clip_coef, MAXIMIZE)
    # state slots 1, 2, 3 (the rounding streams): exp_avg (signed map), exp_avg_sq, max_exp_avg_sq (unsigned)
    m = C.load_state(m_addr, m_absmax, codec_ptr, offs, mask, STATE_FORMAT, S_DTYPE, T_DTYPE, True, ALIGNED,
                     SOFT_BF16)
    v = C.load_state(v_addr, v_absmax, codec_ptr, offs, mask, STATE_FORMAT, S_DTYPE, T_DTYPE, False, ALIGNED,
                     SOFT_BF16)

    # rules.h adamw_update(), same operations in the same order
    if not DECOUPLED:  # Adam's L2 decay (l2_weight_decay is 0 and decay 1 in AdamW mode, as in rules.h)
        g = tl.where(l2_weight_decay != 0, J.fma(l2_weight_decay, p, g), g)
    p = p * decay
    m = J.lerp(m, g, one_minus_beta1)
    v = v * beta2
    v = J.fma(one_minus_beta2 * g, g, v)
    second_moment = v
    if AMSGRAD:
        max_v = C.load_state(vmax_addr, vmax_absmax, codec_ptr, offs, mask, STATE_FORMAT, S_DTYPE, T_DTYPE, False,
                             ALIGNED, SOFT_BF16)
        max_v = tl.where(max_v > v, max_v, v)  # torch.maximum; a NaN in v propagates
        second_moment = max_v
        C.store_state(vmax_addr, vmax_absmax, codec_ptr, start, offs, max_v, mask, seed, rstep, stream, element0,
                      STATE_FORMAT, S_DTYPE, False, 3, ALIGNED, SOFT_BF16, BLOCK)
    denom = J.div(J.sqrt(second_moment), bias_correction2_sqrt) + eps
    p = p + J.div(neg_step_size * m, denom)

    C.store_state(m_addr, m_absmax, codec_ptr, start, offs, m, mask, seed, rstep, stream, element0,
                  STATE_FORMAT, S_DTYPE, True, 1, ALIGNED, SOFT_BF16, BLOCK)
    C.store_state(v_addr, v_absmax, codec_ptr, start, offs, v, mask, seed, rstep, stream, element0,
                  STATE_FORMAT, S_DTYPE, False, 2, ALIGNED, SOFT_BF16, BLOCK)
    C.store_param(p_addr, master_addr, offs, p, mask, seed, rstep, stream, element0, P_DTYPE, HAS_MASTER, PARAM_SR,
                  ALIGNED, SOFT_BF16)


@triton.jit(**L.jit_options(int_args=["beta1_table_len"], pointer_args=["beta1_table_ptr"]))
def adamw_kernel(
    rows_ptr, grad_addrs_ptr, n_tensors: tl.int64, step_table_ptr, done_ptr,
    lr_table_ptr, lr_table_len: tl.int64, beta1_table_ptr, beta1_table_len: tl.int64, schedule_step_ptr,
    grad_scale_ptr, found_inf_ptr, clip_coef_ptr, wd_table_ptr, wd_table_len: tl.int64,
    rounding_step_ptr, rounding_seed: tl.int64, codec_ptr,
    lr: tl.float64, beta1: tl.float64, beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
    SIZE_CLASS: tl.int32,  # autotuning key only
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, ALIGNED: tl.constexpr,
    SOFT_BF16: tl.constexpr, STATE_FORMAT: tl.constexpr, PARAM_SR: tl.constexpr, BLOCK: tl.constexpr,
):
    row = J.row_ptr(rows_ptr)
    lr_now, beta1_now, wd_now, live, inv_scale, clip_coef = J.read_controls(
        schedule_step_ptr, lr_table_ptr, lr_table_len, beta1_table_ptr, beta1_table_len,
        grad_scale_ptr, found_inf_ptr, clip_coef_ptr, wd_table_ptr, wd_table_len, lr, beta1, weight_decay, T_DTYPE)

    # adamw.cpp: `*steps[i] += 1` for every entry of the list happens before make_adamw_scalars reads it.
    # Every program of the tensor reads the old value here and adds the increment the op will make (the
    # number of times the list holds this step tensor: 1, unless a caller lists one tensor twice); the last
    # program writes the increments below. The step table (launcher.py) is [address | increment | increment
    # at the first occurrence of the address, 0 at the others] per tensor.
    tensor = tl.load(row + J.F_TENSOR)
    step_ptr = tl.load(step_table_ptr + tensor).to(tl.pointer_type(tl.int64))
    step = tl.load(step_ptr) + tl.load(step_table_ptr + n_tensors + tensor)

    # rules.h make_adamw_scalars(): double math, each scalar rounded to the math type once
    beta2_64 = J.f64(beta2)
    beta1_pow, beta2_pow = J.power2(beta1_now, beta2_64, step)
    bias_correction1 = 1.0 - beta1_pow
    bias_correction2 = 1.0 - beta2_pow
    if DECOUPLED:
        decay = (1.0 - lr_now * wd_now).to(T_DTYPE)
        l2_weight_decay = tl.full((), 0.0, T_DTYPE)
    else:
        decay = tl.full((), 1.0, T_DTYPE)
        l2_weight_decay = wd_now.to(T_DTYPE)
    beta2_t = beta2_64.to(T_DTYPE)
    one_minus_beta1 = (1.0 - beta1_now).to(T_DTYPE)
    one_minus_beta2 = (1.0 - beta2_64).to(T_DTYPE)
    neg_step_size = (-(lr_now / bias_correction1)).to(T_DTYPE)
    bias_correction2_sqrt = J.sqrt(bias_correction2).to(T_DTYPE)
    eps_t = J.f64(eps).to(T_DTYPE)

    p_addr = tl.load(row + J.F_PARAM)
    g_addr = J.grad_addr(row, grad_addrs_ptr)
    m_addr = tl.load(row + J.F_STATE0)
    v_addr = tl.load(row + J.F_STATE1)
    vmax_addr = tl.load(row + J.F_STATE2)
    master_addr = tl.load(row + J.F_MASTER)
    m_absmax = tl.load(row + J.F_ABSMAX0)
    v_absmax = tl.load(row + J.F_ABSMAX1)
    vmax_absmax = tl.load(row + J.F_ABSMAX2)
    rstep, stream, element0 = C.rounding_stream(row, rounding_step_ptr,
                                                PARAM_SR or STATE_FORMAT == C.FMT_BF16_SR)
    n = tl.where(live, tl.load(row + J.F_NUMEL), 0)  # found_inf: no element is touched
    n_full = (n // BLOCK) * BLOCK
    for start in range(0, n_full, BLOCK):  # full blocks: no mask, 128-bit accesses when ALIGNED
        offs = start + tl.arange(0, BLOCK)
        _adamw_elements(p_addr, g_addr, m_addr, v_addr, vmax_addr, master_addr, m_absmax, v_absmax, vmax_absmax,
                        codec_ptr, start, offs, None, rounding_seed, rstep, stream, element0,
                        inv_scale, clip_coef, decay, l2_weight_decay, beta2_t, one_minus_beta1, one_minus_beta2,
                        neg_step_size, bias_correction2_sqrt, eps_t,
                        P_DTYPE, S_DTYPE, T_DTYPE, HAS_MASTER, AMSGRAD, MAXIMIZE, DECOUPLED, ALIGNED, SOFT_BF16,
                        STATE_FORMAT, PARAM_SR, BLOCK)
    for start in range(n_full, n, BLOCK):  # the tail: at most one masked block
        offs = start + tl.arange(0, BLOCK)
        _adamw_elements(p_addr, g_addr, m_addr, v_addr, vmax_addr, master_addr, m_absmax, v_absmax, vmax_absmax,
                        codec_ptr, start, offs, offs < n, rounding_seed, rstep, stream, element0,
                        inv_scale, clip_coef, decay, l2_weight_decay, beta2_t, one_minus_beta1, one_minus_beta2,
                        neg_step_size, bias_correction2_sqrt, eps_t,
                        P_DTYPE, S_DTYPE, T_DTYPE, HAS_MASTER, AMSGRAD, MAXIMIZE, DECOUPLED, ALIGNED, SOFT_BF16,
                        STATE_FORMAT, PARAM_SR, BLOCK)

    # The step increments. A program may only write a step once no program will read it any more, so the
    # last program to get here does all of them (PyTorch's mark_block_finished pattern): the barrier makes
    # every warp of this program finish its read of the step above before thread 0 makes the atomic
    # increment of the done-counter (acq_rel, gpu scope), which orders those reads before the count; the
    # program that sees the count reach num_programs - 1 is the last, and its barrier after the atomic
    # orders its writes after it. It resets the counter for the next launch (and the next graph replay).
    # Uniform branches per program, not per element. Each distinct step tensor is written once (its
    # first-occurrence increment), so a tensor listed twice is not read and written by two lanes at once.
    tl.debug_barrier()
    done = tl.atomic_add(done_ptr, 1)
    if done == tl.num_programs(0) - 1:
        tl.debug_barrier()
        n_steps = tl.where(live, n_tensors, 0)  # found_inf: no step counts
        for t0 in range(0, n_steps, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            increment = tl.load(step_table_ptr + 2 * n_tensors + t, mask=t < n_steps, other=0)
            write = (t < n_steps) & (increment != 0)
            steps = tl.load(step_table_ptr + t, mask=write, other=0).to(tl.pointer_type(tl.int64))
            tl.store(steps, tl.load(steps, mask=write, other=0) + increment, mask=write)
        tl.store(done_ptr, 0)


_tuned = None
if not L.INTERPRET:
    _tuned = triton.autotune(configs=L.CONFIGS, key=L.TUNE_KEY + ["AMSGRAD", "DECOUPLED"],
                             pre_hook=L.tuning_guard, do_bench=L.bench)(adamw_kernel)


def adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr, beta1, beta2, eps,
           weight_decay, amsgrad, maximize, lr_table, beta1_table, schedule_step, grad_scale, found_inf,
           clip_coef, weight_decay_table=None, decoupled_weight_decay=True, state_absmaxes=None, rounding=(),
           rounding_step=None) -> None:
    """fusedopt::adamw_ (csrc/ops.cpp) on the Triton backend; same arguments, same in-place semantics (small
    state: state_absmaxes, rounding, rounding_step as the op takes them; one launch per state format)."""
    op = "fusedopt::adamw_"
    L.check_params(op, params)
    if not params:
        return
    names = ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
    lists = (exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [])
    fields = {L.F_PARAM: params, L.F_STATE0: exp_avgs, L.F_STATE1: exp_avg_sqs}
    if amsgrad:
        fields[L.F_STATE2] = max_exp_avg_sqs
    if master_params:
        fields[L.F_MASTER] = master_params

    def validate():  # on a cache miss
        sdtype = None if state_absmaxes is not None else L.state_dtype(params, master_params)
        L.check_list(op, "grads", params, grads, True, params[0].dtype)
        L.check_list(op, "exp_avgs", params, exp_avgs, True, sdtype)
        L.check_list(op, "exp_avg_sqs", params, exp_avg_sqs, True, sdtype)
        L.check_list(op, "max_exp_avg_sqs", params, max_exp_avg_sqs, amsgrad, sdtype)
        L.check_list(op, "master_params", params, master_params, False, torch.float32)
        L.check_steps(op, params, steps)
        L.check_small_states(op, params, master_params, lists, names, state_absmaxes, bool(rounding))

    if len(steps) != len(params):
        L.check_steps(op, params, steps)
    parts, rounding_args = L.small_state_parts(op, params, master_params, lists, state_absmaxes, rounding,
                                               rounding_step)
    plans = L.plan_parts(op, parts, fields, steps, grads, validate)
    ctrl = L.controls(op, params[0].device, lr_table, beta1_table, schedule_step, grad_scale, found_inf,
                      clip_coef, weight_decay_table)
    scalars = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay))
    for part, (layout, grad_vector) in zip(parts, plans):
        meta = dict(L.common_meta(params, master_params, part), AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize),
                    DECOUPLED=bool(decoupled_weight_decay))
        L.launch(adamw_kernel, _tuned, layout, grad_vector, ctrl, scalars, meta, rounding_args)
