"""Global grad-norm clipping inside the step: clip_grad_norm_'s formula, computed on the device.

    total = norm of all grads (the norm of the per-tensor norms)     (torch.nn.utils.clip_grad_norm_)
    coef  = min(1, max_norm / (total + 1e-6))

The grads are not rewritten: the update kernels multiply each grad by ``coef`` as they read it.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fusedopt import _ops
from fusedopt.optim._batch import Batch


def norm_of(grads: Sequence[torch.Tensor], device: torch.device, norm_type: float) -> torch.Tensor:
    """The norm_type-norm of all `grads` (on `device`) together, as a float32 scalar there; 0 for no grads or
    only empty ones. CPU: fusedopt::grad_norm, one pass with float64 sums (one reduction op per tensor costs
    more than the update on small tensors). Elsewhere: _foreach_norm, one multi-tensor launch, accumulating
    in float32 (fp16 grads that GradScaler scaled up would overflow an fp16 norm); empty grads are left out,
    as they add nothing and _foreach_norm cannot take their inf-norm."""
    if device.type == "cpu" and _ops.HAS_CPU_EXTENSION and grads:
        return torch.ops.fusedopt.grad_norm(grads, norm_type)
    nonempty = [g for g in grads if g.numel()]
    if not nonempty:
        return torch.zeros((), dtype=torch.float32, device=device)
    return combine_norms(torch._foreach_norm(nonempty, norm_type, dtype=torch.float32), device, norm_type)


def combine_norms(norms: Sequence[torch.Tensor], device: torch.device, norm_type: float) -> torch.Tensor:
    """The norm of partial norms (clip_grad_norm_'s norm of per-tensor norms), on `device`."""
    if len(norms) == 1:
        return norms[0].to(device)
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def sharded_total_norm(batches: Sequence[Batch], first: torch.device, norm_type: float) -> torch.Tensor:
    """The global norm when batches hold DTensor shards: the local grads sharded over the same mesh
    dimensions are normed together, raised to the power p and summed (max for inf) over those dimensions'
    process groups, so every rank gets the norm of the full grads. Replicated dimensions are not summed."""
    import torch.distributed as dist

    # process groups -> device -> local grads; every rank opens the same buckets in the same order, even
    # where its local shards are empty (uneven sharding), since each bucket is one collective
    buckets: Dict[tuple, Dict[torch.device, List[torch.Tensor]]] = {}
    for b in batches:
        for key, g in zip(b.shard_groups or [()] * len(b.grads), b.grads):
            buckets.setdefault(key, {}).setdefault(b.device, []).append(g)
    parts = []
    for key, by_device in buckets.items():
        part = combine_norms([norm_of(gs, d, norm_type) for d, gs in by_device.items()], first, norm_type)
        if key:
            if math.isinf(norm_type):
                for pg in key:
                    dist.all_reduce(part, op=dist.ReduceOp.MAX, group=pg)
            else:
                part = part.double().pow(norm_type)
                for pg in key:
                    dist.all_reduce(part, op=dist.ReduceOp.SUM, group=pg)
                part = part.pow(1.0 / norm_type).float()
        parts.append(part)
    return combine_norms(parts, first, norm_type)


def clip_coefficients(batches: Sequence[Batch], max_norm: float, norm_type: float,
                      grad_scale: Optional[torch.Tensor]) -> Tuple[Dict[torch.device, torch.Tensor], torch.Tensor]:
    """Global grad norm over all params of the optimizer, on the device, and clip_grad_norm_'s coefficient.

    Returns ({device: float32 coef scalar}, the total norm as a float32 scalar on the first device). With
    GradScaler's ``grad_scale`` the norm is that of the unscaled grads, as after GradScaler.unscale_."""
    grads_by_device: Dict[torch.device, List[torch.Tensor]] = {}
    for b in batches:
        grads = b.grads
        if norm_type != 2.0 and b.originals and b.originals[0].is_complex():
            # clip_grad_norm_ norms a complex grad by its elements' moduli; the batch holds real views, whose
            # 2-norm is the same but whose 1- / inf-norms are not
            grads = [torch.view_as_complex(g).abs() for g in grads]
        grads_by_device.setdefault(b.device, []).extend(grads)
    if not grads_by_device:
        return {}, torch.zeros(())
    first = next(iter(grads_by_device))
    if any(b.shard_groups for b in batches):
        total = sharded_total_norm(batches, first, norm_type)
    else:
        total = combine_norms([norm_of(g, d, norm_type) for d, g in grads_by_device.items()], first, norm_type)
    if grad_scale is not None:
        inv_scale = grad_scale.to(device=first, dtype=torch.float64).reciprocal().to(torch.float32)
        total = total * inv_scale
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {device: coef.to(device) for device in grads_by_device}, total
