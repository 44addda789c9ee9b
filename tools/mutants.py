"""Mutation check: plant realistic bugs, one at a time, in a copy of the tree and report which tests catch them.

    make mutants                        (= python tools/mutants.py)
    python tools/mutants.py --list      the mutants, their files and the cells they must be caught in
    python tools/mutants.py adamw_no_eps tr_lion_half_step      only these
    python tools/mutants.py --out FILE  also write the table to FILE

Each mutant is one bug a kernel or optimizer change could plausibly introduce (AdamW's update frozen, the
weight-decay sign flipped, eps dropped, Lion's step halved, SGD's Nesterov term dropped; the same in the Triton
kernels; the small-state codec's tie rule in each backend's encoder and the step left out of the stochastic-rounding
key; a schedule table shifted by a step; the schedule counter advanced on a step GradScaler skipped; a
rejected step that creates state before it raises). For each one the script

  1. copies the worktree's tracked and untracked-but-not-ignored files to a scratch folder (once) and puts the
     one bug in that copy (the worktree is never modified);
  2. rebuilds what the bug needs: the CPU extension for rules.h (incrementally, see Tree.build), nothing for
     Triton (the interpreter reads the source) or Python; the host-executed CUDA bodies (tests/test_cuda_host.py)
     recompile themselves, keyed by a hash of the sources;
  3. runs the tests that own the claim the bug breaks (the oracle tests of that rule in every dtype and on every
     backend that runs here), not the whole suite: the bf16 cases of a rule are caught by the bf16 oracle test
     or not at all;
  4. records, for every (dtype, backend) cell the bug applies to, which of those tests failed.

The table lists mutant x dtype x backend -> the failing tests, or SURVIVED. Before the mutants, the same tests
run on the unmutated copy and must pass (a test failing already would "catch" every bug). The exit status is
non-zero when a cell survives, a baseline test fails, a build fails, or a mutant's pattern is not found.

Patterns. Each edit names a scope (a regex for the function it lives in) and one or more alternative regexes
for the line it changes, written against the meaning of the code (for example "the assignment to p that uses
neg_step_size") rather than one exact spelling, so that the same mutant applies to rewrites of the arithmetic
(plain operators or explicit fma calls). The first alternative that matches exactly once in the scope is used;
if none does, the mutant fails loudly ("pattern not found") instead of being skipped.

Runtime: ~75 min for the whole list on the shared 2-core machine under load (the baseline run of the ~160
owner tests ~18 min, each rules.h mutant 5-14 min: the rebuild, 0.5-6 min, plus the 300-step parity tests; each
Triton or Python mutant ~1 min); everything runs under `nice`. Not part of `make test`. The recorded table:
benchmarks/results/mutants.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("float32", "float64", "bfloat16", "float16")
ALL_DTYPES = DTYPES
KERNEL_BACKENDS = ("cpu", "cuda_host")  # what rules.h compiles into here: the CPU extension, the host-run CUDA bodies


class MutantError(Exception):
    pass


# ------------------------------------------------------------------------------------------------------------
# Edits
# ------------------------------------------------------------------------------------------------------------
Replacement = Union[str, Callable[[re.Match], str]]


@dataclasses.dataclass
class Edit:
    path: str
    alternatives: Sequence[Tuple[str, Replacement]]  # (regex, replacement), tried in order
    scope: Optional[str] = None  # regex for the region the edit must stay inside (DOTALL), matched once

    def apply(self, text: str, mutant: str) -> str:
        start, end = 0, len(text)
        if self.scope is not None:
            found = list(re.finditer(self.scope, text, re.S))
            if len(found) != 1:
                raise MutantError(f"mutant {mutant}: scope {self.scope!r} found {len(found)} times in {self.path} "
                                  f"(expected once)")
            start, end = found[0].span()
        region = text[start:end]
        for pattern, repl in self.alternatives:
            hits = list(re.finditer(pattern, region, re.M))
            if len(hits) == 1:
                if isinstance(repl, str):
                    new_region = region[:hits[0].start()] + hits[0].expand(repl) + region[hits[0].end():]
                else:
                    new_region = region[:hits[0].start()] + repl(hits[0]) + region[hits[0].end():]
                if new_region == region:
                    raise MutantError(f"mutant {mutant}: pattern {pattern!r} in {self.path} changes nothing")
                return text[:start] + new_region + text[end:]
            if len(hits) > 1:
                raise MutantError(f"mutant {mutant}: pattern {pattern!r} matches {len(hits)} times in {self.path}"
                                  f"{' (scope ' + repr(self.scope) + ')' if self.scope else ''}; expected once")
        raise MutantError(f"mutant {mutant}: pattern not found in {self.path}"
                          f"{' (scope ' + repr(self.scope) + ')' if self.scope else ''}: tried "
                          + " | ".join(repr(p) for p, _ in self.alternatives))


def rules_scope(function: str) -> str:
    """The body of a function template in rules.h: from its name to the closing brace at column 0."""
    return r"\b" + function + r"\(.*?\n}\n"


def scale_name_in_line(name: str, factor: str):
    """Replacement that multiplies every use of `name` in the matched line by `factor`."""
    return lambda m: re.sub(r"\b" + re.escape(name) + r"\b", f"({factor} * {name})", m.group(0))


RULES_H = "csrc/fusedopt/rules.h"


@dataclasses.dataclass
class Mutant:
    name: str
    claim: str  # what the bug breaks, in words
    edits: List[Edit]
    select: Callable[[str], bool]  # which test ids own the claim (run for this mutant)
    cells: List[Tuple[str, str]]  # (dtype, backend) cells it must be caught in; dtype/backend "-" = any
    cpu_sources: Tuple[str, ...] = ()  # CPU extension sources that use the mutated code (rebuilt)

    @property
    def needs_build(self) -> bool:
        return any(e.path.startswith("csrc/") for e in self.edits)


# ------------------------------------------------------------------------------------------------------------
# Which tests own which claim, and what a test id says about dtype and backend
# ------------------------------------------------------------------------------------------------------------
# The oracle tests of the update rules, per backend (their ids name rule / config and dtype; files that test
# one backend do not name it).
KERNEL_ORACLE_FILES = {
    "tests/test_parity.py::test_matches_oracle": "cpu",  # float32 / float64, 300 steps vs torch / lion-pytorch
    "tests/test_cuda_host.py::test_float32_matches_torch": "cuda_host",
    "tests/test_cuda_host.py::test_float64_matches_torch": "cuda_host",
    "tests/test_triton_backend.py::test_adamw_vs_torch": "triton",
    "tests/test_triton_backend.py::test_sgd_vs_torch": "triton",
    "tests/test_triton_backend.py::test_lion_vs_lion_pytorch": "triton",
    "tests/test_low_precision.py::test_each_step_is_the_float64_oracle_rounded": None,  # bf16 / fp16, id names it
}
BACKEND_OF_FILE = {"tests/test_parity.py": "cpu", "tests/test_cuda_host.py": "cuda_host",
                   "tests/test_triton_backend.py": "triton"}
BACKENDS = ("cpu", "cuda_host", "triton")


def id_parts(nodeid: str) -> Tuple[str, List[str]]:
    """(file::function, the '-'-separated parts of the parameter id)."""
    base, _, params = nodeid.partition("[")
    return base, [p for p in params.rstrip("]").split("-") if p]


def dtype_of(nodeid: str) -> str:
    base, parts = id_parts(nodeid)
    for d in DTYPES:
        if d in parts:
            return d
    for d in DTYPES:  # test_float32_matches_torch: the dtype is in the function's name
        if d in base.rpartition("::")[2].split("_"):
            return d
    return "-"


def backend_of(nodeid: str) -> str:
    base, parts = id_parts(nodeid)
    for b in BACKENDS:
        if b in parts:
            return b
    return BACKEND_OF_FILE.get(base.partition("::")[0], "-")


def rule_of(nodeid: str) -> Optional[str]:
    """adamw / adam (the AdamW kernel with L2 decay) / sgd / lion, from the id or the function name."""
    base, parts = id_parts(nodeid)
    words = set(parts) | set(base.rpartition("::")[2].split("_"))
    for p in parts:
        words |= set(p.split("-"))
    for rule in ("adamw", "adam", "sgd", "lion"):
        if rule in words:
            return rule
    return None


def kernel_tests(rules: Sequence[str], backends: Sequence[str], must_contain: Sequence[str] = ()):
    """The rule's oracle tests on the given backends, in every dtype; must_contain: words the id must have
    (e.g. nesterov: the configs that use the term)."""

    def select(nodeid: str) -> bool:
        base = nodeid.partition("[")[0]
        if base not in KERNEL_ORACLE_FILES or rule_of(nodeid) not in rules or backend_of(nodeid) not in backends:
            return False
        return all(word in nodeid for word in must_contain)

    return select


def tests_matching(*patterns: str):
    regexes = [re.compile(p) for p in patterns]
    return lambda nodeid: any(r.search(nodeid) for r in regexes)


def cells(backends: Sequence[str], dtypes: Sequence[str] = ALL_DTYPES) -> List[Tuple[str, str]]:
    return [(d, b) for d in dtypes for b in backends]


# ------------------------------------------------------------------------------------------------------------
# The mutants
# ------------------------------------------------------------------------------------------------------------
def _mutants() -> List[Mutant]:
    m: List[Mutant] = []
    # --- rules.h: the CPU kernels and the CUDA bodies (run on the host here) ---------------------------------
    adamw = dict(select=kernel_tests(["adamw", "adam"], KERNEL_BACKENDS), cells=cells(KERNEL_BACKENDS),
                 cpu_sources=("csrc/cpu/adamw.cpp",))
    m.append(Mutant("adamw_frozen", "AdamW moves the param (decay and step)", [
        Edit(RULES_H, [(r"\n[ \t]*p = p \* s\.decay;[^\n]*", "")], scope=rules_scope("adamw_update")),
        Edit(RULES_H, [(r"\n[ \t]*p = [^;]*\bs\.neg_step_size\b[^;]*;[^\n]*", "")],
             scope=rules_scope("adamw_update")),
    ], **adamw))
    m.append(Mutant("adamw_wd_sign", "AdamW decays by 1 - lr*wd, not 1 + lr*wd", [
        Edit(RULES_H, [(r"1\.0 - lr \* weight_decay", "1.0 + lr * weight_decay"),
                       (r"1\.0 - weight_decay \* lr", "1.0 + weight_decay * lr")],
             scope=rules_scope("make_adamw_scalars")),
    ], **adamw))
    m.append(Mutant("adamw_no_eps", "AdamW adds eps to the denominator", [
        Edit(RULES_H, [(r"(denom = [^;]*?)\s*\+\s*s\.eps\s*;", r"\1;"),
                       (r"fma_host_device\(([^;]*?), s\.eps\)", r"(\1)")],  # a fused form, if one appears
             scope=rules_scope("adamw_update")),
    ], **adamw))
    m.append(Mutant("lion_half_step", "Lion steps by lr * sign, not lr/2 * sign", [
        Edit(RULES_H, [(r"^[ \t]*p = [^;]*\bs\.neg_lr\b[^;]*;", scale_name_in_line("s.neg_lr", "T(0.5)"))],
             scope=rules_scope("lion_update")),
    ], select=kernel_tests(["lion"], KERNEL_BACKENDS), cells=cells(KERNEL_BACKENDS),
        cpu_sources=("csrc/cpu/lion.cpp",)))
    m.append(Mutant("sgd_nesterov_dropped", "SGD's Nesterov step uses g + momentum * buf", [
        Edit(RULES_H, [(r"g = s\.nesterov \? [^:;]+ : buf;", "g = s.nesterov ? g : buf;")],
             scope=rules_scope("sgd_update")),
    ], select=kernel_tests(["sgd"], KERNEL_BACKENDS, must_contain=["nesterov"]), cells=cells(KERNEL_BACKENDS),
        cpu_sources=("csrc/cpu/sgd.cpp",)))

    # --- the same bugs in the Triton kernels (run under the interpreter here) ---------------------------------
    tr = ("triton",)
    tr_adamw = dict(select=kernel_tests(["adamw", "adam"], tr), cells=cells(tr))
    m.append(Mutant("tr_adamw_frozen", "AdamW moves the param (Triton)", [
        Edit("fusedopt/triton/adamw.py", [(r"\n[ \t]*p = p \* decay\b[^\n]*", "")]),
        Edit("fusedopt/triton/adamw.py", [(r"\n[ \t]*p = [^\n]*\bneg_step_size\b[^\n]*", "")]),
    ], **tr_adamw))
    m.append(Mutant("tr_adamw_wd_sign", "AdamW decays by 1 - lr*wd (Triton)", [
        Edit("fusedopt/triton/adamw.py", [(r"1\.0 - lr_now \* wd_now", "1.0 + lr_now * wd_now"),
                                          (r"1\.0 - wd_now \* lr_now", "1.0 + wd_now * lr_now")]),
    ], **tr_adamw))
    m.append(Mutant("tr_adamw_no_eps", "AdamW adds eps to the denominator (Triton)", [
        Edit("fusedopt/triton/adamw.py", [(r"(denom = [^\n]*?)\s*\+\s*eps\b", r"\1"),
                                          (r"J\.fma\(([^\n]*?), eps\)", r"(\1)")]),
    ], **tr_adamw))
    m.append(Mutant("tr_lion_half_step", "Lion steps by lr * sign (Triton)", [
        Edit("fusedopt/triton/lion.py", [(r"^[ \t]*p = [^\n]*\bneg_lr\b[^\n]*", scale_name_in_line("neg_lr", "0.5"))]),
    ], select=kernel_tests(["lion"], tr), cells=cells(tr)))
    m.append(Mutant("tr_sgd_nesterov_dropped", "SGD's Nesterov step uses g + momentum * buf (Triton)", [
        Edit("fusedopt/triton/sgd.py", [(r"^([ \t]*)g = (?:g \+ momentum \* buf|J\.fma\(momentum, buf, g\))[ \t]*$",
                                         r"\1g = g")]),
    ], select=kernel_tests(["sgd"], tr, must_contain=["nesterov"]), cells=cells(tr)))

    # --- the small-state codec (issue 13): one spelling per backend ------------------------------------------
    # The tie rule (a value exactly between two map entries takes the smaller magnitude) and the rounding
    # counter are the subtle parts: the fused kernels are compared with the staged path (fusedopt.quantization,
    # searchsorted on the midpoints: independent of the kernels' encoders), with each other and with the
    # documented generator. The owner tests: the small-state files' tests of the backends that run here.
    small_state_tests = tests_matching(r"^tests/test_small_state\.py::", r"^tests/test_quantization\.py::",
                                       r"^tests/test_cuda_host\.py::test_small_state")
    cpu_kernels = ("csrc/cpu/adamw.cpp", "csrc/cpu/lion.cpp", "csrc/cpu/sgd.cpp")
    codec_h = "csrc/fusedopt/state_codec.h"
    m.append(Mutant("q8_tie_up", "a tie between two map entries encodes to the smaller magnitude (state_codec.h: "
                    "the CUDA bodies, the CPU's scalar encoder)", [
        Edit(codec_h, [(r"(const float up = a )>( \(k0 \+ 1\.0f\))", r"\1>=\2")],
             scope=r"\bencode_magnitude\(.*?\n}\n"),
    ], select=small_state_tests, cells=[("-", "cuda_host")], cpu_sources=cpu_kernels))
    m.append(Mutant("q8_avx2_tie_up", "the same tie rule in the CPU's AVX2 encoder (state_io.h)", [
        Edit("csrc/cpu/state_io.h", [(r"_mm256_cmp_ps\(a, mid, _CMP_GT_OQ\)", "_mm256_cmp_ps(a, mid, _CMP_GE_OQ)")],
             scope=r"struct Avx2Encoder \{.*?\n};\n"),
    ], select=small_state_tests, cells=[("-", "-")], cpu_sources=cpu_kernels))
    m.append(Mutant("tr_q8_tie_up", "the same tie rule in the Triton codec (fusedopt/triton/_codec.py)", [
        Edit("fusedopt/triton/_codec.py", [(r"up = tl\.where\(a > mid, ", "up = tl.where(a >= mid, ")]),
    ], select=small_state_tests, cells=[("-", "-")]))
    m.append(Mutant("sr_step_ignored", "stochastic rounding draws new bits every step (the step enters the "
                    "counter-based generator's key)", [
        Edit(codec_h, [(r"^([ \t]*)h = mix32\(h \^ static_cast<uint32_t>\(s\)\);", r"\1h = mix32(h);")],
             scope=r"\brounding_key\(.*?\n}\n"),
    ], select=small_state_tests, cells=[("-", "-")], cpu_sources=cpu_kernels))

    # --- schedules and the optimizer base (Python, every backend) ---------------------------------------------
    m.append(Mutant("warmup_cosine_shifted", "warmup_cosine is HF's get_cosine_schedule_with_warmup, step for step", [
        Edit("fusedopt/schedules.py", [(r"^([ \t]*)return ScheduleTable\((\w+), name=\"warmup_cosine\"\)",
                                        r'\1\2 = \2[1:] + \2[-1:]\n\1return ScheduleTable(\2, name="warmup_cosine")')],
             scope=r"\ndef warmup_cosine\(.*?\n(?=\S)"),
    ], select=tests_matching(r"^tests/test_schedules\.py::.*(warmup_cosine|hugging_face|hf)",
                             r"^tests/test_triton_backend\.py::test_optimizer_class_with_warmup_cosine_vs_lambdalr",
                             r"^tests/test_frameworks\.py::"),
        cells=[("-", "-")]))
    m.append(Mutant("counter_advances_on_skipped_step", "a step GradScaler skips (found_inf) does not advance the schedule", [
        Edit("fusedopt/optim/_schedule.py", [(r"stepped = \(found_inf\.to\(device\) == 0\)\.to\(torch\.int64\)",
                                              "stepped = torch.ones_like(found_inf.to(device), dtype=torch.int64)")]),
        Edit("fusedopt/optim/_schedule.py", [(r"skipped = bool\(found_inf\.item\(\)\)", "skipped = False")]),
    ], select=tests_matching(r"^tests/test_one_pass\.py::test_grad_scaler", r"^tests/test_readme_claims\.py::.*grad_scaler"),
        cells=[("-", "cpu"), ("-", "triton")]))
    m.append(Mutant("rejected_step_creates_state", "a step rejected for a bad grad modifies nothing", [
        Edit("fusedopt/optim/_base.py", [(r"batch\.states\.append\(state\)", "batch.states.append(self._ensure_state(p, group))")],
             scope=r"def _collect\(self\).*?\n    def "),
    ], select=tests_matching(r"^tests/test_bad_input\.py::test_one_bad_grad_changes_nothing",
                             r"^tests/test_bad_input\.py::test_bad_grad_in_fresh_optimizer_creates_no_state"),
        cells=[("-", "-")]))
    return m


MUTANTS = _mutants()


# ------------------------------------------------------------------------------------------------------------
# The scratch tree
# ------------------------------------------------------------------------------------------------------------
class Tree:
    """A copy of the worktree in which one mutant at a time is planted and removed."""

    def __init__(self, work: str, python: str, log):
        self.work = work
        self.dir = os.path.join(work, "tree")
        self.python = python
        self.log = log
        self.dirty_sources: set = set()  # CPU sources whose objects hold a mutant's code: rebuild on the next build
        self.built = False  # whether this copy's own build of _C exists (else the worktree's pristine build)
        files = subprocess.run(["git", "-C", ROOT, "ls-files", "-co", "--exclude-standard", "-z"],
                               capture_output=True, text=True, check=True).stdout.split("\0")
        for f in filter(None, files):
            src = os.path.join(ROOT, f)
            if os.path.isfile(src):
                dst = os.path.join(self.dir, f)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(src, dst)
        self._use_pristine_extension()

    def _use_pristine_extension(self):
        """The worktree's own build of fusedopt._C (the mutants that do not touch C++ use it unchanged)."""
        import glob

        built = glob.glob(os.path.join(ROOT, "fusedopt", "_C*.so"))
        if not built:
            raise MutantError("fusedopt._C is not built in the worktree: run `make build` (or setup.py build_ext "
                              "--inplace) first")
        for path in built + glob.glob(os.path.join(ROOT, "fusedopt", "_build_info.py")):
            shutil.copy2(path, os.path.join(self.dir, "fusedopt", os.path.basename(path)))

    def plant(self, mutant: Mutant) -> Dict[str, Tuple[str, os.stat_result]]:
        originals = {}
        for edit in mutant.edits:
            path = os.path.join(self.dir, edit.path)
            if edit.path not in originals:
                originals[edit.path] = (open(path).read(), os.stat(path))
            text = open(path).read()
            with open(path, "w") as f:
                f.write(edit.apply(text, mutant.name))
        return originals

    def restore(self, mutant: Mutant, originals):
        for rel, (text, st) in originals.items():
            path = os.path.join(self.dir, rel)
            with open(path, "w") as f:
                f.write(text)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        if mutant.needs_build:
            self.dirty_sources |= set(mutant.cpu_sources)

    def build(self, mutant: Mutant, originals) -> float:
        """Rebuild the CPU extension with the mutant. Incremental: the mutated header keeps its old mtime and
        only the sources that use the mutated function (mutant.cpu_sources), plus those still holding the
        previous mutant, are touched, so ninja recompiles those alone (the other objects are the unmutated
        code, byte for byte). The first build in the copy compiles everything."""
        for rel, (_, st) in originals.items():
            os.utime(os.path.join(self.dir, rel), ns=(st.st_atime_ns, st.st_mtime_ns))
        now = time.time()
        for rel in self.dirty_sources | set(mutant.cpu_sources):
            os.utime(os.path.join(self.dir, rel), (now, now))
        self.dirty_sources = set()
        t0 = time.time()
        env = dict(os.environ, FUSEDOPT_SKIP_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
        r = subprocess.run(["nice", self.python, "setup.py", "build_ext", "--inplace"], cwd=self.dir, env=env,
                           capture_output=True, text=True)
        self.log.write(f"\n===== build for {mutant.name}\n{r.stdout}\n{r.stderr}\n")
        if r.returncode:
            raise MutantError(f"mutant {mutant.name}: the CPU extension does not build (see the log):\n"
                              + r.stderr[-2000:])
        self.built = True
        return time.time() - t0

    def pytest(self, nodeids: Sequence[str], label: str) -> Tuple[set, str]:
        """Run the given tests; the set of failed (or errored) ids."""
        env = dict(os.environ, FUSEDOPT_HOSTSIM_CACHE=os.path.join(self.work, "hostsim"),
                   PYTHONDONTWRITEBYTECODE="1")
        env.pop("CI", None)
        listfile = os.path.join(self.work, f"ids-{label}.txt")
        with open(listfile, "w") as f:
            f.write("\n".join(nodeids) + "\n")
        cmd = ["nice", self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=line",
               "-o", "addopts=", *nodeids]
        r = subprocess.run(cmd, cwd=self.dir, env=env, capture_output=True, text=True)
        out = r.stdout + r.stderr
        self.log.write(f"\n===== pytest for {label} ({len(nodeids)} tests)\n{out}\n")
        failed = set(re.findall(r"^(?:FAILED|ERROR) (\S+?)(?: - .*)?$", out, re.M))
        if r.returncode not in (0, 1) or (r.returncode == 1 and not failed):
            raise MutantError(f"{label}: pytest exited {r.returncode} without a list of failures:\n{out[-3000:]}")
        return failed, out

    def collect(self, paths: Sequence[str]) -> List[str]:
        cmd = ["nice", self.python, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *paths]
        r = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True)
        if r.returncode:
            raise MutantError(f"test collection failed:\n{(r.stdout + r.stderr)[-3000:]}")
        return [line for line in r.stdout.splitlines() if "::" in line and not line.startswith(" ")]


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------
def short(nodeids: Sequence[str]) -> str:
    """The failing tests, grouped by test function: file::function[id | id]."""
    groups: Dict[str, List[str]] = {}
    for nodeid in sorted(nodeids):
        base, _, params = nodeid.removeprefix("tests/").partition("[")
        groups.setdefault(base, []).append(params.rstrip("]"))
    return ", ".join(base + (f"[{' | '.join(p)}]" if any(p) else "") for base, p in groups.items())


