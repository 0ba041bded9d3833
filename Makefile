# crashbench: `make demo` and `make test` do all the set-up on a fresh machine.
PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test lint format deps sysdeps venv clean bench

demo: $(STAMP)
	$(VPY) -m harness.cli run --schemes orthros,warmcache,reboot --workload files --fault panic --trials 3

test: $(STAMP)
	$(VPY) -m pytest -q

# ruff, configured in pyproject.toml: the checks, and that the tree is formatted
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(VPY) -m harness.cli bench fs

sysdeps:
	@sh scripts/install-system-packages.sh

$(VENV)/bin/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): pyproject.toml scripts/install-system-packages.sh | $(VENV)/bin/python
	@sh scripts/install-system-packages.sh
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
