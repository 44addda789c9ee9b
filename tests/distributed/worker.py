"""One rank of the distributed tests (tests/test_distributed.py starts two of these on the gloo backend, CPU).

    python tests/distributed/worker.py --rank R --world-size 2 --init-file F --out DIR [--scenarios a,b,...]

Every scenario trains the same tiny model twice from the same initial weights and data, once with fusedopt
(schedule: TABLE, a warmup_cosine) and once with the reference (torch.optim, or lion-pytorch's Lion, driven by
Hugging Face's get_cosine_schedule_with_warmup, the schedule TABLE mirrors, never by the table itself), and
saves what the test compares to DIR/rank{R}.pt: the full parameters of both runs (gathered with full_tensor()
for FSDP2, only for the comparison), plus per-scenario extras. The worker asserts nothing: the
test does, so a failure names the scenario, rank and tensor.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn

import fusedopt
from fusedopt import schedules
from fusedopt.table_scheduler import TableScheduler

STEPS = 8
WARMUP = 2
RESUME_AT = 3  # the checkpoint scenario saves after this many steps
TABLE = schedules.warmup_cosine(STEPS, WARMUP)


def model_fn(outputs: int = 1) -> nn.Module:
    """Shapes chosen so FSDP2 shards them unevenly over 2 ranks: (5, 7) -> 3 + 2 rows, and with one output
    (1, 9) and (1,) -> all rows on rank 0 and an empty shard on rank 1."""
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, outputs))


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data
    x = torch.randn(6, 7, generator=g)
    y = torch.randn(6, 1, generator=g)
    return x, y


def loss_fn(model, rank, step):
    x, y = batch(rank, step)
    return ((model(x) - y) ** 2).mean()  # broadcasts over the outputs


# rule -> (fused class, reference factory, options)
def references():
    from lion_pytorch import Lion

    return {
        "adamw": (fusedopt.FusedAdamW, lambda ps, **kw: torch.optim.AdamW(ps, foreach=False, **kw),
                  dict(lr=1e-2, weight_decay=0.1)),
        "sgd": (fusedopt.FusedSGD, lambda ps, **kw: torch.optim.SGD(ps, foreach=False, **kw),
                dict(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=1e-3)),
        "lion": (fusedopt.FusedLion, lambda ps, **kw: Lion(ps, **kw), dict(lr=1e-3, weight_decay=0.1)),
    }


def reference_schedule(opt):
    """The oracle of TABLE: transformers' get_cosine_schedule_with_warmup on the reference optimizer."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, num_warmup_steps=WARMUP, num_training_steps=STEPS)


