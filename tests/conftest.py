"""Test-session setup, and the one policy for tests that need something this machine may lack.

Without a GPU, the Triton backend runs under the Triton interpreter on CPU tensors; TRITON_INTERPRET must be
set before Triton compiles anything, so it is set here, before any test imports fusedopt.triton. GPU tests
are marked `gpu` and skipped when CUDA is not available.

A skip must never hide breakage. What a machine is expected to have (`expected_backends()`):
  * in CI (CI=true) and on a GPU: the C++ CPU backend, Triton, and lion-pytorch (the Lion oracle);
  * on a GPU: also the CUDA backend.
A test that needs an expected one and finds it missing fails (`require_backend`, `require_lion`) instead of
skipping. FUSEDOPT_TESTS_ALLOW_MISSING (comma list of cpu, cuda, triton, lion) turns named failures back into
skips, for a developer who knowingly runs without them; `make gpu-check` prints the skips it saw.
"""

import inspect
import linecache
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# cuBLAS picks its algorithms per stream workspace; a fixed workspace config keeps a captured backward and an
# eager one bitwise equal (torch's reproducibility notes). Read when the first cuBLAS handle is created.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracles.py

GPU_SKIP_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False)"


def pytest_make_parametrize_id(config, val, argname):
    """Readable ids for the values pytest cannot name itself, so `-k bfloat16` / `-k FusedLion` select what
    they say: a dtype by its name (float32, bfloat16, ...), a class or function by its __name__, a device by
    its string, a lambda by the source text of its body (`S.one_cycle(0)`), a dict of keyword arguments as
    k=v,k=v ("defaults" when empty). Anything else falls back to pytest's own id (and auto_generated_ids()
    below rejects a numbered one such as `kw0`, and `<lambda>`)."""
    if isinstance(val, dict) and all(isinstance(k, str) for k in val):
        return ",".join(f"{k}={v.__name__ if isinstance(v, type) else v}" for k, v in val.items()) or "defaults"
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    if isinstance(val, torch.device):
        return str(val)
    if inspect.isfunction(val) and val.__name__ == "<lambda>":
        return _lambda_body(val)
    if isinstance(val, type) or inspect.isroutine(val):
        return val.__name__
    return None


def _lambda_body(fn):
    """The source text of a one-line lambda's body, from the column span of its bytecode (several lambdas on
    one line each get their own), or None."""
    spans = [pos for pos in fn.__code__.co_positions() if None not in pos and pos[3] > pos[2]]
    if not spans or len({pos[0] for pos in spans} | {pos[1] for pos in spans}) != 1:
        return None
    line = linecache.getline(fn.__code__.co_filename, spans[0][0]).encode()
    return line[min(pos[2] for pos in spans):max(pos[3] for pos in spans)].decode().strip() or None


def auto_generated_ids(items) -> list:
    """The test ids in which pytest numbered a parameter it could not name (`dtype0`, `options1`, `cls2`): a
    part of the id that is an argument name followed by digits, or `<lambda>`. Such ids say nothing and change when a case is
    added; give the parametrization `ids=` (or a value pytest_make_parametrize_id names)."""
    bad = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            continue
        parts = set(callspec.id.split("-"))
        if "<lambda>" in callspec.id or any(part[len(name):].isdigit() for name in callspec.params for part in parts if part.startswith(name)):
            bad.append(item.nodeid)
    return bad


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselect anything: every collected id is checked
def pytest_collection_modifyitems(config, items):
    bad = auto_generated_ids(items)
    if bad:
        shown = "\n  ".join(bad)
        raise pytest.UsageError(f"{len(bad)} test ids with a numbered parameter instead of a readable name "
                                f"(tests/conftest.py auto_generated_ids; pass ids=):\n  {shown}")
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        # the marker, not item.keywords: keywords also hold the names of the folders above the test file
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def expected_backends() -> set:
    """What this machine must have (see the module docstring): names among cpu, cuda, triton, lion."""
    expected = set()
    if in_ci() or HAS_CUDA:
        expected |= {"cpu", "triton", "lion"}
    if HAS_CUDA:
        expected.add("cuda")
    allowed = {x.strip() for x in os.environ.get("FUSEDOPT_TESTS_ALLOW_MISSING", "").split(",") if x.strip()}
    return expected - allowed


def missing(name: str, why: str) -> None:
    """Skip, or fail when `name` is expected here (a skip would hide a broken build or install)."""
    if name in expected_backends():
        pytest.fail(f"{name} is expected here ({'a GPU is present' if HAS_CUDA else 'CI=true'}) but not available: "
                    f"{why} (FUSEDOPT_TESTS_ALLOW_MISSING={name} turns this into a skip)", pytrace=False)
    pytest.skip(f"{name} not available: {why}")


def require_backend(name: str) -> None:
    """Skip unless fusedopt's backend `name` (cpu, cuda, triton) can run here; fail instead when expected."""
    from fusedopt import backends

    ok, why = backends.available()[name]
    if name == "cuda" and ok and not HAS_CUDA:
        ok, why = False, GPU_SKIP_REASON
    if not ok:
        missing(name, why)


def require_lion():
    """lion_pytorch.Lion (the Lion oracle), or a skip (a failure where it is expected)."""
    try:
        from lion_pytorch import Lion
    except ImportError as e:
        missing("lion", f"lion-pytorch does not import ({e}); `pip install lion-pytorch`")
    return Lion


def backend_device(name: str) -> torch.device:
    """Where backend `name` runs its kernels here: cpu on CPU tensors; cuda on the GPU; triton on the GPU when
    there is one, else on CPU tensors under the interpreter."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    return torch.device("cuda")


def usable_backends():
    """Pytest params for every backend that can run here: the C++ CPU kernels; Triton (compiled on a GPU, else
    under its interpreter on CPU tensors); on a GPU the CUDA kernels. The ones on a GPU are marked `gpu`, so
    `pytest -m gpu` (and `make gpu-check`) runs them. Place each run's tensors with backend_device()."""
    names = ["cpu"]
    if os.environ.get("TRITON_INTERPRET") == "1" or HAS_CUDA:
        names.append("triton")
    if HAS_CUDA:
        names.append("cuda")
    return [pytest.param(n, marks=pytest.mark.gpu) if backend_device(n).type == "cuda" else n for n in names]
