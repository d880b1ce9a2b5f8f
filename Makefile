# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv when it is missing. torch is pinned and installed first so that pip never
# pulls a multi-GB CUDA build on a CPU machine; on a GPU machine pass your own build, e.g.
#   make TORCH_SPEC="torch==2.13.0+cu126" demo     (or install torch into .venv yourself first).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffusekit-installed

.PHONY: demo test venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,mnist,photos,text,app]"
	@touch $(STAMP)

demo: venv
	$(PY) -m diffusekit demo --out runs/demo

# two pytest workers with one thread each: the suite's processes never fight over the cores
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

clean-venv:
	rm -rf $(VENV)
