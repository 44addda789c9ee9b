"""The bytes-per-parameter model (the arrays a step must read and write, see ``--help``) and the in-place
stream with the same reads and writes, the memory-bandwidth reference ("bw" line, "% bw")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch


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
    """The arrays one step of `rule` touches per parameter, per the bytes model in ``--help`` (cli.py's docstring)."""
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

    stream.buffers = buffers  # for inspection (tests check they stay finite)
    return stream
