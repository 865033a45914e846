# Quick start: `make run` trains the default job, `make test` runs the suite. Both install what they need once.
# Flags for the run go in ARGS:  make run ARGS="--resume"   make run ARGS="--run-dir runs/b --max-steps 50"
# `make dry-run ARGS=...` checks the same run for NPROC ranks without starting it.
PY ?= python
NPROC ?= 4
ARGS ?=

.installed: setup.py
	@# torch only when missing: a user's own CUDA build is never replaced; the CPU release lies on local disk here
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	touch .installed

install: .installed

run: .installed
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc-per-node $(NPROC) launch/pretrain.py $(ARGS)

dry-run: .installed
	OMP_NUM_THREADS=1 $(PY) launch/pretrain.py --dry-run --world-size $(NPROC) $(ARGS)

demo: .installed
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc-per-node $(NPROC) launch/demo.py

test: .installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

.PHONY: install run dry-run demo test
