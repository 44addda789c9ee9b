"""Test-session setup.

Without a GPU, the Triton backend runs under the Triton interpreter on CPU tensors; TRITON_INTERPRET must be
set before Triton compiles anything, so it is set here, before any test imports fusedopt.triton. GPU tests
are marked `gpu` and skipped when CUDA is not available.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracles.py


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def usable_backends():
    """The backends that can run on CPU tensors here: the C++ CPU kernels and Triton under its interpreter."""
    from fusedopt import backends

    names = ["cpu"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    return names
