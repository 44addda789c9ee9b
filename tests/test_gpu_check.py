"""The parts of `make gpu-check` (tools/gpu_check.py, tools/gpu_sanitize.py) and of `python -m fusedopt.check`
that run without a GPU: argument handling, the commands it builds, the summary it writes from recorded logs
(tests/data/gpu_check/, in the formats of pytest -v -rs, compute-sanitizer and the benchmark), the one-line
refusal without a GPU, the sanitizer workload and the self-test on the CPU."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "gpu_check")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_without_a_gpu_it_says_so_in_one_line_and_fails():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py")], capture_output=True,
                         text=True, env=_env(CUDA_VISIBLE_DEVICES=""), timeout=300)
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 2, out
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU here"), lines


def test_arguments():
    args = gpu_check.parse_args([])
    assert args.stages == list(gpu_check.STAGES) and args.total_seconds < 480  # the 8-minute bound
    assert gpu_check.parse_args(["--stages", "pytest, bench"]).stages == ["pytest", "bench"]
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(["--stages", "pytest,lint"])
    assert e.value.code == 2


def test_build_command_targets_the_present_gpu_only():
    argv, env = gpu_check.build_command("/usr/bin/python3", (9, 0), 16)
    assert argv == ["/usr/bin/python3", "setup.py", "build_ext", "--inplace"]
    assert env == {"FUSEDOPT_CUDA_ARCH_LIST": "9.0", "FUSEDOPT_FORCE_CUDA": "1", "MAX_JOBS": "16"}
    assert gpu_check.build_command("python3", [10, 0], 0)[1]["FUSEDOPT_CUDA_ARCH_LIST"] == "10.0"
    assert gpu_check.build_command("python3", [10, 0], 0)[1]["MAX_JOBS"] == "1"
    # setup.py turns the entry into exactly one sm_ target
    spec = importlib.util.spec_from_file_location("fusedopt_setup", os.path.join(ROOT, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    assert setup.cuda_arch_flags("9.0") == ["-gencode=arch=compute_90,code=sm_90"]


def test_output_folder_and_gpu_names():
    assert gpu_check.gpu_slug("NVIDIA H200") == "h200"
    assert gpu_check.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_check.output_dir("2026-12-01", "NVIDIA H200").endswith(os.path.join("benchmarks", "results",
                                                                                    "2026-12-01-h200"))


def test_pytest_shards_run_every_test_file_once():
    commands = gpu_check.pytest_commands("python3", "/out")
    files = sorted(os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    reached = {f: 0 for f in files}
    for _, argv in commands:
        assert argv[:5] == ["python3", "-m", "pytest", "-m", "gpu"]
        ignored = {a.split("=", 1)[1] for a in argv if a.startswith("--ignore=")}
        explicit = [a for a in argv if a.startswith("tests/")]
        for f in files:
            if f in explicit or ("tests" in argv and f not in ignored):
                reached[f] += 1
        assert all(os.path.exists(os.path.join(ROOT, f)) for f in explicit)
    assert set(reached.values()) == {1}, reached


def test_summary_from_recorded_logs():
    parsed = [gpu_check.parse_pytest_log(open(os.path.join(DATA, f)).read())
              for f in ("pytest-training.log", "pytest-cuda.log")]
    training, cut = parsed
    assert training["complete"] and training["counts"] == {"failed": 2, "passed": 3, "skipped": 1, "deselected": 1}
    assert [f["test"] for f in training["failures"]] == [
        "tests/test_gpu_training.py::test_whole_network_capture_recipe[triton-adamw]",
        "tests/test_gpu_training.py::test_training_steps_never_sync[cuda-lion-cpu-tensor-lr]"]
    assert "3 of 262144 elements differ" in training["failures"][0]["message"]
    assert training["skips"][0]["reason"].startswith("lion not available")
    # a shard stopped at its time limit: counted from the outcome lines
    assert not cut["complete"] and cut["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert cut["failures"] == [{"test": "tests/test_cuda_gpu.py::test_matches_cpu_backend[lion-torch.bfloat16]",
                                "kind": "failed", "message": ""}]
    merged = gpu_check.merge_pytest(parsed)
    assert merged["counts"]["passed"] == 5 and merged["counts"]["failed"] == 3 and not merged["complete"]

    memcheck = gpu_check.parse_sanitizer_log(open(os.path.join(DATA, "memcheck.log")).read())
    racecheck = gpu_check.parse_sanitizer_log(open(os.path.join(DATA, "racecheck.log")).read())
    assert memcheck["errors"] == 0 and racecheck["errors"] == 1
    assert gpu_check.parse_sanitizer_log("killed before the end")["errors"] is None
    rows = gpu_check.bench_headline(os.path.join(DATA, "results.json"))
    assert rows == [["gpt2-small", "adamw", "step", "fusedopt[cuda]", "torch fused", "1.08x", "90%"],
                    ["gpt2-small", "lion", "full", "fusedopt[triton]", "lion-pytorch", "3.50x", "-"]]

    stages = [gpu_check.Stage("build", "ok", 120.0, "cpu, cuda (9.0)"),
              gpu_check.Stage("pytest", "TIMED OUT", 200.0, "5 passed, 3 failed", data=merged),
              gpu_check.Stage("sanitizer", "FAILED", 70.0, "memcheck 0 errors; racecheck 1 errors"),
              gpu_check.Stage("bench", "ok", 95.0, "2 headline rows")]
    env = dict(gpu="NVIDIA H200", arch="9.0", torch="2.11.0+cu130", cuda="13.0", triton="3.6.0", python="3.12.3")
    text, status = gpu_check.summarize(env, stages, os.path.join(ROOT, "benchmarks", "results", "x"), rows)
    assert status == 1
    lines = text.splitlines()
    assert len(lines) <= 40, "one screen"
    assert lines[0].startswith("fusedopt gpu-check: NVIDIA H200 (sm_90), torch 2.11.0+cu130")
    assert any("FAILED tests/test_gpu_training.py::test_whole_network_capture_recipe[triton-adamw]" in l for l in lines)
    assert any("skipped 1: lion not available" in l for l in lines)
    assert any(l.strip().startswith("gpt2-small  lion") and "3.50x" in l for l in lines)
    assert lines[-1].startswith("gpu-check: FAILED (pytest, sanitizer)")
    ok_text, ok_status = gpu_check.summarize(env, [gpu_check.Stage("build", "ok")], ROOT, [])
    assert ok_status == 0 and ok_text.splitlines()[-1].startswith("gpu-check: all stages passed")


def test_bench_is_bounded_by_a_time_limit():
    argv = gpu_check.bench_command("python3", "/out", 60)
    assert argv[argv.index("--time-limit") + 1] == "60" and argv[argv.index("--device") + 1] == "cuda"
    from fusedopt.bench import cli

    assert cli.parse_args(argv[3:]).time_limit == 60.0


def test_small_state_bench_is_bounded_and_counted(tmp_path):
    """The small-state benchmark (issue 13's scenarios on the GPU) is a bounded run into its own folder, and the
    summary counts the groups in which fusedopt[cuda] was timed."""
    argv = gpu_check.bench_small_command("python3", "/out", 40)
    from fusedopt.bench import cli

    args = cli.parse_args(argv[3:])
    assert args.time_limit == 40.0 and args.device == "cuda" and args.out == "/out/small-state"
    assert set(args.dtype.split(",")) == {"8bit", "bf16-sr", "bf16-states", "bf16"}
    results = tmp_path / "results.json"
    rows = [dict(model="gpt2-small", rule=r, dtype=d, scenario="step", contender=c, status=st)
            for r, d, c, st in [("adamw", "8bit", "fusedopt[cuda]", "ok"), ("adamw", "8bit", "bnb AdamW8bit", "ok"),
                                ("lion", "8bit", "fusedopt[cuda]", "ok"),
                                ("sgd", "bf16-sr", "fusedopt[cuda]", "error")]]
    results.write_text(json.dumps({"results": rows}))
    assert gpu_check.bench_groups(str(results)) == 2
    assert gpu_check.bench_groups(str(tmp_path / "missing.json")) == 0


def test_sanitizer_workload_runs_on_the_cpu():
    """The workload compute-sanitizer runs on a GPU, on the CPU op (its logic, not the GPU kernels)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_sanitize.py"), "--device", "cpu",
                          "--small", "--backends", "cpu"], capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gpu_sanitize: backend cpu on cpu:" in out.stdout and "NON-FINITE" not in out.stdout


