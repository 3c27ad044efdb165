# The two commands of the README: `make run` (install + the embedded default APO run) and
# `make test` (install + the test suite).
PY := .venv/bin/python
ARGS ?=

.PHONY: install run test test-fast

install:
	bash scripts/install.sh

run: install
	$(PY) -m apo_ray.train --config configs/default.yaml $(ARGS)

test: install
	$(PY) -m pytest -q -ra --timeout=900

test-fast: install
	$(PY) -m pytest -q -m "not integration"