def reference_lrs(base_lr: float, n: int):
    """The lr of optimizer steps 0..n-1 under reference_schedule, read from a torch optimizer."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    sched = reference_schedule(opt)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def full_params(model):
    out = []
    for p in model.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(t.detach().clone())
    return out


def fsdp2(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model, opt, rank, steps, sched=None, clip=None, start=0):
    norms = []
    for t in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, rank, t).backward()
        if clip is not None:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), clip[0], norm_type=clip[1])
            norms.append(float(total.full_tensor() if hasattr(total, "full_tensor") else total))
        opt.step()
        if sched is not None:
            sched.step()
    return norms


# ----------------------------------------------------------------------------------------------------------
# Scenarios: each returns a dict saved under its name
# ----------------------------------------------------------------------------------------------------------


def scenario_ddp(rank, mesh, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for rule, (fused_cls, ref_factory, options) in references().items():
        ours_model, ref_model = DDP(model_fn()), DDP(model_fn())
        ours = fused_cls(ours_model.parameters(), **options, schedule=TABLE)
        ref = ref_factory(ref_model.parameters(), **options)
        train(ours_model, ours, rank, STEPS)
        train(ref_model, ref, rank, STEPS, sched=reference_schedule(ref))
        out[rule] = {"fused": full_params(ours_model), "ref": full_params(ref_model)}
    return out


def scenario_fsdp2(rank, mesh, tmp):
    out = {}
    for rule, (fused_cls, ref_factory, options) in references().items():
        ours_model, ref_model = fsdp2(model_fn(), mesh), fsdp2(model_fn(), mesh)
        ours = fused_cls(ours_model.parameters(), **options, schedule=TABLE)
        ref = ref_factory(ref_model.parameters(), **options)
        train(ours_model, ours, rank, STEPS)
        train(ref_model, ref, rank, STEPS, sched=reference_schedule(ref))
        state_types = sorted({type(v).__name__ for s in ours.state.values() for k, v in s.items() if k != "step"})
        local_shapes = [tuple(p.to_local().shape) for p in ours_model.parameters()]
        out[rule] = {"fused": full_params(ours_model), "ref": full_params(ref_model),
                     "state_types": state_types, "local_shapes": local_shapes}
    return out


def scenario_fsdp2_clip(rank, mesh, tmp):
    """max_grad_norm inside the fused step vs clip_grad_norm_ on the FSDP2 model + torch.optim, with a
    max norm small enough that every step clips."""
    out = {}
    refs = references()
    # torch's clip_grad_norm_ cannot take the inf-norm of an empty local shard (_foreach_norm has no identity
    # for max), so the inf-norm case uses a model whose shards are all non-empty; fusedopt handles both.
    for name, rule, norm_type, outputs in (("adamw_l2", "adamw", 2.0, 1), ("sgd_inf", "sgd", math.inf, 2),
                                           ("lion_l1", "lion", 1.0, 1)):
        fused_cls, ref_factory, options = refs[rule]
        ours_model, ref_model = fsdp2(model_fn(outputs), mesh), fsdp2(model_fn(outputs), mesh)
        ours = fused_cls(ours_model.parameters(), **options, schedule=TABLE, max_grad_norm=0.05, norm_type=norm_type)
        ref = ref_factory(ref_model.parameters(), **options)
        ours_norms = []
        for t in range(STEPS):
            ours.zero_grad(set_to_none=True)
            loss_fn(ours_model, rank, t).backward()
            ours.step()
            ours_norms.append(float(ours.last_grad_norm))
        ref_norms = train(ref_model, ref, rank, STEPS, sched=reference_schedule(ref),
                          clip=(0.05, norm_type))
        out[name] = {"fused": full_params(ours_model), "ref": full_params(ref_model), "fused_norms": ours_norms,
                     "ref_norms": ref_norms, "lion": rule == "lion"}
    return out


def scenario_zero(rank, mesh, tmp):
    """ZeroRedundancyOptimizer(optimizer_class=Fused*) with DDP vs DDP + the reference on all params."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for rule, (fused_cls, ref_factory, options) in references().items():
        ours_model, ref_model = DDP(model_fn()), DDP(model_fn())
        ours = ZeroRedundancyOptimizer(ours_model.parameters(), optimizer_class=fused_cls, schedule=TABLE, **options)
        sched = TableScheduler(ours)
        ref = ref_factory(ref_model.parameters(), **options)
        logged = []
        for t in range(STEPS):
            ours.zero_grad(set_to_none=True)
            loss_fn(ours_model, rank, t).backward()
            ours.step()
            sched.step()
            logged.append(sched.get_last_lr()[0])
        train(ref_model, ref, rank, STEPS, sched=reference_schedule(ref))
        local = sum(p.numel() for g in ours.optim.param_groups for p in g["params"])
        out[rule] = {"fused": full_params(ours_model), "ref": full_params(ref_model), "logged_lr": logged,
                     # the lr of steps 1..STEPS; step STEPS is past the table's end (one entry per step of a
                     # STEPS-step run), where the table holds step STEPS - 1's lr
                     "expected_lr": reference_lrs(options["lr"], STEPS)[1:] + reference_lrs(options["lr"], STEPS)[-1:],
                     "local_numel": local, "total_numel": sum(p.numel() for p in ours_model.parameters())}
    # 8-bit states (ZeroRedundancyOptimizer copies state_precision into every param group): each rank quantizes
    # the whole tensors of its partition, so the run is bitwise DDP + the same optimizer on all params
    def wide_model():
        torch.manual_seed(99)
        return nn.Sequential(nn.Linear(7, 80), nn.Tanh(), nn.Linear(80, 64), nn.Tanh(), nn.Linear(64, 1))

    ours_model, ref_model = DDP(wide_model()), DDP(wide_model())
    ours = ZeroRedundancyOptimizer(ours_model.parameters(), optimizer_class=fusedopt.FusedAdamW, lr=1e-2,
                                   weight_decay=0.1, state_precision="8bit")
    ref = fusedopt.FusedAdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1, state_precision="8bit")
    train(ours_model, ours, rank, STEPS)
    train(ref_model, ref, rank, STEPS)
    out["adamw_8bit"] = {"fused": full_params(ours_model), "ref": full_params(ref_model),
                         "state_dtypes": sorted({str(st["exp_avg"].dtype) for st in ours.optim.state.values()})}
    return out


