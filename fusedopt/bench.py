"""`python -m fusedopt.bench`: time optimizer steps on parameter lists shaped like real models.

Every contender updates the same parameter list, in interleaved rounds (round r times every contender once,
in a rotating order), so that the ratios between contenders are measured side by side under the same machine
conditions. The first steps (state creation) are warm-up and are not timed.

Models (``--models``; ``--quick`` scales every one down, uses one thread and 3 repetitions, so that the whole run
takes well under a minute on a small, busy CI machine):

    gpt2-small     GPT-2 124M: wte, wpe, 12 blocks (ln, c_attn, c_proj, ln, c_fc, c_proj), ln_f: 148 tensors
    gpt2-medium    GPT-2 350M: the same with d=1024 and 24 blocks: 292 tensors
    resnet50       ResNet-50 (torchvision layout): 161 tensors, 25.6M params, 4-D conv weights
    small-tensors  10,000 tensors of 1..4096 elements (log-uniform, seed 0): ~4.9M params; per-tensor overhead

Contenders: every fusedopt backend usable for the device (``fusedopt[cpu]``, ``fusedopt[cuda]``,
``fusedopt[triton]``) and every peer present: torch.optim for-loop (``foreach=False``), foreach and fused
(AdamW, SGD), lion-pytorch (Lion), apex FusedAdam / FusedSGD and DeepSpeed FusedAdam (CUDA) or
DeepSpeedCPUAdam (CPU) when they import. A peer that is missing is listed with the reason, not an error.

Scenarios (``--scenarios``):

    step   the bare ``optimizer.step()``
    full   the step as users write it. Peers: ``clip_grad_norm_(params, 1.0)`` + ``step()`` +
           ``scheduler.step()`` (LambdaLR reading the same warmup-cosine factors); fusedopt:
           ``max_grad_norm=1.0`` + ``schedule=warmup_cosine(...)`` (norm and schedule on the device).
    graph  (CUDA only) the bare step captured once in a ``torch.cuda.CUDAGraph`` (warmed up on a side stream
           first) and replayed; torch AdamW gets ``capturable=True``.

Dtypes (``--dtype``):

    float32      float32 params, grads and states.
    bf16-master  bfloat16 params and grads with float32 master weights and states. fusedopt does it in one pass
                 (``master_weights=True``). Peers do torch's nearest equivalent: the optimizer on float32 master
                 params, ``torch._foreach_copy_`` of the bf16 grads into float32 master grads before the step and
                 of the master params into the bf16 model after it ("+master"). "(fp32 grads)" is the same without
                 the grad copy, as when a backward hook accumulates straight into float32 grads.

Bytes-per-parameter model (the traffic a step must move at least; ``effective GB/s = bytes x params/s``):

    rule (float32)                reads               writes          bytes/param
    AdamW                         p, g, m, v          p, m, v         7 x 4 = 28
    AdamW amsgrad                 + v_max             + v_max         36      (not benchmarked)
    SGD with momentum / Nesterov  p, g, buf           p, buf          5 x 4 = 20
    SGD without momentum          p, g                p               3 x 4 = 12  (not benchmarked)
    Lion                          p, g, m             p, m            5 x 4 = 20

    bf16-master (bf16 p and g, float32 master w and states): the bf16 param is *not read* (the master copy is
    the value that is updated); it is only written, rounded from the new master.
    AdamW                         g(2), w, m, v       w, m, v, p(2)   2 + 3x4 + 3x4 + 2 = 28
    SGD momentum / Lion           g(2), w, buf        w, buf, p(2)    2 + 2x4 + 2x4 + 2 = 20
    SGD without momentum          g(2), w             w, p(2)         12
    torch's equivalent moves more: + grad copy (read 2, write 4) + param copy (read 4, write 2) = +12, i.e.
    40 B/param for AdamW, 32 for SGD momentum and Lion: the one-pass step can be at most 40/28 = 1.43x (AdamW)
    faster when both run at the memory bandwidth; 34/28 = 1.21x against the "(fp32 grads)" variant.

    full step: + one read of the grads (the global norm): 32 B/param for float32 AdamW, 30 for bf16-master.
    clip_grad_norm_ also rescales the grads in place (one more read and write of g), which a fused clip avoids;
    that is work the fused step saves, so it is not counted as useful traffic.

Memory bandwidth ("bw" line, "% bw"): in the same run, as one more contender in the same rounds, an in-place
stream over flat buffers with the rule's reads and writes (same dtypes): each write-only array is a copy_ from a
read-only one of its dtype, each remaining read-only array is added into a read-write one (``w.add_(g)``), the
other read-write arrays are scaled in place (``m.mul_(1.0)``), the norm read is a ``sum``. Every element of every
buffer is touched exactly as often as the rule touches it, in place (a copy into a fresh array would add page
faults and understate the limit). Buffers hold min(model params, 2^26) elements. In --quick mode the buffers
fit in the caches, so "% bw" means little there.

Statistics: per contender, ``reps`` timed repetitions of ``inner`` steps (``inner`` chosen so a repetition
lasts about --min-rep-seconds); median, quartiles and min/max of the per-step time. Ratios: median step time
of the best peer over that of the contender; the headline also gives the median and quartiles of the per-round
ratios (paired rounds). Slow contenders get fewer repetitions (at least 3) so that one (model, rule) group
stays within --budget seconds per contender.

Threads: on a machine shared with other jobs, every parallel region (torch's: one or more per tensor and op;
fusedopt's: one per param group) can stall for a scheduler time slice when a worker thread is descheduled. That
penalizes the contenders with many regions and inflates ratios; ``--threads 1`` measures without that effect.

Output in --out (default benchmarks/results/<date>-<device>/; --quick: benchmarks/out/<date>-<device>-quick/): results.json, results.md, results.png (params/s
against model size per contender, with the bandwidth line); a table on stdout, a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fusedopt
from fusedopt import backends, schedules

# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------

MODEL_NAMES = ("gpt2-small", "gpt2-medium", "resnet50", "small-tensors")


def gpt2_shapes(vocab: int, ctx: int, d: int, layers: int) -> List[Tuple[int, ...]]:
    """HF GPT-2 parameter shapes (Conv1D weights are (in, out); lm_head is tied to wte)."""
    shapes: List[Tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def resnet50_shapes(width: int = 64, num_classes: int = 1000) -> List[Tuple[int, ...]]:
    """torchvision resnet50 parameter shapes (conv weight, then BN weight and bias; downsample in block 0)."""
    shapes: List[Tuple[int, ...]] = [(width, 3, 7, 7), (width,), (width,)]
    inplanes = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = width * 2 ** stage
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(num_classes, inplanes), (num_classes,)]
    return shapes


def small_tensor_shapes(count: int = 10_000, max_size: int = 4096, seed: int = 0) -> List[Tuple[int, ...]]:
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(count, generator=gen, dtype=torch.float64)
    sizes = torch.exp(u * math.log(max_size)).floor().clamp_(1, max_size).long().tolist()
    return [(s,) for s in sizes]


def model_shapes(name: str, quick: bool) -> List[Tuple[int, ...]]:
    if name == "gpt2-small":
        return gpt2_shapes(2048, 128, 128, 2) if quick else gpt2_shapes(50257, 1024, 768, 12)
    if name == "gpt2-medium":
        return gpt2_shapes(2048, 128, 192, 3) if quick else gpt2_shapes(50257, 1024, 1024, 24)
    if name == "resnet50":
        return resnet50_shapes(8, 100) if quick else resnet50_shapes()
    if name == "small-tensors":
        return small_tensor_shapes(1000) if quick else small_tensor_shapes()
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")


def numel_of(shapes: Sequence[Tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


# ----------------------------------------------------------------------------------------------------------
# Bytes model and bandwidth stream
# ----------------------------------------------------------------------------------------------------------

RULES = ("adamw", "sgd", "lion")
DTYPES = ("float32", "bf16-master")
SCENARIOS = ("step", "full", "graph")
STATE_ARRAYS = {"adamw": ("m", "v"), "sgd": ("buf",), "lion": ("m",)}
STREAM_CAP = 1 << 26


@dataclass(frozen=True)
class Array:
    name: str
    dtype: torch.dtype
    mode: str  # "rw" (read and written in place), "r" (read only), "w" (written only)


def traffic(rule: str, dtype: str, scenario: str) -> List[Array]:
    """The arrays one step of `rule` touches per parameter, per the bytes model in the module docstring."""
    low = dtype == "bf16-master"
    pdt = torch.bfloat16 if low else torch.float32
    arrays = [Array("g", pdt, "r")]
    arrays += [Array("w", torch.float32, "rw"), Array("p", pdt, "w")] if low else [Array("p", pdt, "rw")]
    arrays += [Array(s, torch.float32, "rw") for s in STATE_ARRAYS[rule]]
    if scenario == "full":
        arrays.append(Array("g", pdt, "r"))  # the global grad norm reads the grads once more
    return arrays


def bytes_per_param(rule: str, dtype: str, scenario: str) -> int:
    total = 0
    for a in traffic(rule, dtype, scenario):
        size = torch.empty((), dtype=a.dtype).element_size()
        total += size * (2 if a.mode == "rw" else 1)
    return total


def bytes_model_table() -> Dict[str, Dict[str, Dict[str, int]]]:
    return {rule: {dtype: {sc: bytes_per_param(rule, dtype, sc) for sc in ("step", "full")} for dtype in DTYPES}
            for rule in RULES}


def make_stream(rule: str, dtype: str, scenario: str, numel: int, device: torch.device) -> Callable[[], None]:
    """An in-place pass over flat buffers with the same reads and writes (and dtypes) as the rule."""
    arrays = traffic(rule, dtype, scenario)
    buffers: Dict[str, torch.Tensor] = {}
    for a in arrays:
        if a.name not in buffers:
            buffers[a.name] = torch.rand(numel, dtype=a.dtype, device=device)
    reads = [a for a in arrays if a.mode == "r"]
    ops: List[Callable[[], None]] = []
    rw = [a for a in arrays if a.mode == "rw"]
    for w in [a for a in arrays if a.mode == "w"]:
        src = next((r for r in reads if r.dtype == w.dtype), None)
        if src is not None:
            reads.remove(src)
            ops.append(lambda w=buffers[w.name], r=buffers[src.name]: w.copy_(r))
        else:
            ops.append(lambda w=buffers[w.name]: w.fill_(1.0))
    for x in rw:
        src = next((r for r in reads if r.dtype == x.dtype), None)
        if src is not None:
            reads.remove(src)
            ops.append(lambda x=buffers[x.name], r=buffers[src.name]: x.add_(r, alpha=1e-30))
        else:
            ops.append(lambda x=buffers[x.name]: x.mul_(1.0))
    for r in reads:
        ops.append(lambda r=buffers[r.name]: r.sum())

    def stream():
        for op in ops:
            op()

    return stream


# ----------------------------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------------------------

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


def fusedopt_contender(backend: str) -> Contender:
    classes = {"adamw": fusedopt.FusedAdamW, "sgd": fusedopt.FusedSGD, "lion": fusedopt.FusedLion}

    def build(s: Setup):
        kw = dict(HYPER[s.rule])
        if s.master:
            kw["master_weights"] = True
        if s.scenario == "full":
            kw.update(max_grad_norm=MAX_NORM, schedule=_schedule_table())
        opt = classes[s.rule](s.params, backend=backend, **kw)
        return opt.step

    return Contender(f"fusedopt[{backend}]", "fusedopt", build)


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
        skipped["lion-pytorch"] = f"not importable ({e})"
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


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_graph(step: Callable[[], None], device: torch.device, warmup: int = 3) -> Callable[[], None]:
    """Warm `step` up on a side stream (state allocation happens there), capture one step, return replay."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    _sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    _sync(device)
    return graph.replay


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - start) / n


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> Dict[str, float]:
    s = sorted(times)
    return dict(median_s=quantile(s, 0.5), q1_s=quantile(s, 0.25), q3_s=quantile(s, 0.75), min_s=s[0], max_s=s[-1])


