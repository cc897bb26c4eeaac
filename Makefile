# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a machine without CUDA, pin the CPU build of torch (a plain `pip install torch` pulls a multi-GB CUDA build).
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/nanomind: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

demo: $(BIN)/nanomind
	$(BIN)/nanomind demo $(ARGS)

test: $(BIN)/nanomind
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(ARGS)

lint: $(BIN)/nanomind
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(BIN)/nanomind
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/generate_speed.py
	$(BIN)/python benchmarks/prepare_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
