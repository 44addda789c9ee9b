"""What step() hands to one backend op call: a Batch (one param group, device and dtype), and the views of
DTensor params (FSDP2, tensor parallel) that let the kernels update the local shards in place."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

# The classes of params and grads that step()'s whole-group check takes (None: a param without grad, which the
# check itself turns down); anything else, DTensor included, goes the per-param way.
PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter, type(None)})


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill its memory span with no gaps or overlaps (any dimension order), so one
    flat index walks param, grad and states alike."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def dtensor_class():
    """torch.distributed.tensor.DTensor once that module is loaded, else None (no DTensor can exist before
    it is), without importing it: a torch built without distributed support has no such module."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


class LocalState(dict):
    """The kernels' view of a DTensor param's state: each DTensor value as its local shard. A value that the
    update rule sets (SGD's first momentum buffer, created from the local param) is stored in the real state
    as a DTensor with the param's mesh and placements, which torch.distributed.checkpoint expects."""

    __slots__ = ("_state", "_param")

    def __init__(self, state: dict, param):
        dtensor = dtensor_class()
        super().__init__((k, v.to_local() if isinstance(v, dtensor) else v) for k, v in state.items())
        self._state = state
        self._param = param

    def __setitem__(self, key, value):
        dtensor = dtensor_class()
        if isinstance(value, dtensor):  # created from the DTensor param (state formats): the kernels get its shard
            super().__setitem__(key, value.to_local())
            self._state[key] = value
            return
        super().__setitem__(key, value)
        p = self._param
        if isinstance(value, torch.Tensor) and key != "step" and value.shape == p.to_local().shape:
            value = dtensor_class().from_local(value, p.device_mesh, p.placements, run_check=False,
                                               shape=p.shape, stride=p.stride())
        self._state[key] = value


def real_view(value):
    return torch.view_as_real(value) if isinstance(value, torch.Tensor) and value.is_complex() else value


class RealViewState(dict):
    """The kernels' view of a complex param's state: each complex value as torch.view_as_real, torch.optim's
    complex rule (AdamW / Adam view param, grad and states as real; SGD's complex arithmetic by real scalars is
    the same per component). A value the rule sets (SGD's first momentum buffer) is stored complex in the real
    state, as torch.optim keeps it."""

    __slots__ = ("_state",)

    def __init__(self, state: dict):
        super().__init__((k, real_view(v)) for k, v in state.items())
        self._state = state

    def __setitem__(self, key, value):
        self._state[key] = value
        super().__setitem__(key, real_view(value))


@dataclass
class Batch:
    """The tensors of one op call: one param group, one device, one dtype (and for SGD one first-step flag)."""

    group_index: int
    device: torch.device
    params: List[torch.Tensor] = field(default_factory=list)
    grads: List[torch.Tensor] = field(default_factory=list)
    states: List[dict] = field(default_factory=list)
    # (original param, contiguous stand-in) for params that are strided views: updated on the copy, copied back
    write_back: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    first_step: bool = False
    # True when fusedopt::grads_ready vouched for the whole group: every grad is dense with its param's layout
    ready: bool = False
    # set when the batch holds DTensor shards: per grad, the process groups its norm is summed over (clipping)
    shard_groups: Optional[List[tuple]] = None
    # the params as the optimizer holds them (DTensors, strided views), before _prepare puts local shards and
    # contiguous stand-ins in `params`; empty until then (stochastic rounding keys its bits on them)
    originals: List[torch.Tensor] = field(default_factory=list)
    # the small-state arguments of the op (state_absmaxes, rounding, rounding_step) when a kernel reads the
    # batch's 8-bit / bfloat16 / stochastically rounded states itself; None: plain states
    small_state: Optional[dict] = None


def to_local(batch: Batch, k: int, p, optimizer_name: str) -> torch.Tensor:
    """Put the local shard of DTensor param k (FSDP2's fully_shard, tensor parallel) in its place in the
    batch, with its grad's and states' local shards: the kernels update the shard in place. Nothing is
    gathered; only clipping communicates (a scalar per mesh dimension, see _clipping.sharded_total_norm)."""
    g = batch.grads[k]
    dtensor = dtensor_class()
    if (not isinstance(g, dtensor) or g.device_mesh != p.device_mesh or g.placements != p.placements
            or any(pl.is_partial() for pl in g.placements)):
        raise RuntimeError(
            f"{optimizer_name}: a DTensor param (placements {p.placements}) needs a DTensor grad with the "
            f"same mesh and placements, got " + (f"placements {g.placements}" if isinstance(g, dtensor)
                                                 else f"a {type(g).__name__}") + "; redistribute the grad first")
    if batch.shard_groups is None:
        batch.shard_groups = [()] * len(batch.grads)
    mesh = p.device_mesh
    batch.shard_groups[k] = tuple(mesh.get_group(i) for i, pl in enumerate(p.placements) if pl.is_shard())
    local = p.to_local()
    batch.params[k] = local
    batch.grads[k] = g.to_local()
    batch.states[k] = LocalState(batch.states[k], p)
    return local
