"""Optional dependencies of the tools (plots, benchmark, demo): import them or say how to install them.

The optimizers need only torch. The tools need more, declared as extras in pyproject.toml:

    fusedopt[plot]    matplotlib                  python -m fusedopt.plot, LRFinderResult.plot
    fusedopt[bench]   matplotlib, lion-pytorch    python -m fusedopt.bench (its plot; Lion's peer)
    fusedopt[demo]    scikit-learn                python -m fusedopt.demo (the digits data set)

:func:`require` raises :class:`MissingDependency` (an ImportError) whose message names the missing package and
the pip command that installs it; the command-line tools print that message instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

# import name -> (pip distribution name, the extra that installs it)
PACKAGES = {
    "matplotlib": ("matplotlib", "plot"),
    "sklearn": ("scikit-learn", "demo"),
    "lion_pytorch": ("lion-pytorch", "bench"),
}


class MissingDependency(ImportError):
    """An optional dependency of a fusedopt tool is not installed; the message says how to install it."""


def install_hint(module: str, extra: Optional[str] = None) -> str:
    """'pip install "fusedopt[plot]"  (or: pip install matplotlib)' for an import name listed in PACKAGES;
    ``extra`` names another extra that also installs it (e.g. "bench" for matplotlib)."""
    dist, default_extra = PACKAGES[module]
    return f'pip install "fusedopt[{extra or default_extra}]"  (or: pip install {dist})'


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a key of PACKAGES, or a submodule of one, e.g. "matplotlib.pyplot") and return it.

    Raises:
        MissingDependency: the package is not installed (or fails to import); the message says what needs it
            (``purpose``, e.g. "python -m fusedopt.plot") and the pip command that installs it.
    """
    top = module.split(".", 1)[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        dist, _ = PACKAGES[top]
        raise MissingDependency(f"{purpose} needs {dist}, which is not installed ({e}). Install it with: "
                                f"{install_hint(top)}", name=top) from e
