"""Run fusedopt's command-line tools (and snippets) in a subprocess, optionally with some packages missing.

A package is made missing by a meta-path finder installed before anything else is imported (a `-c` shim): an
import of it, or of any of its submodules, raises the same ModuleNotFoundError("No module named ...") as when
it is not installed. The code under test is not touched or mocked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argv: [-c, BLOCKED (comma list), "module" or "code", MODULE or CODE, args...]
SHIM = r"""
import importlib.abc, runpy, sys

blocked = {name for name in sys.argv[1].split(",") if name}


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
kind, what = sys.argv[2], sys.argv[3]
if kind == "module":
    sys.argv = [what] + sys.argv[4:]
    runpy.run_module(what, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c"] + sys.argv[4:]
    exec(compile(what, "<test code>", "exec"), {"__name__": "__main__"})
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    # the repository's fusedopt, also when the tool runs from another folder
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_module(module: str, args: Sequence[str] = (), *, without: Iterable[str] = (), cwd: Optional[str] = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args...` with the packages in ``without`` not importable."""
    cmd = [sys.executable, "-c", SHIM, ",".join(without), "module", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, env=_env(), timeout=timeout)


def run_code(code: str, *, without: Iterable[str] = (), cwd: Optional[str] = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -c code` with the packages in ``without`` not importable."""
    cmd = [sys.executable, "-c", SHIM, ",".join(without), "code", code]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, env=_env(), timeout=timeout)


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""