def scenario_dcp(rank, mesh, tmp):
    """torch.distributed.checkpoint: save at step RESUME_AT, restore into a fresh FSDP2 model + optimizer,
    finish the run; compare with the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    out = {}
    refs = references()
    for rule in ("adamw", "sgd", "lion"):
        fused_cls, _, options = refs[rule]
        path = os.path.join(tmp, f"ckpt_{rule}")
        # uninterrupted, with a checkpoint taken on the way
        model = fsdp2(model_fn(), mesh)
        opt = fused_cls(model.parameters(), **options, schedule=TABLE, max_grad_norm=1.0)
        train(model, opt, rank, RESUME_AT)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=path)
        train(model, opt, rank, STEPS - RESUME_AT, start=RESUME_AT)
        uninterrupted = full_params(model)
        # resumed: fresh model and optimizer (the standard DCP flow: build the state dicts, load, set)
        model2 = fsdp2(model_fn(), mesh)
        opt2 = fused_cls(model2.parameters(), **options, schedule=TABLE, max_grad_norm=1.0)
        state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model2, state["model"])
        set_optimizer_state_dict(model2, opt2, state["optim"])
        restored = {"host_step": opt2.schedule_step,
                    "device_steps": [int(g["schedule_step"]) for g in opt2.param_groups],
                    "last_lr": opt2.get_last_lr(), "expected_lr": [reference_lrs(options["lr"], RESUME_AT + 1)[RESUME_AT]],
                    "state_types": sorted({type(v).__name__ for s in opt2.state.values()
                                           for k, v in s.items() if k != "step"})}
        train(model2, opt2, rank, STEPS - RESUME_AT, start=RESUME_AT)
        out[rule] = {"fused": full_params(model2), "ref": uninterrupted, "restored": restored}
    return out


def scenario_hsdp_clip(rank, mesh, tmp):
    """README: clipping all-reduces the local norm^p over the mesh dimensions the grads are sharded on, and
    not over replicated ones. HSDP (fully_shard on a 2-D mesh: replicate x shard = 2 x 1) makes every param a
    DTensor with placements (Replicate(), Shard(0)); summing over the replicate dimension would make the L2
    norm sqrt(2) and the L1 norm 2 times too large. Reference: clip_grad_norm_ on the HSDP model + torch.optim."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh2 = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("replicate", "shard"))
    out = {}
    refs = references()
    for name, rule, norm_type in (("adamw_l2", "adamw", 2.0), ("sgd_l1", "sgd", 1.0)):
        fused_cls, ref_factory, options = refs[rule]
        ours_model, ref_model = fsdp2(model_fn(), mesh2), fsdp2(model_fn(), mesh2)
        ours = fused_cls(ours_model.parameters(), **options, schedule=TABLE, max_grad_norm=0.05, norm_type=norm_type)
        ref = ref_factory(ref_model.parameters(), **options)
        ours_norms = []
        for t in range(STEPS):
            ours.zero_grad(set_to_none=True)
            loss_fn(ours_model, rank, t).backward()
            ours.step()
            ours_norms.append(float(ours.last_grad_norm))
        ref_norms = train(ref_model, ref, rank, STEPS, sched=reference_schedule(ref), clip=(0.05, norm_type))
        out[name] = {"fused": full_params(ours_model), "ref": full_params(ref_model), "fused_norms": ours_norms,
                     "ref_norms": ref_norms,
                     "placements": sorted({str(p.placements) for p in ours_model.parameters()})}
    return out


def scenario_fsdp2_inf_empty(rank, mesh, tmp):
    """README: torch's clip_grad_norm_ fails on an empty local shard with norm_type=inf, fusedopt does not. The
    (1, 9) weight and (1,) bias leave rank 1 an empty shard. Reference: torch.optim on the same FSDP2 model,
    clipped by torch's clip_grads_with_norm_ with the inf-norm of the full grads (get_total_norm over their
    full_tensor()); records what torch's own clip_grad_norm_ raises on rank 1."""
    from torch.distributed.tensor import DTensor, Replicate

    fused_cls, ref_factory, options = references()["adamw"]
    ours_model, ref_model = fsdp2(model_fn(), mesh), fsdp2(model_fn(), mesh)
    ours = fused_cls(ours_model.parameters(), **options, schedule=TABLE, max_grad_norm=0.05, norm_type=math.inf)
    ref = ref_factory(ref_model.parameters(), **options)
    sched = reference_schedule(ref)
    ours_norms, ref_norms, torch_error = [], [], None
    for t in range(STEPS):
        ours.zero_grad(set_to_none=True)
        loss_fn(ours_model, rank, t).backward()
        ours.step()
        ours_norms.append(float(ours.last_grad_norm))
        ref.zero_grad(set_to_none=True)
        loss_fn(ref_model, rank, t).backward()
        if t == 0 and rank == 1:
            # torch's clip_grad_norm_ on the rank whose shards are empty: it raises in the local norm, before the
            # all-reduce (called on rank 0 too, rank 0 would wait in that all-reduce for a rank that never comes)
            try:
                torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05, norm_type=math.inf)
            except RuntimeError as e:
                torch_error = str(e)
        total = torch.nn.utils.get_total_norm([p.grad.full_tensor() for p in ref_model.parameters()], math.inf)
        torch.nn.utils.clip_grads_with_norm_(ref_model.parameters(), 0.05,
                                             DTensor.from_local(total, mesh, [Replicate()], run_check=False))
        ref_norms.append(float(total))
        ref.step()
        sched.step()
    local_shapes = [tuple(p.to_local().shape) for p in ours_model.parameters()]
    return {"adamw_inf": {"fused": full_params(ours_model), "ref": full_params(ref_model),
                          "fused_norms": ours_norms, "ref_norms": ref_norms, "torch_error": torch_error,
                          "local_shapes": local_shapes}}


