VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup system-deps test demo bench bench-search bench-match bench-kill bench-scan clean

setup: system-deps $(VENV)/.installed

# sox makes the real edits (speed, tempo, pitch, reverb) that the matching tests query with.
system-deps:
	@command -v sox >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq sox libsox-fmt-all >/dev/null; \
	  else echo "note: install sox (e.g. 'apt install sox libsox-fmt-all') to run the matching tests"; fi; }

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

# Matching benchmark: builds its test set once (needs sox, ffmpeg, espeak-ng, fluidsynth; see BENCHMARKS.md),
# then matches every query, beside audfprint when AUDFPRINT points at a checkout of dpwe/audfprint.
MATCHSET ?= build/matchset
AUDFPRINT ?=
AUDFPRINT_PY ?= python3
bench-match: setup
	@test -f $(MATCHSET)/manifest.json || $(PY) -m benchmarks.match build --out $(MATCHSET)
	$(PY) -m benchmarks.match run --set $(MATCHSET) $(if $(AUDFPRINT),--audfprint $(AUDFPRINT) --audfprint-python $(AUDFPRINT_PY))

bench-kill: setup
	$(PY) -m benchmarks.kill

# Scan benchmark: a generated 2-hour recording with 50 planted, edited library excerpts (needs sox, espeak-ng).
bench-scan: setup
	$(PY) -m benchmarks.scan

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo
