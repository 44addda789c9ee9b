"""fusedopt::lion_ as one Triton launch per call (lion-pytorch's Lion).

Mirrors csrc/fusedopt/rules.h make_lion_scalars() / lion_update() and csrc/cpu/lion.cpp line by line (Lion has
no maximize: the gradient transform runs with maximize=false, as in lion.cpp). exp_avg is loaded and stored
through the codec (_codec.py; 8-bit on the signed map, rounding stream slot 1), the param to nearest or
stochastically (slot 0).
"""

import torch
import triton
import triton.language as tl

from fusedopt.triton import _codec as C
from fusedopt.triton import _jit as J
from fusedopt.triton import launcher as L


@J.device_function
def _lion_elements(p_addr, g_addr, m_addr, master_addr, m_absmax, codec_ptr, start, offs, mask, seed, rstep, stream,
                   element0,
                   inv_scale, clip_coef, decay, neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                   P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                   ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr, STATE_FORMAT: tl.constexpr,
                   PARAM_SR: tl.constexpr, BLOCK: tl.constexpr):
    p = J.load_param(p_addr, master_addr, offs, mask, P_DTYPE, tl.float32, T_DTYPE, HAS_MASTER, ALIGNED, SOFT_BF16)
    g = J.transform_grad(J.load_elems(g_addr, offs, mask, P_DTYPE, T_DTYPE, ALIGNED, SOFT_BF16),
                         inv_scale, clip_coef, False)
    m = C.load_state(m_addr, m_absmax, codec_ptr, offs, mask, STATE_FORMAT, S_DTYPE, T_DTYPE, True, ALIGNED,
                     SOFT_BF16)

    # rules.h lion_update(), same operations in the same order
    p = p * decay
    blended = J.fma(one_minus_beta1, g, m * beta1)
    p = J.fma(neg_lr, J.sign(blended), p)
    m = J.fma(one_minus_beta2, g, m * beta2)

    C.store_state(m_addr, m_absmax, codec_ptr, start, offs, m, mask, seed, rstep, stream, element0,
                  STATE_FORMAT, S_DTYPE, True, 1, ALIGNED, SOFT_BF16, BLOCK)
    C.store_param(p_addr, master_addr, offs, p, mask, seed, rstep, stream, element0, P_DTYPE, HAS_MASTER, PARAM_SR,
                  ALIGNED, SOFT_BF16)


