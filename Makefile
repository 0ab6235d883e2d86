# The two commands a newcomer needs: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= .run
STAMP := $(VENV)/.installed-$(shell cat setup.cfg setup.py | cksum | cut -d' ' -f1)

.PHONY: run test check machine bench lint clean

$(STAMP): setup.cfg setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

## run: install into .venv and start the agent on its defaults (a token is made in .run/token when none is set;
## as non-root the state dir defaults to .run/state, since /var/lib is root's, and network isolation is off,
## since firewall rules are root's). The agent itself says
## "listening" once its configuration passed and the port is bound; `utopia-agent check` and `gpus` run
## from this checkout find the same token and state dir.
run: $(STAMP)
	@mkdir -p $(RUN_DIR)
	@if [ -z "$$UTOPIA_AGENT_TOKEN" ] && [ -z "$$UTOPIA_AGENT_TOKEN_FILE" ] && [ ! -s $(RUN_DIR)/token ]; then \
		umask 077; $(PY) -c 'import secrets; print(secrets.token_urlsafe(32))' > $(RUN_DIR)/token; fi
	@export UTOPIA_AGENT_TOKEN_FILE="$${UTOPIA_AGENT_TOKEN_FILE:-$$( [ -z "$$UTOPIA_AGENT_TOKEN" ] && echo $(CURDIR)/$(RUN_DIR)/token )}"; \
		[ -n "$$UTOPIA_AGENT_TOKEN_FILE" ] || unset UTOPIA_AGENT_TOKEN_FILE; \
		[ "$$(id -u)" = 0 ] || export UTOPIA_AGENT_STATE_DIR="$${UTOPIA_AGENT_STATE_DIR:-$(CURDIR)/$(RUN_DIR)/state}"; \
		[ "$$(id -u)" = 0 ] || export UTOPIA_AGENT_NETWORK_ISOLATION="$${UTOPIA_AGENT_NETWORK_ISOLATION:-off}"; \
		exec $(VENV)/bin/gunicorn -c gunicorn.conf.py wsgi:app

## test: prepare the machine (as root: Debian packages, dockerd with the stand-in NVIDIA hook),
## install what the tests need and run them against the real engine
test: machine $(STAMP)
	$(PY) -m pytest

## check: the edit loop: the tests that need no engine (seconds, on two processes) and the lint (ruff.toml).
## pytest keeps its rewritten test modules as bytecode even where PYTHONDONTWRITEBYTECODE is set: rewriting
## them all again is 3 of the loop's seconds (each of the two processes collects).
check: $(STAMP)
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -m "not docker" -n 2
	$(PY) -m ruff check utopia_agent tests benchmarks wsgi.py gunicorn.conf.py

machine:
	@tests/support/prepare-machine

## bench: measure the agent against the engine's own calls (prints ratios, writes JSON)
bench: $(STAMP)
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) $(RUN_DIR) build *.egg-info
