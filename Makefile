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

.PHONY: test serve install model bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: the CPU wheel on local disk. Anything installed later that asks for torch finds it
# satisfied, so no install ever pulls a multi-GB CUDA build. pip's cache keeps the built llama-cpp-python wheel.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Assemble the default model once into the user cache dir (a no-op when it is there).
model: $(STAMP)
	$(VENV)/bin/gemma-sessions model fetch $(MODEL)

test: model
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job: the OpenAI-compatible server on the default model and store (STORE=dir to choose another).
serve: model
	$(VENV)/bin/gemma-sessions serve --model $(MODEL) --host $(HOST) --port $(PORT) $(if $(STORE),--store $(STORE),)

bench: model
	$(PY) bench/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
