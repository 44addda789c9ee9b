"""The bytes-per-parameter model (the arrays a step must read and write, see ``--help``) and the in-place
stream with the same reads and writes, the memory-bandwidth reference ("bw" line, "% bw").

A precision setting (``--dtype``) fixes the param / grad dtype and how the optimizer state is stored:

    float32      float32 params, grads, states
    bf16-master  bf16 params and grads, float32 master weights and states
    bf16         bf16 params, grads and states, no master copy (round-to-nearest: small updates are lost)
    bf16-sr      the same with stochastic rounding of the updated params and states (state_precision None)
    bf16-states  float32 params and grads, bf16 states          (state_precision="bf16")
    8bit         float32 params and grads, blockwise 8-bit states (state_precision="8bit"): one byte per state
                 element plus one float32 absmax per block of 256; tensors under 4,096 elements keep float32
                 states (the bitsandbytes / torchao rule), so a model's figure depends on its tensor sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


RULES = ("adamw", "sgd", "lion")
DTYPES = ("float32", "bf16-master", "bf16", "bf16-sr", "bf16-states", "8bit")
# the issue-13 settings, `--dtype small-state`
SMALL_STATE_DTYPES = ("8bit", "bf16-states", "bf16", "bf16-sr")
SCENARIOS = ("step", "full", "graph")
STATE_ARRAYS = {"adamw": ("m", "v"), "sgd": ("buf",), "lion": ("m",)}
STREAM_CAP = 1 << 26
# the 8-bit scheme (bitsandbytes, torchao, fusedopt state_precision="8bit"): one float32 absmax per block
QUANT_BLOCK = 256
# tensors with fewer elements keep float32 states under "8bit"
QUANT_MIN_NUMEL = 4096


@dataclass(frozen=True)
class Precision:
    """What a ``--dtype`` setting means for the tensors a step touches."""

    param: torch.dtype  # the model's params and grads
    master: bool  # a float32 master copy of each param is read and written instead of the param
    state: str  # "param" (the param dtype, or float32 with master), "bf16" or "8bit"
    stochastic_rounding: bool = False


PRECISIONS = {
    "float32": Precision(torch.float32, False, "param"),
    "bf16-master": Precision(torch.bfloat16, True, "param"),
    "bf16": Precision(torch.bfloat16, False, "param"),
    "bf16-sr": Precision(torch.bfloat16, False, "param", stochastic_rounding=True),
    "bf16-states": Precision(torch.float32, False, "bf16"),
    "8bit": Precision(torch.float32, False, "8bit"),
}


def param_dtype(dtype: str) -> torch.dtype:
    return PRECISIONS[dtype].param


@dataclass(frozen=True)
class Array:
    name: str
    dtype: torch.dtype
    mode: str  # "rw" (read and written in place), "r" (read only), "w" (written only)
    per_param: float = 1.0  # elements per parameter (1/256 for a per-block absmax)

    @property
    def bytes(self) -> float:
        size = torch.empty((), dtype=self.dtype).element_size()
        return size * self.per_param * (2 if self.mode == "rw" else 1)


def traffic(rule: str, dtype: str, scenario: str, quantized: bool = True) -> List[Array]:
    """The arrays one step of `rule` touches per parameter, per the bytes model in ``--help`` (cli.py's docstring).
    ``quantized=False``: an "8bit" tensor too small to be quantized (float32 states)."""
    prec = PRECISIONS[dtype]
    pdt = prec.param
    arrays = [Array("g", pdt, "r")]
    arrays += [Array("w", torch.float32, "rw"), Array("p", pdt, "w")] if prec.master else [Array("p", pdt, "rw")]
    states = STATE_ARRAYS[rule]
    if prec.state == "8bit" and quantized:
        arrays += [Array(s, torch.uint8, "rw") for s in states]
        arrays += [Array(f"{s}_absmax", torch.float32, "rw", 1.0 / QUANT_BLOCK) for s in states]
    else:
        sdt = {"param": torch.float32 if prec.master else pdt, "bf16": torch.bfloat16, "8bit": torch.float32}[prec.state]
        arrays += [Array(s, sdt, "rw") for s in states]
    if scenario == "full":
        arrays.append(Array("g", pdt, "r"))  # the global grad norm reads the grads once more
    return arrays


def _segments(dtype: str, shapes: Optional[Sequence[Tuple[int, ...]]]) -> List[Tuple[bool, float]]:
    """(quantized, fraction of the params) of a model: under "8bit" its tensors under QUANT_MIN_NUMEL keep
    float32 states."""
    if PRECISIONS[dtype].state != "8bit" or not shapes:
        return [(True, 1.0)]
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    small = sum(n for n in sizes if n < QUANT_MIN_NUMEL) / max(total, 1)
    return [(q, f) for q, f in ((True, 1.0 - small), (False, small)) if f > 0]


def bytes_per_param(rule: str, dtype: str, scenario: str,
                    shapes: Optional[Sequence[Tuple[int, ...]]] = None) -> float:
    """Bytes a step must move per parameter (an int where it is one). With ``shapes`` the "8bit" figure counts
    the tensors under QUANT_MIN_NUMEL elements at float32 states."""
    total = sum(f * sum(a.bytes for a in traffic(rule, dtype, scenario, q)) for q, f in _segments(dtype, shapes))
    return int(total) if float(total).is_integer() else round(total, 6)


def bytes_model_table() -> Dict[str, Dict[str, Dict[str, float]]]:
    """rule -> dtype -> scenario -> bytes per param (for large tensors: "8bit" fully quantized)."""
    return {rule: {dtype: {sc: bytes_per_param(rule, dtype, sc) for sc in ("step", "full")} for dtype in DTYPES}
            for rule in RULES}


def state_bytes_model(rule: str, dtype: str, shapes: Optional[Sequence[Tuple[int, ...]]] = None) -> float:
    """Bytes of optimizer state per parameter that the precision setting implies (the rule's states, the
    8-bit absmax, the master copy), for comparison with what the optimizers actually hold."""
    total = 0.0
    for quantized, frac in _segments(dtype, shapes):
        arrays = [a for a in traffic(rule, dtype, "step", quantized) if a.name not in ("g", "p")]
        total += frac * sum(a.bytes / (2 if a.mode == "rw" else 1) for a in arrays)
    return round(total, 6)


def _stream_ops(arrays: List[Array], numel: int, device: torch.device,
                buffers: Dict[str, torch.Tensor], prefix: str) -> List[Callable[[], None]]:
    for a in arrays:
        if prefix + a.name not in buffers:
            n = max(1, int(math.ceil(numel * a.per_param)))
            if a.dtype == torch.uint8:
                buffers[prefix + a.name] = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
            else:
                buffers[prefix + a.name] = torch.rand(n, dtype=a.dtype, device=device)
    reads = [a for a in arrays if a.mode == "r"]
    ops: List[Callable[[], None]] = []
    rw = [a for a in arrays if a.mode == "rw"]

    def buf(a: Array) -> torch.Tensor:
        return buffers[prefix + a.name]

    def source_for(x: Array) -> Optional[Array]:
        return next((r for r in reads if r.dtype == x.dtype and r.per_param == x.per_param), None)

    for w in [a for a in arrays if a.mode == "w"]:
        src = source_for(w)
        if src is not None:
            reads.remove(src)
            ops.append(lambda w=buf(w), r=buf(src): w.copy_(r))
        else:
            ops.append(lambda w=buf(w): w.fill_(1))
    for x in rw:
        src = source_for(x)
        if src is not None:
            reads.remove(src)
            ops.append(lambda x=buf(x), r=buf(src): x.add_(r, alpha=1e-30))
        else:  # an integer array is rewritten unchanged too: x * 1
            ops.append(lambda x=buf(x): x.mul_(1))
    for r in reads:
        ops.append(lambda r=buf(r): r.sum())
    return ops


def make_stream(rule: str, dtype: str, scenario: str, numel: int, device: torch.device,
                shapes: Optional[Sequence[Tuple[int, ...]]] = None) -> Callable[[], None]:
    """An in-place pass over flat buffers with the same reads and writes (and dtypes) as the rule. Under "8bit"
    with ``shapes``, the buffers are split in the model's proportion of quantized and float32-state tensors.
    The function's ``bytes_per_element`` is what one call moves per element of ``numel``."""
    buffers: Dict[str, torch.Tensor] = {}
    ops: List[Callable[[], None]] = []
    moved = 0.0
    for quantized, frac in _segments(dtype, shapes):
        n = max(1, int(round(numel * frac)))
        arrays = traffic(rule, dtype, scenario, quantized)
        ops += _stream_ops(arrays, n, device, buffers, "" if quantized else "fp32_")
        moved += n * sum(a.bytes for a in arrays)

    def stream():
        for op in ops:
            op()

    stream.buffers = buffers  # for inspection (tests check they stay finite)
    stream.bytes_per_element = moved / numel
    return stream