class Progress:
    """A plain-text progress bar on stderr (one line rewritten in place on a terminal, sparse lines otherwise)."""

    def __init__(self, total: float, enabled: bool = True, stream=None):
        self.total = max(total, 1e-9)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_line = 0.0

    def update(self, done: float, label: str) -> None:
        if not self.enabled:
            return
        frac = min(max(done / self.total, 0.0), 1.0)
        width = 30
        filled = int(round(frac * width))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {100 * frac:5.1f}% {time.perf_counter() - self.start:6.1f}s "
                f"{label}")
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            self.stream.flush()
        elif now - self._last_line > 5.0 or frac >= 1.0:
            self._last_line = now
            self.stream.write(line + "\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class Options:
    reps: int = 5
    min_rep_seconds: float = 0.2
    budget: float = 12.0  # seconds per contender and group, at most (never fewer than 3 repetitions)
    warmup: int = 2


def make_params(shapes, device: torch.device, dtype: str, seed: int = 0) -> List[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pdt = torch.bfloat16 if dtype == "bf16-master" else torch.float32
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=pdt)
        p.grad = (torch.randn(shape, generator=gen) * 1e-2).to(device=device, dtype=pdt)
        params.append(p)
    return params


def run_group(model: str, shapes, rule: str, dtype: str, scenario: str, device: torch.device,
              contenders: List[Contender], opts: Options, progress: Progress, done_before: float,
              log: Callable[[str], None]) -> List[dict]:
    """Time every contender on one (model, rule, dtype, scenario) in interleaved rounds."""
    params = make_params(shapes, device, dtype)
    numel = numel_of(shapes)
    setup = Setup(params, device, rule, dtype, scenario)
    bpp = bytes_per_param(rule, dtype, "full" if scenario == "full" else "step")
    label = f"{model} {rule} {dtype} {scenario}"
    results: List[dict] = []
    live = []  # (contender, display name, step fn, est seconds per step)
    base = dict(model=model, numel=numel, num_tensors=len(shapes), rule=rule, dtype=dtype, scenario=scenario,
                bytes_per_param=bpp)
    for c in contenders:
        name = c.name if c.kind == "stream" else display_name(c, dtype)
        if not name:
            continue
        progress.update(done_before, f"{label}: setting up {name}")
        try:
            step = c.build(setup)
            if scenario == "graph":
                step = capture_graph(step, device)
            t = time_steps(step, 1, device)  # first step: state creation
            if opts.warmup > 1 and t < opts.budget / 4:  # a slow contender is warm after one step
                t = time_steps(step, opts.warmup - 1, device)
            live.append((c, name, step, t))
        except NotApplicable:
            continue
        except Exception as e:  # noqa: BLE001 - one failing contender must not end the benchmark
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"  {label}: {name} failed: {msg}")
            if os.environ.get("FUSEDOPT_BENCH_DEBUG"):
                traceback.print_exc()
            results.append(dict(base, contender=name, kind=c.kind, status="error", error=msg))

    plans = []
    for c, name, step, t in live:
        inner = max(1, int(math.ceil(opts.min_rep_seconds / max(t, 1e-9))))
        reps = opts.reps
        per_rep = t * inner
        if per_rep * reps > opts.budget:
            reps = max(3, min(reps, int(opts.budget // max(per_rep, 1e-9))))
        plans.append([c, name, step, inner, reps, []])
    rounds = max((p[4] for p in plans), default=0)
    for r in range(rounds):
        progress.update(done_before + r / max(rounds, 1), f"{label}: round {r + 1}/{rounds}")
        order = plans[r % len(plans):] + plans[:r % len(plans)] if plans else []
        for plan in order:
            c, name, step, inner, reps, times = plan
            if r < reps:
                times.append(time_steps(step, inner, device))
    for c, name, step, inner, reps, times in plans:
        stats = summarize(times)
        entry = dict(base, contender=name, kind=c.kind, status="ok", reps=len(times), inner=inner, times_s=times,
                     **stats)
        steps_per_s = 1.0 / stats["median_s"]
        entry["steps_per_s"] = steps_per_s
        if c.kind == "stream":
            stream_numel = min(numel, STREAM_CAP)
            entry["stream_numel"] = stream_numel
            entry["gb_per_s"] = bpp * stream_numel / stats["median_s"] / 1e9
            entry["params_per_s"] = stream_numel / stats["median_s"]
        else:
            entry["params_per_s"] = numel * steps_per_s
            entry["gb_per_s"] = bpp * numel * steps_per_s / 1e9
        results.append(entry)
    del live, plans, setup, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # derived figures: fraction of the measured bandwidth, ratios against the best peer
    ok = [e for e in results if e["status"] == "ok"]
    stream = next((e for e in ok if e["kind"] == "stream"), None)
    peers = [e for e in ok if e["kind"] == "peer"]
    best_peer = min(peers, key=lambda e: e["median_s"]) if peers else None
    for e in ok:
        e["bw_fraction"] = e["gb_per_s"] / stream["gb_per_s"] if stream else None
        if best_peer is not None and e["kind"] != "stream":
            e["best_peer"] = best_peer["contender"]
            e["ratio_vs_best_peer"] = best_peer["median_s"] / e["median_s"]
        else:
            e["best_peer"] = None
            e["ratio_vs_best_peer"] = None
    return results


def paired_ratio(a: dict, b: dict) -> Optional[Dict[str, float]]:
    """How many times faster `a` is than `b`: median-based, and the spread of the per-round (paired) ratios."""
    if a.get("status") != "ok" or b.get("status") != "ok":
        return None
    n = min(len(a["times_s"]), len(b["times_s"]))
    per_round = sorted(b["times_s"][i] / a["times_s"][i] for i in range(n))
    return dict(ratio=b["median_s"] / a["median_s"], round_median=quantile(per_round, 0.5),
                round_q1=quantile(per_round, 0.25), round_q3=quantile(per_round, 0.75), rounds=n)


# ----------------------------------------------------------------------------------------------------------
# Headline and targets
# ----------------------------------------------------------------------------------------------------------

BEST = "best peer"
# The CPU targets of the issue: (rule, dtype, scenario, peer or BEST, minimum ratio, label).
CPU_TARGETS = [
    ("adamw", "float32", "step", "torch fused", 1.0, "FusedAdamW >= 1.0x torch fused AdamW"),
    ("adamw", "float32", "step", "torch foreach", 4.0, "FusedAdamW >= 4x torch foreach AdamW"),
    ("adamw", "float32", "full", BEST, 1.2, "AdamW full step >= 1.2x torch's fastest full step"),
    ("sgd", "float32", "full", BEST, 1.2, "SGD full step >= 1.2x torch's fastest full step"),
    ("lion", "float32", "full", BEST, 1.2, "Lion full step >= 1.2x the fastest peer full step"),
    ("sgd", "float32", "step", "torch fused", 1.0, "FusedSGD (Nesterov) >= 1.0x torch fused SGD"),
    ("lion", "float32", "step", "lion-pytorch", 4.0, "FusedLion >= 4x lion-pytorch"),
    ("adamw", "bf16-master", "step", "torch fused +master", 1.25,
     "bf16+master AdamW (one pass) >= 1.25x torch fused on fp32 master + grad and param copies"),
    ("adamw", "bf16-master", "step", BEST, 1.25,
     "bf16+master AdamW (one pass) >= 1.25x the best peer (incl. the fp32-grads variant)"),
]


def group_key(e: dict) -> tuple:
    return (e["model"], e["rule"], e["dtype"], e["scenario"])


def best_fusedopt(entries: List[dict]) -> Optional[dict]:
    ours = [e for e in entries if e["kind"] == "fusedopt" and e["status"] == "ok"]
    return min(ours, key=lambda e: e["median_s"]) if ours else None


def headline(results: List[dict]) -> List[dict]:
    groups: Dict[tuple, List[dict]] = {}
    for e in results:
        groups.setdefault(group_key(e), []).append(e)
    out = []
    for key, entries in groups.items():
        ours = best_fusedopt(entries)
        peers = [e for e in entries if e["kind"] == "peer" and e["status"] == "ok"]
        if ours is None or not peers:
            continue
        best = min(peers, key=lambda e: e["median_s"])
        pr = paired_ratio(ours, best)
        out.append(dict(model=key[0], rule=key[1], dtype=key[2], scenario=key[3], fusedopt=ours["contender"],
                        best_peer=best["contender"], ratio=pr["ratio"], round_q1=pr["round_q1"],
                        round_q3=pr["round_q3"], fusedopt_bw_fraction=ours.get("bw_fraction"),
                        best_peer_bw_fraction=best.get("bw_fraction")))
    return out


def evaluate_targets(results: List[dict], device: torch.device) -> List[dict]:
    if device.type != "cpu":
        return []
    groups: Dict[tuple, List[dict]] = {}
    for e in results:
        groups.setdefault(group_key(e), []).append(e)
    models = sorted({e["model"] for e in results}, key=lambda m: MODEL_NAMES.index(m) if m in MODEL_NAMES else 99)
    out = []
    for rule, dtype, scenario, peer, minimum, label in CPU_TARGETS:
        for model in models:
            entries = groups.get((model, rule, dtype, scenario))
            if not entries:
                continue
            ours = best_fusedopt(entries)
            peers = [e for e in entries if e["kind"] == "peer" and e["status"] == "ok"]
            if peer == BEST:
                other = min(peers, key=lambda e: e["median_s"]) if peers else None
            else:
                other = next((e for e in peers if e["contender"] == peer), None)
            if ours is None or other is None:
                continue
            pr = paired_ratio(ours, other)
            out.append(dict(target=label, model=model, rule=rule, dtype=dtype, scenario=scenario,
                            fusedopt=ours["contender"], peer=other["contender"], minimum=minimum,
                            ratio=pr["ratio"], round_q1=pr["round_q1"], round_q3=pr["round_q3"],
                            met=pr["ratio"] >= minimum))
    return out


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def group_rows(entries: List[dict]) -> List[List[str]]:
    rows = []
    for e in sorted(entries, key=lambda e: ({"fusedopt": 0, "peer": 1, "stream": 2}[e["kind"]],
                                            e.get("median_s", math.inf))):
        if e["status"] != "ok":
            rows.append([e["contender"], "error", "", "", "", "", "", "", e.get("error", "")[:60]])
            continue
        rows.append([
            e["contender"],
            _fmt_time(e["median_s"]),
            f"{_fmt_time(e['q1_s'])} - {_fmt_time(e['q3_s'])}",
            f"{e['steps_per_s']:.2f}",
            f"{e['params_per_s'] / 1e6:.0f}",
            f"{e['gb_per_s']:.1f}",
            _fmt_pct(e.get("bw_fraction")),
            _fmt_ratio(e.get("ratio_vs_best_peer")) if e["kind"] != "stream" else "",
            f"{e['reps']}x{e['inner']}",
        ])
    return rows


HEADER = ["contender", "median/step", "IQR", "steps/s", "Mparams/s", "GB/s", "% bw", "vs best peer", "reps"]


def text_table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x).replace("|", "/") for x in row) + " |" for row in rows]
    return "\n".join(lines)


def group_title(e: dict) -> str:
    return (f"{e['model']} ({e['numel'] / 1e6:.1f}M params, {e['num_tensors']} tensors) - {e['rule']} "
            f"{e['dtype']} {e['scenario']} ({e['bytes_per_param']} B/param)")


def headline_rows(head: List[dict]) -> List[List[str]]:
    return [[h["model"], h["rule"], h["dtype"], h["scenario"], h["fusedopt"], h["best_peer"],
             f"{h['ratio']:.2f}x", f"{h['round_q1']:.2f} - {h['round_q3']:.2f}", _fmt_pct(h["fusedopt_bw_fraction"]),
             _fmt_pct(h["best_peer_bw_fraction"])] for h in head]


HEADLINE_HEADER = ["model", "rule", "dtype", "scenario", "fusedopt", "best peer", "ratio", "per-round IQR",
                   "fusedopt % bw", "peer % bw"]
TARGET_HEADER = ["target", "model", "vs", "ratio", "per-round IQR", "met"]


def target_rows(targets: List[dict]) -> List[List[str]]:
    return [[t["target"], t["model"], t["peer"], f"{t['ratio']:.2f}x (>= {t['minimum']}x)",
             f"{t['round_q1']:.2f} - {t['round_q3']:.2f}", "yes" if t["met"] else "NO"] for t in targets]


