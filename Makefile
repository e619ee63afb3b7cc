# editlib — the two contract commands are `make reproduce` and `make test`.
PY ?= .venv/bin/python
PARAMS ?= params/tiny.yaml
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test reproduce tiny-world tiny-check bench clean

.venv/bin/python:
	python3 -m venv .venv
	.venv/bin/python -m pip install --quiet --upgrade pip
	.venv/bin/python -m pip install --quiet $(TORCH_SPEC)
	.venv/bin/python -m pip install --quiet -e ".[dev]"

setup: .venv/bin/python

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

reproduce: setup
	HF_HUB_OFFLINE=1 $(PY) -m editlib reproduce --params $(PARAMS)

# Rebuild the committed miniature (models/tiny-world) from its seed.
tiny-world: setup
	HF_HUB_OFFLINE=1 $(PY) -m editlib tiny-train --world 1000 --seed 0 --layers 6 --out models/tiny-world

tiny-check: setup
	HF_HUB_OFFLINE=1 $(PY) -m editlib tiny-check models/tiny-world

clean:
	rm -rf .venv runs .pytest_cache
