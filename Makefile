# make demo   -- set up .venv (first time only) and run the offline demo into $(WORKDIR)
# make test   -- set up .venv (first time only) and run the test suite
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/demo
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_STAMP := $(VENV)/.installed-torch
# PyTorch for the parity tests against the reference implementations (weight import) and
# the benchmarks' peers. 2.13.0 is the CPU wheel on the project's machines; set
# TORCH_SPEC= (empty) to skip it, or e.g. TORCH_SPEC='torch==2.9.1' elsewhere.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv clean-venv bench

venv: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

# Only the tests and benchmarks need PyTorch: make demo does not install it.
$(TORCH_STAMP): $(STAMP)
	$(if $(strip $(TORCH_SPEC)),$(PY) -m pip install -q '$(TORCH_SPEC)')
	@touch $(TORCH_STAMP)

demo: $(STAMP)
	$(PY) -m launch.run --config=configs/demo.py --workdir=$(WORKDIR)

test: $(TORCH_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

bench: $(TORCH_STAMP)
	$(PY) benchmarks/train_throughput.py

clean-venv:
	rm -rf $(VENV)
