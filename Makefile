# make demo   -- set up .venv (first time only) and run the offline demo into $(WORKDIR)
# make test   -- set up .venv (first time only) and run the test suite
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/demo
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean-venv bench

venv: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.train --config=configs/demo.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: $(STAMP)
	$(PY) -m pip install -q 'torch==2.13.0'
	$(PY) benchmarks/train_throughput.py

clean-venv:
	rm -rf $(VENV)
