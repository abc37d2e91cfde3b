# Two commands that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint format clean bench-env lock

# constraints.txt pins every package to the versions experiments/*/results were made with, so a
# fresh machine months later installs the same set (`make lock` rewrites it from .venv).
$(BIN)/.installed: pyproject.toml constraints.txt reference-packages.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so the CPU wheel on this machine's find-links is used, not a CUDA one.
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# Parity references whose version pins conflict with ours (see the file): no dependency resolution.
	$(BIN)/pip install -q --no-deps -r reference-packages.txt
	touch $@

# The flagship: the tiny Gemma 2 JPN language-error fix (recipes/jpn_language_fix_tiny.yaml),
# its table printed and experiments/jpn_language_fix/results.md updated for seed $(SEED).
SEED ?= 0
demo: $(BIN)/.installed
	$(BIN)/python experiments/jpn_language_fix/run.py --seeds $(SEED)

lock: $(BIN)/.installed
	# Local version labels (+cpu) dropped: ==2.13.0 matches the CPU wheel and the plain one.
	$(BIN)/pip freeze --exclude-editable | sed -E 's/\+[a-z0-9.]+$$//' \
		| grep -v -i -x -F -f reference-packages.txt > constraints.txt

test: $(BIN)/.installed
	# Two workers (one per core here); a test file stays on one worker, so its module fixtures
	# (the quickstart's run, trained tokenizers) are built once. --no-loadscope-reorder keeps
	# conftest's longest-first order (xdist would hand out the files with most tests first and
	# start the one-test flagship recipe last).
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q --durations=15 \
		-n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV)

# Benchmarks against Google's Tunix need google-tunix, whose pins differ from the test extra's.
bench-env: .venv-bench/.installed
.venv-bench/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q torch==2.13.0
	.venv-bench/bin/pip install -q -e . google-tunix==0.1.7 trl
	touch $@
