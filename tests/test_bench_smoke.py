"""Smoke test of `python -m fusedopt.bench`: one --quick run into a temporary folder; checks the files and the
JSON's fields (never timings: this machine is shared and noisy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fusedopt import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESULT_FIELDS = {"model", "numel", "num_tensors", "rule", "dtype", "scenario", "bytes_per_param", "contender", "kind",
                 "status"}
TIMING_FIELDS = {"reps", "inner", "times_s", "median_s", "q1_s", "q3_s", "min_s", "max_s", "steps_per_s",
                 "params_per_s", "gb_per_s", "bw_fraction", "ratio_vs_best_peer", "best_peer"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fusedopt.bench", "--quick", "--device", "cpu", "--models", "resnet50",
           "--rules", "adamw,sgd,lion", "--dtype", "float32,bf16-master", "--budget", "0.3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        data = json.load(f)
    return out, data, proc


def test_writes_json_markdown_and_png(quick_run):
    out, _, proc = quick_run
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "results.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "## Headline" in md and "## Targets" in md and "fusedopt[cpu]" in md
    assert "not judged in --quick mode" in md
    # the console: a short summary (one row per group, one column per model), not every group's table (-v)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("fusedopt.bench on ")
    assert "Best fusedopt backend vs the best peer (median step time of the peer / of fusedopt; > 1: fusedopt " \
           "faster)" in lines
    assert "params, " not in proc.stdout  # group_title(): "resnet50 (0.1M params, 161 tensors) - ..."
    assert "Targets: not judged in --quick mode" in proc.stdout
    assert lines[-1].startswith(f"wrote results.json, results.md, results.png to {out} (")
    assert len(lines) < 25, proc.stdout
    assert "%" in proc.stderr  # the progress bar


def test_json_fields(quick_run):
    _, data, _ = quick_run
    assert set(data) >= {"meta", "bytes_model", "results", "headline", "targets"}
    meta = data["meta"]
    assert meta["device"] == "cpu" and meta["quick"] is True
    assert meta["threads"] == 1  # --quick defaults to one thread
    assert set(meta) >= {"date", "device_name", "torch", "fusedopt", "models", "options", "skipped", "elapsed_s"}
    assert "DeepSpeed" in meta["skipped"] or "DeepSpeedCPUAdam" in {e["contender"] for e in data["results"]}
    assert data["bytes_model"]["adamw"]["float32"]["step"] == 28
    assert data["bytes_model"]["adamw"]["bf16-master"]["step"] == 28

    results = data["results"]
    for e in results:
        assert set(e) >= RESULT_FIELDS, e
        if e["status"] == "ok":
            assert set(e) >= TIMING_FIELDS, e
            assert e["q1_s"] <= e["median_s"] <= e["q3_s"] and e["min_s"] <= e["q1_s"] and e["q3_s"] <= e["max_s"]
            assert len(e["times_s"]) == e["reps"] >= 3
    assert all(e["status"] == "ok" for e in results), [e for e in results if e["status"] != "ok"]

    groups = {(e["rule"], e["dtype"], e["scenario"]) for e in results}
    assert groups == {(r, "float32", s) for r in ("adamw", "sgd", "lion") for s in ("step", "full")} | \
        {(r, "bf16-master", "step") for r in ("adamw", "sgd", "lion")}
    names = {(e["rule"], e["dtype"], e["contender"]) for e in results}
    for rule in ("adamw", "sgd", "lion"):
        assert (rule, "float32", "fusedopt[cpu]") in names
        assert (rule, "float32", "bandwidth (stream)") in names
    for impl in ("for-loop", "foreach", "fused"):
        assert ("adamw", "float32", f"torch {impl}") in names
        assert ("sgd", "float32", f"torch {impl}") in names
        assert ("adamw", "bf16-master", f"torch {impl} +master") in names
    assert ("adamw", "bf16-master", "torch fused +master (fp32 grads)") in names
    assert ("lion", "float32", "lion-pytorch") in names
    assert ("lion", "bf16-master", "lion-pytorch +master") in names

    assert len(data["headline"]) == len(groups)
    for h in data["headline"]:
        assert h["fusedopt"] == "fusedopt[cpu]" and h["ratio"] > 0
    assert {t["target"] for t in data["targets"]} == {t[-1] for t in bench.CPU_TARGETS}
    # quick shapes: the ratios are reported, the targets not judged
    assert all(t["judged"] is False and t["met"] is None and t["ratio"] > 0 for t in data["targets"])


def test_bytes_model_and_stream_agree():
    expected = {("adamw", "float32"): 28, ("sgd", "float32"): 20, ("lion", "float32"): 20,
                ("adamw", "bf16-master"): 28, ("sgd", "bf16-master"): 20, ("lion", "bf16-master"): 20}
    for (rule, dtype), b in expected.items():
        assert bench.bytes_per_param(rule, dtype, "step") == b
        grad_bytes = 2 if dtype == "bf16-master" else 4
        assert bench.bytes_per_param(rule, dtype, "full") == b + grad_bytes
    # the stream runs and leaves its buffers finite
    stream = bench.make_stream("adamw", "bf16-master", "full", 1000, torch.device("cpu"))
    for _ in range(3):
        stream()
    assert set(stream.buffers) == {"g", "w", "p", "m", "v"}
    for name, buf in stream.buffers.items():
        assert buf.numel() == 1000 and bool(torch.isfinite(buf).all()), name


def test_shapes_match_the_real_models():
    assert bench.numel_of(bench.model_shapes("gpt2-small", quick=False)) == 124_439_808
    assert len(bench.model_shapes("gpt2-small", quick=False)) == 148
    assert bench.numel_of(bench.model_shapes("resnet50", quick=False)) == 25_557_032
    assert len(bench.model_shapes("resnet50", quick=False)) == 161
    assert len(bench.model_shapes("small-tensors", quick=False)) == 10_000
    assert 300e6 < bench.numel_of(bench.model_shapes("gpt2-medium", quick=False)) < 360e6


def test_bad_arguments_exit_2(capsys, tmp_path):
    assert bench.main(["--models", "gpt5", "--no-plot"]) == 2
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2
    # an --out that cannot be created is refused before anything is timed
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    capsys.readouterr()
    threads = torch.get_num_threads()
    assert bench.main(["--quick", "--out", str(blocker / "sub")]) == 2
    assert torch.get_num_threads() == threads  # refused before --quick's one thread is set (process-wide)
    assert capsys.readouterr().err.startswith(f"fusedopt.bench: cannot write the results to {blocker / 'sub'}: ")


def test_targets_are_judged_at_full_size():
    """On the committed full-size CPU run every target is judged, met exactly when the ratio reaches the
    minimum; the same results flagged quick are reported unjudged."""
    with open(os.path.join(ROOT, "benchmarks", "results", "2026-11-23-cpu", "results.json")) as f:
        results = json.load(f)["results"]
    full = bench.evaluate_targets(results, torch.device("cpu"))
    assert len(full) == 3 * len(bench.CPU_TARGETS)  # every target on each of the 3 models
    assert all(t["judged"] and t["met"] == (t["ratio"] >= t["minimum"]) for t in full)
    assert {t["met"] for t in full} == {True, False}
    quick = bench.evaluate_targets(results, torch.device("cpu"), quick=True)
    assert [t["ratio"] for t in quick] == [t["ratio"] for t in full]
    assert all(not t["judged"] and t["met"] is None for t in quick)
    assert bench.evaluate_targets(results, torch.device("cuda")) == []
