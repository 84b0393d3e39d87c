# Two commands on a fresh machine: `make demo` and `make test` (each sets everything up first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean system-deps cpp

# from Debian: a compiler and CMake (AOTInductor, torch.compile, and the C++ loader in cpp/ against the LibTorch
# inside the torch wheel), iproute2 (the Ray tests run the cluster in a network namespace of their own) and
# nghttp2-client (h2load: benchmarks/serving.py's gRPC load)
system-deps:
	@command -v cmake >/dev/null && command -v c++ >/dev/null && command -v ip >/dev/null && command -v h2load >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends cmake g++ make iproute2 nghttp2-client; }

cpp: $(STAMP) system-deps
	cmake -S cpp -B build/cpp -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DOpenVINO_DIR="$$($(BIN)/python -c 'import openvino, os; print(os.path.join(os.path.dirname(openvino.__file__), "cmake"))')"
	cmake --build build/cpp -j2

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch found locally; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP) system-deps
	$(BIN)/torchship demo

# two test processes (pytest-xdist): 10.5 min instead of 14.7 on 2 cores, measured in one fresh clone
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -n 2

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/optimize.py

clean:
	rm -rf $(VENV) demo-out torchship-bundle
