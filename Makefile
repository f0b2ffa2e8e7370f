# One-command set-up and the project's main jobs. Every target creates the virtual environment at
# .venv on first use (installing torch==2.14.1/torchvision==0.29.1 when it has no torch) and reuses it.
#
#   make demo        sample an image with the default weights -> out/demo.png
#   make test        the test suite (what CI runs)
#   make bench-cpu   the CPU benchmark suite (not part of CI), results into bench/results/
#   make bench-table regenerate bench/RESULTS.md from the committed result files
#   make bench-gpu-dry-run  print the plan of bench/gpu_check.sh (the GPU check, one 10-minute device call)
#   make bench-gpu-rehearse run that check on this CPU at tiny shapes -> out/gpu-rehearsal
#   make image-build-check  build the extension against the GPU image's torch 2.11 / Triton 3.6 (not in CI)
#   make train-default  train the bundled default model from scratch (CPU, ~70 min) into wuerstchen_fast/weights/default
#   make eval-default   held-out accuracy table and sample grid of the default model
#   make build       (re)build the compiled extension in place
#   make wheel       build a wheel into dist/

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.14.1 torchvision==0.29.1
# Test dependencies (oracles and runners). Pinned: diffusers is the numerical oracle of the
# parity tests, and its deprecated Würstchen code is what we match.
TEST_DEPS := pytest==9.2.0 pytest-benchmark==5.3.1 pytest-timeout==2.4.0 diffusers==0.42.1 transformers==5.23.0 \
             build==1.6.1
# The Triton of the GPU machines' image, beside the pinned one: the ahead-of-time compile test builds every
# Triton kernel with both (tests/test_triton_build.py). Installed here, at set-up: tests never download.
IMAGE_TRITON := 3.6.0
IMAGE_TRITON_DIR := $(VENV)/alt/triton-$(IMAGE_TRITON)
PROMPT ?= a red circle on a blue background

.PHONY: demo test train-default eval-default bench-cpu bench-table bench-gpu-dry-run bench-gpu-rehearse \
        image-build-check build wheel venv clean

# The stamp is rebuilt when the build inputs change, which rebuilds the extension.
$(VENV)/.installed: setup.py pyproject.toml CMakeLists.txt csrc/sources.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp kernels/cuda/*.cu kernels/cuda/*.cuh)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel ninja
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	@command -v cmake >/dev/null || $(BIN)/python -m pip install -q cmake
	$(BIN)/python -m pip install -q $(TEST_DEPS)
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	@touch $@

$(IMAGE_TRITON_DIR)/.complete: $(VENV)/.installed
	rm -rf $(IMAGE_TRITON_DIR)
	$(BIN)/python -m pip install -q --no-deps --target $(IMAGE_TRITON_DIR) triton==$(IMAGE_TRITON)
	@touch $@

venv: $(VENV)/.installed $(IMAGE_TRITON_DIR)/.complete

demo: $(VENV)/.installed
	@mkdir -p out
	$(BIN)/python -m wuerstchen_fast.demo --out out/demo.png "$(PROMPT)"

test: $(VENV)/.installed $(IMAGE_TRITON_DIR)/.complete
	$(BIN)/python -m pytest -q

train-default: $(VENV)/.installed
	$(BIN)/python -m wuerstchen_fast.training.default_model

eval-default: $(VENV)/.installed
	$(BIN)/python -m wuerstchen_fast.training.evaluate_default

bench-cpu: $(VENV)/.installed
	PYTHON=$(BIN)/python bash bench/run_cpu.sh

bench-table: $(VENV)/.installed
	$(BIN)/python bench/make_table.py

bench-gpu-dry-run:
	bash bench/gpu_check.sh --dry-run --out out/gpu

bench-gpu-rehearse: $(VENV)/.installed
	bash bench/gpu_check.sh --rehearse --python $(BIN)/python --out out/gpu-rehearsal --wheels wheels

image-build-check: $(VENV)/.installed $(IMAGE_TRITON_DIR)/.complete
	bash bench/image_build_check.sh --python $(BIN)/python --triton $(IMAGE_TRITON)

build: $(VENV)/.installed
	$(BIN)/python setup.py -q build_ext --inplace

wheel: $(VENV)/.installed
	$(BIN)/python -m build --no-isolation --wheel

clean:
	rm -rf build dist *.egg-info wuerstchen_fast/_C*.so out
