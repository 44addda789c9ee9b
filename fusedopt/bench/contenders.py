"""The contenders: fusedopt backends, torch.optim, lion-pytorch, apex, DeepSpeed, bitsandbytes, torchao and the
bandwidth stream, each a builder of a zero-argument step function on the shared parameter list; their
hyperparameters; the optimizer-state bytes a built contender holds.

Kinds: "fusedopt" (the contender being measured), "peer" (another library at the same precision setting: the
headline's "best peer"), "reference" (a baseline at a different state precision, e.g. torch fused AdamW with
float32 states in the 8-bit group: named in the targets, never the "best peer"), "stream" (the bandwidth)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fusedopt
from fusedopt import backends, schedules
from fusedopt._extras import install_hint
from fusedopt.bench.traffic import PRECISIONS, QUANT_BLOCK, STREAM_CAP, make_stream


ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
SGD = dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-4)
LION = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-2)
HYPER = {"adamw": ADAMW, "sgd": SGD, "lion": LION}
MAX_NORM = 1.0
SCHEDULE_STEPS = 100_000
SCHEDULE_WARMUP = 1_000

# where each kind of contender runs (--dtype values)
PARAM_DTYPES = ("float32", "bf16-master", "bf16")  # peers that keep states in the param dtype (or fp32)
ALL_DTYPES = tuple(PRECISIONS)
# fusedopt's keyword arguments for each precision setting (issue 13's API for the last three)
FUSEDOPT_KWARGS = {
    "float32": {},
    "bf16-master": dict(master_weights=True),
    "bf16": {},
    "bf16-sr": dict(stochastic_rounding=True),
    "bf16-states": dict(state_precision="bf16"),
    "8bit": dict(state_precision="8bit"),
}


class NotApplicable(Exception):
    """The contender has no implementation for this rule / dtype / scenario (not an error, not listed)."""


class Unavailable(Exception):
    """The contender exists but cannot run this group here (raised by a builder): listed as skipped with the
    reason in the group's table, unlike NotApplicable."""


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
        return PRECISIONS[self.dtype].master


@dataclass
class Contender:
    name: str
    kind: str  # "fusedopt", "peer", "reference" or "stream"
    build: Callable[[Setup], Callable[[], None]]  # returns a zero-argument function doing one step
    master_label: str = " +master"  # appended to a peer's name in the bf16-master scenario
    master_only: bool = False  # a variant that exists only with master weights
    dtypes: Tuple[str, ...] = PARAM_DTYPES  # the --dtype settings it runs in


def optimizer_step(opt: torch.optim.Optimizer, extra_state_bytes: int = 0) -> Callable[[], None]:
    """``opt.step`` as the timed function, carrying the optimizer (for its state bytes) and the bytes of
    optimizer-owned copies it keeps outside ``opt.state`` (a peer's float32 master params)."""
    step = functools.partial(opt.step)
    step.optimizer = opt
    step.extra_state_bytes = extra_state_bytes
    return step


