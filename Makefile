# Set-up and entry points.  `make demo` runs the main job, `make test` the test suite; each
# creates .venv and installs everything it needs on a fresh machine (no Hugging Face hub needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel from local disk here; GPU users: make TORCH='torch==X.Y.Z' (or pre-install their own build)
TORCH ?= torch==2.13.0
LOWBIT_DATA_DIR ?= $(abspath ../shared/data)
export LOWBIT_DATA_DIR

.PHONY: install demo test

$(BIN)/lowbit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(BIN)/lowbit

demo: install
	$(BIN)/lowbit info smollm2-135m
	$(BIN)/lowbit quantize smollm2-135m --recipe gptq-w4g64 --calib wikitext2 --nsamples 128 --seqlen 512 \
		--eval --max-windows 10 --out out/smollm2-135m-gptq-w4g64

test: install
	$(BIN)/python -m pytest -q
