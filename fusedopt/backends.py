"""The one place that knows which backends are built and picks one for a device.

A backend is an object with three functions, ``adamw_``, ``sgd_`` and ``lion_``, whose signatures are those of
the ops in csrc/ops.cpp. The "cpu" and "cuda" backends are those ops (torch dispatches on the tensors'
device); the "triton" backend is fusedopt.triton, which implements the same signatures with Triton kernels.

"auto" picks, for CPU tensors, the C++ CPU kernels; for CUDA tensors, the CUDA extension when it was built
(hand-written multi-tensor kernels: one launch per group, vectorized 128-bit access) and otherwise Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

from fusedopt import _ops

NAMES = ("auto", "cpu", "cuda", "triton")

_BUILD_HINT = (
    "reinstall fusedopt from source in this environment: `pip install --no-build-isolation .` "
    "(see README, 'Installing')"
)


class BackendUnavailable(RuntimeError):
    """Raised when a requested backend is not built or cannot run on the given device."""


@dataclass(frozen=True)
class Backend:
    name: str
    adamw_: Callable
    sgd_: Callable
    lion_: Callable


def _triton_status() -> Tuple[bool, str]:
    try:
        from fusedopt import triton as triton_backend

        return triton_backend.is_available()
    except (ImportError, AttributeError) as e:  # triton missing, or a triton too old for the kernels
        return False, f"the Triton backend cannot be imported ({type(e).__name__}: {e}); `pip install triton`"


def _status(name: str) -> Tuple[bool, str]:
    if name == "cpu":
        if _ops.HAS_CPU_EXTENSION:
            return True, ""
        return False, f"the C++ extension fusedopt._C did not load ({_ops.LOAD_ERRORS.get('fusedopt._C')}); {_BUILD_HINT}"
    if name == "cuda":
        if _ops.HAS_CUDA_EXTENSION:
            return True, ""
        if not _ops.HAS_CPU_EXTENSION:
            return _status("cpu")
        error = _ops.LOAD_ERRORS.get("fusedopt._cuda", "")
        if error and not error.startswith("ModuleNotFoundError: No module named 'fusedopt._cuda'"):
            return False, f"fusedopt._cuda did not load ({error}); {_BUILD_HINT}"
        return False, ("fusedopt was built without CUDA kernels (torch without CUDA, no CUDA toolkit, or "
                       "FUSEDOPT_SKIP_CUDA=1); install a CUDA toolkit and " + _BUILD_HINT)
    return _triton_status()


def available() -> Dict[str, Tuple[bool, str]]:
    """Each backend name -> (built and importable, reason when not)."""
    return {name: _status(name) for name in ("cpu", "cuda", "triton")}


def _ops_backend(name: str) -> Backend:
    ops = torch.ops.fusedopt
    return Backend(name, ops.adamw_, ops.sgd_, ops.lion_)


def _triton_backend() -> Backend:
    from fusedopt import triton as triton_backend

    return Backend("triton", triton_backend.adamw_, triton_backend.sgd_, triton_backend.lion_)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(name: str, device: torch.device) -> Backend:
    """The backend that runs the update for tensors on ``device``; raises BackendUnavailable with a fix."""
    if name not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, NAMES))}; got {name!r}")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cpu":
            name = "cpu"
        elif device.type == "cuda":
            name = "cuda" if _status("cuda")[0] else "triton"
            if name == "triton" and not _status("triton")[0]:
                raise BackendUnavailable(
                    f"backend='auto' found no backend for {device}: cuda: {_status('cuda')[1]}; "
                    f"triton: {_status('triton')[1]}")
        else:
            raise BackendUnavailable(f"fusedopt has no backend for {device.type} tensors (supported: cpu, cuda)")
    ok, why = _status(name)
    if not ok:
        raise BackendUnavailable(f"backend={name!r} is not available: {why}")
    if name == "cpu" and device.type != "cpu":
        raise BackendUnavailable(f"backend='cpu' runs on CPU tensors, but the params are on {device}")
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailable(
            f"backend='cuda' runs on CUDA tensors, but the params are on {device}: move the model to the GPU "
            f"before building the optimizer (model.cuda(), then the optimizer), or use backend='auto', which picks "
            f"the kernels for wherever the params are")
    if name == "triton" and device.type == "cpu" and not triton_interpreted():
        raise BackendUnavailable(
            "backend='triton' runs on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 (the Triton "
            "interpreter, for testing) or use backend='cpu'")
    return _triton_backend() if name == "triton" else _ops_backend(name)
