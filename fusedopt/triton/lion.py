"""fusedopt::lion_ as one Triton launch per call (lion-pytorch's Lion).

Mirrors csrc/fusedopt/rules.h make_lion_scalars() / lion_update() and csrc/cpu/lion.cpp line by line (Lion has
no maximize: the gradient transform runs with maximize=false, as in lion.cpp).
"""

import torch
import triton
import triton.language as tl

from fusedopt.triton import _jit as J
from fusedopt.triton import launcher as L


@J.device_function
def _lion_elements(p_addr, g_addr, m_addr, master_addr, offs, mask,
                   inv_scale, clip_coef, decay, neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                   P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                   ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr):
    p = J.load_param(p_addr, master_addr, offs, mask, P_DTYPE, S_DTYPE, T_DTYPE, HAS_MASTER, ALIGNED, SOFT_BF16)
    g = J.transform_grad(J.load_elems(g_addr, offs, mask, P_DTYPE, T_DTYPE, ALIGNED, SOFT_BF16),
                         inv_scale, clip_coef, False)
    m = J.load_elems(m_addr, offs, mask, S_DTYPE, T_DTYPE, ALIGNED, SOFT_BF16)

    # rules.h lion_update(), same operations in the same order
    p = p * decay
    blended = J.fma(one_minus_beta1, g, m * beta1)
    p = J.fma(neg_lr, J.sign(blended), p)
    m = J.fma(one_minus_beta2, g, m * beta2)

    J.store_elems(m_addr, offs, m, mask, S_DTYPE, ALIGNED, SOFT_BF16)
    J.store_param(p_addr, master_addr, offs, p, mask, P_DTYPE, S_DTYPE, HAS_MASTER, ALIGNED, SOFT_BF16)


@triton.jit(**L.jit_options(int_args=["beta1_table_len"], pointer_args=["beta1_table_ptr"]))
def lion_kernel(
    rows_ptr, grad_addrs_ptr, n_tensors: tl.int64, step_table_ptr, done_ptr,
    lr_table_ptr, lr_table_len: tl.int64, beta1_table_ptr, beta1_table_len: tl.int64, schedule_step_ptr,
    grad_scale_ptr, found_inf_ptr, clip_coef_ptr, wd_table_ptr, wd_table_len: tl.int64,
    lr: tl.float64, beta1: tl.float64, beta2: tl.float64, weight_decay: tl.float64,
    SIZE_CLASS: tl.int32,  # autotuning key only
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
    ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK: tl.constexpr,
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
    n = tl.where(live, tl.load(row + J.F_NUMEL), 0)  # found_inf: no element is touched
    n_full = (n // BLOCK) * BLOCK
    for start in range(0, n_full, BLOCK):  # full blocks: no mask, 128-bit accesses when ALIGNED
        offs = start + tl.arange(0, BLOCK)
        _lion_elements(p_addr, g_addr, m_addr, master_addr, offs, None,
                       inv_scale, clip_coef, decay, neg_lr, beta1_t, one_minus_beta1, beta2_t, one_minus_beta2,
                       P_DTYPE, S_DTYPE, T_DTYPE, HAS_MASTER, ALIGNED, SOFT_BF16)
    for start in range(n_full, n, BLOCK):  # the tail: at most one masked block
        offs = start + tl.arange(0, BLOCK)
        _lion_elements(p_addr, g_addr, m_addr, master_addr, offs, offs < n,
                       inv_scale, clip_coef, decay, neg_lr, beta1_t, one_minus_beta1, beta2_t, one_minus_beta2,
                       P_DTYPE, S_DTYPE, T_DTYPE, HAS_MASTER, ALIGNED, SOFT_BF16)


_tuned = None
if not L.INTERPRET:
    _tuned = triton.autotune(configs=L.CONFIGS, key=L.TUNE_KEY, pre_hook=L.tuning_guard,
                             do_bench=L.bench)(lion_kernel)


def lion_(params, grads, exp_avgs, master_params, lr, beta1, beta2, weight_decay, lr_table, beta1_table,
          schedule_step, grad_scale, found_inf, clip_coef, weight_decay_table=None) -> None:
    """fusedopt::lion_ (csrc/ops.cpp) on the Triton backend; same arguments, same in-place semantics."""
    op = "fusedopt::lion_"
    L.check_params(op, params)
    if not params:
        return
    fields = {L.F_PARAM: params, L.F_STATE0: exp_avgs}
    if master_params:
        fields[L.F_MASTER] = master_params

    def validate():  # on a cache miss
        sdtype = L.state_dtype(params, master_params)
        L.check_list(op, "grads", params, grads, True, params[0].dtype)
        L.check_list(op, "exp_avgs", params, exp_avgs, True, sdtype)
        L.check_list(op, "master_params", params, master_params, False, torch.float32)

    layout, grad_vector = L.get_plan(op, fields, None, grads, validate)
    ctrl = L.controls(op, params[0].device, lr_table, beta1_table, schedule_step, grad_scale, found_inf,
                      clip_coef, weight_decay_table)
    meta = L.common_meta(params, master_params)
    scalars = (float(lr), float(beta1), float(beta2), float(weight_decay))
    L.launch(lion_kernel, _tuned, layout, grad_vector, ctrl, scalars, meta)
