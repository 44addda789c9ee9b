"""The command-line tools as a user runs them: `python -m fusedopt.info | plot | demo | bench` in a subprocess,
checked by exit status and first line of output. Missing optional dependencies (matplotlib, scikit-learn) are
made unimportable by tests/cli_runner.py's import shim, the way they are missing in a plain `pip install
fusedopt`: the tool must say which `pip install` it needs, without a traceback."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

import fusedopt
from cli_runner import ROOT, first_line, run_module
from fusedopt import bench, plot


def no_traceback(proc):
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# python -m fusedopt.info
# ----------------------------------------------------------------------------------------------------------


def test_info_report():
    # `--json` runs in tests/test_wheel.py, from the installed wheel
    proc = run_module("fusedopt.info")
    assert proc.returncode == 0, proc.stderr
    assert first_line(proc.stdout) == f"fusedopt {fusedopt.__version__}  ({os.path.join(ROOT, 'fusedopt')})"
    assert "backends:" in proc.stdout


def test_info_help_and_bad_flag():
    proc = run_module("fusedopt.info", ["--help"])
    assert proc.returncode == 0, proc.stderr
    assert first_line(proc.stdout) == "usage: python -m fusedopt.info [-h] [--json]"
    assert "--json" in proc.stdout and "built against: torch" not in proc.stdout  # the help, not the report
    proc = run_module("fusedopt.info", ["--jsn"])
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert first_line(proc.stderr) == "usage: python -m fusedopt.info [-h] [--json]"
    assert proc.stderr.strip().splitlines()[-1] == "python -m fusedopt.info: error: unrecognized arguments: --jsn"


# ----------------------------------------------------------------------------------------------------------
# python -m fusedopt.plot
# ----------------------------------------------------------------------------------------------------------


def test_plot_help_is_plain_text(capsys):
    # in-process: argparse's --help is the same in a subprocess, and each subprocess costs an import of torch
    with pytest.raises(SystemExit) as exit_:
        plot.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert first_line(out).startswith("usage: python -m fusedopt.plot [-h] [--schedules NAMES]")
    for markup in (":func:", ":data:", ":class:", "``", "`"):
        assert markup not in out, markup


def test_plot_into_a_missing_folder_is_one_clear_line(tmp_path):
    missing = tmp_path / "no-such-folder" / "x.png"
    proc = run_module("fusedopt.plot", ["--schedules", "one_cycle", "--out", str(missing)])
    assert proc.returncode == 1
    no_traceback(proc)
    assert proc.stdout == ""
    assert proc.stderr.strip() == (f"fusedopt.plot: cannot write {missing}: the folder {missing.parent} "
                                   f"does not exist")
    assert not missing.parent.exists()


def test_plot_without_matplotlib_says_what_to_install(tmp_path):
    out = tmp_path / "x.png"
    proc = run_module("fusedopt.plot", ["--schedules", "one_cycle", "--out", str(out)], without=["matplotlib"])
    assert proc.returncode == 1
    no_traceback(proc)
    assert first_line(proc.stderr).startswith("fusedopt.plot: drawing plots (fusedopt.plot) needs matplotlib, "
                                              "which is not installed")
    assert 'pip install "fusedopt[plot]"' in proc.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# python -m fusedopt.demo
# ----------------------------------------------------------------------------------------------------------


def test_demo_runs():
    proc = run_module("fusedopt.demo", ["--steps", "12", "--warmup", "2", "--hidden", "16", "--batch", "16"])
    assert proc.returncode == 0, proc.stderr
    assert first_line(proc.stdout).startswith("scikit-learn digits: 1797 images, MLP 64-16-16-10")
    assert "largest parameter difference after 12 steps" in proc.stdout


def test_demo_without_scikit_learn_says_what_to_install():
    proc = run_module("fusedopt.demo", without=["sklearn"])
    assert proc.returncode == 1
    no_traceback(proc)
    assert first_line(proc.stderr).startswith("fusedopt.demo: python -m fusedopt.demo (the digits data set) needs "
                                              "scikit-learn, which is not installed")
    assert 'pip install "fusedopt[demo]"' in proc.stderr and proc.stdout == ""


# ----------------------------------------------------------------------------------------------------------
# python -m fusedopt.bench
# ----------------------------------------------------------------------------------------------------------


def test_bench_help_and_bad_flag(capsys):
    # in-process (see test_plot_help_is_plain_text); the subprocess run is the next test
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--help"])
    assert exit_.value.code == 0
    assert first_line(capsys.readouterr().out).startswith("usage: python -m fusedopt.bench [-h]")
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--quick", "--bogus"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "python -m fusedopt.bench: error: unrecognized arguments: --bogus"


def test_bench_quick_without_matplotlib_writes_tables_into_a_temp_folder(tmp_path):
    """No --out: a --quick run leaves the current folder alone and writes into a new temporary folder; without
    matplotlib it still prints its summary and writes results.json / results.md, and says how to get the plot."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run_module("fusedopt.bench", ["--quick", "--device", "cpu", "--models", "small-tensors", "--rules", "sgd",
                                         "--dtype", "float32", "--scenarios", "step", "--budget", "0.2",
                                         "--no-progress"], without=["matplotlib"], cwd=str(cwd))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    no_traceback(proc)
    assert first_line(proc.stdout).startswith("fusedopt.bench on ")
    assert "Best fusedopt backend vs the best peer" in proc.stdout and "sgd float32 step" in proc.stdout
    assert "Targets: not judged in --quick mode" in proc.stdout
    assert "no results.png" in proc.stderr and 'pip install "fusedopt[bench]"' in proc.stderr
    assert os.listdir(cwd) == []
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("wrote results.json, results.md to "), last
    folder = last[len("wrote results.json, results.md to "):].rsplit(" (", 1)[0]
    try:
        assert os.path.commonpath([os.path.realpath(folder), os.path.realpath(tempfile.gettempdir())]) == \
            os.path.realpath(tempfile.gettempdir())
        assert sorted(os.listdir(folder)) == ["results.json", "results.md"]
        with open(os.path.join(folder, "results.json")) as f:
            data = json.load(f)
        assert data["meta"]["quick"] is True and data["results"]
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
