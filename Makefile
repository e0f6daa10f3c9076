# ptyl — two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint docs bench readme venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on this machine; a bare `torch` requirement would pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# every optional integration (their tests skip without them); naming torch again keeps pip from replacing it
	$(PY) -m pip install -q -e '.[test,hf,lightning,peft,docs]' torch==2.13.0
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ptyl demo --out demo-output

# the README's demo tables: run the full and the quick demo, embed the summary (tests/cli/test_demo.py checks it)
readme: $(STAMP)
	$(PY) scripts/readme_demo.py

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (rules and line length in pyproject.toml) and mypy on src/ (strictness and its per-module relaxations there)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts examples
	$(VENV)/bin/mypy

# the documentation site from the docstrings (mkdocs.yml); warnings are errors; nothing is published
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo-output site
