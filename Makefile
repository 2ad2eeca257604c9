# Two entry points: `make demo` and `make test`. Both create .venv, install the project, then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU wheel that these machines carry; only used when no torch is importable at all.
TORCH_FALLBACK ?= torch==2.13.0

.PHONY: setup demo test unit system-deps bench clean

setup: $(STAMP)

$(STAMP): setup.py
	bash scripts/system-deps.sh
	bash scripts/make-venv.sh "$(VENV)" "$(TORCH_FALLBACK)"
	touch $@

demo: setup
	$(PY) -m scripts.demo

test: setup
	$(PY) -m pytest tests -ra $(PYTEST_ARGS)

# the in-process tests alone (tests/unit): a few minutes
unit: setup
	$(PY) -m pytest tests/unit -ra $(PYTEST_ARGS)

# the benches run as modules from the root: python -m bench.NAME (bench/__init__.py lists them)
bench: setup
	$(PY) -m bench.train_step $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
