VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup system-deps test demo bench bench-search bench-match bench-kill bench-dupes bench-scan bench-serve clean

setup: system-deps $(VENV)/.installed

# sox makes the real edits (speed, tempo, pitch, reverb) that the matching tests query with;
# Debian's chromium is the browser the serve page's tests drive (through Playwright, never its own download).
system-deps:
	@command -v sox >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sox libsox-fmt-all chromium >/dev/null; \
	  else echo "note: install sox and chromium (e.g. 'apt install sox libsox-fmt-all chromium') to run the matching and browser tests"; fi; }

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

# Duplicate report: a generated library with planted copies (fingerprints only, no model); HOURS=100 for more.
HOURS ?= 10
bench-dupes: setup
	$(PY) -m benchmarks.dupes --hours $(HOURS)

# Scan benchmark: a generated 2-hour recording with 50 planted, edited library excerpts (needs sox, espeak-ng).
bench-scan: setup
	$(PY) -m benchmarks.scan

# Serving benchmark: requests/s and p50/p99 latency of POST /api/query at 1 and 20 clients, small and full-size AST.
bench-serve: setup
	$(PY) -m benchmarks.serve

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo
