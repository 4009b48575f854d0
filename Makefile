# Conveyor: the README's commands call these targets.
#
# `make demo` installs only what the demo needs (the project and its dependencies);
# `make test` adds the test extras to the same .venv. Both install with uv: the uv on
# PATH if there is one, else uv bootstrapped into .venv by pip (uv is a dependency).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# The uv that installs into .venv (shell code): the one in it if any, else the one on PATH.
UV := $$([ -x $(BIN)/uv ] && echo $(BIN)/uv || command -v uv)

.PHONY: install install-runtime bytecode test demo bench lint clean

install: $(VENV)/.installed

install-runtime: $(VENV)/.installed-runtime

# .venv with the project and its runtime dependencies (what `make demo` needs).
$(VENV)/.installed-runtime: pyproject.toml
	@if [ -x $(BIN)/python ]; then :; \
	elif command -v uv >/dev/null; then \
	  uv venv -q --python $(PYTHON) $(VENV); \
	else \
	  $(PYTHON) -m venv --without-pip $(VENV) && \
	  { $(PYTHON) -m pip --python $(BIN)/python install -q uv 2>/dev/null || \
	    { $(BIN)/python -m ensurepip -q && $(BIN)/python -m pip install -q uv; }; }; \
	fi
	@echo "installing conveyor into $(VENV) (uv pip install -e .)"
	@$(UV) pip install -q --compile-bytecode --python $(BIN)/python pip -e .
	@touch $@

# ... plus the test extras (pytest, numpy, pandas, scikit-learn, Playwright, ...).
$(VENV)/.installed: $(VENV)/.installed-runtime
	@echo "installing the test extras into $(VENV) (uv pip install -e '.[test]')"
	@$(UV) pip install -q --compile-bytecode --python $(BIN)/python -e '.[test]'
	@touch $@

test: install bytecode
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install-runtime bytecode
	$(BIN)/python examples/demo.py

# Bytecode of the project's own packages (the installs above compile the dependencies'):
# every process that starts cold -- a step without a fork server, an agent, the CLI --
# then loads it instead of compiling, also where the tree is read-only to it or
# PYTHONDONTWRITEBYTECODE is set. Only changed files are compiled again.
bytecode: install-runtime
	@$(BIN)/python -m compileall -q controller agent

bench: install
	$(BIN)/python scripts/bench/store.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
