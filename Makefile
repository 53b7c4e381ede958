# make venv | demo | test | test-slow | clean-venv
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

.PHONY: venv demo test test-slow clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade-strategy only-if-needed '$(TORCH)' 'setuptools>=70.1' wheel
	$(PY) -m pip install --upgrade-strategy only-if-needed --no-build-isolation -e '.[test]'
	$(PY) -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
	touch $@

demo: venv
	$(PY) -m examples.demo $(ARGS)

test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(ARGS)

# Only the tests marked slow (the default run deselects them); exit 5 = none collected yet.
test-slow: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m slow $(ARGS); rc=$$?; test $$rc -eq 0 -o $$rc -eq 5

clean-venv:
	rm -rf $(VENV)
