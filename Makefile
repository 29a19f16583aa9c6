# The two commands: `make demo` and `make test`. Both create .venv when missing
# and (re)install onebit into it when its sources changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.onebit-installed
NATIVE_SOURCES := pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(NATIVE_SOURCES)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 scikit-build-core==1.1.2 nanobind==3.1.0
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m onebit demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m onebit bench

clean:
	rm -rf build runs $(VENV)
