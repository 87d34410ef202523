# `make demo` and `make test` create/update .venv themselves, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test test-quick bench clean constraints tiny-base

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# No GPU: take the local CPU wheel of torch first so the pinned range never pulls a CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	bash scripts/demo.sh

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

test-quick: venv
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

clean:
	rm -rf runs .pytest_cache

# Rebuild assets/tiny_base, the tiny recipe's pretrained 1K-context base (about 25 minutes on 2 CPU cores; its
# TRAINING.json records the arguments, the passkey curve and the final accuracies at 256..8K).
TINY_BASE_ARGS ?= --steps 2800 --hidden 128 --layers 3 --heads 4 --kv-heads 4 --passkey-share 0.8 --noise-share 0.7 \
	--answer-only-loss --answer-weight 1.0 --curriculum 256,512,1024,1024 --tokens-per-step 4096 --lr 1e-3 --seed 0
tiny-base: venv
	$(PY) scripts/train_base.py --out assets/tiny_base $(TINY_BASE_ARGS) --threads 2

# Pin the cluster's nodes to the environment the tests passed in (see requirements/constraints-py311.txt).
constraints: venv
	{ sed -n '1,4p' requirements/constraints-py311.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^raylong' \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > requirements/constraints.tmp
	mv requirements/constraints.tmp requirements/constraints-py311.txt
