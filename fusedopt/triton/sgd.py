"""fusedopt::sgd_ as one Triton launch per call (torch.optim.SGD: momentum, dampening, Nesterov, weight decay,
maximize; single-tensor semantics).

Mirrors csrc/fusedopt/rules.h make_sgd_scalars() / sgd_update() and csrc/cpu/sgd.cpp line by line: the lr
and momentum come from the schedule tables at the device-side schedule step, the scalars are computed in
float64 and rounded to the math type once, per program. The momentum buffer is loaded and stored through the
codec (_codec.py; 8-bit on the signed map, rounding stream slot 1), the param to nearest or stochastically
(slot 0).
"""

import torch
import triton
import triton.language as tl

from fusedopt.triton import _codec as C
from fusedopt.triton import _jit as J
from fusedopt.triton import launcher as L


@J.device_function
def _sgd_elements(p_addr, g_addr, buf_addr, master_addr, buf_absmax, codec_ptr, start, offs, mask, seed, rstep, stream,
                  element0, inv_scale, clip_coef, neg_lr, weight_decay, momentum, one_minus_dampening, first_step,
                  P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                  USE_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                  MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr,
                  STATE_FORMAT: tl.constexpr, PARAM_SR: tl.constexpr, BLOCK: tl.constexpr):
    p = J.load_param(p_addr, master_addr, offs, mask, P_DTYPE, tl.float32, T_DTYPE, HAS_MASTER, ALIGNED, SOFT_BF16)
    g = J.transform_grad(J.load_elems(g_addr, offs, mask, P_DTYPE, T_DTYPE, ALIGNED, SOFT_BF16),
                         inv_scale, clip_coef, MAXIMIZE)

    # rules.h sgd_update(), same operations in the same order
    g = tl.where(weight_decay != 0, J.fma(weight_decay, p, g), g)  # skipped at 0, like torch
    if USE_MOMENTUM:
        # first_step: a runtime flag (one compiled kernel for the first and the later steps, see launcher.py)
        if first_step != 0:
            buf = g  # torch creates the buffer as a copy of the gradient (sgd.cpp does not read it)
        else:
            buf = C.load_state(buf_addr, buf_absmax, codec_ptr, offs, mask, STATE_FORMAT, S_DTYPE, T_DTYPE, True,
                               ALIGNED, SOFT_BF16)
            buf = J.fma(one_minus_dampening, g, buf * momentum)
        if NESTEROV:
            g = J.fma(momentum, buf, g)
        else:
            g = buf
        C.store_state(buf_addr, buf_absmax, codec_ptr, start, offs, buf, mask, seed, rstep, stream, element0,
                      STATE_FORMAT, S_DTYPE, True, 1, ALIGNED, SOFT_BF16, BLOCK)
    p = J.fma(neg_lr, g, p)

    C.store_param(p_addr, master_addr, offs, p, mask, seed, rstep, stream, element0, P_DTYPE, HAS_MASTER, PARAM_SR,
                  ALIGNED, SOFT_BF16)


