"""python -m fusedopt.info: what this fusedopt was built against, what it runs with, which backends work.

    python -m fusedopt.info          a human-readable report
    python -m fusedopt.info --json   the same as one JSON object (for scripts and bug reports)

Paste its output into bug reports.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional

import torch

import fusedopt
from fusedopt import _ops, _version_check, backends


def _arch_covers(arch_list: Optional[str], capability) -> Optional[bool]:
    """Whether a build for `arch_list` ("8.0;9.0+PTX") runs on a GPU of compute capability (major, minor):
    an exact sm_XY cubin, or PTX for an architecture at or below it (the driver JIT-compiles PTX upward)."""
    if not arch_list or capability is None:
        return None
    cap = capability[0] * 10 + capability[1]
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        digits = entry.replace("+PTX", "").replace("sm_", "").replace(".", "")
        if not digits.isdigit():
            continue
        arch = int(digits)
        if arch == cap or (ptx and arch <= cap):
            return True
    return False


def collect() -> Dict[str, Any]:
    """Everything the report prints, as plain data."""
    info = _version_check.build_info()
    built_backends = tuple(getattr(info, "BACKENDS_BUILT", ()))
    gpus: List[Dict[str, Any]] = []
    cuda_available = torch.cuda.is_available()
    if cuda_available:
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{cap[0]}.{cap[1]}",
                         "covered_by_arch_list": _arch_covers(getattr(info, "CUDA_ARCH_LIST", None), cap)})
    available = backends.available()
    rows = {}
    for name in ("cpu", "cuda", "triton"):
        importable, why = available[name]
        if name == "triton":
            built = "jit"  # Python sources compiled by Triton at first use; nothing to build
        else:
            module = "fusedopt._C" if name == "cpu" else "fusedopt._cuda"
            present = importlib.util.find_spec(module) is not None
            built = bool(present)
        device_ok = name == "cpu" or cuda_available or (name == "triton" and backends.triton_interpreted())
        usable = bool(importable and device_ok)
        reason = why
        if importable and not device_ok:
            reason = "built, but torch sees no CUDA GPU here"
        rows[name] = {"built": built, "importable": bool(importable), "usable": usable, "reason": reason}
    return {
        "fusedopt_version": fusedopt.__version__,
        "fusedopt_path": os.path.dirname(os.path.abspath(fusedopt.__file__)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "built_with": None if info is None else {
            "torch": info.TORCH_VERSION,
            "cuda": info.TORCH_CUDA_VERSION,
            "cuda_toolkit": info.CUDA_TOOLKIT,
            "cuda_arch_list": info.CUDA_ARCH_LIST,
            "cuda_skip_reason": info.CUDA_SKIP_REASON,
            "backends_built": list(built_backends),
            "limited_api": info.LIMITED_API,
            "py_limited_api": getattr(info, "PY_LIMITED_API", None),
            "python": info.PYTHON_VERSION,
        },
        "running_with": {"torch": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_available": cuda_available, "gpus": gpus},
        "torch_mismatch": _version_check.torch_mismatch(),
        "load_errors": dict(_ops.LOAD_ERRORS),
        "backends": rows,
    }


def report(data: Dict[str, Any]) -> str:
    b = data["built_with"]
    r = data["running_with"]
    lines = [f"fusedopt {data['fusedopt_version']}  ({data['fusedopt_path']})",
             f"python    {data['python']}  ({data['platform']})"]
    if b is None:
        lines.append("built against: unknown (no fusedopt/_build_info.py: a source tree that setup.py has not built)")
    else:
        lines.append(f"built against: torch {b['torch']}, CUDA {b['cuda'] or 'none (CPU-only torch)'}"
                     f"  (python {b['python']}, {_abi(b)})")
    lines.append(f"running with:  torch {r['torch']}, CUDA {r['cuda'] or 'none (CPU-only torch)'}"
                 f"  -> {'MISMATCH: ' + data['torch_mismatch'] if data['torch_mismatch'] else 'ok'}")
    if b is not None:
        if "cuda" in b["backends_built"]:
            lines.append(f"CUDA arch list: {b['cuda_arch_list']}  (toolkit {b['cuda_toolkit']})")
        elif data["backends"]["cuda"]["built"]:
            lines.append(f"CUDA arch list: unknown: fusedopt._cuda is left from an earlier build (the last build "
                         f"skipped CUDA: {b['cuda_skip_reason']})")
        else:
            lines.append(f"CUDA arch list: none, the CUDA kernels were not built ({b['cuda_skip_reason']})")
    if r["gpus"]:
        for g in r["gpus"]:
            cover = {True: "covered by the arch list", False: "NOT in the arch list",
                     None: "no CUDA kernels built"}[g["covered_by_arch_list"]]
            lines.append(f"GPU {g['index']}: {g['name']} (compute capability {g['capability']}, {cover})")
    else:
        lines.append("GPU: none visible to torch")
    lines.append("backends:  name    built  importable  usable here")
    for name, row in data["backends"].items():
        built = "jit" if row["built"] == "jit" else ("yes" if row["built"] else "no")
        line = (f"           {name:<7} {built:<6} {'yes' if row['importable'] else 'no':<11} "
                f"{'yes' if row['usable'] else 'no'}")
        if not row["usable"] and row["reason"]:
            line += f"  ({row['reason']})"
        lines.append(line)
    return "\n".join(lines)


def _abi(built: Dict[str, Any]) -> str:
    """'abi3 build (Py_LIMITED_API 3.10, any CPython >= 3.10)' or 'version-specific build'."""
    if not built["limited_api"]:
        return "version-specific build"
    value = built.get("py_limited_api")
    if not value:  # recorded by builds before the value was
        return "abi3 build"
    number = int(value, 16)
    version = f"{number >> 24}.{(number >> 16) & 0xFF}"
    return f"abi3 build (Py_LIMITED_API {version}, any CPython >= {version})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedopt.info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    data = collect()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
