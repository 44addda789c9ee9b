"""Small optimizer state of the fused optimizers: ``state_precision`` and ``stochastic_rounding``.

Which storage each state tensor gets, creating it, the rounding counters, running one op call on such states,
and converting checkpoints between formats. The formats themselves (the 8-bit maps, the block layout, the
rounding rules, the random bits) are defined in :mod:`fusedopt.quantization`.

``state_precision``:
    None      today's rule: states in the param dtype (float32 with master weights)
    "fp32"    float32 states (bf16 / fp16 params keep their dtype; with or without master weights)
    "bf16"    bfloat16 states
    "8bit"    blockwise 8-bit states (uint8 codes + ``<key>_absmax``), float32 for tensors under 4,096 elements
``stochastic_rounding``: round bfloat16 params without a master copy, and bfloat16 states, stochastically.

A state's format is read from the state tensors themselves (their dtype), so a checkpoint decides nothing by
itself: loading converts it to this optimizer's formats (quantizes float states, dequantizes codes).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from fusedopt import quantization as Q
from fusedopt.optim._batch import Batch, dtensor_class, is_dense

PRECISIONS = ("fp32", "bf16", "8bit")
# Backends whose kernels load and store small states themselves (one fused pass: decode, rule, absmax, encode;
# csrc/cpu/state_io.h and csrc/cuda/state_slots.h over csrc/fusedopt/state_codec.h, fusedopt/triton/_codec.py),
# for params of these dtypes; float16 params (and any other backend) run through _call_staged.
FUSED_SMALL_STATE_BACKENDS = ("cpu", "cuda", "triton")
FUSED_SMALL_STATE_DTYPES = (torch.float32, torch.bfloat16)
QUANTIZABLE_KEYS = Q.SIGNED_STATE_KEYS + Q.UNSIGNED_STATE_KEYS
_SUFFIX = "_absmax"
_M32 = 0xFFFFFFFF


def check_small_state_options(state_precision, stochastic_rounding) -> None:
    """ValueError unless state_precision is None / "fp32" / "bf16" / "8bit" and stochastic_rounding a bool."""
    if state_precision is not None and (not isinstance(state_precision, str) or state_precision not in PRECISIONS):
        raise ValueError(f"state_precision must be one of None, 'fp32', 'bf16', '8bit'; got {state_precision!r}")
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"stochastic_rounding must be a bool, got {stochastic_rounding!r}")


def absmax_key(key: str) -> str:
    return key + _SUFFIX


def is_absmax_key(key: str) -> bool:
    return key.endswith(_SUFFIX)


def signed_key(key: str) -> bool:
    """The map of a state key: signed for first moments / momentum, unsigned for second moments."""
    if key in Q.SIGNED_STATE_KEYS:
        return True
    if key in Q.UNSIGNED_STATE_KEYS:
        return False
    raise KeyError(f"no 8-bit map for state {key!r}")


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in memory order: the order the kernels walk, so blocks of 256
    are the kernels' blocks (for a permuted param too)."""
    if t.is_contiguous():
        return t.view(-1)
    dims = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.size(d)), reverse=True)
    return t.permute(dims).reshape(-1) if t.numel() <= 1 else t.permute(dims).view(-1)


def _local(t):
    dtensor = dtensor_class()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


# --------------------------------------------------------------------------------------------------------------
# Stochastic rounding's random bits and bf16 rounding, in plain torch (the staged path; the kernels compute the
# same integers: csrc/fusedopt/state_codec.h)
# --------------------------------------------------------------------------------------------------------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for uint32 values held in int64, without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """state_codec.h mix32 (Wellons' lowbias32) on ints or int64 tensors of uint32 values."""
    if isinstance(x, int):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & _M32
        x ^= x >> 15
        x = (x * 0x846CA68B) & _M32
        return x ^ (x >> 16)
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rounding_key(seed: int, step: int, stream: int) -> Tuple[int, int]:
    """state_codec.h rounding_key."""
    s, t = step & ((1 << 64) - 1), stream & ((1 << 64) - 1)
    h = _mix32((seed & _M32) ^ 0x9E3779B9)
    for word in ((seed >> 32) & _M32, s & _M32, s >> 32, t & _M32, t >> 32):
        h = _mix32(h ^ word)
    return h, _mix32(h ^ 0x85EBCA6B)


