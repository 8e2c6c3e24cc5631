# `make demo` and `make test` do all set-up: a virtual environment in .venv, then the job.
# TORCH pins the PyTorch build (on the project's CI machine 2.13.0 is a local CPU wheel);
# override it, e.g. `make test TORCH=torch`, to use whatever your index serves.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
STUBS  := build/trt-stubs/tensorrt/__init__.pyi
TRT_STUBS ?= tensorrt-stubs==10.13.0.35.1
# tritonserver (2.51) with the Python backend, from PyPI. --no-deps: its Python API pins NumPy < 2
# and is not used; only the binary is (cvt_export/triton/server.py).
PYTRITON ?= nvidia-pytriton==0.7.0
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test test-full check lint regress docs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test,docs]"
	$(BIN)/python -m pip install -q --no-deps "$(PYTRITON)"
	rm -rf build/wheels
	$(BIN)/python -m pip download -q --no-deps "$(TRT_STUBS)" -d build/wheels
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/cvt-export variants
	$(BIN)/cvt-export predict --variant cvt-13 --weights random:0 --top 3
	$(BIN)/cvt-export onnx --variant cvt-13 --weights random:0 --precision fp32,fp16,int8 --out artifacts/cvt-13
	$(BIN)/cvt-bench --backend all --artifacts artifacts/cvt-13 --out artifacts/cvt-13/report

# TensorRT cannot be installed everywhere; its API stubs can. mypy checks backends/tensorrt.py
# against them (patched by scripts/trt_stubs.py; never installed into the venv). The wheel is
# fetched by the install step above, with everything else: `make test` itself downloads nothing
# (only a venv made before that step was added fetches it here, once).
$(STUBS): scripts/trt_stubs.py $(STAMP)
	ls build/wheels/tensorrt_stubs-*.whl >/dev/null 2>&1 || \
		$(BIN)/python -m pip download -q --no-deps "$(TRT_STUBS)" -d build/wheels
	$(BIN)/python scripts/trt_stubs.py build/wheels/tensorrt_stubs-*.whl build/trt-stubs

lint: $(STAMP) $(STUBS)
	$(BIN)/ruff check cvt_ref cvt_export tests scripts
	$(BIN)/mypy

# The CI tier, the README's test command (about 5 minutes of pytest here): lint, then every test
# not marked slow, and the 30 slowest tests so a CI log says where the time goes.
test: lint
	$(BIN)/python -m pytest -q -m "not slow" --durations=30 $(PYTEST_ARGS)

# Everything, slow tests included (full-size models, real tritonserver, tune, the regression
# matrix; 27-75 minutes here, by CPU). Run it before you stop.
test-full: lint
	$(BIN)/python -m pytest -q --durations=30 $(PYTEST_ARGS)

# The working loop (about 2 minutes here): the CI tier less the tests marked heavy (more than 5 s
# each, lighter tests of the same code stay), the commands called in the test's interpreter instead
# of a new one each (tests/helpers.py: run_cli), and the shared cvt-13 exports kept in
# build/test-exports and reused while nothing they were made from changed (tests/export_cache.py).
# CI's `make test` runs every command as its own process and always exports afresh.
check: lint
	CVT_TEST_CLI=in-process CVT_TEST_EXPORT_CACHE=$(CURDIR)/build/test-exports \
		$(BIN)/python -m pytest -q -m "not slow and not heavy" $(PYTEST_ARGS)

# The CI gate on exported artifacts: re-export cvt-13 (cached), re-run every available backend,
# compare with the committed baseline. `make regress REGRESS_ARGS=--update` rewrites it.
regress: $(STAMP)
	$(BIN)/cvt-bench regress --baseline reports/baseline/cvt-13.json --out artifacts/regress-report $(REGRESS_ARGS)

# The documentation site (docs/ and mkdocs.yml) into build/site, strict: a broken link, a missing
# page or a page left out of the navigation fails it.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
