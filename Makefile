# One command installs everything for development and runs the tests: `make test`.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup test quickstart
setup:
	./scripts/setup.sh

test: setup
	NVL_STRICT_PLUGINS=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

quickstart: setup
	$(VENV)/bin/nvl quickstart --workdir nvl-quickstart --overwrite
