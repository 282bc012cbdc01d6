VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench bench-search clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m tests.demo demo

bench: setup
	$(PY) -m benchmarks.ingest

bench-search: setup
	$(PY) -m benchmarks.search

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo
