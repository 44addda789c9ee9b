#!/usr/bin/env python3
"""`make gpu-check`: everything a session with a GPU must run, in one call of under 8 minutes.

    python3 tools/gpu_check.py                 on a machine with a CUDA GPU (what `make gpu-check` runs)
    python3 tools/gpu_check.py --prepare       on a machine with network access: downloads the wheels the GPU
                                               machine lacks (lion-pytorch) into .whl/ (git-ignored), to be
                                               carried along with the working tree

Stages, against the torch that `--python` (default: this interpreter) imports; no virtual environment, no
download:
  build      the extensions in place (python setup.py build_ext --inplace) for the present GPU's architecture
             only, CUDA forced (FUSEDOPT_FORCE_CUDA=1). Meanwhile tools/gpu_sanitize.py compiles the Triton
             kernels once (Triton's cache then serves the later stages).
  pytest     pytest -m gpu (in three processes), with lion-pytorch installed from .whl/ into a
             temporary --target folder when it is not importable (its comparisons are skipped, with the reason
             printed, when there is no wheel). Triton autotuning off (the tests that cover it turn it on).
  sanitizer  compute-sanitizer --tool memcheck and --tool racecheck on tools/gpu_sanitize.py (every rule and
             backend, tail sizes, misalignment, more than one launch), without PyTorch's caching allocator.
             Runs while pytest runs; so does `python -m fusedopt.check`.
  bench      python -m fusedopt.bench --device cuda, float32, bounded by --bench-seconds: the headline; then the
             small-state scenarios (issue 13: 8bit, bf16-sr, bf16-states, bf16 on gpt2-small) bounded by
             --bench-small-seconds, into small-state/ of the results folder.
Everything goes to benchmarks/results/<date>-<gpu>/ (logs, pytest XML, sanitizer logs, info.json, check.txt,
the benchmark's results.json / .md / .png, summary.md, summary.json); the end of the output is a one-screen
summary. Without a GPU it prints one line and exits 2; it exits 1 when a stage failed or timed out.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("build", "pytest", "sanitizer", "bench")
LION_WHEEL = "lion-pytorch==0.2.5"
WHEEL_DIR = os.path.join(ROOT, ".whl")
# pytest -m gpu in three processes side by side (Triton's compiles are CPU-bound and the GPU has room): each
# shard's files, most important first; the last shard also takes every other test file of tests/.
PYTEST_SHARDS = {
    "training": ["tests/test_gpu_training.py"],
    "cuda": ["tests/test_cuda_gpu.py", "tests/test_one_pass.py"],
    "triton": ["tests/test_triton_backend.py", "tests/test_gpu_compile.py"],
}
# Seconds: the whole run must end within TOTAL_SECONDS; the stages get what is left, in this order.
TOTAL_SECONDS = 450
BUILD_SECONDS = 210
PYTEST_SECONDS = 240
SANITIZER_SECONDS = 180
BENCH_SECONDS = 60
BENCH_SMALL_SECONDS = 40
# The small-state benchmark: fusedopt's kernels on 8-bit / bf16 states and stochastic rounding next to the peers
# that run there (bitsandbytes, torchao when installed) and fusedopt's own float32-state step.
BENCH_SMALL_DTYPES = "8bit,bf16-sr,bf16-states,bf16"
BENCH_SMALL_DIR = "small-state"
SUMMARY_RESERVE = 10


# ------------------------------------------------------------------------------------------------------------
# Arguments and commands (pure functions: tested in CI)
# ------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=sys.executable, help="the interpreter whose torch to build and test against")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<date>-<gpu>/)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma list of {', '.join(STAGES)} (default: all)")
    p.add_argument("--total-seconds", type=float, default=TOTAL_SECONDS, help="the time bound of the whole run")
    p.add_argument("--bench-seconds", type=float, default=BENCH_SECONDS, help="the benchmark's --time-limit")
    p.add_argument("--bench-small-seconds", type=float, default=BENCH_SMALL_SECONDS,
                   help="the small-state benchmark's --time-limit (0: not run)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs (MAX_JOBS)")
    p.add_argument("--prepare", action="store_true", help="download the wheels the GPU machine lacks into .whl/")
    p.add_argument("--copy-to", default=None,
                   help="also copy the results folder (as benchmarks/results/<date>-<gpu>/) into this folder at the "
                        "end, e.g. the folder a remote runner sends back")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        p.error(f"unknown stage {', '.join(bad) or '(none)'}; choose from {', '.join(STAGES)}")
    args.stages = stages
    return args


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3': the folder name part for a GPU."""
    words = re.sub(r"(?i)\bnvidia\b|\bgeforce\b", " ", name).lower()
    return re.sub(r"[^a-z0-9]+", "-", words).strip("-") or "gpu"


def output_dir(date: str, gpu_name: str) -> str:
    return os.path.join(ROOT, "benchmarks", "results", f"{date}-{gpu_slug(gpu_name)}")


def arch_of(capability: Sequence[int]) -> str:
    """(9, 0) -> '9.0', the FUSEDOPT_CUDA_ARCH_LIST entry of exactly this GPU."""
    return f"{int(capability[0])}.{int(capability[1])}"


def build_command(python: str, capability: Sequence[int], jobs: int) -> Tuple[List[str], Dict[str, str]]:
    """The in-place build against the installed torch, for this GPU's architecture only, CUDA required."""
    env = {"FUSEDOPT_CUDA_ARCH_LIST": arch_of(capability), "FUSEDOPT_FORCE_CUDA": "1", "MAX_JOBS": str(max(1, jobs))}
    return [python, "setup.py", "build_ext", "--inplace"], env


def pytest_commands(python: str, out: str, per_test_seconds: int = 120) -> List[Tuple[str, List[str]]]:
    """(shard, argv) per shard of `pytest -m gpu`; together they run every test file once."""
    taken = [f for name, files in PYTEST_SHARDS.items() for f in files]
    commands = []
    for i, (name, files) in enumerate(PYTEST_SHARDS.items()):
        rest = ["tests"] + [f"--ignore={f}" for f in taken if f not in files] if i == len(PYTEST_SHARDS) - 1 else []
        commands.append((name, [python, "-m", "pytest", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider",
                                f"--timeout={per_test_seconds}", f"--junitxml={os.path.join(out, f'pytest-{name}.xml')}",
                                *files, *rest]))
    return commands


def merge_pytest(parsed: List[dict]) -> dict:
    """One result from the shards' parse_pytest_log results."""
    counts: Dict[str, int] = {}
    for p in parsed:
        for k, v in p["counts"].items():
            counts[k] = counts.get(k, 0) + v
    return {"counts": counts, "failures": [f for p in parsed for f in p["failures"]],
            "skips": [s for p in parsed for s in p["skips"]], "complete": all(p["complete"] for p in parsed),
            "seconds": max([p["seconds"] or 0.0 for p in parsed], default=0.0)}


def sanitizer_commands(sanitizer: str, python: str) -> List[Tuple[str, List[str]]]:
    script = os.path.join("tools", "gpu_sanitize.py")
    return [(tool, [sanitizer, "--tool", tool, "--error-exitcode", "3", "--print-limit", "20", python, script])
            for tool in ("memcheck", "racecheck")]


def warm_command(python: str) -> List[str]:
    """Compiles the Triton kernels (into Triton's cache) while the extensions build."""
    return [python, os.path.join("tools", "gpu_sanitize.py"), "--backends", "triton"]


def info_command(python: str) -> List[str]:
    return [python, "-m", "fusedopt.info", "--json"]


def check_command(python: str) -> List[str]:
    return [python, "-m", "fusedopt.check"]


def bench_command(python: str, out: str, seconds: float) -> List[str]:
    return [python, "-m", "fusedopt.bench", "--device", "cuda", "--dtype", "float32",
            "--models", "gpt2-small,resnet50,small-tensors", "--budget", "1.5", "--reps", "3",
            "--min-rep-seconds", "0.05", "--time-limit", f"{seconds:g}", "--no-progress", "--out", out]


def bench_small_command(python: str, out: str, seconds: float) -> List[str]:
    """The small-state scenarios on gpt2-small (every rule), into <out>/small-state/."""
    return [python, "-m", "fusedopt.bench", "--device", "cuda", "--dtype", BENCH_SMALL_DTYPES,
            "--models", "gpt2-small", "--budget", "1.5", "--reps", "3", "--min-rep-seconds", "0.05",
            "--time-limit", f"{seconds:g}", "--no-progress", "--out", os.path.join(out, BENCH_SMALL_DIR)]


def bench_groups(results_json: str, contender: str = "fusedopt[cuda]") -> int:
    """How many (model, rule, dtype, scenario) groups of a benchmark run timed `contender` (0: none, or no
    results file)."""
    try:
        with open(results_json) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return 0
    return len({(r["model"], r["rule"], r["dtype"], r["scenario"]) for r in data.get("results", [])
                if r.get("contender") == contender and r.get("status") == "ok"})


def find_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in filter(None, [os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]):
        path = os.path.join(home, "bin", "compute-sanitizer")
        if os.path.isfile(path):
            return path
    return None


# ------------------------------------------------------------------------------------------------------------
# Reading the logs (pure functions: tested in CI on recorded logs)
# ------------------------------------------------------------------------------------------------------------
_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)
_FINAL = re.compile(r"^=+ (.*\b(passed|failed|skipped|error|errors|deselected)\b.*) in ([\d.]+)s", re.M)
_SKIP_REASON = re.compile(r"^SKIPPED \[(\d+)\] (\S+?):\d+: (.*)$", re.M)
_FAILED_LINE = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$", re.M)


def parse_pytest_log(text: str) -> dict:
    """Counts per outcome, the failed tests with their one-line messages, the skip reasons, and whether the run
    reached its final line (it did not when the stage was stopped at its time limit)."""
    counts: Dict[str, int] = {}
    outcomes = {}
    for test, outcome in _OUTCOME.findall(text):
        outcomes[test] = outcome.lower()
    final = _FINAL.findall(text)
    if final:
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                                       final[-1][0]):
            counts["error" if word.startswith("error") else word] = int(number)
    else:
        for outcome in outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
    failures = []
    for kind, test, message in _FAILED_LINE.findall(text):
        failures.append({"test": test, "kind": kind.lower(), "message": (message or "").strip()})
    if not failures:  # stopped before the short summary: the outcome lines are all there is
        failures = [{"test": t, "kind": o, "message": ""} for t, o in outcomes.items() if o in ("failed", "error")]
    skips = [{"count": int(n), "where": where, "reason": reason.strip()} for n, where, reason in
             _SKIP_REASON.findall(text)]
    return {"counts": counts, "failures": failures, "skips": skips, "complete": bool(final),
            "seconds": float(final[-1][2]) if final else None}


def parse_sanitizer_log(text: str) -> dict:
    """compute-sanitizer's own summary line: memcheck 'ERROR SUMMARY: N errors', racecheck 'RACECHECK SUMMARY:
    N hazards displayed (E errors, W warnings)'. errors None: no summary (the tool did not finish)."""
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    if m:
        return {"errors": int(m.group(1)), "warnings": 0}
    m = re.search(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    if m:
        return {"errors": int(m.group(1)), "warnings": int(m.group(2))}
    return {"errors": None, "warnings": None}


def bench_headline(results_json: str) -> List[List[str]]:
    """The benchmark's headline rows (model, rule, scenario, fusedopt, best peer, ratio, % bw)."""
    try:
        with open(results_json) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    rows = []
    for h in data.get("headline", []):
        pct = h.get("fusedopt_bw_fraction")
        rows.append([h["model"], h["rule"], h["scenario"], h["fusedopt"], h["best_peer"], f"{h['ratio']:.2f}x",
                     "-" if pct is None else f"{100 * pct:.0f}%"])
    return rows


@dataclass
class Stage:
    name: str
    status: str = "not run"  # ok, FAILED, TIMED OUT, not run, skipped
    seconds: float = 0.0
    detail: str = ""
    log: str = ""
    data: dict = field(default_factory=dict)


def summarize(env: dict, stages: List[Stage], out: str, bench_rows: List[List[str]]) -> Tuple[str, int]:
    """The one-screen summary and the exit status (0: every stage that ran is ok; 1 otherwise)."""
    lines = [f"fusedopt gpu-check: {env.get('gpu', '?')} (sm_{env.get('arch', '?').replace('.', '')}), "
             f"torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, triton {env.get('triton', '?')}, "
             f"python {env.get('python', '?')}",
             f"results: {os.path.relpath(out, ROOT)}/" + (f"; lion-pytorch {env['lion']}" if env.get("lion") else ""),
             ""]
    for s in stages:
        lines.append(f"  {s.name:<10} {s.status:<10} {s.seconds:6.0f} s  {s.detail}")
        if s.name == "pytest" and s.data:
            for failure in s.data.get("failures", [])[:10]:
                lines.append(f"      {failure['kind'].upper()} {failure['test']}"
                             + (f"  {failure['message'][:100]}" if failure["message"] else ""))
            if len(s.data.get("failures", [])) > 10:
                lines.append(f"      ... {len(s.data['failures']) - 10} more in pytest.log")
            reasons: Dict[str, int] = {}
            for skip in s.data.get("skips", []):
                reasons[skip["reason"][:110]] = reasons.get(skip["reason"][:110], 0) + skip["count"]
            for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]:
                lines.append(f"      skipped {n}: {reason}")
    if bench_rows:
        lines += ["", "  benchmark headline (ratio > 1: fusedopt faster than the best peer)"]
        widths = [max(len(r[i]) for r in bench_rows) for i in range(len(bench_rows[0]))]
        for r in bench_rows[:12]:
            lines.append("    " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
    failed = [s.name for s in stages if s.status not in ("ok", "not run", "skipped")]
    lines += ["", f"gpu-check: {'FAILED (' + ', '.join(failed) + ')' if failed else 'all stages passed'}; "
              f"logs and results in {os.path.relpath(out, ROOT)}/"]
    return "\n".join(lines), 1 if failed else 0


# ------------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------------
_PROBE = ("import json, platform, torch\n"
          "d = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),\n"
          "         available=torch.cuda.is_available())\n"
          "if d['available']:\n"
          "    d['gpu'] = torch.cuda.get_device_name(0); d['capability'] = list(torch.cuda.get_device_capability(0))\n"
          "try:\n"
          "    import triton; d['triton'] = triton.__version__\n"
          "except Exception as e:\n"
          "    d['triton'] = 'missing (%s)' % e\n"
          "print(json.dumps(d))\n")


def probe(python: str) -> Tuple[Optional[dict], str]:
    """What `python` sees: torch, CUDA, the GPU, triton; (None, why) when it cannot tell."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{python} did not run ({e})"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"{python} cannot import torch ({last})"
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def start(argv: List[str], env: dict, log_path: str) -> Tuple[subprocess.Popen, object]:
    log = open(log_path, "w")
    log.write("$ " + " ".join(argv) + "\n")
    log.flush()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def finish(proc: subprocess.Popen, log, deadline: float) -> Tuple[Optional[int], bool]:
    """Waits until `deadline` (time.monotonic()); past it, stops the process group. (returncode, timed_out)."""
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        rc, timed_out = None, True
    log.close()
    return rc, timed_out


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def prepare() -> int:
    os.makedirs(WHEEL_DIR, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", LION_WHEEL, "-d", WHEEL_DIR]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def lion_site(python: str, env: dict, out: str) -> str:
    """PYTHONPATH entry with lion-pytorch when it is not importable: installed from .whl/ into a temporary
    --target folder. '' when not needed or not possible (then its tests skip with the reason)."""
    if subprocess.run([python, "-c", "import lion_pytorch"], env=env, capture_output=True).returncode == 0:
        return ""
    wheels = sorted(glob.glob(os.path.join(WHEEL_DIR, "lion_pytorch-*.whl")))
    if not wheels:
        return ""
    target = os.path.join("/tmp", "fusedopt-gpu-check-site")
    with open(os.path.join(out, "lion-install.log"), "w") as log:
        subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade", "--target", target,
                        wheels[-1]], env=env, stdout=log, stderr=subprocess.STDOUT)
    return target


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare()
    t0 = time.monotonic()
    deadline = t0 + args.total_seconds
    info, why = probe(args.python)
    if info is None or not info.get("available"):
        why = why or f"torch {info['torch']} sees no CUDA GPU (torch.cuda.is_available() is False)"
        print(f"gpu-check: no CUDA GPU here: {why}; run it on a machine with one")
        return 2
    date = _dt.date.today().isoformat()
    out = os.path.abspath(args.out) if args.out else output_dir(date, info["gpu"])
    os.makedirs(out, exist_ok=True)
    env_info = dict(gpu=info["gpu"], arch=arch_of(info["capability"]), torch=info["torch"], cuda=info["cuda"],
                    triton=info["triton"], python=info["python"], date=date)
    print(f"gpu-check: {env_info['gpu']} sm_{env_info['arch'].replace('.', '')}, torch {info['torch']}; "
          f"writing to {out}", flush=True)

    base_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base_env["PYTHONPATH"] = ROOT + os.pathsep + base_env.get("PYTHONPATH", "")
    base_env["CUBLAS_WORKSPACE_CONFIG"] = base_env.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    stages = {name: Stage(name) for name in STAGES + ("check",)}

    def remaining(reserve: float = 0.0) -> float:
        return deadline - time.monotonic() - reserve

    # build (with the Triton kernels compiled meanwhile)
    warm = None
    if "build" in args.stages:
        s = stages["build"]
        argv_b, env_b = build_command(args.python, info["capability"], args.jobs)
        started = time.monotonic()
        proc, log = start(argv_b, {**base_env, **env_b}, os.path.join(out, "build.log"))
        warm = start(warm_command(args.python), {**base_env, "FUSEDOPT_TRITON_AUTOTUNE": "0"},
                     os.path.join(out, "triton-warm.log"))
        rc, timed_out = finish(proc, log, time.monotonic() + min(BUILD_SECONDS, remaining(SUMMARY_RESERVE)))
        s.seconds = time.monotonic() - started
        s.status = "TIMED OUT" if timed_out else ("ok" if rc == 0 else "FAILED")
        built = [line.split("building backends:", 1)[1].strip() for line in read(os.path.join(out, "build.log"))
                 .splitlines() if "building backends:" in line]
        s.detail = (built[-1] if built else "") + ("" if s.status == "ok" else "  (see build.log)")
        print(f"  build: {s.status} in {s.seconds:.0f} s", flush=True)
    if warm is not None:
        finish(*warm, time.monotonic() + min(60.0, max(1.0, remaining(SUMMARY_RESERVE + 120))))
    with open(os.path.join(out, "info.json"), "w") as info_file:
        subprocess.run(info_command(args.python), cwd=ROOT, env=base_env, stdout=info_file,
                       stderr=subprocess.DEVNULL, timeout=120)

    # pytest, the sanitizers and python -m fusedopt.check, side by side
    test_env = dict(base_env, FUSEDOPT_TRITON_AUTOTUNE="0", COLUMNS="250")  # COLUMNS: untruncated summaries
    site = lion_site(args.python, test_env, out)
    if site:
        test_env["PYTHONPATH"] = test_env["PYTHONPATH"] + os.pathsep + site
    if subprocess.run([args.python, "-c", "import lion_pytorch"], env=test_env, capture_output=True).returncode:
        test_env["FUSEDOPT_TESTS_ALLOW_MISSING"] = "lion"  # skipped, with the reason in the summary
        env_info["lion"] = "MISSING: its comparisons are skipped (python3 tools/gpu_check.py --prepare, carry .whl/)"
    else:
        env_info["lion"] = "installed from .whl/" if site else "installed"
    running = []
    bench_reserve = (args.bench_seconds + args.bench_small_seconds + 90) if "bench" in args.stages else 0
    window = time.monotonic() + max(30.0, min(PYTEST_SECONDS, remaining(bench_reserve + SUMMARY_RESERVE)))
    if "pytest" in args.stages:
        for shard, argv_p in pytest_commands(args.python, out):
            running.append((f"pytest-{shard}", time.monotonic(),
                            start(argv_p, test_env, os.path.join(out, f"pytest-{shard}.log")), window))
    if "sanitizer" in args.stages:
        sanitizer = find_sanitizer()
        if sanitizer is None:
            stages["sanitizer"].status, stages["sanitizer"].detail = "FAILED", "compute-sanitizer not found"
        else:
            san_env = dict(test_env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
            for tool, argv_s in sanitizer_commands(sanitizer, args.python):
                running.append((tool, time.monotonic(), start(argv_s, san_env, os.path.join(out, f"{tool}.log")),
                                min(window, time.monotonic() + SANITIZER_SECONDS)))
    check_log = os.path.join(out, "check.txt")
    running.append(("check", time.monotonic(), start(check_command(args.python), test_env, check_log),
                    min(window, time.monotonic() + 120)))
    results = {}
    for name, started, (proc, log), until in running:
        rc, timed_out = finish(proc, log, until)
        results[name] = (rc, timed_out, time.monotonic() - started)
    shards = [name for name in results if name.startswith("pytest-")]
    if shards:
        s = stages["pytest"]
        s.data = merge_pytest([parse_pytest_log(read(os.path.join(out, f"{name}.log"))) for name in shards])
        c = s.data["counts"]
        s.seconds = max(results[name][2] for name in shards)
        s.detail = ", ".join(f"{c[k]} {k}" for k in ("passed", "failed", "error", "skipped") if c.get(k))
        stopped = [name for name in shards if results[name][1]]
        failed = [name for name in shards if results[name][0] != 0 and not results[name][1]]
        s.status = "TIMED OUT" if stopped else ("FAILED" if failed or s.data["failures"] else "ok")
        if stopped:
            s.detail += f" ({', '.join(stopped)} stopped at the {s.seconds:.0f} s limit; the rest did not run)"
    san_parts, san_status, san_secs = [], [], 0.0
    for tool in ("memcheck", "racecheck"):
        if tool not in results:
            continue
        rc, timed_out, secs = results[tool]
        parsed = parse_sanitizer_log(read(os.path.join(out, f"{tool}.log")))
        san_secs = max(san_secs, secs)
        ok = not timed_out and rc == 0 and parsed["errors"] == 0
        san_status.append(ok)
        san_parts.append(f"{tool} " + ("timed out" if timed_out else f"{parsed['errors']} errors" if parsed["errors"]
                                       is not None else f"exit {rc}, no summary"))
    if san_parts:
        s = stages["sanitizer"]
        s.status, s.seconds, s.detail = ("ok" if all(san_status) else "FAILED"), san_secs, "; ".join(san_parts)
    rc, timed_out, secs = results["check"]
    check_tail = [line for line in read(check_log).splitlines() if line.startswith("fusedopt.check:")]
    stages["check"].status = "TIMED OUT" if timed_out else ("ok" if rc == 0 else "FAILED")
    stages["check"].seconds, stages["check"].detail = secs, (check_tail[-1] if check_tail else "")

    # the benchmark, alone on the GPU
    bench_rows = []
    if "bench" in args.stages:
        s = stages["bench"]
        small = args.bench_small_seconds > 0
        small_reserve = (args.bench_small_seconds + 30) if small else 0
        seconds = max(10.0, min(args.bench_seconds, remaining(SUMMARY_RESERVE + 45 + small_reserve)))
        started = time.monotonic()
        proc, log = start(bench_command(args.python, out, seconds), dict(base_env, FUSEDOPT_TRITON_AUTOTUNE="1"),
                          os.path.join(out, "bench.log"))
        rc, timed_out = finish(proc, log, time.monotonic() + max(15.0, remaining(SUMMARY_RESERVE + small_reserve)))
        bench_rows = bench_headline(os.path.join(out, "results.json"))
        s.status = "TIMED OUT" if timed_out else ("ok" if rc == 0 and bench_rows else "FAILED")
        s.detail = f"{len(bench_rows)} headline rows (results.md, results.png)"
        if small:  # the small-state scenarios (issue 13), after the headline
            seconds = max(10.0, min(args.bench_small_seconds, remaining(SUMMARY_RESERVE + 30)))
            proc, log = start(bench_small_command(args.python, out, seconds),
                              dict(base_env, FUSEDOPT_TRITON_AUTOTUNE="1"), os.path.join(out, "bench-small-state.log"))
            rc, small_timed_out = finish(proc, log, time.monotonic() + max(15.0, remaining(SUMMARY_RESERVE)))
            groups = bench_groups(os.path.join(out, BENCH_SMALL_DIR, "results.json"))
            small_ok = rc == 0 and groups > 0 and not small_timed_out
            s.detail += (f"; small-state: {groups} groups ({BENCH_SMALL_DIR}/results.md)" if small_ok else
                         f"; small-state: {'TIMED OUT' if small_timed_out else 'FAILED'} (bench-small-state.log)")
            if s.status == "ok" and not small_ok:
                s.status = "TIMED OUT" if small_timed_out else "FAILED"
        s.seconds = time.monotonic() - started

    shown = [stages[n] for n in ("build", "pytest", "sanitizer", "check", "bench")
             if n in args.stages or n == "check"]
    text, status = summarize(env_info, shown, out, bench_rows)
    total = time.monotonic() - t0
    text += f" ({total:.0f} s)"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("```\n" + text + "\n```\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(dict(env=env_info, seconds=round(total, 1), status=status,
                       stages=[asdict(s) for s in shown]), f, indent=2)
    print("\n" + text, flush=True)
    if args.copy_to:
        dest = os.path.join(args.copy_to, os.path.relpath(out, ROOT) if out.startswith(ROOT) else os.path.basename(out))
        shutil.copytree(out, dest, dirs_exist_ok=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
