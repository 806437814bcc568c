# make demo: run the shipped campaign end to end on an embedded SMTP server.
# make test: run the test suite.  Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test check preview bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dashboard]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mailer demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest

check: $(STAMP)
	$(BIN)/mailer check

preview: $(STAMP)
	$(BIN)/mailer preview --out preview-out

bench: $(STAMP)
	$(BIN)/python bench/micro.py
	$(BIN)/python bench/throughput.py

lint: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/ruff check mailer tests bench
	$(BIN)/ruff format --check mailer
	$(BIN)/mypy

clean:
	rm -rf $(VENV) demo-out preview-out .pytest_cache
