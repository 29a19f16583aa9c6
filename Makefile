# The two commands: `make demo` and `make test`. Both create .venv when missing
# and (re)install onebit into it when its sources changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.onebit-installed
NATIVE_SOURCES := pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
# the editable install maps every Python module to its file: a module added, moved or removed
# (which changes its directory) needs a new install
PACKAGE_DIRS := $(shell find src/onebit -type d -not -name __pycache__ 2>/dev/null)

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# pyproject.toml declares ranges; constraints.txt pins the exact versions installed here (torch==2.13.0)
$(STAMP): $(PY) constraints.txt $(NATIVE_SOURCES) $(PACKAGE_DIRS)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch scikit-build-core nanobind
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e '.[test,onnx,tensorboard,hub]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m onebit demo --out runs/demo

# The tests whose numbers depend on the CPU's vector ISA (torch's and onebit's), run a second
# time with both forced to AVX2: what an AVX2-only machine computes, caught on any x86 machine.
NUMERICS_TESTS := tests/nn/test_nn.py tests/nn/test_lowbit.py tests/canonize/test_thresholds.py tests/canonize/test_canonize.py \
	tests/models/test_models.py $(addprefix tests/engine/,test_engine.py test_engine_fallbacks.py test_kernels.py \
	test_torch_rounding.py test_bitplanes.py test_graph.py test_fuse.py test_fuse_thresholds.py test_packed.py \
	test_lowering.py test_layouts.py test_geometry.py test_ops.py test_reference.py test_relayout.py)
AVX2_ONLY := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEBIT_ISA=avx2

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest
	@if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then \
	  echo "# the numerics-sensitive tests again, torch and onebit forced to AVX2 ($(AVX2_ONLY))"; \
	  $(AVX2_ONLY) $(PY) -m pytest -q $(NUMERICS_TESTS); \
	fi

bench: $(STAMP)
	$(PY) -m onebit bench

clean:
	rm -rf build runs $(VENV)
