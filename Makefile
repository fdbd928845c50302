# Two commands on a fresh machine (after the Debian packages listed in README.md):
#   make run    sets up .venv with what the daemon needs and runs it (CONFIG=FILE for another
#               config than ./config.yaml)
#   make test   adds the test and benchmark tools and runs the linters and the whole default
#               test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
DEVELOPMENT := $(VENV)/.installed-development

.PHONY: run test test-slow lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME)

$(DEVELOPMENT): pyproject.toml $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(DEVELOPMENT)

run: $(RUNTIME)
	mkdir -p photos
	$(BIN)/photoscand run $(if $(CONFIG),--config '$(CONFIG)')

test: $(DEVELOPMENT)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

test-slow: $(DEVELOPMENT)
	$(BIN)/pytest -m slow

lint: $(DEVELOPMENT)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(DEVELOPMENT)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
