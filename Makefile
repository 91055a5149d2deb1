# The README's two commands: `make quickstart` (set up, then run the main job) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup quickstart test lint benchmark clean

setup: $(VENV)/.installed

# Re-install when the dependencies change; torch comes from the machine's local wheels when it has them.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# The main job: the quickstart search on the offline default (digits, ImageNet EfficientNet-Lite0 weights).
quickstart: setup
	$(BIN)/raytl search search_spaces/quickstart.yaml --output runs/quickstart --overwrite

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check raytl tests benchmarks
	$(BIN)/ruff format --check raytl tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf runs .pytest_cache
