# Two commands on a fresh machine: `make demo` and `make test` (each sets everything up first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench bench-deps clean system-deps cpp constraints

APT = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends

# from Debian, before the venv: python3-venv (Debian's python3 makes no venv without it), a compiler and CMake
# (AOTInductor, torch.compile, and the C++ loader in cpp/ against the LibTorch inside the torch wheel) and iproute2
# (the Ray tests run the cluster in a network namespace of their own)
system-deps:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null && command -v cmake >/dev/null && command -v c++ >/dev/null \
	  && command -v ip >/dev/null || { $(APT) python3-venv cmake g++ make iproute2; }

# benchmark-only tools: nghttp2-client (h2load: benchmarks/serving.py's gRPC load)
bench-deps:
	@command -v h2load >/dev/null || { $(APT) nghttp2-client; }

cpp: $(STAMP) system-deps
	cmake -S cpp -B build/cpp -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DOpenVINO_DIR="$$($(BIN)/python -c 'import openvino, os; print(os.path.join(os.path.dirname(openvino.__file__), "cmake"))')"
	cmake --build build/cpp -j2

$(STAMP): pyproject.toml constraints.txt | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch found locally; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

# resolve every dependency afresh in a new venv, write what it got to constraints.txt, and run the suite on it
constraints: system-deps
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q --upgrade pip
	.venv-constraints/bin/python -m pip install -q torch==2.13.0
	.venv-constraints/bin/python -m pip install -q -e '.[all,dev]'
	{ echo "# The exact versions the test suite passed with (make constraints refreshes this file and runs the suite)."; \
	  echo "# make setup installs with -c constraints.txt, so the same commit resolves the same way on another day."; \
	  .venv-constraints/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; \
	} > constraints.txt
	.venv-constraints/bin/python -m pytest -q -n 2

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/torchship demo

# two test processes (pytest-xdist) on 2 cores: 8 min 45 s - 13 min 17 s quiet in eighteen fresh clones (tests/conftest.py keeps OpenMP's
# waiting threads from spinning on the other process's core); three processes were slower, and broke one worker's builds
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP) bench-deps
	$(BIN)/python benchmarks/optimize.py

clean:
	rm -rf $(VENV) .venv-constraints demo-out torchship-bundle
