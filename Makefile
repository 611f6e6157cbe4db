# Two commands set everything up on a fresh CPU machine (Python 3.11):
#   make train   -> creates .venv on first use, then: python -m pipelines.train recsys=dare
#   make test    -> creates .venv on first use, then runs every test but the CUDA-only ones
#   make unit    -> the fast unit loop (no subprocess pipelines, no multi-process runs)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
FBGEMM ?= fbgemm-gpu-cpu==1.8.0
ARGS   ?=

.PHONY: venv train test unit lint bench-dare clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/cpu.txt requirements/cpu-lock.txt
	@echo "[1/5] creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	@echo "[2/5] torch 2.13.0"
	$(PY) -m pip install torch==2.13.0
	@echo "[3/5] the pinned dependencies ($(FBGEMM), Lightning, Hydra, MLflow, polars, ...)"
	$(PY) -m pip install -r requirements/cpu.txt -c requirements/cpu-lock.txt $(FBGEMM)
	@echo "[4/5] torchrec 1.8.0 (--no-deps: its metadata would pull the CUDA fbgemm-gpu)"
	$(PY) -m pip install --no-deps torchrec==1.8.0
	@echo "      hydra-optuna-sweeper 1.3.0 (--no-deps: its metadata pins optuna<3; optuna 5 came with step 3)"
	$(PY) -m pip install --no-deps hydra-optuna-sweeper==1.3.0
	@echo "[5/5] this package, editable"
	$(PY) -m pip install --no-deps -e .
	touch $@
	@echo "ready: activate with 'source $(VENV)/bin/activate' (or call $(VENV)/bin/python)"

train: venv
	$(PY) -m pipelines.train recsys=dare $(ARGS)

# everything but the CUDA-only tests (tens of minutes on 2 CPU cores; see README)
test: venv
	$(PY) -m pytest tests -q -m "not gpu" -n 2 --dist loadfile $(ARGS)

# the fast unit loop: no subprocess pipelines, no multi-process runs
unit: venv
	$(PY) -m pytest tests -q -m "not slow and not e2e and not gpu" $(ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench-dare: venv
	$(PY) -m benchmarks.dare_ml100k $(ARGS)

clean-venv:
	rm -rf $(VENV)
