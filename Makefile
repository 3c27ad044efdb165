# The two commands of the README: `make run` (install + the embedded default APO run) and
# `make test` (install + the test suite), both on the CPU stack. `make install-gpu`: the GPU stack instead.
# `make docs`: the documentation site (mkdocs.yml) into site/, strict: a warning or a broken link fails it.
# `make lint`: ruff's lint and format check (pyproject.toml [tool.ruff]); `make format` applies both.
PY := .venv/bin/python
ARGS ?=

.PHONY: install install-gpu run test test-fast docs lint format

install:
	bash scripts/install.sh cpu

install-gpu:
	bash scripts/install.sh gpu

run: install
	$(PY) -m apo_ray.train --config configs/default.yaml $(ARGS)

test: install
	$(PY) -m pytest -q -ra --timeout=900 --durations=30

test-fast: install
	$(PY) -m pytest -q -m "not integration"

docs: install
	$(PY) -m mkdocs build --strict --site-dir site

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The layout first (it wraps the long code lines the lint would refuse), then the lint's fixes (import order,
# pyupgrade), then the layout again over what they changed.
format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
