# Two commands do all set-up on a fresh machine with Python 3.10+ (3.11+ for `make test`):
#   make demo   venv + install + the default DP training run on embedded synthetic data
#   make test   venv with every test extra + the whole suite
PYTHON ?= python3
VENV ?= .venv
TEST_VENV ?= .venv-test

.PHONY: demo test benchmark clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e .
	touch $@

$(TEST_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TEST_VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python scripts/train.py --config configs/dp_intents.py

# Two pytest workers (pytest-xdist): most tests are bound by XLA compilation, which runs on one
# core, so two workers on 2 cores took 14 min 51 s against 18 min 19 s in one process.
TEST_WORKERS ?= 2

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

benchmark: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python scripts/benchmark_dp.py

clean:
	rm -rf $(VENV) $(TEST_VENV) results
