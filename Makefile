# Moot: developer entry points. `make test` is what CI runs (.ci/run).

PYTHON      ?= python3
VENV        := .venv
STAMP       := $(VENV)/.installed
DATA_DIR    ?= moot-data
PYTEST_ARGS ?=

.PHONY: venv run test test-deps bench clean

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependency list changed since the last install.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

run: venv
	$(VENV)/bin/moot --data-dir $(DATA_DIR) run

test: venv test-deps
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Tests run against a real PostgreSQL server (tests/pgserver.py starts a
# throwaway one; its binaries live under /usr/lib/postgresql/<version>/bin),
# drive Debian's Chromium through Playwright (never `playwright install`), and
# check TURN credentials against a real coturn (tests/turnserver.py starts one).
test-deps:
	@missing=; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/turnserver ] || missing="$$missing coturn"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	  else echo "test-deps: missing$$missing; installing needs root (apt-get install$$missing)" >&2; exit 1; fi; \
	  echo "test-deps: installing$$missing"; \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

bench: venv test-deps
	@for script in bench/*.py; do \
	  case "$$(basename $$script)" in _*) continue;; esac; \
	  echo "== $$script"; \
	  $(VENV)/bin/python "$$script" --quick || exit 1; \
	done

# Leaves $(VENV) and $(DATA_DIR) alone: the data directory holds a node's users.
clean:
	rm -rf .pytest_cache test-artifacts bench/results *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
