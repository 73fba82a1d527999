# One command installs everything for development and runs the tests: `make test`.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup test lint quickstart
setup:
	./scripts/setup.sh

test: setup lint
	NVL_STRICT_PLUGINS=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

quickstart: setup
	$(VENV)/bin/nvl quickstart --workdir nvl-quickstart --overwrite
