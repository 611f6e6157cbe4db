# Two commands set everything up on a fresh CPU machine (Python 3.11):
#   make train   -> creates .venv on first use, then: python -m pipelines.train recsys=dare
#   make test    -> creates .venv on first use, then runs the whole test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
FBGEMM ?= fbgemm-gpu-cpu==1.8.0
ARGS   ?=

.PHONY: venv train test lint bench-dare clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/cpu.txt requirements/cpu-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/cpu.txt -c requirements/cpu-lock.txt $(FBGEMM)
	$(PY) -m pip install -q --no-deps torchrec==1.8.0
	$(PY) -m pip install -q --no-deps -e .
	touch $@

train: venv
	$(PY) -m pipelines.train recsys=dare $(ARGS)

test: venv
	$(PY) -m pytest tests -q $(ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench-dare: venv
	$(PY) -m benchmarks.dare_ml100k $(ARGS)

clean-venv:
	rm -rf $(VENV)
