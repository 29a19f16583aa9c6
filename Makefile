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

.PHONY: demo test bench clean check-kernels test-aarch64 wheel-aarch64

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
	test_lowering.py test_layouts.py test_geometry.py test_ops.py test_reference.py test_relayout.py \
	test_kernel_max_pool.py test_kernel_operands.py test_int8_engine.py test_ordered_conv.py test_rms_norm.py) tests/nn/test_int8_layers.py
AVX2_ONLY := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEBIT_ISA=avx2

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest
	@if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then \
	  echo "# the numerics-sensitive tests again, torch and onebit forced to AVX2 ($(AVX2_ONLY))"; \
	  $(AVX2_ONLY) $(PY) -m pytest -q $(NUMERICS_TESTS); \
	fi
	$(MAKE) --no-print-directory check-kernels

# The C++ kernels on their own: tests/native/check_kernels.cpp checks every ISA x tile this CPU
# runs against plain-loop references on COUNT random shapes drawn from SEED.
SEED ?= 1
COUNT ?= 300
KERNEL_SOURCES := $(wildcard csrc/kernels/*) $(wildcard tests/native/*)
build/check_kernels: $(KERNEL_SOURCES)
	@mkdir -p build
	tests/native/build.sh $@ c++
check-kernels: build/check_kernels
	build/check_kernels --seed $(SEED) --count $(COUNT)

# The same on 64-bit ARM, emulated: cross-compiled (static) and run under qemu on a core without
# dotprod (cortex-a53: the neon ISA; SDOT would be SIGILL), one with it (neoverse-n1: neon_dotprod)
# and every feature qemu has (max). Installs Debian's cross compiler and qemu when they are missing.
AARCH64_CXX := aarch64-linux-gnu-g++
AARCH64_CPUS := cortex-a53 neoverse-n1 max
build/check_kernels_aarch64: $(KERNEL_SOURCES)
	@command -v $(AARCH64_CXX) >/dev/null && command -v qemu-aarch64-static >/dev/null || tools/install_aarch64_tools.sh
	@mkdir -p build
	tests/native/build.sh $@ $(AARCH64_CXX) -static
test-aarch64: build/check_kernels_aarch64
	@command -v qemu-aarch64-static >/dev/null || tools/install_aarch64_tools.sh
	@for cpu in $(AARCH64_CPUS); do \
	  echo "# qemu-aarch64-static -cpu $$cpu"; \
	  qemu-aarch64-static -cpu $$cpu build/check_kernels_aarch64 --seed $(SEED) --count $(COUNT) || exit 1; \
	done

# A linux_aarch64 wheel, cross-built into build/wheelhouse, and its extension loaded and run by an
# arm64 CPython under qemu (tools/wheel_aarch64.sh).
wheel-aarch64: $(PY)
	$(PY) -m pip install -q -c constraints.txt scikit-build-core nanobind
	tools/wheel_aarch64.sh $(PY) build/wheelhouse

bench: $(STAMP)
	$(PY) -m onebit bench

clean:
	rm -rf build runs $(VENV)