def scenario_fsdp2_triton_master(rank, mesh, tmp):
    """README: DTensor params work with the Triton backend (here under TRITON_INTERPRET=1 on CPU tensors) and with
    master weights. bfloat16 FSDP2 model, backend="triton", master_weights=True; reference: torch.optim on a
    float32 FSDP2 copy started from the same (bfloat16) values and fed the same bfloat16 grads, widened. The
    float32 master copies must follow it, and each bfloat16 param must be its master copy rounded."""
    out = {}
    for rule, (fused_cls, ref_factory, options) in references().items():
        ours_model = fsdp2(model_fn().to(torch.bfloat16), mesh)
        ref_model = fsdp2(model_fn().to(torch.bfloat16).to(torch.float32), mesh)
        ours = fused_cls(ours_model.parameters(), **options, schedule=TABLE, backend="triton", master_weights=True)
        ref = ref_factory(ref_model.parameters(), **options)
        sched = reference_schedule(ref)
        for t in range(STEPS):
            ours.zero_grad(set_to_none=True)
            x, y = batch(rank, t)
            ((ours_model(x.to(torch.bfloat16)).float() - y) ** 2).mean().backward()
            for p, q in zip(ours_model.parameters(), ref_model.parameters()):
                q.grad = p.grad.to(torch.float32)
            ours.step()
            ref.step()
            sched.step()
        params = list(ours_model.parameters())
        masters = [ours.state[p]["master_param"] for p in params]
        out[rule] = {"fused": [m.full_tensor().detach().clone() for m in masters], "ref": full_params(ref_model),
                     "param_is_master_rounded": all(torch.equal(p.full_tensor(), m.full_tensor().to(p.dtype))
                                                    for p, m in zip(params, masters)),
                     "dtypes": sorted({str(p.dtype) for p in params} | {str(m.dtype) for m in masters}),
                     "state_types": sorted({type(v).__name__ for s in ours.state.values()
                                            for k, v in s.items() if k != "step"})}
    return out


# Small state (state_precision / stochastic_rounding): params whose shards are large enough to be quantized
# (>= 4,096 elements, so the per-shard reference on plain tensors is quantized too) and sharded unevenly, so that a
# shard boundary falls inside what would be one block of the full tensor.
SMALL_SHAPES = [(129, 97), (8199,), (3, 5)]  # 65 + 64 rows (6305 + 6208 elements), 4100 + 4099, and too small


def small_state_grads(params, step):
    """Deterministic full grads (the same on every rank), as DTensors placed like each param."""
    from torch.distributed.tensor import distribute_tensor

    out = []
    for k, p in enumerate(params):
        g = torch.Generator().manual_seed(100 * step + k)
        full = torch.randn(p.shape, generator=g) * (1.0 + step % 3)
        out.append(distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements))
    return out


def sharded_small_params(mesh, dtype=torch.float32):
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(77)
    return [nn.Parameter(distribute_tensor(torch.randn(s, generator=g).to(dtype), mesh, [Shard(0)]))
            for s in SMALL_SHAPES]


