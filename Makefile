# imtrial — developer entry points. `make demo` runs the main job on the bundled example;
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STUDY  ?= examples/amyloid_mri.imtrial
DEMO   ?= demo-out
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test test-fast sysdeps venv bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[cwl,docs,ops,test,usdm]'
	touch $@

venv: $(VENV)/.installed

# System tools the tests and documents use: graphviz (dot), poppler (pdftoppm), dicom3tools (dciodvfy).
sysdeps:
	@scripts/sysdeps.sh

demo: $(VENV)/.installed sysdeps
	@scripts/demo.sh $(STUDY) $(DEMO)

test: $(VENV)/.installed sysdeps
	$(PY) -m pytest -n 2 -q -p no:cacheprovider

test-fast: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q -m "not slow"

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(DEMO) build dist *.egg-info .pytest_cache
