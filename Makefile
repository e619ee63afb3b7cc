# editlib — the two contract commands are `make reproduce` and `make test`.
PY ?= .venv/bin/python
PARAMS ?= params/tiny.yaml
TORCH_SPEC ?= torch==2.13.0
NUMERICS ?= auto

.PHONY: setup test reproduce lab tiny-world tiny-check clean

.venv/bin/python:
	python3 -m venv .venv
	.venv/bin/python -m pip install --quiet --upgrade pip
	.venv/bin/python -m pip install --quiet $(TORCH_SPEC)

# editlib and its extras, at the versions the committed figures were made with (constraints.txt);
# again whenever pyproject.toml or constraints.txt changes
.venv/.installed: .venv/bin/python pyproject.toml constraints.txt
	.venv/bin/python -m pip install --quiet -e ".[dev]" -c constraints.txt
	touch $@

setup: .venv/.installed

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

reproduce: setup
	HF_HUB_OFFLINE=1 $(PY) -m editlib reproduce --params $(PARAMS) --numerics $(NUMERICS)

# JupyterLab on the notebooks (offline; run their cells top to bottom, or use papermill via reproduce).
lab: setup
	HF_HUB_OFFLINE=1 $(PY) -m jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

# Rebuild the committed miniature (models/tiny-world) from its seed.
tiny-world: setup
	HF_HUB_OFFLINE=1 $(PY) -m editlib tiny-train --world 1000 --seed 0 --layers 6 --out models/tiny-world

tiny-check: setup
	HF_HUB_OFFLINE=1 $(PY) -m editlib tiny-check models/tiny-world

clean:
	rm -rf .venv runs .pytest_cache
