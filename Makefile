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

.PHONY: install install-runtime test demo bench lint clean

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
	@$(UV) pip install -q --python $(BIN)/python pip -e .
	@touch $@

# ... plus the test extras (pytest, numpy, pandas, scikit-learn, Playwright, ...).
$(VENV)/.installed: $(VENV)/.installed-runtime
	@echo "installing the test extras into $(VENV) (uv pip install -e '.[test]')"
	@$(UV) pip install -q --python $(BIN)/python -e '.[test]'
	@touch $@

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install-runtime
	$(BIN)/python examples/demo.py

bench: install
	$(BIN)/python scripts/bench/store.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