def write_markdown(path: str, data: dict) -> None:
    meta = data["meta"]
    lines = [f"# fusedopt benchmark - {meta['device_name']} ({meta['date']})", ""]
    lines.append(f"torch {meta['torch']}, fusedopt {meta['fusedopt']}, {meta['threads']} threads, "
                 f"{'quick mode (scaled-down shapes)' if meta['quick'] else 'full-size shapes'}; "
                 f"command: `{meta['command']}`")
    lines.append("")
    if meta.get("skipped"):
        lines.append("Not measured: " + "; ".join(f"{k}: {v}" for k, v in sorted(meta["skipped"].items())))
        lines.append("")
    lines += ["## Headline: best fusedopt backend vs the best peer", "",
              "Ratio = median step time of the best peer / median step time of fusedopt (> 1: fusedopt faster); "
              "per-round IQR = quartiles of the ratios of paired rounds.", "",
              md_table(HEADLINE_HEADER, headline_rows(data["headline"])), ""]
    if data["targets"]:
        lines += ["## Targets", "", md_table(TARGET_HEADER, target_rows(data["targets"])), ""]
    lines += ["## All measurements", "",
              "Median / IQR of the time per step over the repetitions (reps x steps per repetition); GB/s from the "
              "bytes-per-parameter model (see `python -m fusedopt.bench --help`); % bw: against the in-place stream "
              "with the same reads and writes, measured in the same rounds.", ""]
    groups: Dict[tuple, List[dict]] = {}
    for e in data["results"]:
        groups.setdefault(group_key(e), []).append(e)
    for key, entries in groups.items():
        lines += [f"### {group_title(entries[0])}", "", md_table(HEADER, group_rows(entries)), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def _split(value: str, allowed: Sequence[str], what: str) -> List[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    if items == ["all"]:
        return list(allowed)
    bad = [x for x in items if x not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fusedopt.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma list of {', '.join(MODEL_NAMES)} or 'all' (default: all; on CPU without --quick "
                        f"all but gpt2-medium, whose for-loop / foreach steps take seconds each)")
    p.add_argument("--quick", action="store_true", help="scaled-down shapes and few repetitions (CI-sized)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--rules", default="adamw,sgd,lion", help="comma list of adamw, sgd, lion")
    p.add_argument("--dtype", default="float32,bf16-master", help="comma list of float32, bf16-master")
    p.add_argument("--scenarios", default=None,
                   help="comma list of step, full, graph (default: step,full (+graph on CUDA) for float32; "
                        "step (+graph) for bf16-master)")
    p.add_argument("--contenders", default=None,
                   help="comma list of substrings; only contenders whose name contains one are run (the "
                        "bandwidth stream always runs)")
    p.add_argument("--fusedopt-backends", default=None,
                   help="comma list of fusedopt backends to time (default: every one usable for the device)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per contender (default 5; quick 3)")
    p.add_argument("--min-rep-seconds", type=float, default=None,
                   help="steps per repetition are chosen so a repetition lasts about this long (default 0.2; quick 0.01)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per contender and group; slower contenders get fewer repetitions, never < 3 "
                        "(default 12; quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's; 1 with --quick, so that a busy CI runner does not "
                        "stall every parallel region of every contender)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<date>-<device>/; with "
                                                 "--quick benchmarks/out/<date>-<device>-quick/, which git ignores)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fusedopt.bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        if args.models is None:
            models = ([m for m in MODEL_NAMES if m != "gpt2-medium"] if device.type == "cpu" and not args.quick
                      else list(MODEL_NAMES))
        else:
            models = _split(args.models, MODEL_NAMES, "model")
        rules = _split(args.rules, RULES, "rule")
        dtypes = _split(args.dtype, DTYPES, "dtype")
        scenarios = None if args.scenarios is None else _split(args.scenarios, SCENARIOS, "scenario")
        fo_backends = None if args.fusedopt_backends is None else _split(args.fusedopt_backends, ("cpu", "cuda", "triton"),
                                                                         "fusedopt backend")
    except argparse.ArgumentTypeError as e:
        print(f"fusedopt.bench: {e}", file=sys.stderr)
        return 2
    opts = Options(reps=args.reps or (3 if args.quick else 5),
                   min_rep_seconds=args.min_rep_seconds if args.min_rep_seconds is not None else (0.01 if args.quick else 0.2),
                   budget=args.budget if args.budget is not None else (1.0 if args.quick else 12.0),
                   warmup=1 if args.quick else 2)
    date = _dt.date.today().isoformat()
    # quick runs (CI, `make bench`) go to the git-ignored benchmarks/out/, so they never overwrite real results
    out_dir = args.out or (os.path.join("benchmarks", "out", f"{date}-{device.type}-quick") if args.quick else
                           os.path.join("benchmarks", "results", f"{date}-{device.type}"))
    os.makedirs(out_dir, exist_ok=True)

    skipped: Dict[str, str] = {}
    contenders = all_contenders(device, skipped, fo_backends)
    if args.contenders:
        wanted = [w.strip() for w in args.contenders.split(",") if w.strip()]
        contenders = [c for c in contenders if any(w in c.name for w in wanted)]
    contenders.append(stream_contender())

    def scenarios_for(dtype: str) -> List[str]:
        if scenarios is not None:
            chosen = list(scenarios)
        else:
            chosen = ["step", "full"] if dtype == "float32" else ["step"]
            if device.type == "cuda":
                chosen.append("graph")
        if device.type != "cuda" and "graph" in chosen:
            skipped["graph scenario"] = "CUDA only"
            chosen.remove("graph")
        return chosen

    plan = [(m, r, d, s) for d in dtypes for m in models for r in rules for s in scenarios_for(d)]
    shapes = {m: model_shapes(m, args.quick) for m in models}
    progress = Progress(len(plan), enabled=not args.no_progress)
    started = time.perf_counter()
    results: List[dict] = []

    def log(msg: str) -> None:
        if progress.tty and progress.enabled:
            sys.stderr.write("\n")
        print(msg, file=sys.stderr, flush=True)

    print(f"fusedopt.bench on {device_name(device)}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"models {', '.join(models)}{' (quick shapes)' if args.quick else ''}; {len(plan)} groups", flush=True)
    if skipped:
        print("not measured: " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())), flush=True)
    group_seconds = {}
    for i, (model, rule, dtype, scenario) in enumerate(plan):
        t0 = time.perf_counter()
        entries = run_group(model, shapes[model], rule, dtype, scenario, device, contenders, opts, progress, i, log)
        results += entries
        group_seconds[f"{model} {rule} {dtype} {scenario}"] = round(time.perf_counter() - t0, 2)
        progress.update(i + 1, f"{model} {rule} {dtype} {scenario} done")
        if entries:
            if progress.tty and progress.enabled:
                sys.stderr.write("\n")
            print(f"\n{group_title(entries[0])}\n{text_table(HEADER, group_rows(entries))}", flush=True)
    progress.finish()
    elapsed = time.perf_counter() - started

    data = dict(
        meta=dict(date=date, device=device.type, device_name=device_name(device), torch=torch.__version__,
                  fusedopt=fusedopt.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                  quick=args.quick, command="python -m fusedopt.bench " + " ".join(sys.argv[1:] if argv is None else argv),
                  models={m: dict(numel=numel_of(shapes[m]), num_tensors=len(shapes[m])) for m in models},
                  rules=rules, dtypes=dtypes, options=opts.__dict__, hyperparameters=HYPER, max_grad_norm=MAX_NORM,
                  skipped=skipped, backends={k: v[0] for k, v in backends.available().items()},
                  elapsed_s=elapsed, group_seconds=group_seconds, load_average=_load_average()),
        bytes_model=bytes_model_table(),
        results=results,
    )
    data["headline"] = headline(results)
    data["targets"] = evaluate_targets(results, device)

    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    md_path = os.path.join(out_dir, "results.md")
    write_markdown(md_path, data)
    png_path = os.path.join(out_dir, "results.png")
    if not args.no_plot:
        from fusedopt.plot import plot_benchmark

        plot_benchmark(data, png_path)

    print(f"\nHeadline (best fusedopt vs best peer; ratio > 1 = fusedopt faster)\n"
          f"{text_table(HEADLINE_HEADER, headline_rows(data['headline']))}")
    if data["targets"]:
        print(f"\nTargets\n{text_table(TARGET_HEADER, target_rows(data['targets']))}")
    print(f"\nwrote {json_path}, {md_path}" + ("" if args.no_plot else f", {png_path}") + f" in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
