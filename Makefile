# Quick start: `make run` trains the default job, `make test` runs the suite. Both install what they need once.
PY ?= python
NPROC ?= 4

.installed: setup.py
	@# torch only when missing: a user's own CUDA build is never replaced; the CPU release lies on local disk here
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	touch .installed

install: .installed

run: .installed
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc-per-node $(NPROC) launch/pretrain.py

demo: .installed
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc-per-node $(NPROC) launch/demo.py

test: .installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

.PHONY: install run demo test