def _tensors_in(value) -> List[torch.Tensor]:
    """The plain tensors in a state value: tensor subclasses (torchao's quantized states) are opened with
    ``__tensor_flatten__``; lists, tuples and dicts are walked."""
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
            names, _ = value.__tensor_flatten__()
            return [t for n in names for t in _tensors_in(getattr(value, n))]
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of memory held by the tensors in ``opt.state`` (every param's entries: moments, 8-bit codes,
    absmax, quantization maps, master copies, step counters), each storage counted once (a map shared by all
    params, or views into one flat buffer, are not counted twice)."""
    seen = set()
    total = 0
    for per_param in opt.state.values():
        for t in _tensors_in(per_param):
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr(), storage.nbytes())
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def _schedule_table() -> schedules.ScheduleTable:
    return schedules.warmup_cosine(SCHEDULE_STEPS, SCHEDULE_WARMUP)


FUSEDOPT_CLASSES = {"adamw": "FusedAdamW", "sgd": "FusedSGD", "lion": "FusedLion"}


def fusedopt_contender(backend: str) -> Contender:
    def build(s: Setup):
        kw = dict(HYPER[s.rule], **FUSEDOPT_KWARGS[s.dtype])
        if s.scenario == "full":
            kw.update(max_grad_norm=MAX_NORM, schedule=_schedule_table())
        opt = getattr(fusedopt, FUSEDOPT_CLASSES[s.rule])(s.params, backend=backend, **kw)
        return optimizer_step(opt)

    return Contender(f"fusedopt[{backend}]", "fusedopt", build, dtypes=ALL_DTYPES)


def fusedopt_reference(backend: str) -> List[Contender]:
    """fusedopt at today's precision in the small-state groups: float32 states next to "8bit" / "bf16-states",
    round-to-nearest next to "bf16-sr" (the step that stochastic rounding must not slow down much)."""

    def build(s: Setup):
        opt = getattr(fusedopt, FUSEDOPT_CLASSES[s.rule])(s.params, backend=backend, **HYPER[s.rule])
        return optimizer_step(opt)

    return [Contender(f"fusedopt[{backend}] fp32 states", "reference", build, dtypes=("8bit", "bf16-states")),
            Contender(f"fusedopt[{backend}] no SR", "reference", build, dtypes=("bf16-sr",))]


def _copy_lists(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    try:
        torch._foreach_copy_(dst, src)
    except (AttributeError, RuntimeError):
        for d, s_ in zip(dst, src):
            d.copy_(s_)


def peer_contender(name: str, make_optimizer: Callable[[List[torch.Tensor], Setup], torch.optim.Optimizer],
                   upcast_grads: bool = True, kind: str = "peer",
                   dtypes: Tuple[str, ...] = PARAM_DTYPES) -> Contender:
    """A torch-style optimizer driven as users drive it, with master weights done the torch way for bf16."""

    def build(s: Setup):
        extra = 0
        if s.master:
            model = s.params
            params = [p.detach().float().clone() for p in model]
            model_grads = [p.grad for p in model]
            for m, p in zip(params, model):
                m.grad = p.grad.float()
            master_grads = [m.grad for m in params]
            extra = sum(p.numel() * p.element_size() for p in params)  # the float32 master params
        else:
            params = s.params
        opt = make_optimizer(params, s)
        sched = None
        if s.scenario == "full":
            table = _schedule_table()
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: table.lr_at(t))
        full = s.scenario == "full"
        master = s.master
        if not master and not full:
            return optimizer_step(opt)

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

        step.optimizer = opt
        step.extra_state_bytes = extra
        return step

    if upcast_grads:
        return Contender(name, kind, build, dtypes=dtypes)
    return Contender(name, kind, build, master_label=" +master (fp32 grads)", master_only=True, dtypes=dtypes)


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
    # the float32 step that 8-bit / bf16 states are measured against (issue 13: "8-bit AdamW >= 1.5x torch
    # fused fp32 AdamW")
    out.append(peer_contender("torch fused (fp32 states)", make("fused"), kind="reference",
                              dtypes=("8bit", "bf16-states")))
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
    """DeepSpeedCPUAdam / DeepSpeedCPULion (CPU; JIT-built with ninja on first use) or DeepSpeed FusedAdam /
    FusedLion (CUDA). In the 8-bit and bf16-states groups they are float32-state references. On CPU, bf16
    params also get DeepSpeedCPUAdam's ``fp32_optimizer_states=False`` (bf16 states, the traffic of the "bf16"
    bytes model). DeepSpeedCPULion treats sign(0) as +1 (lion-pytorch and fusedopt: 0) and allocates an
    exp_avg_sq it does not use (its measured state bytes show it)."""
    try:
        if device.type == "cuda":
            from deepspeed.ops.adam import FusedAdam as AdamCls
            from deepspeed.ops.lion import FusedLion as LionCls
        else:
            from deepspeed.ops.adam import DeepSpeedCPUAdam as AdamCls
            from deepspeed.ops.lion import DeepSpeedCPULion as LionCls
    except Exception as e:  # noqa: BLE001 - DeepSpeed fails to import in many ways when absent or half-built
        skipped["DeepSpeed"] = f"not importable ({type(e).__name__}: {e}); pip install deepspeed"
        return []

    def make(rule: str, fp32_states: bool = True):
        def make_optimizer(params, s: Setup):
            if s.rule != rule:
                raise NotApplicable(f"this DeepSpeed optimizer is {rule} only")
            if s.scenario == "graph":
                raise NotApplicable("DeepSpeed's optimizers are not captured in a CUDA graph here")
            kw = {} if fp32_states else dict(fp32_optimizer_states=False)
            if rule == "lion":
                return LionCls(params, **LION, **kw)
            if device.type == "cuda":
                return AdamCls(params, adam_w_mode=True, **ADAMW)
            return AdamCls(params, adamw_mode=True, **ADAMW, **kw)

        return make_optimizer

    out = []
    prefix = "DeepSpeed " if device.type == "cuda" else ""
    for rule, cls in (("adamw", AdamCls), ("lion", LionCls)):
        name = prefix + cls.__name__
        out.append(peer_contender(name, make(rule)))
        out.append(peer_contender(f"{name} (fp32 states)", make(rule), kind="reference",
                                  dtypes=("8bit", "bf16-states")))
        if device.type == "cpu":
            out.append(peer_contender(f"{name} (bf16 states)", make(rule, fp32_states=False), dtypes=("bf16",)))
    return out


def bitsandbytes_contenders(device: torch.device, skipped: Dict[str, str]) -> List[Contender]:
    """bitsandbytes' 8-bit optimizers (blockwise dynamic quantization, block 256 on CPU; tensors under 4,096
    elements keep float32 states). Its SGD8bit accepts nesterov but its kernels ignore it: it runs heavy-ball
    momentum (the same traffic as Nesterov)."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - a missing or broken native library fails in several ways
        skipped["bitsandbytes"] = f"not importable ({type(e).__name__}: {e}); pip install bitsandbytes"
        return []

    def make_optimizer(params, s: Setup):
        if s.scenario == "graph":
            raise NotApplicable("bitsandbytes reads its lr and step on the host: not captured")
        if s.rule == "adamw":
            return bnb.optim.AdamW8bit(params, **ADAMW)
        if s.rule == "lion":
            return bnb.optim.Lion8bit(params, **LION)
        return bnb.optim.SGD8bit(params, **SGD)

    names = {"adamw": "bnb AdamW8bit", "lion": "bnb Lion8bit", "sgd": "bnb SGD8bit"}
    def only(rule: str):
        def make(params, s: Setup):
            if s.rule != rule:
                raise NotApplicable(f"{names[rule]} is {rule} only")
            return make_optimizer(params, s)

        return make

    return [peer_contender(name, only(rule), dtypes=("8bit",)) for rule, name in names.items()]


