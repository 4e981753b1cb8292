# The README's two commands, `make demo` and `make test`, do all set-up themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint docs clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes, so `make test` stays quick once set up.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests
	site=$$(mktemp -d) && $(MAKE) --no-print-directory docs SITE_DIR=$$site; \
	status=$$?; rm -rf $$site; exit $$status

# The documentation site (mkdocs.yml, docs/): --strict fails on any warning (a broken link,
# nav entry or API reference; never add --quiet: it hides warnings from --strict too);
# `make test` builds it into a temporary folder.
SITE_DIR ?= site
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(SITE_DIR)

demo: setup
	$(BIN)/python -m entityseg.demo experiment=demo

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) outputs data/synthetic .pytest_cache site