@triton.jit(**L.jit_options(int_args=["beta1_table_len"], pointer_args=["beta1_table_ptr"]))
def lion_kernel(
    rows_ptr, grad_addrs_ptr, n_tensors: tl.int64, step_table_ptr, done_ptr,
    lr_table_ptr, lr_table_len: tl.int64, beta1_table_ptr, beta1_table_len: tl.int64, schedule_step_ptr,
    grad_scale_ptr, found_inf_ptr, clip_coef_ptr, wd_table_ptr, wd_table_len: tl.int64,
    rounding_step_ptr, rounding_seed: tl.int64, codec_ptr,
    lr: tl.float64, beta1: tl.float64, beta2: tl.float64, weight_decay: tl.float64,
    SIZE_CLASS: tl.int32,  # autotuning key only
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
    ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr, STATE_FORMAT: tl.constexpr, PARAM_SR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = J.row_ptr(rows_ptr)
    lr_now, beta1_now, wd_now, live, inv_scale, clip_coef = J.read_controls(
        schedule_step_ptr, lr_table_ptr, lr_table_len, beta1_table_ptr, beta1_table_len,
        grad_scale_ptr, found_inf_ptr, clip_coef_ptr, wd_table_ptr, wd_table_len, lr, beta1, weight_decay, T_DTYPE)

    # rules.h make_lion_scalars()
    beta2_64 = J.f64(beta2)
    decay = (1.0 - lr_now * wd_now).to(T_DTYPE)
    neg_lr = (-lr_now).to(T_DTYPE)
    beta1_t = beta1_now.to(T_DTYPE)
    one_minus_beta1 = (1.0 - beta1_now).to(T_DTYPE)
    beta2_t = beta2_64.to(T_DTYPE)
    one_minus_beta2 = (1.0 - beta2_64).to(T_DTYPE)

    p_addr = tl.load(row + J.F_PARAM)
    g_addr = J.grad_addr(row, grad_addrs_ptr)
    m_addr = tl.load(row + J.F_STATE0)
    master_addr = tl.load(row + J.F_MASTER)
    m_absmax = tl.load(row + J.F_ABSMAX0)
    rstep, stream, element0 = C.rounding_stream(row, rounding_step_ptr,
                                                PARAM_SR or STATE_FORMAT == C.FMT_BF16_SR)
    n = tl.where(live, tl.load(row + J.F_NUMEL), 0)  # found_inf: no element is touched
    n_full = (n // BLOCK) * BLOCK
    for start in range(0, n_full, BLOCK):  # full blocks: no mask, 128-bit accesses when ALIGNED
        offs = start + tl.arange(0, BLOCK)
        _lion_elements(p_addr, g_addr, m_addr, master_addr, m_absmax, codec_ptr, start, offs, None,
                       rounding_seed, rstep, stream, element0,
                       inv_scale, clip_coef, decay, neg_lr, beta1_t, one_minus_beta1, beta2_t, one_minus_beta2,
                       P_DTYPE, S_DTYPE, T_DTYPE, HAS_MASTER, ALIGNED, SOFT_BF16, STATE_FORMAT, PARAM_SR, BLOCK)
    for start in range(n_full, n, BLOCK):  # the tail: at most one masked block
        offs = start + tl.arange(0, BLOCK)
        _lion_elements(p_addr, g_addr, m_addr, master_addr, m_absmax, codec_ptr, start, offs, offs < n,
                       rounding_seed, rstep, stream, element0,
                       inv_scale, clip_coef, decay, neg_lr, beta1_t, one_minus_beta1, beta2_t, one_minus_beta2,
                       P_DTYPE, S_DTYPE, T_DTYPE, HAS_MASTER, ALIGNED, SOFT_BF16, STATE_FORMAT, PARAM_SR, BLOCK)


_tuned = None
if not L.INTERPRET:
    _tuned = triton.autotune(configs=L.CONFIGS, key=L.TUNE_KEY, pre_hook=L.tuning_guard,
                             do_bench=L.bench)(lion_kernel)


def lion_(params, grads, exp_avgs, master_params, lr, beta1, beta2, weight_decay, lr_table, beta1_table,
          schedule_step, grad_scale, found_inf, clip_coef, weight_decay_table=None, state_absmaxes=None,
          rounding=(), rounding_step=None) -> None:
    """fusedopt::lion_ (csrc/ops.cpp) on the Triton backend; same arguments, same in-place semantics (small
    state: state_absmaxes, rounding, rounding_step as the op takes them; one launch per state format)."""
    op = "fusedopt::lion_"
    L.check_params(op, params)
    if not params:
        return
    fields = {L.F_PARAM: params, L.F_STATE0: exp_avgs}
    if master_params:
        fields[L.F_MASTER] = master_params

    def validate():  # on a cache miss
        sdtype = None if state_absmaxes is not None else L.state_dtype(params, master_params)
        L.check_list(op, "grads", params, grads, True, params[0].dtype)
        L.check_list(op, "exp_avgs", params, exp_avgs, True, sdtype)
        L.check_list(op, "master_params", params, master_params, False, torch.float32)
        L.check_small_states(op, params, master_params, (exp_avgs,), ("exp_avgs",), state_absmaxes,
                             bool(rounding))

    parts, rounding_args = L.small_state_parts(op, params, master_params, (exp_avgs,), state_absmaxes, rounding,
                                               rounding_step)
    plans = L.plan_parts(op, parts, fields, None, grads, validate)
    ctrl = L.controls(op, params[0].device, lr_table, beta1_table, schedule_step, grad_scale, found_inf,
                      clip_coef, weight_decay_table)
    scalars = (float(lr), float(beta1), float(beta2), float(weight_decay))
    for part, (layout, grad_vector) in zip(parts, plans):
        L.launch(lion_kernel, _tuned, layout, grad_vector, ctrl, scalars, L.common_meta(params, master_params, part),
                 rounding_args)