def torchao_contenders(device: torch.device, skipped: Dict[str, str]) -> List[Contender]:
    """torchao's low-bit AdamW (torchao.optim: 8-bit and 4-bit blockwise states, compiled per param with
    torch.compile: the first steps take tens of seconds) and its bf16 stochastic-rounding AdamW (``_AdamW``
    with ``bf16_stochastic_round=True``, the "bf16-sr" peer). AdamW only."""
    try:
        import torchao.optim as ao
    except Exception as e:  # noqa: BLE001
        skipped["torchao"] = f"not importable ({type(e).__name__}: {e}); pip install torchao"
        return []

    def make(cls_name: str, **extra):
        def make_optimizer(params, s: Setup):
            if s.rule != "adamw":
                raise NotApplicable("torchao's low-bit optimizers are Adam / AdamW only")
            if s.scenario == "graph":
                raise NotApplicable("torchao's optimizers compile per param: not captured here")
            return getattr(ao, cls_name)(params, **ADAMW, **extra)

        return make_optimizer

    return [peer_contender("torchao AdamW8bit", make("AdamW8bit", block_size=QUANT_BLOCK), dtypes=("8bit",)),
            peer_contender("torchao AdamW4bit", make("AdamW4bit"), dtypes=("8bit",)),
            peer_contender("torchao AdamW bf16 SR", make("_AdamW", bf16_stochastic_round=True), dtypes=("bf16-sr",))]


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
        out += fusedopt_reference(name)
    return out


def stream_contender() -> Contender:
    def build(s: Setup):
        numel = min(sum(p.numel() for p in s.params), STREAM_CAP)
        shapes = [tuple(p.shape) for p in s.params]
        return make_stream(s.rule, s.dtype, "full" if s.scenario == "full" else "step", numel, s.device, shapes)

    return Contender("bandwidth (stream)", "stream", build, dtypes=ALL_DTYPES)


def all_contenders(device: torch.device, skipped: Dict[str, str],
                   fusedopt_backends: Optional[Sequence[str]]) -> List[Contender]:
    out = fusedopt_backend_contenders(device, skipped, fusedopt_backends)
    out += torch_contenders()
    out += lion_pytorch_contenders(device, skipped)
    out += apex_contenders(device, skipped)
    out += deepspeed_contenders(device, skipped)
    out += bitsandbytes_contenders(device, skipped)
    out += torchao_contenders(device, skipped)
    return out


def display_name(c: Contender, dtype: str) -> str:
    """The contender's name in this dtype's tables; "" when it does not run there."""
    if dtype not in c.dtypes:
        return ""
    if c.kind == "peer" and dtype == "bf16-master":
        return c.name + c.master_label
    return "" if c.master_only else c.name