@triton.jit(**L.jit_options(int_args=["momentum_table_len", "first_step"], pointer_args=["momentum_table_ptr"]))
def sgd_kernel(
    rows_ptr, grad_addrs_ptr, n_tensors: tl.int64, step_table_ptr, done_ptr,
    lr_table_ptr, lr_table_len: tl.int64, momentum_table_ptr, momentum_table_len: tl.int64, schedule_step_ptr,
    grad_scale_ptr, found_inf_ptr, clip_coef_ptr, wd_table_ptr, wd_table_len: tl.int64,
    rounding_step_ptr, rounding_seed: tl.int64, codec_ptr,
    lr: tl.float64, momentum: tl.float64, dampening: tl.float64, weight_decay: tl.float64, first_step: tl.int32,
    SIZE_CLASS: tl.int32,  # autotuning key only
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
    USE_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr, STATE_FORMAT: tl.constexpr, PARAM_SR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = J.row_ptr(rows_ptr)
    lr_now, momentum_now, wd_now, live, inv_scale, clip_coef = J.read_controls(
        schedule_step_ptr, lr_table_ptr, lr_table_len, momentum_table_ptr, momentum_table_len,
        grad_scale_ptr, found_inf_ptr, clip_coef_ptr, wd_table_ptr, wd_table_len, lr, momentum, weight_decay, T_DTYPE)

    # rules.h make_sgd_scalars()
    neg_lr = (-lr_now).to(T_DTYPE)
    weight_decay_t = wd_now.to(T_DTYPE)
    momentum_t = momentum_now.to(T_DTYPE)
    one_minus_dampening = (1.0 - J.f64(dampening)).to(T_DTYPE)

    p_addr = tl.load(row + J.F_PARAM)
    g_addr = J.grad_addr(row, grad_addrs_ptr)
    buf_addr = tl.load(row + J.F_STATE0)
    master_addr = tl.load(row + J.F_MASTER)
    buf_absmax = tl.load(row + J.F_ABSMAX0)
    rstep, stream, element0 = C.rounding_stream(row, rounding_step_ptr,
                                                PARAM_SR or STATE_FORMAT == C.FMT_BF16_SR)
    n = tl.where(live, tl.load(row + J.F_NUMEL), 0)  # found_inf: no element is touched
    n_full = (n // BLOCK) * BLOCK
    for start in range(0, n_full, BLOCK):  # full blocks: no mask, 128-bit accesses when ALIGNED
        offs = start + tl.arange(0, BLOCK)
        _sgd_elements(p_addr, g_addr, buf_addr, master_addr, buf_absmax, codec_ptr, start, offs, None,
                      rounding_seed, rstep, stream, element0,
                      inv_scale, clip_coef, neg_lr, weight_decay_t, momentum_t, one_minus_dampening, first_step,
                      P_DTYPE, S_DTYPE, T_DTYPE, HAS_MASTER, USE_MOMENTUM, NESTEROV, MAXIMIZE,
                      ALIGNED, SOFT_BF16, STATE_FORMAT, PARAM_SR, BLOCK)
    for start in range(n_full, n, BLOCK):  # the tail: at most one masked block
        offs = start + tl.arange(0, BLOCK)
        _sgd_elements(p_addr, g_addr, buf_addr, master_addr, buf_absmax, codec_ptr, start, offs, offs < n,
                      rounding_seed, rstep, stream, element0,
                      inv_scale, clip_coef, neg_lr, weight_decay_t, momentum_t, one_minus_dampening, first_step,
                      P_DTYPE, S_DTYPE, T_DTYPE, HAS_MASTER, USE_MOMENTUM, NESTEROV, MAXIMIZE,
                      ALIGNED, SOFT_BF16, STATE_FORMAT, PARAM_SR, BLOCK)


_tuned = None
if not L.INTERPRET:
    _tuned = triton.autotune(configs=L.CONFIGS, key=L.TUNE_KEY + ["USE_MOMENTUM"], pre_hook=L.tuning_guard,
                             do_bench=L.bench)(sgd_kernel)


def sgd_(params, grads, momentum_buffers, master_params, lr, momentum, dampening, weight_decay, nesterov,
         maximize, first_step, lr_table, momentum_table, schedule_step, grad_scale, found_inf,
         clip_coef, weight_decay_table=None, state_absmaxes=None, rounding=(), rounding_step=None) -> None:
    """fusedopt::sgd_ (csrc/ops.cpp) on the Triton backend; same arguments, same in-place semantics (small
    state: state_absmaxes, rounding, rounding_step as the op takes them; one launch per state format).
    momentum_buffers empty: plain SGD (no buffer); first_step: the buffers are being created."""
    op = "fusedopt::sgd_"
    L.check_params(op, params)
    if not params:
        return
    use_momentum = len(momentum_buffers) > 0
    fields = {L.F_PARAM: params}
    if use_momentum:
        fields[L.F_STATE0] = momentum_buffers
    if master_params:
        fields[L.F_MASTER] = master_params

    def validate():  # on a cache miss
        sdtype = None if state_absmaxes is not None else L.state_dtype(params, master_params)
        L.check_list(op, "grads", params, grads, True, params[0].dtype)
        L.check_list(op, "momentum_buffers", params, momentum_buffers, False, sdtype)
        L.check_list(op, "master_params", params, master_params, False, torch.float32)
        L.check_small_states(op, params, master_params, (momentum_buffers,), ("momentum_buffers",),
                             state_absmaxes, bool(rounding))

    parts, rounding_args = L.small_state_parts(op, params, master_params, (momentum_buffers,), state_absmaxes,
                                               rounding, rounding_step)
    plans = L.plan_parts(op, parts, fields, None, grads, validate)
    ctrl = L.controls(op, params[0].device, lr_table, momentum_table, schedule_step, grad_scale, found_inf,
                      clip_coef, weight_decay_table)
    scalars = (float(lr), float(momentum), float(dampening), float(weight_decay), int(bool(first_step)))
    for part, (layout, grad_vector) in zip(parts, plans):
        meta = dict(L.common_meta(params, master_params, part), USE_MOMENTUM=use_momentum,
                    NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize))
        L.launch(sgd_kernel, _tuned, layout, grad_vector, ctrl, scalars, meta, rounding_args)