def scenario_fsdp2_small_state(rank, mesh, tmp):
    """(1) 8-bit states of DTensor params: blocks are per local shard. Reference: the same optimizer on plain
    tensors holding this rank's shards and grads; the shards must be bitwise equal. (2) Stochastic rounding of
    bfloat16 DTensor params: the bits are keyed on the element's index in the full tensor, so the sharded run is
    bitwise the unsharded one (computed on every rank). (3) torch.distributed.checkpoint with 8-bit states: a
    resumed run is bitwise the uninterrupted one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    out = {}
    for rule, (fused_cls, _, options) in references().items():
        params = sharded_small_params(mesh)
        plain = [nn.Parameter(p.to_local().detach().clone()) for p in params]
        ours = fused_cls(params, **options, state_precision="8bit")
        ref = fused_cls(plain, **options, state_precision="8bit")
        for t in range(4):
            for p, q, g in zip(params, plain, small_state_grads(params, t)):
                p.grad = g
                q.grad = g.to_local().clone()
            ours.step()
            ref.step()
        shard_states, ref_states = [], []
        for p, q in zip(params, plain):
            shard_states.append({k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
                                 for k, v in ours.state[p].items() if k != "step"})
            ref_states.append({k: v.detach().clone() for k, v in ref.state[q].items() if k != "step"})
        out[rule] = {"fused": [p.to_local().detach().clone() for p in params],
                     "ref": [q.detach().clone() for q in plain],
                     "states": shard_states, "ref_states": ref_states,
                     "local_numels": [p.to_local().numel() for p in params],
                     "state_types": sorted({type(v).__name__ for st in ours.state.values() for k, v in st.items()
                                            if k != "step"})}
    # (2) stochastic rounding: sharded == unsharded
    torch.manual_seed(5)
    params = sharded_small_params(mesh, torch.bfloat16)
    full = [nn.Parameter(p.full_tensor().detach().clone()) for p in params]
    ours = fusedopt.FusedAdamW(params, lr=1e-3, stochastic_rounding=True)
    torch.manual_seed(5)
    ref = fusedopt.FusedAdamW(full, lr=1e-3, stochastic_rounding=True)
    for t in range(3):
        for p, q, g in zip(params, full, small_state_grads(params, t)):
            p.grad = g
            q.grad = g.full_tensor().clone()
        ours.step()
        ref.step()
    out["sr"] = {"fused": [p.full_tensor().detach().clone() for p in params], "ref": [q.detach().clone() for q in full]}
    # (3) DCP with 8-bit states
    path = os.path.join(tmp, "ckpt_small_state")
    params = sharded_small_params(mesh)
    opt = fusedopt.FusedAdamW(params, lr=1e-2, state_precision="8bit")
    model = nn.ParameterList(params)

    def steps(opt, params, first, n):
        for t in range(first, first + n):
            for p, g in zip(params, small_state_grads(params, t)):
                p.grad = g
            opt.step()

    steps(opt, params, 0, 2)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    saved = [p.to_local().detach().clone() for p in params]
    steps(opt, params, 2, 2)
    params2 = sharded_small_params(mesh)
    for p, s in zip(params2, saved):
        p.to_local().data.copy_(s)
    model2 = nn.ParameterList(params2)
    opt2 = fusedopt.FusedAdamW(params2, lr=1e-2, state_precision="8bit")
    state = {"optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(model2, opt2, state["optim"])
    steps(opt2, params2, 2, 2)
    out["dcp"] = {"fused": [p.full_tensor().detach().clone() for p in params2],
                  "ref": [p.full_tensor().detach().clone() for p in params]}
    return out


SCENARIOS = {"ddp": scenario_ddp, "fsdp2": scenario_fsdp2, "fsdp2_clip": scenario_fsdp2_clip,
             "zero": scenario_zero, "dcp": scenario_dcp, "hsdp_clip": scenario_hsdp_clip,
             "fsdp2_inf_empty": scenario_fsdp2_inf_empty, "fsdp2_triton_master": scenario_fsdp2_triton_master,
             "fsdp2_small_state": scenario_fsdp2_small_state}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--init-file", required=True, help="a path for the gloo FileStore (no TCP port to pick)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args()
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    # a rank that fails mid-scenario leaves the other in a collective: time out instead of hanging
    dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank,
                            world_size=args.world_size, timeout=datetime.timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (args.world_size,))
    tmp = os.path.join(args.out, "shared")
    os.makedirs(tmp, exist_ok=True)
    results = {}
    for name in args.scenarios.split(","):
        try:
            results[name] = SCENARIOS[name](args.rank, mesh, tmp)
        except Exception:  # recorded for the test to report; the other rank fails the same way or times out
            results[name] = {"error": traceback.format_exc()}
            traceback.print_exc()
        dist.barrier()
    torch.save(results, os.path.join(args.out, f"rank{args.rank}.pt"))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
