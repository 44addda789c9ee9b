# The two commands of the README:
#   make demo   set up .venv (torch 2.14.1 + fusedopt with its compiled kernels), then train a small model with
#               FusedAdamW + warmup_cosine beside torch.optim.AdamW + LambdaLR
#   make test   the same set-up, then the whole test suite (what CI runs, through .ci/run)
# Other targets: make build (recompile the extension), make bench (CPU benchmark), make clean.
#   make mutants    plant a fixed list of realistic bugs (rules.h, the Triton kernels, schedules, the optimizer
#                   base) one at a time in a scratch copy, rebuild, run the tests that own each claim, print
#                   mutant x dtype x backend -> the tests that caught it / SURVIVED; non-zero exit on a survivor
#                   (tools/mutants.py; ~75 min on 2 shared cores, not part of make test). MUTANTS_ARGS="adamw_no_eps"
#                   runs only the named ones; the table also goes to $(MUTANTS_OUT)
#   make gpu-check  on a machine with a CUDA GPU, in under 8 minutes: build for that GPU against the installed
#                   torch (no venv), pytest -m gpu, compute-sanitizer, the GPU benchmark headline; results in
#                   benchmarks/results/<date>-<gpu>/ (tools/gpu_check.py; without a GPU: one line, exit 2);
#                   GPU_CHECK_ARGS="--copy-to DIR" also copies them into DIR

# bash for `set -o pipefail` in the build recipe
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.14.1
# Parallel compile jobs for the extension (ninja); the CI machine has 2 cores.
MAX_JOBS ?= 2
export MAX_JOBS

SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test build bench clean venv gpu-check mutants

venv: $(VENV)/.deps
$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet "torch==$(TORCH_VERSION)" ninja numpy
	$(PIP) install --quiet "torch==$(TORCH_VERSION)" pytest pytest-timeout expecttest lion-pytorch scikit-learn matplotlib \
		transformers==5.23.0 accelerate==1.15.0 pytorch-lightning==2.6.6
	touch $@

# Builds fusedopt._C (CPU) and, when torch has CUDA and a toolkit is found, fusedopt._cuda. pip shows a build's
# output only with -v: the whole of it goes to $(BUILD_LOG), and setup.py's "[fusedopt build]" lines (which
# backends are built, why CUDA was skipped) are echoed as they come, once each (pip runs setup.py twice: for
# the metadata, then for the build); on failure the log's tail is printed.
BUILD_LOG := build/pip-install.log
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	@mkdir -p build
	@echo "$(PIP) install -v --no-build-isolation --no-deps -e .  (full output: $(BUILD_LOG))"
	@set -o pipefail; $(PIP) install -v --no-build-isolation --no-deps -e . 2>&1 | tee $(BUILD_LOG) \
		| { grep --line-buffered -o '\[fusedopt build\].*' | awk '!seen[$$0]++ { print; fflush() }' || true; } \
		|| { tail -n 60 $(BUILD_LOG); echo "fusedopt build failed; full output: $(BUILD_LOG)"; exit 1; }
	$(PY) -c "import fusedopt, fusedopt.backends as b; print('fusedopt backends:', {k: v[0] for k, v in b.available().items()})"
	touch $@

build: $(VENV)/.built

demo: $(VENV)/.built
	$(PY) -m fusedopt.demo

test: $(VENV)/.built
	$(PY) -m pytest tests -q --timeout=900

bench: $(VENV)/.built
	$(PY) -m fusedopt.bench --quick

MUTANTS_OUT ?= benchmarks/results/mutants.txt
mutants: $(VENV)/.built
	$(PY) tools/mutants.py --python $(PY) --out $(MUTANTS_OUT) $(MUTANTS_ARGS)

gpu-check:
	$(PYTHON) tools/gpu_check.py --python $(PYTHON) --jobs $$(nproc) $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist *.egg-info fusedopt/*.so $(VENV)
