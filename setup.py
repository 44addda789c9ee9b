"""Build fusedopt's compiled backends.

Two extension modules:
  fusedopt._C      the op schemas (csrc/ops.cpp), the step's grad check (csrc/grads_ready.cpp) and the CPU
                   kernels (csrc/cpu). Always built.
  fusedopt._cuda   the CUDA kernels (csrc/cuda). Built when torch has CUDA and a CUDA toolkit is found.

Both use only the limited Python API (no pybind11: the ops are reached through torch.ops.fusedopt), so a
wheel is tagged cpXY-abi3, where XY is the Python version in the -DPy_LIMITED_API value the sources are compiled
with (torch's cpp_extension.min_supported_cpython, 3.10 for torch 2.14): the tag and the define are computed from
that one value. The wheel is tied to the torch (and CUDA) release it was built with, not to CPython, and its
metadata says so: `Requires-Dist: torch==<that release>` (see torch_requirement()).

Environment switches:
  FUSEDOPT_SKIP_CUDA=1         build the CPU backend only
  FUSEDOPT_FORCE_CUDA=1        fail instead of skipping when the CUDA backend cannot be built
  FUSEDOPT_CUDA_ARCH_LIST      e.g. "8.0;9.0+PTX" (default "8.0;8.6;8.9;9.0+PTX")
  FUSEDOPT_NO_LIMITED_API=1    build version-specific (cpXY) modules instead of abi3
  MAX_JOBS                     parallel compile jobs (ninja)
  CUDA_HOME                    the CUDA toolkit to use (else the toolkit behind `nvcc`, else /usr/local/cuda*)
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
LIMITED_API = os.environ.get("FUSEDOPT_NO_LIMITED_API", "0") != "1"
# Used only with a torch whose cpp_extension does not define Py_LIMITED_API itself (before 2.6); matches
# pyproject.toml's requires-python (>=3.10).
FALLBACK_LIMITED_API = "0x030A0000"


def log(msg):
    print(f"[fusedopt build] {msg}", flush=True)


def toolkit_behind_nvcc(nvcc):
    """The toolkit root of an nvcc, even when `nvcc` is a wrapper script: ask nvcc itself (--dryrun)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_toolkit():
    """CUDA_HOME, else the real toolkit behind `nvcc` on PATH, else the newest /usr/local/cuda*."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(("CUDA_HOME", os.environ["CUDA_HOME"]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        top = toolkit_behind_nvcc(nvcc)
        if top:
            candidates.append((f"nvcc on PATH ({nvcc})", top))
    for path in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        candidates.append(("/usr/local", path))
    for source, path in candidates:
        if os.path.isfile(os.path.join(path, "bin", "nvcc")):
            return path, source
    return None, None


def cuda_arch_flags(arch_list):
    flags = []
    entries = [a.strip() for a in re.split(r"[;, ]+", arch_list) if a.strip()]
    if not entries:
        raise SystemExit("FUSEDOPT_CUDA_ARCH_LIST is empty")
    for entry in entries:
        ptx = entry.endswith("+PTX")
        number = entry.replace("+PTX", "").replace("sm_", "").replace(".", "")
        if not number.isdigit():
            raise SystemExit(f"FUSEDOPT_CUDA_ARCH_LIST: cannot read architecture {entry!r} (use e.g. 8.0 or 9.0+PTX)")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def wheel_headers():
    """Headers the toolkit may lack (cusparse.h, cublas_v2.h, ...) come with torch's nvidia-* wheels."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def decide_cuda():
    """Returns (toolkit path or None, reason). Never looks at torch.cuda.is_available(): building without a
    GPU is normal."""
    force = os.environ.get("FUSEDOPT_FORCE_CUDA", "0") == "1"

    def skip(reason):
        if force:
            raise SystemExit(f"FUSEDOPT_FORCE_CUDA=1 but the CUDA backend cannot be built: {reason}")
        return None, reason

    if os.environ.get("FUSEDOPT_SKIP_CUDA", "0") == "1":
        return skip("FUSEDOPT_SKIP_CUDA=1")
    import torch

    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    toolkit, source = find_cuda_toolkit()
    if toolkit is None:
        return skip("no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)")
    log(f"CUDA toolkit: {toolkit} (from {source}); torch built with CUDA {torch.version.cuda}")
    return toolkit, "ok"


def torch_requirement():
    """`torch==<release>` for the torch this build compiles against, for the wheel's Requires-Dist.

    The local version label (PEP 440: everything after "+", e.g. +cu130, +cpu) is dropped: a specifier without
    one matches every local variant of that release, and the release alone fixes libtorch's C++ ABI. Pinning
    `torch==2.14.1+cu130` would be unsatisfiable from PyPI (which has no local versions) and would refuse the
    +cpu or +cu126 build of the same release; a variant with another CUDA major version still loads the CPU
    backend, and fusedopt.backends.available() says why the CUDA one does not (fusedopt/_version_check.py)."""
    import torch

    return f"torch=={str(torch.__version__).split('+', 1)[0]}"


