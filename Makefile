# make test   : create .venv (if absent) from requirements*.txt and run the test suite on the CPU
# make lint   : ruff lint and format check (configuration in pyproject.toml; `ruff format .` fixes the format)
# make demo   : synthetic CT -> preprocessing -> the whole IoU-interval grid at demo size -> table
# make bench  : run the benchmarks, results in benchmarks/results/
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test lint demo bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

demo: $(STAMP)
	WANDB_MODE=offline $(PY) reproduce_table.py --preset demo --output_dir demo_output

bench: $(STAMP)
	$(PY) benchmarks/bench_sampler.py
	$(PY) benchmarks/bench_preprocess.py
	$(PY) benchmarks/bench_metrics.py
	$(PY) benchmarks/bench_train.py --device cpu --quick

clean:
	rm -rf $(VENV) .pytest_cache
