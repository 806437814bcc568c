# make demo: run the shipped campaign end to end on an embedded SMTP server.
# make test: run the whole test suite (make test-fast: without the tests marked slow).
# make test-aiosmtplib-range: the transport tests with the lowest and highest aiosmtplib allowed.
# make lint: ruff check, ruff format --check and mypy --strict over mailer/, tests/ and bench/.
# make screenshot: regenerate the README's dashboard picture (needs chromium + chromium-driver).
# make mail-screenshots: regenerate tests/screenshots/mail-*.png, the shipped mails in Chromium.
# All create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
LINTED := mailer tests bench

.PHONY: demo test test-fast test-aiosmtplib-range screenshot mail-screenshots check preview bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dashboard]'
	touch $(STAMP)

$(DEV): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,dashboard,dev]'
	touch $(DEV)

demo: $(STAMP)
	$(BIN)/mailer demo --out demo-out

# pytest's addopts (pyproject.toml) include -rs: skipped tests are listed with their reason.
test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# tests/test_transport.py against the lowest and the highest aiosmtplib pyproject.toml allows
# (mailer.transport.protocol_wire uses its internals). Each version is installed alone
# (--no-deps) into a throwaway folder under AIOSMTPLIB_DIR, put first on PYTHONPATH; the rest
# comes from .venv. About 30 s; pip needs the package index (or its mirror) for the two wheels.
AIOSMTPLIB_DIR ?= /tmp/mailer-aiosmtplib-range
test-aiosmtplib-range: $(STAMP)
	@spec=$$($(BIN)/python -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(x for x in d if x.startswith("aiosmtplib")).replace(" ", ""))'); \
	low=$$(echo "$$spec" | sed -n 's/.*>=\([0-9.]*\).*/\1/p'); \
	test -n "$$low" || { echo "no >= floor in $$spec"; exit 1; }; \
	for req in "aiosmtplib==$$low" "$$spec"; do \
	  dir="$(AIOSMTPLIB_DIR)/$$(echo "$$req" | tr -c 'A-Za-z0-9.\n' '_')"; \
	  $(BIN)/pip install --quiet --no-deps --upgrade --target "$$dir" "$$req" || exit 1; \
	  ver=$$(PYTHONPATH="$$dir" $(BIN)/python -c 'import aiosmtplib; print(aiosmtplib.__version__)'); \
	  echo "== tests/test_transport.py with aiosmtplib $$ver (from $$req)"; \
	  PYTHONPATH="$$dir" $(BIN)/python -m pytest -p no:cacheprovider tests/test_transport.py || exit 1; \
	done

# The dashboard test writes its screenshot under tmp_path unless MAILER_SCREENSHOT names a file;
# CI=1 turns a missing browser into a failure instead of a skip.
screenshot: $(STAMP)
	CI=1 MAILER_SCREENSHOT=$(CURDIR)/tests/screenshots/dashboard.png \
	  $(BIN)/python -m pytest -q tests/test_dashboard.py -k test_event_page_answers_the_four_questions

# The shipped mails (invitation, reminder, update, cancel) at 375 and 1024 px in headless
# Chromium, into tests/screenshots/mail-<kind>-<width>.png (the README links them); the normal
# test run writes them under tmp_path instead.
mail-screenshots: $(STAMP)
	CI=1 MAILER_MAIL_SCREENSHOTS=$(CURDIR)/tests/screenshots \
	  $(BIN)/python -m pytest -q tests/test_mail_screenshots.py

check: $(STAMP)
	$(BIN)/mailer check

preview: $(STAMP)
	$(BIN)/mailer preview --out preview-out

bench: $(STAMP)
	$(BIN)/python bench/micro.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/web_answers.py
	$(BIN)/python bench/big_ledger.py
	$(BIN)/python bench/dashboard_pages.py --repeat 3
	$(BIN)/python bench/check_speed.py
	$(BIN)/python bench/daemon_idle.py --paced

lint: $(DEV)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy  # files and strictness: [tool.mypy] in pyproject.toml

clean:
	rm -rf $(VENV) demo-out preview-out .pytest_cache