# ------------------------------------------------------------------------------------------------------------
# python -m fusedopt.check
# ------------------------------------------------------------------------------------------------------------
def test_check_passes_on_the_cpu(capsys):
    from fusedopt import check

    assert check.main(["--device", "cpu", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 3 and "Paste into a bug report" in out and "fusedopt.check: 3 of 3" in out
    assert check.main(["--device", "cpu", "--backend", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["failed"] == 0 and {r["check"] for r in data["rows"]} == {"adamw", "sgd", "lion"}
    assert data["environment"]["running_with"]["torch"] == torch.__version__


def test_check_fails_a_wrong_update(monkeypatch, capsys):
    """A planted bug (our optimizers run with twice the lr) must show as FAIL rows and exit status 1."""
    from fusedopt import check

    real = check._ours

    def doubled(rule, params, backend, **kw):
        opt = real(rule, params, backend, **kw)
        for g in opt.param_groups:
            g["lr"] = 2 * g["lr"]
        return opt

    monkeypatch.setattr(check, "_ours", doubled)
    assert check.main(["--device", "cpu", "--backend", "cpu"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL cpu cpu") == 3 and "3 FAILED" in out


def test_check_lion_reference_without_lion_pytorch(monkeypatch):
    """Without lion-pytorch the check compares Lion with its own float64 statement of the update; that
    reference agrees with lion-pytorch."""
    from fusedopt import check

    Lion = pytest.importorskip("lion_pytorch").Lion
    gen = torch.Generator().manual_seed(3)
    a = [torch.randn(50, generator=gen) for _ in range(2)]
    b = [p.clone() for p in a]
    ours, theirs = check._lion_reference(a, check.OPTIONS["lion"]), Lion(b, **check.OPTIONS["lion"])
    for _ in range(4):
        for p, q in zip(a, b):
            p.grad = torch.randn(50, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # float64 vs float32 arithmetic
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # import fails
    rows = check.run(["cpu"], ["cpu"])
    lion = [r for r in rows if r["check"] == "lion"][0]
    assert lion["result"] == "PASS" and "lion-pytorch not installed" in lion["detail"]


def test_main_runs_the_stages_and_writes_the_results(monkeypatch, tmp_path, capsys):
    """The driver end to end with each command replaced by one that prints a recorded log (a GPU probe that
    answers as an H200 would): the stages run, their logs and the summary files land in --out, the summary
    reads the logs and the exit status reports the failures in them."""
    def replay(name):
        return [sys.executable, "-c", f"print(open({os.path.join(DATA, name)!r}).read())"]

    def bench(python, out, seconds):
        return [sys.executable, "-c", f"import shutil; shutil.copy({os.path.join(DATA, 'results.json')!r}, "
                                      f"{os.path.join(out, 'results.json')!r})"]

    fake_gpu = dict(torch="2.11.0+cu130", cuda="13.0", python="3.12.3", available=True, gpu="NVIDIA H200",
                    capability=[9, 0], triton="3.6.0")
    monkeypatch.setattr(gpu_check, "probe", lambda python: (fake_gpu, ""))
    monkeypatch.setattr(gpu_check, "build_command", lambda python, cap, jobs: (
        [sys.executable, "-c", "print('[fusedopt build] building backends: cpu, cuda (9.0)')"], {}))
    monkeypatch.setattr(gpu_check, "warm_command", lambda python: [sys.executable, "-c", "pass"])
    monkeypatch.setattr(gpu_check, "info_command", lambda python: [sys.executable, "-c", "print('{}')"])
    monkeypatch.setattr(gpu_check, "check_command", lambda python: [
        sys.executable, "-c", "print('fusedopt.check: 12 of 12 checks passed')"])
    monkeypatch.setattr(gpu_check, "pytest_commands", lambda python, out: [
        ("training", replay("pytest-training.log")), ("cuda", replay("pytest-cuda.log"))])
    monkeypatch.setattr(gpu_check, "find_sanitizer", lambda: "compute-sanitizer")
    monkeypatch.setattr(gpu_check, "sanitizer_commands", lambda sanitizer, python: [
        ("memcheck", replay("memcheck.log")), ("racecheck", replay("racecheck.log"))])
    monkeypatch.setattr(gpu_check, "bench_command", bench)

    def bench_small(python, out, seconds):  # one small-state group timed on the GPU
        entry = dict(model="gpt2-small", rule="adamw", dtype="8bit", scenario="step", contender="fusedopt[cuda]",
                     status="ok")
        target = os.path.join(out, gpu_check.BENCH_SMALL_DIR)
        return [sys.executable, "-c", f"import json, os; os.makedirs({target!r}, exist_ok=True); "
                                      f"json.dump({{'results': [{entry!r}]}}, open(os.path.join({target!r}, "
                                      f"'results.json'), 'w'))"]

    monkeypatch.setattr(gpu_check, "bench_small_command", bench_small)
    monkeypatch.setattr(gpu_check, "lion_site", lambda python, env, out: "")
    status = gpu_check.main(["--out", str(tmp_path / "results"), "--total-seconds", "300",
                             "--copy-to", str(tmp_path / "sent-back")])
    tmp_path = tmp_path / "results"
    out = capsys.readouterr().out
    # the replayed pytest logs exit 0, but they hold failures; racecheck's log holds a hazard
    assert status == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["build"]["status"] == "ok" and stages["build"]["detail"] == "cpu, cuda (9.0)"
    assert stages["pytest"]["detail"].startswith("5 passed, 3 failed, 2 skipped")
    assert stages["sanitizer"]["status"] == "FAILED" and "racecheck 1 errors" in stages["sanitizer"]["detail"]
    assert stages["check"]["status"] == "ok" and stages["bench"]["status"] == "ok"
    assert "small-state: 1 groups" in stages["bench"]["detail"]
    for name in ("build.log", "pytest-training.log", "memcheck.log", "racecheck.log", "check.txt", "info.json",
                 "results.json", "summary.md"):
        assert (tmp_path / name).exists(), name
    assert "gpu-check: FAILED (pytest, sanitizer)" in out and "3.50x" in out
    assert (tmp_path.parent / "sent-back" / "results" / "summary.json").exists()
