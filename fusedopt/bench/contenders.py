"""The contenders: fusedopt backends, torch.optim, lion-pytorch, apex, DeepSpeed and the bandwidth stream, each
a builder of a zero-argument step function on the shared parameter list; their hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

import fusedopt
from fusedopt import backends, schedules
from fusedopt._extras import install_hint
from fusedopt.bench.traffic import STREAM_CAP, make_stream


ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
SGD = dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-4)
LION = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-2)
HYPER = {"adamw": ADAMW, "sgd": SGD, "lion": LION}
MAX_NORM = 1.0
SCHEDULE_STEPS = 100_000
SCHEDULE_WARMUP = 1_000


class NotApplicable(Exception):
    """The contender has no implementation for this rule / dtype / scenario (not an error)."""


@dataclass
class Setup:
    """What a contender builds on: the shared model params (grads attached), rule, dtype and scenario."""

    params: List[torch.Tensor]
    device: torch.device
    rule: str
    dtype: str
    scenario: str

    @property
    def master(self) -> bool:
        return self.dtype == "bf16-master"


@dataclass
class Contender:
    name: str
    kind: str  # "fusedopt", "peer" or "stream"
    build: Callable[[Setup], Callable[[], None]]  # returns a zero-argument function doing one step
    master_label: str = " +master"  # appended to a peer's name in the bf16-master scenario
    master_only: bool = False  # a variant that exists only with master weights


def _schedule_table() -> schedules.ScheduleTable:
    return schedules.warmup_cosine(SCHEDULE_STEPS, SCHEDULE_WARMUP)


def fusedopt_contender(backend: str, state_precision: Optional[str] = None, staged: bool = False) -> Contender:
    """fusedopt on one backend; with state_precision ("8bit", "bf16") its small states, and with staged=True
    through the optimizers' staged path (states widened to float32 around the float32 kernel, re-encoded after:
    what the fused small-state kernels replace), for comparison."""
    classes = {"adamw": fusedopt.FusedAdamW, "sgd": fusedopt.FusedSGD, "lion": fusedopt.FusedLion}

    def build(s: Setup):
        kw = dict(HYPER[s.rule])
        if s.master:
            kw["master_weights"] = True
        if s.scenario == "full":
            kw.update(max_grad_norm=MAX_NORM, schedule=_schedule_table())
        if state_precision is not None:
            kw["state_precision"] = state_precision
        opt = classes[s.rule](s.params, backend=backend, **kw)
        if staged:
            opt._fused_small_state = lambda backend, batch: False
        return opt.step

    name = f"fusedopt[{backend}]"
    if state_precision is not None:
        name += f" {state_precision} states" + (" (staged)" if staged else "")
    return Contender(name, "fusedopt", build)


def _copy_lists(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    try:
        torch._foreach_copy_(dst, src)
    except (AttributeError, RuntimeError):
        for d, s_ in zip(dst, src):
            d.copy_(s_)


def peer_contender(name: str, make_optimizer: Callable[[List[torch.Tensor], Setup], torch.optim.Optimizer],
                   upcast_grads: bool = True) -> Contender:
    """A torch-style optimizer driven as users drive it, with master weights done the torch way for bf16."""

    def build(s: Setup):
        if s.master:
            model = s.params
            params = [p.detach().float().clone() for p in model]
            model_grads = [p.grad for p in model]
            for m, p in zip(params, model):
                m.grad = p.grad.float()
            master_grads = [m.grad for m in params]
        else:
            params = s.params
        opt = make_optimizer(params, s)
        sched = None
        if s.scenario == "full":
            table = _schedule_table()
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: table.lr_at(t))
        full = s.scenario == "full"
        master = s.master

        def step():
            if master and upcast_grads:
                _copy_lists(master_grads, model_grads)
            if full:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            opt.step()
            if sched is not None:
                sched.step()
            if master:
                _copy_lists(model, params)

        return step

    if upcast_grads:
        return Contender(name, "peer", build)
    return Contender(name, "peer", build, master_label=" +master (fp32 grads)", master_only=True)


def torch_contenders() -> List[Contender]:
    def make(impl: str):
        def make_optimizer(params, s: Setup):
            kw = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[impl]
            if s.rule == "adamw":
                if s.scenario == "graph":
                    kw["capturable"] = True
                return torch.optim.AdamW(params, **ADAMW, **kw)
            if s.rule == "sgd":
                return torch.optim.SGD(params, **SGD, **kw)
            raise NotApplicable("torch.optim has no Lion")

        return make_optimizer

    out = [peer_contender(f"torch {impl}", make(impl)) for impl in ("for-loop", "foreach", "fused")]
    out.append(peer_contender("torch fused", make("fused"), upcast_grads=False))
    return out


def lion_pytorch_contenders(device: torch.device, skipped: Dict[str, str]) -> List[Contender]:
    try:
        from lion_pytorch import Lion
    except ImportError as e:
        skipped["lion-pytorch"] = f"not importable ({e}); {install_hint('lion_pytorch')}"
        return []

    def make(use_triton: bool):
        def make_optimizer(params, s: Setup):
            if s.rule != "lion":
                raise NotApplicable("lion-pytorch implements Lion only")
            return Lion(params, **LION, use_triton=use_triton)

        return make_optimizer

    out = [peer_contender("lion-pytorch", make(False))]
    if device.type == "cuda":
        try:
            import lion_pytorch.triton  # noqa: F401

            out.append(peer_contender("lion-pytorch triton", make(True)))
        except Exception as e:  # noqa: BLE001 - any import failure means "not present"
            skipped["lion-pytorch triton"] = f"not importable ({type(e).__name__}: {e})"
    return out


def apex_contenders(device: torch.device, skipped: Dict[str, str]) -> List[Contender]:
    if device.type != "cuda":
        skipped["apex"] = "CUDA only"
        return []
    try:
        from apex.optimizers import FusedAdam, FusedSGD
    except Exception as e:  # noqa: BLE001
        skipped["apex"] = f"not importable ({type(e).__name__}: {e})"
        return []

    def make_optimizer(params, s: Setup):
        if s.rule == "adamw":
            kw = dict(capturable=True) if s.scenario == "graph" else {}
            return FusedAdam(params, adam_w_mode=True, **ADAMW, **kw)
        if s.rule == "sgd":
            return FusedSGD(params, **SGD)
        raise NotApplicable("apex has no Lion")

    return [peer_contender("apex", make_optimizer)]


def deepspeed_contenders(device: torch.device, skipped: Dict[str, str]) -> List[Contender]:
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    except Exception as e:  # noqa: BLE001 - DeepSpeed fails to import in many ways when absent or half-built
        skipped["DeepSpeed"] = f"not importable ({type(e).__name__}: {e})"
        return []

    def make_optimizer(params, s: Setup):
        if s.rule != "adamw":
            raise NotApplicable("DeepSpeed's fused optimizers here are Adam only")
        if device.type == "cuda":
            return FusedAdam(params, adam_w_mode=True, **ADAMW)
        return DeepSpeedCPUAdam(params, adamw_mode=True, **ADAMW)

    name = "DeepSpeed FusedAdam" if device.type == "cuda" else "DeepSpeedCPUAdam"
    return [peer_contender(name, make_optimizer)]


def fusedopt_backend_contenders(device: torch.device, skipped: Dict[str, str],
                                requested: Optional[Sequence[str]]) -> List[Contender]:
    out = []
    for name in ("cpu", "cuda", "triton"):
        if requested is not None and name not in requested:
            continue
        try:
            backends.resolve(name, device)
        except (backends.BackendUnavailable, ValueError) as e:
            skipped[f"fusedopt[{name}]"] = str(e).split(";")[0]
            continue
        if name == "triton" and device.type == "cpu" and requested is None:
            skipped["fusedopt[triton]"] = ("the Triton interpreter (TRITON_INTERPRET=1) is a test tool, not timed; "
                                           "pass --fusedopt-backends triton to include it")
            continue
        out.append(fusedopt_contender(name))
        out.append(fusedopt_contender(name, "8bit"))
        if name == "cpu":
            out.append(fusedopt_contender(name, "8bit", staged=True))
    return out


def stream_contender() -> Contender:
    def build(s: Setup):
        numel = min(sum(p.numel() for p in s.params), STREAM_CAP)
        return make_stream(s.rule, s.dtype, "full" if s.scenario == "full" else "step", numel, s.device)

    return Contender("bandwidth (stream)", "stream", build)


def all_contenders(device: torch.device, skipped: Dict[str, str],
                   fusedopt_backends: Optional[Sequence[str]]) -> List[Contender]:
    out = fusedopt_backend_contenders(device, skipped, fusedopt_backends)
    out += torch_contenders()
    out += lion_pytorch_contenders(device, skipped)
    out += apex_contenders(device, skipped)
    out += deepspeed_contenders(device, skipped)
    return out


def display_name(c: Contender, dtype: str) -> str:
    """The contender's name in this dtype's tables; "" when it does not run there."""
    if c.kind == "peer" and dtype == "bf16-master":
        return c.name + c.master_label
    return "" if c.master_only else c.name
