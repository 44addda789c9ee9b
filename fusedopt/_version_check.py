"""Is this build of fusedopt's compiled extensions made for the torch that is running?

fusedopt._C and fusedopt._cuda link against libtorch's C++ API, which has no stable ABI: a build works with the
exact torch release it was compiled against (the wheel is abi3 for CPython, not for torch). setup.py
records that release in the generated fusedopt/_build_info.py; fusedopt/_ops.py calls :func:`check_torch`
before it loads the extensions, so installing fusedopt for another torch gives one clear ImportError naming
both versions instead of an "undefined symbol" from the dynamic loader (or a crash).

``FUSEDOPT_SKIP_VERSION_CHECK=1`` turns the error into a warning (and tries to load the extensions anyway).
"""

from __future__ import annotations

import os
import sys
import warnings
from types import ModuleType
from typing import Optional

import torch

SKIP_ENV = "FUSEDOPT_SKIP_VERSION_CHECK"


def build_info() -> Optional[ModuleType]:
    """fusedopt/_build_info.py, or None in a source tree that setup.py has not built."""
    try:
        from fusedopt import _build_info
    except ImportError:
        return None
    return _build_info


def release(version: str) -> str:
    """'2.14.1+cu130' -> '2.14.1': the local tag (+cu130, +cpu) does not change the C++ ABI of libtorch."""
    return str(version).split("+", 1)[0]


def _fusedopt_version() -> str:
    return getattr(sys.modules.get("fusedopt"), "__version__", "?")


def torch_mismatch(built: Optional[str] = None, running: Optional[str] = None) -> Optional[str]:
    """None when the extensions were built against the running torch release (or nothing was recorded), else
    the error message, which names both versions."""
    if built is None:
        info = build_info()
        built = getattr(info, "TORCH_VERSION", None)
    running = torch.__version__ if running is None else running
    if built is None or release(built) == release(running):
        return None
    return (f"fusedopt {_fusedopt_version()} was built against torch {built}, but torch {running} is installed. "
            f"Its compiled kernels (fusedopt._C, fusedopt._cuda) only load into the torch release they were built "
            f"with. Install the torch it was built for (pip install torch=={release(built)}), or rebuild fusedopt "
            f"against this torch: pip install --no-build-isolation --no-deps --force-reinstall <fusedopt sdist or "
            f"source checkout>. (Set {SKIP_ENV}=1 to try loading it anyway.)")


def cuda_mismatch(built_cuda: Optional[str] = None, running_cuda: Optional[str] = "unset",
                  cuda_built: Optional[bool] = None) -> Optional[str]:
    """Why fusedopt._cuda cannot load into this torch (None when it can, or when it was not built): the CUDA
    major version of the build's torch differs from the running torch's (or the running torch is CPU-only)."""
    info = build_info()
    if cuda_built is None:
        cuda_built = info is not None and "cuda" in getattr(info, "BACKENDS_BUILT", ())
    if not cuda_built:
        return None
    if built_cuda is None:
        built_cuda = getattr(info, "TORCH_CUDA_VERSION", None)
    if running_cuda == "unset":
        running_cuda = torch.version.cuda
    if built_cuda is None:
        return None
    if running_cuda is None:
        return (f"fusedopt._cuda was built for torch with CUDA {built_cuda}, but torch {torch.__version__} is a "
                f"CPU-only build; install a CUDA build of torch or use the cpu backend")
    if built_cuda.split(".")[0] != running_cuda.split(".")[0]:
        return (f"fusedopt._cuda was built for CUDA {built_cuda} (torch built with CUDA {built_cuda}), but the "
                f"installed torch {torch.__version__} uses CUDA {running_cuda}; rebuild fusedopt against this torch "
                f"(pip install --no-build-isolation --no-deps --force-reinstall <fusedopt sdist>)")
    return None


def check_torch() -> None:
    """Raise ImportError naming both torch versions when fusedopt was built against another torch release."""
    message = torch_mismatch()
    if message is None:
        return
    if os.environ.get(SKIP_ENV, "0") == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    raise ImportError(message)
