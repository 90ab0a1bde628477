# The two commands: `make demo` and `make test`. Both create or reuse .venv and install what
# they need on a fresh machine (Python 3.11+, Java 17+, Maven).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EMBER := $(BIN)/ember
STAMP := $(VENV)/.installed
MODELS ?= models
TINY := $(MODELS)/tiny
PYTEST_ARGS ?=
# Which tests `make test` runs: all of them, the reliability suite's short form included
# (tests/reliability: faults, fuzz, load under real processes, ~4 min on its own broker).
# TEST_SELECT='-m "not reliability"' leaves it out; `make test-reliability` runs only it and
# `make reliability` its long form.
TEST_SELECT ?=

.PHONY: setup demo test test-reliability broker topics stop bench-decode clean-venv

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (found " + sys.version.split()[0] + ")")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

broker: setup
	$(EMBER) broker start

topics: broker
	$(EMBER) topics apply --model tiny

$(TINY)/config.json: $(STAMP)
	$(EMBER) make-model --size tiny $(TINY)

demo: topics $(TINY)/config.json
	$(EMBER) --log-level WARNING demo --model-dir $(TINY)

test: topics
	$(BIN)/python -m pytest -q $(TEST_SELECT) $(PYTEST_ARGS)

test-reliability: topics
	$(BIN)/python -m pytest -q -m reliability $(PYTEST_ARGS)

stop:
	-$(EMBER) broker stop

bench-decode: setup
	$(BIN)/python benchmarks/decode_throughput.py

clean-venv:
	rm -rf $(VENV)

# The reliability suite's long form (faults, fuzzed input, sustained load) as a table, also
# written to benchmarks/results/reliability.md. Runs its own broker; `make test-reliability`
# runs the short form.
.PHONY: reliability
reliability: setup
	$(BIN)/python benchmarks/reliability.py