def check_patterns(chosen: Sequence[Mutant], tree: str) -> int:
    """Apply each mutant to the files of `tree` in memory and show what it changes (the kernels are being
    rewritten on other branches: every mutant must apply to each version)."""
    import difflib

    bad = 0
    for mu in chosen:
        texts: Dict[str, str] = {}
        try:
            for edit in mu.edits:
                if edit.path not in texts:
                    texts[edit.path] = open(os.path.join(tree, edit.path)).read()
                texts[edit.path] = edit.apply(texts[edit.path], mu.name)
        except MutantError as e:
            print(f"FAIL {e}")
            bad += 1
            continue
        print(f"ok   {mu.name}")
        for rel, text in texts.items():
            before = open(os.path.join(tree, rel)).read().splitlines()
            for line in difflib.unified_diff(before, text.splitlines(), rel, rel, n=0, lineterm=""):
                if not line.startswith(("---", "+++", "@@")):
                    print(f"       {line}")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--work", help="scratch folder (default: a new temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (not for the record)")
    ap.add_argument("--out", help="also write the table to this file (and the full log to FILE.log)")
    ap.add_argument("--check-patterns", metavar="TREE", nargs="?", const=ROOT,
                    help="only apply every chosen mutant's edits to the files of TREE (default: this worktree), "
                         "print the diff, run nothing")
    args = ap.parse_args(argv)

    chosen = MUTANTS
    if args.names:
        unknown = set(args.names) - {m.name for m in MUTANTS}
        if unknown:
            ap.error(f"unknown mutants: {sorted(unknown)}; --list shows them")
        chosen = [m for m in MUTANTS if m.name in args.names]
    if args.list:
        for mu in MUTANTS:
            print(f"{mu.name:34s} {', '.join(sorted({e.path for e in mu.edits})):40s} {mu.claim}")
            print(f"{'':34s} cells: {' '.join(f'{d}/{b}' for d, b in mu.cells)}")
        return 0
    if args.check_patterns:
        return check_patterns(chosen, args.check_patterns)
    # Python mutants and Triton first (they use the worktree's build of _C), the rules.h ones last (they
    # rebuild the copy's _C); within those, grouped by source so each rebuild recompiles as little as it can.
    chosen = sorted(chosen, key=lambda mu: (mu.needs_build, mu.cpu_sources))

    work = args.work or tempfile.mkdtemp(prefix="fusedopt-mutants-")
    os.makedirs(work, exist_ok=True)
    log_path = os.path.join(work, "mutants.log")
    t_start = time.time()
    problems: List[str] = []
    rows: List[Tuple[str, str, str, str]] = []
    with open(log_path, "w") as log:
        print(f"scratch tree and full log: {work} ({log_path})", flush=True)
        tree = Tree(work, args.python, log)
        # which files to collect: the test files any chosen mutant's selection can pick
        candidates = sorted({"tests/test_parity.py", "tests/test_cuda_host.py", "tests/test_triton_backend.py",
                             "tests/test_low_precision.py", "tests/test_schedules.py", "tests/test_frameworks.py",
                             "tests/test_one_pass.py", "tests/test_readme_claims.py", "tests/test_bad_input.py",
                             "tests/test_small_state.py", "tests/test_quantization.py"})
        all_ids = tree.collect(candidates)
        selections = {mu.name: [i for i in all_ids if mu.select(i)] for mu in chosen}
        for mu in chosen:
            if not selections[mu.name]:
                problems.append(f"mutant {mu.name}: no test selected")
        if not args.no_baseline:
            union = sorted({i for ids in selections.values() for i in ids})
            t0 = time.time()
            failed, _ = tree.pytest(union, "baseline")
            print(f"baseline (unmutated copy): {len(union)} tests, {len(failed)} failed, {time.time() - t0:.0f} s",
                  flush=True)
            for f in sorted(failed):
                problems.append(f"baseline: {f} fails without any mutant")
        for mu in chosen:
            t0 = time.time()
            try:
                originals = tree.plant(mu)
            except MutantError as e:
                problems.append(str(e))
                print(f"{mu.name}: {e}", flush=True)
                for d, b in mu.cells:
                    rows.append((mu.name, d, b, "NOT RUN (pattern not found)"))
                continue
            try:
                build_s = tree.build(mu, originals) if mu.needs_build else 0.0
                failed, _ = tree.pytest(selections[mu.name], mu.name)
            except MutantError as e:
                problems.append(str(e))
                print(str(e), flush=True)
                failed = None
            finally:
                tree.restore(mu, originals)
            for d, b in mu.cells:
                if failed is None:
                    rows.append((mu.name, d, b, "NOT RUN (error)"))
                    continue
                caught = sorted(f for f in failed if (d == "-" or dtype_of(f) == d) and (b == "-" or backend_of(f) == b))
                rows.append((mu.name, d, b, short(caught) if caught else "SURVIVED"))
            print(f"{mu.name}: {len(selections[mu.name])} tests, {0 if failed is None else len(failed)} failed "
                  f"({'build %.0f s, ' % build_s if mu.needs_build else ''}{time.time() - t0:.0f} s)", flush=True)

    width = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"fusedopt mutants ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{time.time() - t_start:.0f} s; each cell lists the owner tests that failed with the bug planted)",
             f"{'mutant':{width}s}  {'dtype':8s}  {'backend':9s}  caught by"]
    for name, d, b, caught in rows:
        lines.append(f"{name:{width}s}  {d:8s}  {b:9s}  {caught}")
    survivors = [r for r in rows if r[3] == "SURVIVED" or r[3].startswith("NOT RUN")]
    lines.append("")
    lines.append(f"{len(rows) - len(survivors)} of {len(rows)} cells caught; "
                 f"{len(survivors)} survived or not run; {len(problems)} problems")
    lines += [f"PROBLEM: {p}" for p in problems]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.out:
        shutil.copy(log_path, args.out + ".log")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if survivors or problems else 0


if __name__ == "__main__":
    sys.exit(main())
