"""The test-id policy of tests/conftest.py: every parametrized id names its values (`-k bfloat16` selects the
bfloat16 cases); a numbered parameter (`dtype0`, `kw1`) or `<lambda>` fails the collection."""

from types import SimpleNamespace

import torch

from conftest import auto_generated_ids, pytest_make_parametrize_id


def _item(nodeid, **params):
    callspec = SimpleNamespace(id=nodeid.partition("[")[2].rstrip("]"), params=params)
    return SimpleNamespace(nodeid=nodeid, callspec=callspec)


def test_numbered_and_lambda_ids_are_rejected():
    bad = [_item("t.py::f[dtype0-adamw]", dtype=torch.float32, rule="adamw"),
           _item("t.py::f[cpu-kw12]", backend="cpu", kw={}),
           _item("t.py::f[<lambda>-x]", call=None, match="x")]
    good = [_item("t.py::f[bfloat16-adamw-cpu]", dtype=torch.bfloat16, rule="adamw", backend="cpu"),
            _item("t.py::f[lr=-0.001]", lr=-0.001),
            _item("t.py::f[float32]", dtype=torch.float32),
            SimpleNamespace(nodeid="t.py::g")]  # not parametrized
    assert auto_generated_ids(bad + good) == [item.nodeid for item in bad]


def test_values_pytest_cannot_name_get_readable_ids():
    name = lambda val: pytest_make_parametrize_id(None, val, "x")  # noqa: E731
    assert [name(d) for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)] == [
        "float32", "float64", "bfloat16", "float16"]
    assert name(torch.optim.AdamW) == "AdamW"
    assert name(dict(lr=0.1, betas=(0.9, 0.99))) == "lr=0.1,betas=(0.9, 0.99)"
    assert name({}) == "defaults"
    assert name(lambda opt: torch.optim.SGD(opt, lr=0.1)) == "torch.optim.SGD(opt, lr=0.1)"
    assert name(object()) is None  # pytest's own id, which auto_generated_ids then rejects