def limited_api_version():
    """(hex, wheel tag): the Py_LIMITED_API value the extensions are compiled with and the cpXY tag that says
    the same. torch's BuildExtension adds -DPy_LIMITED_API=<cpp_extension.min_supported_cpython> itself; the
    tag is derived from that value so the two cannot disagree. Returns (None, None) for version-specific
    builds (FUSEDOPT_NO_LIMITED_API=1)."""
    if not LIMITED_API:
        return None, None
    from torch.utils import cpp_extension

    value = getattr(cpp_extension, "min_supported_cpython", None) or FALLBACK_LIMITED_API
    number = int(value, 16)  # 0x030A0000: major in bits 24-31, minor in bits 16-23
    return value, f"cp{number >> 24}{(number >> 16) & 0xFF}"


def extensions():
    from torch.utils import cpp_extension  # noqa: F401  (imported after CUDA_HOME is settled)

    common_defines = []
    limited_api, _ = limited_api_version()
    if limited_api is not None and getattr(cpp_extension, "min_supported_cpython", None) is None:
        common_defines.append(("Py_LIMITED_API", limited_api))  # newer torch adds it itself: never twice
    include_dirs = [os.path.join(ROOT, "csrc")]
    # -fno-trapping-math: lets GCC if-convert the selects of the element loops (Adam's L2 select, the NaN select
    # of bfloat16 rounding) so that they vectorize; it changes no result (fusedopt never reads FP exception flags).
    # --param=inline-unit-growth: each CPU kernel file instantiates its loop for every (dtype pair, flag) x ISA
    # clone and must inline the rule and the bf16/fp16 conversions into each; GCC's default budget (+40% of the
    # file) ran out there, leaving per-element calls (4x slower loops). Clang ignores the option.
    cxx_flags = ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp",
                 "--param=inline-unit-growth=400"]
    exts = [
        cpp_extension.CppExtension(
            "fusedopt._C",
            sources=sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
            include_dirs=include_dirs,
            define_macros=common_defines,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=LIMITED_API,
        )
    ]
    built = ["cpu"]
    toolkit, reason = decide_cuda()
    if toolkit is not None:
        arch_list = os.environ.get("FUSEDOPT_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        # --fmad=false: no contraction into FMA, like the CPU build's -ffp-contract=off, so CUDA, CPU and the
        # host-executed CUDA block bodies round identically
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"] + cuda_arch_flags(arch_list)
        log(f"CUDA architectures: {arch_list}")
        exts.append(
            cpp_extension.CUDAExtension(
                "fusedopt._cuda",
                sources=sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
                include_dirs=include_dirs + wheel_headers(),
                define_macros=common_defines,
                extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": nvcc_flags},
                py_limited_api=LIMITED_API,
            )
        )
        built.append(f"cuda ({arch_list})")
    log(summary_line(built, None if toolkit is not None else reason))
    write_build_info(toolkit, arch_list if toolkit is not None else None, reason)
    return exts


def summary_line(built, cuda_skip_reason):
    """The one line saying which backends this build makes and why CUDA was skipped (`make build` shows it)."""
    line = "building backends: " + ", ".join(built)
    if cuda_skip_reason is not None:
        line += f"; CUDA skipped: {cuda_skip_reason}"
    return line + "; triton needs no build"


def write_build_info(toolkit, arch_list, cuda_reason):
    """Record what this build was made against in fusedopt/_build_info.py (generated, git-ignored): read by
    `python -m fusedopt.info` and by the import-time torch version check (fusedopt/_version_check.py)."""
    import torch

    info = {
        "TORCH_VERSION": torch.__version__,
        "TORCH_CUDA_VERSION": torch.version.cuda,
        "CUDA_TOOLKIT": toolkit,
        "CUDA_ARCH_LIST": arch_list,
        "CUDA_SKIP_REASON": None if toolkit is not None else cuda_reason,
        "BACKENDS_BUILT": ("cpu", "cuda") if toolkit is not None else ("cpu",),
        "LIMITED_API": LIMITED_API,
        "PY_LIMITED_API": limited_api_version()[0],
        "PYTHON_VERSION": "%d.%d.%d" % sys.version_info[:3],
    }
    text = "# Generated by setup.py when the extensions were built. Do not edit; not in git.\n" + "".join(
        f"{key} = {value!r}\n" for key, value in info.items())
    path = os.path.join(ROOT, "fusedopt", "_build_info.py")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def prepare_cuda_home():
    # torch.utils.cpp_extension reads CUDA_HOME once, at import; on machines where `nvcc` is a wrapper script
    # its own guess (the parent of the script's folder) is wrong, so settle it before that import.
    if os.environ.get("FUSEDOPT_SKIP_CUDA", "0") == "1":
        return
    toolkit, _ = find_cuda_toolkit()
    if toolkit and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = toolkit


def main():
    prepare_cuda_home()
    from torch.utils.cpp_extension import BuildExtension

    _, tag = limited_api_version()
    options = {"bdist_wheel": {"py_limited_api": tag}} if tag else {}
    setup(
        packages=find_packages(include=["fusedopt", "fusedopt.*"]),
        install_requires=[torch_requirement()],  # pyproject.toml lists "dependencies" as dynamic
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options=options,
    )


if __name__ == "__main__":
    main()
