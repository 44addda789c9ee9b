"""Packaging: the sdist holds everything the extensions compile from; a wheel built from it is an abi3 binary
wheel whose tag (cp310-abi3) says the same Python version as the -DPy_LIMITED_API it was compiled with, whose
metadata requires the torch release it was built against (and declares the tools' extras and the SPDX license),
with the compiled CPU extension and the Triton sources; installed in a fresh virtual environment (its torch
requirement resolved there, nothing downloaded) it runs every optimizer from outside the repository;
`python -m fusedopt.info` reports the build; a build for another torch fails to import with an error naming
both torch versions.

The wheel is built with FUSEDOPT_SKIP_CUDA=1, i.e. the CPU extension only (about 40-70 s on 2 cores; the CUDA
kernels would add several minutes of nvcc and cannot run here anyway). The CUDA build path is the same
setup.py code that `make build` runs. The build happens in a copy of the sources in a temporary folder, so
the repository's build/ and fusedopt/_build_info.py are not touched.

The fresh environment reuses this environment's torch instead of installing it again: it is made with
`python -m venv --without-pip`, and a .pth file in its site-packages appends this environment's site-packages
to sys.path (a plain path line: .pth files found there, such as the editable install of fusedopt, are not
processed, and the new environment's own site-packages comes first). fusedopt is installed into it with this
environment's pip (`pip --python NEW_PYTHON install --no-index WHEEL`): with --no-index the install succeeds
only if the wheel's `Requires-Dist: torch==...` is satisfied by the torch already there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from torch.utils import cpp_extension

from fusedopt import _version_check

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "csrc", "fusedopt"]


def run(cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n"
                                 f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "checkout"
    src.mkdir()
    ignore = shutil.ignore_patterns("*.so", "*.o", "__pycache__", "_build_info.py", "*.egg-info", "build")
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=ignore)
        elif os.path.exists(path):
            shutil.copy2(path, src / name)
    env = dict(os.environ, FUSEDOPT_SKIP_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("PYTHONPATH", None)
    sdist_log = run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp / "dist")], cwd=src, env=env)
    (sdist,) = [p for p in os.listdir(tmp / "dist") if p.endswith(".tar.gz")]
    with tarfile.open(tmp / "dist" / sdist) as tar:
        sdist_names = tar.getnames()
        try:
            tar.extractall(tmp / "unpacked", filter="data")
        except TypeError:  # Python without extraction filters (< 3.11.4)
            tar.extractall(tmp / "unpacked")
    (unpacked,) = os.listdir(tmp / "unpacked")
    # the wheel is built from the unpacked sdist: proof that the sdist is complete. -v: the compile commands
    # (their -DPy_LIMITED_API) and setup.py's "[fusedopt build]" line are in the output.
    wheel_log = run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "--no-index",
                     "-w", str(tmp / "wheels"), str(tmp / "unpacked" / unpacked)], cwd=tmp, env=env, timeout=900)
    (wheel,) = [p for p in os.listdir(tmp / "wheels") if p.endswith(".whl")]

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = str(venv / "bin" / "python")
    site = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    with open(os.path.join(site, "reuse_outer_torch.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # a plain path: appended, its .pth files not run
    # with its dependencies and no index: torch==<release> must be satisfied by the torch the venv sees
    run([sys.executable, "-m", "pip", "--python", py, "install", "--no-index", "--quiet",
         str(tmp / "wheels" / wheel)])
    workdir = tmp / "elsewhere"  # outside the repository: the repo's fusedopt/ must not be importable
    workdir.mkdir()
    return {"tmp": tmp, "sdist_names": sdist_names, "wheel": tmp / "wheels" / wheel, "python": py, "site": site,
            "cwd": str(workdir), "sdist_log": sdist_log.stdout + sdist_log.stderr,
            "wheel_log": wheel_log.stdout + wheel_log.stderr}


def run_in_venv(built, code, env_extra=None, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(env_extra or {})
    out = subprocess.run([built["python"], "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         cwd=built["cwd"], env=env, timeout=300)
    if check:
        assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    return out


def test_sdist_has_the_sources_and_headers(built):
    names = {n.split("/", 1)[1] for n in built["sdist_names"] if "/" in n}
    for needed in ["setup.py", "pyproject.toml", "MANIFEST.in", "csrc/ops.cpp", "csrc/fusedopt/rules.h",
                   "csrc/fusedopt/schedule.h", "csrc/fusedopt/op_args.h", "csrc/cpu/multi_tensor_cpu.h",
                   "fusedopt/__init__.py", "fusedopt/triton/__init__.py", "fusedopt/py.typed"]:
        assert needed in names, f"{needed} missing from the sdist"
    for repo_file in os.listdir(os.path.join(ROOT, "csrc", "cuda")):
        assert f"csrc/cuda/{repo_file}" in names, f"csrc/cuda/{repo_file} missing from the sdist"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc")) or n.endswith("_build_info.py")]


def test_sdist_build_has_no_deprecation_warning(built):
    # e.g. setuptools' banner for a `project.license` TOML table (SPDX strings replace it, PEP 639)
    assert "Deprecat" not in built["sdist_log"], built["sdist_log"][-3000:]


def wheel_metadata(built, name):
    with zipfile.ZipFile(built["wheel"]) as z:
        (path,) = [n for n in z.namelist() if n.endswith(f".dist-info/{name}")]
        return z.read(path).decode()


def test_wheel_tag_agrees_with_the_limited_api_it_was_compiled_with(built):
    tags = [line.split(": ", 1)[1] for line in wheel_metadata(built, "WHEEL").splitlines() if line.startswith("Tag: ")]
    assert len(tags) == 1, tags
    python_tag, abi_tag, platform_tag = tags[0].split("-")
    assert abi_tag == "abi3" and platform_tag.startswith("linux_")
    assert built["wheel"].name.endswith(f"-{tags[0]}.whl")
    # every compile command of the build defines the same Py_LIMITED_API: torch's (cpp_extension adds it)
    defines = re.findall(r"-DPy_LIMITED_API=(0x[0-9A-Fa-f]+)", built["wheel_log"])
    sources = [f for d in ("csrc", os.path.join("csrc", "cpu")) for f in os.listdir(os.path.join(ROOT, d))
               if f.endswith(".cpp")]
    assert len(defines) >= len(sources), built["wheel_log"][-3000:]  # one compile command per source at least
    assert set(defines) == {cpp_extension.min_supported_cpython}
    number = int(defines[0], 16)
    major, minor = number >> 24, (number >> 16) & 0xFF
    assert python_tag == f"cp{major}{minor}"
    assert f"Requires-Python: >={major}.{minor}\n" in wheel_metadata(built, "METADATA")
    with zipfile.ZipFile(built["wheel"]) as z:
        info = z.read("fusedopt/_build_info.py").decode()
    assert f"PY_LIMITED_API = {defines[0]!r}" in info
    assert "[fusedopt build] building backends: cpu; CUDA skipped: FUSEDOPT_SKIP_CUDA=1" in built["wheel_log"]


def test_wheel_requires_the_torch_it_was_built_against(built):
    meta = wheel_metadata(built, "METADATA")
    requires = [Requirement(line.split(": ", 1)[1]) for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    (torch_req,) = [r for r in requires if r.name == "torch"]
    assert torch_req.marker is None
    running = Version(torch.__version__)
    assert str(torch_req.specifier) == f"=={running.public}"  # the release, without the local label (+cu130)
    assert torch_req.specifier.contains(running)  # every local variant of the release satisfies it
    assert not torch_req.specifier.contains(f"{running.major}.{running.minor + 1}.0")
    by_extra = {}
    for r in requires:
        if r.marker is not None:  # 'extra == "plot"'
            by_extra.setdefault(str(r.marker).split('"')[1], set()).add(r.name)
    provided = {line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Provides-Extra: ")}
    assert provided == set(by_extra) and {"plot", "bench", "demo", "test"} <= provided
    assert by_extra["plot"] == {"matplotlib"} and by_extra["demo"] == {"scikit-learn"}
    assert by_extra["bench"] == {"matplotlib", "lion-pytorch"}
    assert "License-Expression: BSD-3-Clause\n" in meta
    assert "License :: " not in meta  # no legacy classifier beside the SPDX expression


def test_wheel_has_extension_and_triton_sources(built):
    with zipfile.ZipFile(built["wheel"]) as z:
        names = set(z.namelist())
        info = z.read("fusedopt/_build_info.py").decode()
    assert "fusedopt/_C.abi3.so" in names
    assert "fusedopt/_cuda.abi3.so" not in names  # FUSEDOPT_SKIP_CUDA=1
    triton_repo = {f for f in os.listdir(os.path.join(ROOT, "fusedopt", "triton")) if f.endswith(".py")}
    assert triton_repo and {f"fusedopt/triton/{f}" for f in triton_repo} <= names
    assert {"fusedopt/py.typed", "fusedopt/info.py", "fusedopt/_version_check.py", "fusedopt/_extras.py"} <= names
    assert f"TORCH_VERSION = {torch.__version__!r}" in info
    assert "BACKENDS_BUILT = ('cpu',)" in info


def test_installed_wheel_runs_each_optimizer_outside_the_repo(built):
    out = run_in_venv(built, f"""
        import os, torch, fusedopt
        from fusedopt import schedules
        from fusedopt.table_scheduler import TableScheduler
        assert fusedopt.__file__.startswith({built['site']!r}), fusedopt.__file__
        assert not fusedopt.__file__.startswith({ROOT!r})
        refs = {{"FusedAdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
                 "FusedSGD": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=False),
                 "FusedLion": None}}
        kwargs = {{"FusedAdamW": dict(lr=1e-2), "FusedSGD": dict(lr=1e-2, momentum=0.9),
                   "FusedLion": dict(lr=1e-2)}}
        for name, ref_factory in refs.items():
            g = torch.Generator().manual_seed(0)
            p = torch.randn(257, generator=g).requires_grad_()
            grad = torch.randn(257, generator=g)
            before = p.detach().clone()
            opt = getattr(fusedopt, name)([p], schedule=schedules.constant(), **kwargs[name])
            TableScheduler(opt)
            p.grad = grad.clone()
            opt.step()
            assert opt.schedule_step == 1 and int(opt.param_groups[0]["schedule_step"]) == 1
            assert torch.isfinite(p).all() and not torch.equal(p, before), name
            if ref_factory is not None:
                q = before.clone().requires_grad_()
                q.grad = grad.clone()
                ref_factory([q]).step()
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
            else:  # Lion's first step: -lr * sign(grad) (+ decoupled decay)
                expected = before * (1 - 1e-2 * 0.0) - 1e-2 * torch.sign(grad)
                torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
            print(name, "ok")
    """)
    assert out.stdout.split() == ["FusedAdamW", "ok", "FusedSGD", "ok", "FusedLion", "ok"]


def test_info_reports_the_build(built):
    out = run_in_venv(built, "import runpy, sys; sys.argv = ['info', '--json']; "
                             "runpy.run_module('fusedopt.info', run_name='__main__')")
    data = json.loads(out.stdout)
    assert data["fusedopt_version"]
    assert data["built_with"]["torch"] == torch.__version__
    assert data["built_with"]["cuda"] == torch.version.cuda
    assert data["built_with"]["backends_built"] == ["cpu"]
    assert data["built_with"]["cuda_arch_list"] is None
    assert data["built_with"]["cuda_skip_reason"] == "FUSEDOPT_SKIP_CUDA=1"
    assert data["built_with"]["limited_api"] is True
    assert data["built_with"]["py_limited_api"] == cpp_extension.min_supported_cpython
    assert data["running_with"]["torch"] == torch.__version__
    assert data["torch_mismatch"] is None
    assert data["backends"]["cpu"] == {"built": True, "importable": True, "usable": True, "reason": ""}
    assert data["backends"]["cuda"]["built"] is False and data["backends"]["cuda"]["usable"] is False
    text = run([built["python"], "-m", "fusedopt.info"], cwd=built["cwd"]).stdout
    assert f"built against: torch {torch.__version__}" in text
    assert "CUDA arch list: none" in text and "FUSEDOPT_SKIP_CUDA=1" in text


def test_wheel_for_another_torch_fails_clearly(built):
    info_path = os.path.join(built["site"], "fusedopt", "_build_info.py")
    original = open(info_path).read()
    try:
        with open(info_path, "w") as f:
            f.write(original.replace(f"TORCH_VERSION = {torch.__version__!r}", "TORCH_VERSION = '2.0.0+cu118'"))
        out = run_in_venv(built, "import fusedopt", check=False)
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError:"), out.stderr
        assert "2.0.0+cu118" in last and torch.__version__ in last, last
        # the escape hatch: a warning, and the extensions are tried anyway (they load: the build is really ours)
        ok = run_in_venv(built, "import fusedopt, fusedopt.backends as b; print(b.available()['cpu'][0])",
                         env_extra={_version_check.SKIP_ENV: "1"})
        assert ok.stdout.strip() == "True"
        assert "2.0.0+cu118" in ok.stderr
    finally:
        with open(info_path, "w") as f:
            f.write(original)


# ----------------------------------------------------------------------------------------------------------
# The version check itself (no wheel needed)
# ----------------------------------------------------------------------------------------------------------


def test_version_check_messages():
    assert _version_check.torch_mismatch("2.14.1+cu130", "2.14.1+cpu") is None  # the local tag does not matter
    assert _version_check.torch_mismatch("2.14.1", "2.14.1") is None
    msg = _version_check.torch_mismatch("2.13.0+cu128", "2.14.1+cu130")
    assert "2.13.0+cu128" in msg and "2.14.1+cu130" in msg and "pip install torch==2.13.0" in msg
    assert _version_check.cuda_mismatch("13.0", "13.2", cuda_built=True) is None
    assert "12.8" in _version_check.cuda_mismatch("13.0", "12.8", cuda_built=True)
    assert "CPU-only" in _version_check.cuda_mismatch("13.0", None, cuda_built=True)
    assert _version_check.cuda_mismatch("13.0", "12.8", cuda_built=False) is None
