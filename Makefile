# rnnserve: `make demo` runs the main job, `make test` runs the test suite,
# `make lint` and `make typecheck` the checks CI runs before it (.ci/run).
# Both create .venv when it is missing and install the project into it.
# ORT=gpu installs onnxruntime-gpu instead of onnxruntime (never both).
PYTHON ?= python3
VENV   ?= .venv
ORT    ?= cpu
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(ORT)
EXTRAS := $(ORT),train,test,lint

.PHONY: install demo test lint typecheck protos bench quality clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ "$(ORT)" = gpu ]; then $(BIN)/pip uninstall -y -q onnxruntime || true; \
	 else $(BIN)/pip uninstall -y -q onnxruntime-gpu || true; fi
	$(BIN)/pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

# mypy over rnnserve/ and serve/ (= rnnserve.serve); see scripts/typecheck.py for why a script.
typecheck: install
	$(BIN)/python scripts/typecheck.py

protos: install
	$(BIN)/python scripts/gen_protos.py

bench: install
	$(BIN)/python -m bench.bench_latency
	$(BIN)/python -m bench.bench_server
	$(BIN)/python -m bench.bench_engine
	$(BIN)/python -m bench.bench_batching
	$(BIN)/python -m bench.bench_defaults
	$(BIN)/python -m bench.stream_threads
	$(BIN)/python -m bench.dataplane_steps
	$(BIN)/python -m bench.lone_runs
	$(BIN)/python -m bench.wide_runs
	$(BIN)/python -m bench.bench_statestore

quality: install
	$(BIN)/python -m bench.quality --corpus ../shared/data/tinyshakespeare.txt

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
