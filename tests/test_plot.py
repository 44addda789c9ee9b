"""`python -m fusedopt.plot`: schedules (lr and momentum against step) and benchmark results to PNG."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fusedopt import plot, schedules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def test_cli_draws_schedules(tmp_path):
    out = tmp_path / "x.png"
    proc = subprocess.run([sys.executable, "-m", "fusedopt.plot", "--schedules", "one_cycle,warmup_cosine",
                           "--steps", "1000", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert is_png(out)


def test_cli_rejects_unknown_schedule(tmp_path):
    assert plot.main(["--schedules", "nope", "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_cli_needs_one_source(tmp_path):
    with pytest.raises(SystemExit):
        plot.main(["--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize("name", plot.SCHEDULE_NAMES)
def test_every_builder_name(name):
    table = plot.build_schedule(name, 200)
    assert isinstance(table, schedules.ScheduleTable)
    assert len(table) >= 1


def test_lines_are_the_schedules_values(tmp_path):
    """The plotted lines are the lrs (and momenta) of the schedulers the tables mirror: torch's OneCycleLR and
    Hugging Face's get_cosine_schedule_with_warmup, read off a torch optimizer with lr 0.5."""
    from transformers import get_cosine_schedule_with_warmup

    from oracles import schedule_trace

    tables = {"1cycle": schedules.one_cycle(100), "cos": schedules.warmup_cosine(100, 10)}
    fig = plot.plot_schedules(tables, 100, None, lr=0.5)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    one_cycle_lr, one_cycle_mom = schedule_trace(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=100), 100, lr=0.5)
    cos_lr, _ = schedule_trace(lambda o: get_cosine_schedule_with_warmup(o, 10, 100), 100, lr=0.5)
    assert list(lines["cos: lr"].get_ydata()) == pytest.approx(cos_lr, rel=1e-12, abs=0)
    assert list(lines["1cycle: lr"].get_ydata()) == pytest.approx(one_cycle_lr, rel=1e-12, abs=0)
    # momentum on the twin axis of the same plot, only for the table that has one
    mom = {line.get_label(): line for line in fig.axes[1].get_lines()}
    assert set(mom) == {"1cycle: momentum"}
    assert list(mom["1cycle: momentum"].get_ydata()) == pytest.approx(one_cycle_mom, rel=1e-12, abs=0)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plot_benchmark_from_results(tmp_path):
    """Models on a categorical axis (no line joins two models), every contender's point at its params/s, the
    bandwidth reference as a segment within each model's slot, one shared legend and the note explaining the
    reference."""
    def entry(contender, kind, numel, model, t):
        return dict(model=model, numel=numel, num_tensors=3, rule="adamw", dtype="float32", scenario="step",
                    bytes_per_param=28, contender=contender, kind=kind, status="ok", median_s=t, q1_s=0.9 * t,
                    q3_s=1.1 * t, params_per_s=numel / t, gb_per_s=28 * numel / t / 1e9)

    ok = [entry("fusedopt[cpu]", "fusedopt", 1000, "a", 1e-3), entry("fusedopt[cpu]", "fusedopt", 2_500_000, "b", 5e-3),
          entry("torch fused", "peer", 1000, "a", 2e-3), entry("torch fused", "peer", 2_500_000, "b", 9e-3),
          entry("bandwidth (stream)", "stream", 1000, "a", 5e-4), entry("bandwidth (stream)", "stream", 2_500_000, "b", 4e-3)]
    data = dict(meta=dict(device_name="test", date="2026-11-23", quick=True), results=ok + [
        dict(model="a", rule="adamw", dtype="float32", scenario="step", contender="x", kind="peer", status="error")])
    out = tmp_path / "bench.png"
    fig = plot.plot_benchmark(data, str(out))
    assert is_png(out)
    (ax,) = [a for a in fig.axes if a.get_visible() and a.axison]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a\n(1.0k params)", "b\n(2.5M params)"]
    assert ax.get_xlabel() == "model (parameter list)" and ax.get_yscale() == "log"
    points = {}
    for container in ax.containers:  # one errorbar per contender
        line = container.lines[0]
        assert line.get_linestyle() == "None", container.get_label()  # markers only
        points[container.get_label()] = list(zip(line.get_xdata(), line.get_ydata()))
    assert set(points) == {"fusedopt[cpu]", "torch fused"}
    for name, pts in points.items():
        (xa, ya), (xb, yb) = sorted(pts)
        assert -0.5 < xa < 0.5 < xb < 1.5  # inside the slots of "a" and "b"
        expected = sorted(e["params_per_s"] for e in ok if e["contender"] == name)
        assert sorted([ya, yb]) == pytest.approx(expected)
    bw = [line for line in ax.get_lines() if line.get_label() == plot.BANDWIDTH_LABEL]
    assert len(bw) == 2
    for line, e in zip(sorted(bw, key=lambda ln: ln.get_xdata()[0]), ok[4:]):
        x0, x1 = line.get_xdata()
        assert int(round((x0 + x1) / 2)) == ["a", "b"].index(e["model"]) and 0 < x1 - x0 < 1
        assert list(line.get_ydata()) == pytest.approx([e["gb_per_s"] * 1e9 / 28] * 2)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["fusedopt[cpu]", "torch fused", plot.BANDWIDTH_LABEL]
    assert all(t.get_fontsize() >= 9 for t in legend.get_texts())
    assert any(plot.BANDWIDTH_NOTE == t.get_text() for t in fig.texts)