def random_bits(key: Tuple[int, int], first_element: int, count: int, device) -> torch.Tensor:
    """state_codec.h random_bits for elements first_element .. first_element + count - 1 (int64 tensor)."""
    e = torch.arange(count, dtype=torch.int64, device=device) + first_element
    x = _mix32((e & _M32) ^ key[0])
    return _mix32(x ^ (key[1] ^ ((e >> 32) & _M32)))


def bf16_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """state_codec.h bf16_round_stochastic: float32 x -> bfloat16, away from zero with probability
    (low 16 bits of x) / 65536, from 32 random bits per element (their low 16 bits are used)."""
    u = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & _M32
    r = (u + (bits & 0xFFFF)) >> 16
    r = torch.where(torch.isnan(x), torch.full_like(r, 0x7FC0), r & 0xFFFF)
    return torch.where(r >= 0x8000, r - 0x10000, r).to(torch.int16).view(torch.bfloat16)


# --------------------------------------------------------------------------------------------------------------
# The mixin
# --------------------------------------------------------------------------------------------------------------
class SmallState:
    """Mixin of FusedOptimizer: state formats, the rounding counters, the staged op call, checkpoint conversion."""

    def _init_small_state(self, state_precision, stochastic_rounding) -> None:
        check_small_state_options(state_precision, stochastic_rounding)
        self.state_precision = state_precision
        self.stochastic_rounding = stochastic_rounding
        # 62 bits from torch's default generator: torch.manual_seed makes the run reproducible
        self._rounding_seed = int(torch.randint(0, 2 ** 62, ())) if stochastic_rounding else None
        self._no_absmax: Dict[torch.device, torch.Tensor] = {}  # the op's absmax entry of a state not in 8 bits

    # ---------------------------------------------------------------------------------------------- params
    def _check_param_precision(self, p: torch.Tensor, where: str) -> None:
        """Raised by add_param_group (before the group is added)."""
        if self.state_precision in ("bf16", "8bit") and p.dtype == torch.float64:
            raise ValueError(f"{where} is float64: state_precision={self.state_precision!r} supports float32, bfloat16 "
                             f"and float16 params (use state_precision=None or 'fp32' for float64 params)")
        if self.stochastic_rounding and p.dtype == torch.float16 and not self._uses_master(p):
            raise ValueError(f"{where} is float16: stochastic_rounding rounds bfloat16 values (bfloat16 params "
                             f"without master weights, bfloat16 states); use bfloat16 params, or "
                             f"master_weights=True for float16 params")

    def _add_rounding_counter(self, group: dict, device: torch.device) -> None:
        if self.stochastic_rounding:
            group.setdefault("rounding_seed", self._rounding_seed)
            group["rounding_step"] = torch.zeros((), dtype=torch.int64, device=device)

    # ---------------------------------------------------------------------------------------------- formats
    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The storage dtype of p's rule states: a float dtype, or torch.uint8 for 8-bit codes."""
        precision = self.state_precision
        if precision is None:
            return torch.float32 if self._uses_master(p) else p.dtype
        if precision == "fp32":
            return torch.float32
        if precision == "bf16":
            return torch.bfloat16
        # 8bit: by the full tensor's size (a DTensor's numel is the global one), so every rank agrees
        return torch.uint8 if Q.is_quantized_size(p.numel()) else torch.float32

    def _expected_dtype(self, p: torch.Tensor, key: str) -> torch.dtype:
        if key == "master_param" or is_absmax_key(key):
            return torch.float32
        return self._state_dtype(p)

    def _zeros_state(self, p: torch.Tensor, key: str, state: dict) -> None:
        """state[key] = zeros in p's storage format (8-bit: the code of 0 and a zero absmax per block)."""
        dtype = self._state_dtype(p)
        if dtype == torch.uint8:
            zero_code = 127 if signed_key(key) else 0
            state[key] = torch.full_like(p, zero_code, dtype=torch.uint8, memory_format=torch.preserve_format)
            state[absmax_key(key)] = self._new_absmax(p)
        else:
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _new_absmax(self, p: torch.Tensor) -> torch.Tensor:
        """float32 zeros, one per block of the local tensor. For a DTensor: a DTensor sharded over the mesh
        dimensions the param is sharded on, each rank's part padded to the largest shard's block count, so that
        torch's even chunking of it gives every rank its own blocks (what torch.distributed.checkpoint needs)."""
        dtensor = dtensor_class()
        if dtensor is None or not isinstance(p, dtensor):
            return torch.zeros(Q.num_blocks(p.numel()), dtype=torch.float32, device=p.device)
        from torch.distributed.tensor import Replicate, Shard

        mesh, placements = p.device_mesh, p.placements
        largest = list(p.shape)
        for i, pl in enumerate(placements):
            if pl.is_shard():
                largest[pl.dim] = -(-largest[pl.dim] // mesh.size(i))
        per_rank = Q.num_blocks(int(torch.Size(largest).numel()))
        parts = 1
        absmax_placements = []
        for i, pl in enumerate(placements):
            if pl.is_shard():
                parts *= mesh.size(i)
                absmax_placements.append(Shard(0))
            else:
                absmax_placements.append(Replicate())
        local = torch.zeros(per_rank, dtype=torch.float32, device=p.to_local().device)
        return dtensor.from_local(local, mesh, absmax_placements, run_check=False, shape=(per_rank * parts,),
                                  stride=(1,))

    # ---------------------------------------------------------------------------------------------- the step
    def _complete_states(self, batch: Batch, group: dict) -> None:
        """Create state tensors this step needs that do not exist yet (the rules override it); before the op."""

    def _needs_staging(self, batch: Batch) -> bool:
        """Whether the batch's states or rounding need the staged path (the kernels read and write float states
        of the kernel dtype, round to nearest)."""
        if self.state_precision is None and not self.stochastic_rounding:
            # Today's rule: states are created (_state_dtype) and normalized after a load (_base._prepare) in the
            # kernel dtype. Returning here keeps the per-tensor walk below off the default step (measured: half of
            # step()'s Python time with 300 small tensors, ~0.5 ms per step).
            return False
        if self.stochastic_rounding:
            if batch.params and batch.params[0].dtype == torch.bfloat16 and not self._uses_master(batch.params[0]):
                return True
        for p, state in zip(batch.params, batch.states):
            kernel = torch.float32 if self._uses_master(p) else p.dtype
            for key in self.state_keys:
                value = state.get(key) if state else None
                if key != "step" and isinstance(value, torch.Tensor) and value.dtype != kernel:
                    return True
        return False

    def _rounding_streams(self, batch: Batch) -> List[Tuple[int, int]]:
        """(param index in the optimizer, element offset of the local shard in the full tensor) per batch param.
        The index map is built once per step (step() clears it), not once per batch."""
        index = self.__dict__.get("_step_param_index")
        if index is None:
            index = {}
            for group in self.param_groups:
                for p in group["params"]:
                    index.setdefault(id(p), len(index))
            self._step_param_index = index
        out = []
        for original in batch.originals or batch.params:
            offset = 0
            dtensor = dtensor_class()
            if dtensor is not None and isinstance(original, dtensor):
                offset = _shard_offset(original)
            out.append((index[id(original)], offset))
        return out

    def _fused_small_state(self, backend, batch: Batch) -> bool:
        """Whether the backend's kernels take this batch's small states themselves (else: _call_staged)."""
        return (backend.name in FUSED_SMALL_STATE_BACKENDS and bool(batch.params)
                and batch.params[0].dtype in FUSED_SMALL_STATE_DTYPES)

    def _small_state_args(self, batch: Batch, group: dict) -> dict:
        """The op's small-state arguments for a batch whose kernels read the formats themselves: per state list (the
        op's order) and param, the absmax of 8-bit codes (an empty tensor for other states); with stochastic
        rounding the seed, (param index, element offset of the shard) per param and the group's counter."""
        empty = self._no_absmax.get(batch.device)  # one per device, not one allocation per call
        if empty is None:
            empty = self._no_absmax[batch.device] = torch.empty(0, dtype=torch.float32, device=batch.device)
        absmaxes = []
        for key in self.state_keys:
            if key == "step":
                continue
            for state in batch.states:
                value = state.get(key)
                is_8bit = isinstance(value, torch.Tensor) and value.dtype == torch.uint8
                absmaxes.append(_local(state[absmax_key(key)]) if is_8bit else empty)
        out = {"state_absmaxes": absmaxes}
        if self.stochastic_rounding:
            rounding = [int(group["rounding_seed"])]
            for index, offset in self._rounding_streams(batch):
                rounding += [index, offset]
            out["rounding"] = rounding
            out["rounding_step"] = group["rounding_step"]
        return out

    def _call_staged(self, backend, batch: Batch, group: dict, found_inf: Optional[torch.Tensor], call) -> None:
        """One op call on states the kernels cannot take as they are: every rule state is widened to the kernel
        dtype (8-bit codes decoded, bfloat16 widened), params without a master copy get a float32 one when
        their states are not in their dtype or rounding is stochastic, the op runs, and unless GradScaler
        skipped the step everything is stored back: params and bfloat16 states rounded to nearest or
        stochastically, 8-bit states re-encoded with their new block absmax. Bit for bit what a fused kernel
        does (decode -> rules.h update -> absmax -> encode): the decoding is exact and the encoding a function of
        the float32 values alone (fusedopt.quantization)."""
        params = batch.params
        p0 = params[0]
        math_dtype = torch.float64 if p0.dtype == torch.float64 else torch.float32
        low = p0.dtype in (torch.bfloat16, torch.float16)
        master = low and self._uses_master(p0)
        temp_master = low and not master
        views: List[dict] = []
        stores = []  # (kind, key or None, k, temp)
        for k, (p, state) in enumerate(zip(params, batch.states)):
            view = dict(state)
            for key in self.state_keys:
                value = state.get(key)
                if key == "step" or not isinstance(value, torch.Tensor):
                    continue
                if value.dtype == torch.uint8:
                    temp = _decode_state(value, state[absmax_key(key)], signed_key(key)).to(math_dtype)
                elif value.dtype != math_dtype:
                    temp = value.to(math_dtype)
                else:
                    continue  # already what the kernel reads: updated in place
                view[key] = temp
                stores.append(("state", key, k, temp))
            if temp_master:
                view["master_param"] = p.detach().to(torch.float32)
                stores.append(("param", None, k, view["master_param"]))
            views.append(view)
        call(Batch(batch.group_index, batch.device, params, batch.grads, views, first_step=batch.first_step,
                   ready=batch.ready, shard_groups=batch.shard_groups))
        if found_inf is not None and bool(found_inf.ne(0).any()):
            return  # skipped: the op changed nothing, and nothing is re-encoded (codes / absmax stay as they were)
        streams = self._rounding_streams(batch) if self.stochastic_rounding else None
        step = int(group["rounding_step"]) if self.stochastic_rounding else 0  # read before the counter advances
        slots = {key: n + 1 for n, key in enumerate(k for k in self.state_keys if k != "step")}
        for kind, key, k, temp in stores:
            state = batch.states[k]
            if kind == "param":
                if self.stochastic_rounding and params[k].dtype == torch.bfloat16:
                    _store_stochastic(params[k], temp, group["rounding_seed"], step, streams[k], 0)
                continue  # the op already wrote the param, rounded to nearest
            target = state[key]
            if target.dtype == torch.uint8:
                codes, absmax = Q.quantize_blockwise(memory_order(temp), signed_key(key))
                memory_order(target).copy_(codes)
                full = state[absmax_key(key)]
                full[: absmax.numel()].copy_(absmax)
            elif target.dtype == torch.bfloat16 and self.stochastic_rounding:
                _store_stochastic(target, temp, group["rounding_seed"], step, streams[k], slots[key])
            else:
                target.copy_(temp)

    def _advance_rounding_counters(self, found_inf: Optional[torch.Tensor]) -> None:
        """rounding_step += 1 on the device, unless GradScaler skipped the step (like the schedule counters)."""
        if not self.stochastic_rounding:
            return
        for group in self.param_groups:
            counter = group.get("rounding_step")
            if not isinstance(counter, torch.Tensor):
                continue
            if found_inf is None:
                counter.add_(1)
            else:
                counter.add_((found_inf.to(counter.device) == 0).to(torch.int64))

    # ---------------------------------------------------------------------------------------------- checkpoints
    def _small_state_for_load(self, p: torch.Tensor, key: str, value: torch.Tensor, pstate: dict,
                              index) -> None:
        """Checks of one loaded state against p, before anything is loaded: 8-bit codes need their absmax, with
        one entry per block of the param."""
        if value.dtype == torch.uint8:
            absmax = pstate.get(absmax_key(key))
            if not isinstance(absmax, torch.Tensor):
                raise ValueError(f"state_dict does not fit the params: 8-bit state '{key}' of param {index} has no "
                                 f"'{absmax_key(key)}'")
            local_p = _local(p)
            needed = Q.num_blocks(local_p.numel())
            have = _local(absmax).numel()
            # A DTensor's local absmax is padded to the largest shard's block count (_new_absmax); a plain
            # tensor's has exactly one entry per block. More entries than that: blocks of another layout, e.g.
            # a full state dict gathered from FSDP2 shards (each shard's blocks start at the shard's first
            # element), which decoded as one tensor would give rows the wrong scales.
            plain = dtensor_class() is None or not isinstance(p, dtensor_class())
            if absmax.dtype != torch.float32 or absmax.dim() != 1 or have < needed or (plain and have != needed):
                sharded = (" (these codes were quantized per shard, as FSDP2 / DTensor params are: load such a "
                           "checkpoint into params sharded the same way)" if plain and have > needed else "")
                raise ValueError(f"state_dict does not fit the params: '{absmax_key(key)}' of param {index} has "
                                 f"{have} blocks ({absmax.dtype}, shape {tuple(absmax.shape)}) but the param's "
                                 f"{local_p.numel()} elements make {needed} blocks of {Q.BLOCK_SIZE} (float32)"
                                 f"{sharded}")
        elif not value.is_floating_point() and not (value.is_complex() and p.is_complex()):
            raise ValueError(f"state_dict does not fit the params: state '{key}' of param {index} has dtype "
                             f"{value.dtype} (expected a floating dtype, or uint8 codes with '{absmax_key(key)}')")

    def _convert_loaded(self, p: torch.Tensor, state: dict) -> None:
        """Bring the loaded rule states to this optimizer's formats (after torch's load): dequantize codes the
        optimizer does not keep in 8 bits, quantize float states it does, cast float states."""
        target = self._state_dtype(p)
        for key in [k for k in state if not is_absmax_key(k)]:
            value = state[key]
            if key in ("step", "master_param") or not isinstance(value, torch.Tensor):
                continue
            if value.dtype == torch.uint8 and target == torch.uint8 and layout_differs(value, p):
                # blocks follow memory order: codes of another layout (a channels_last checkpoint, a model moved
                # to another memory format) are decoded and quantized again in the param's order
                absmax = _local(state.pop(absmax_key(key)))
                value = _decode_state(_local(value), absmax.to(value.device), signed_key(key)).to(p.device)
            if value.dtype == torch.uint8:
                if target == torch.uint8:
                    if value.device != p.device:
                        state[key] = value.to(p.device)
                        state[absmax_key(key)] = state[absmax_key(key)].to(p.device)
                    continue
                absmax = _local(state.pop(absmax_key(key)))
                values = _decode_state(_local(value), absmax, signed_key(key))
                state[key] = _like(p, values.to(target))
            elif target == torch.uint8:
                holder: dict = {}
                self._zeros_state(p, key, holder)
                values = _strided_like(_local(value), _local(p))
                codes, absmax = Q.quantize_blockwise(memory_order(values), signed_key(key))
                memory_order(_local(holder[key])).copy_(codes)
                _local(holder[absmax_key(key)])[: absmax.numel()].copy_(absmax)
                state.update(holder)
            elif layout_differs(value, p):  # the kernels walk param, grad and states in one memory order
                state[key] = _like(p, _strided_like(_local(value), _local(p), target))
            elif value.dtype != target or value.device != p.device:
                state[key] = value.detach().to(device=p.device, dtype=target)
        for key in [k for k in state if is_absmax_key(k)]:
            if key[: -len(_SUFFIX)] not in state or state[key[: -len(_SUFFIX)]].dtype != torch.uint8:
                del state[key]  # an absmax whose codes were dequantized, or left over

    def state_dict(self, dequantize: bool = False) -> dict:
        """torch.optim's state_dict(). With ``dequantize=True`` every rule state is given as a float32 tensor under
        torch's key (8-bit codes decoded, their ``*_absmax`` dropped; bfloat16 widened), which torch.optim's
        optimizers load; without it, states are saved as they are stored (a lossless round trip)."""
        sd = super().state_dict()
        if not dequantize:
            return sd
        out = {}
        for index, pstate in sd["state"].items():
            pstate = dict(pstate)
            for key in [k for k in pstate if not is_absmax_key(k)]:
                value = pstate[key]
                if key in ("step", "master_param") or not isinstance(value, torch.Tensor):
                    continue
                if value.dtype == torch.uint8:
                    pstate[key] = _decode_dtensor(value, pstate.pop(absmax_key(key)), signed_key(key))
                elif value.dtype != torch.float32 and value.dtype != torch.float64 and not value.is_complex():
                    pstate[key] = value.to(torch.float32)  # (complex states: as torch.optim keeps them)
            out[index] = pstate
        return {**sd, "state": out}


def layout_differs(value: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether a state of p's shape has other strides than p (dense p only: the state of a strided-view param is
    contiguous, as the step's contiguous stand-in)."""
    v, q = _local(value), _local(p)
    return v.shape == q.shape and v.numel() > 1 and is_dense(q) and v.stride() != q.stride()


def _strided_like(value: torch.Tensor, p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """value (p's shape) as a `dtype` tensor on p's device with p's strides, so its memory order is p's."""
    out = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
    return out.copy_(value)


def _like(p: torch.Tensor, local_value: torch.Tensor):
    dtensor = dtensor_class()
    if dtensor is not None and isinstance(p, dtensor):
        return dtensor.from_local(local_value, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
    return local_value


def _decode_state(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """float32 values of a (local) code tensor, in its shape and strides (blocks in memory order)."""
    absmax = _local(absmax)
    flat = memory_order(codes)
    values = Q.dequantize_blockwise(flat.contiguous(), absmax[: Q.num_blocks(flat.numel())].contiguous(), signed)
    out = torch.empty_like(codes, dtype=torch.float32, memory_format=torch.preserve_format)
    memory_order(out).copy_(values)
    return out


def _decode_dtensor(codes, absmax, signed: bool):
    dtensor = dtensor_class()
    if dtensor is not None and isinstance(codes, dtensor):
        local = _decode_state(codes.to_local(), absmax, signed)
        return dtensor.from_local(local, codes.device_mesh, codes.placements, run_check=False, shape=codes.shape,
                                  stride=codes.stride())
    return _decode_state(codes, absmax, signed)


def _shard_offset(p) -> int:
    """The flat index in the full tensor of a DTensor shard's first element (exact for Shard(0), FSDP2)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    stride, flat = 1, 0
    for size, off in zip(reversed(p.shape), reversed(offset)):
        flat += off * stride
        stride *= size
    return flat


def _store_stochastic(target: torch.Tensor, values: torch.Tensor, seed: int, step: int, stream: Tuple[int, int],
                      slot: int) -> None:
    """target (bfloat16) = values rounded stochastically with the bits of stream (param index, offset), slot."""
    param_index, offset = stream
    key = rounding_key(seed, step, 4 * param_index + slot)
    flat_values = memory_order(values)
    bits = random_bits(key, offset, flat_values.numel(), values.device)
    memory_order(target).copy_(bf16_stochastic(flat_values, bits))
