# The two commands: `make run` (the service on SQLite) and `make test` (the whole suite).
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
export FLASK_APP := wsgi.py

.PHONY: run test bench bench-litellm mutate

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The gateway's packages and the embedded engine's (run as a process of its own).
$(VENV)/.runtime: requirements.txt engine/requirements.txt | $(BIN)/activate
	$(BIN)/pip install -q -r requirements.txt -r engine/requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt engine/requirements.txt bench/requirements.txt | $(BIN)/activate
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# A development .env with a fresh random SECRET_KEY, a free trial and the development outbox; never overwritten.
.env:
	sed -e "s/^SECRET_KEY=.*/SECRET_KEY=$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(32))')/" \
	    -e "s/^SIGNUP_CREDITS=.*/SIGNUP_CREDITS=1000/" -e "s/^DEV_OUTBOX=.*/DEV_OUTBOX=true/" .env.example > $@

# Another port: BIND=127.0.0.1:9000 (here, in the environment or in .env); links follow it.
run: $(VENV)/.runtime .env
	bin/run

# openai-node, for the client replay suite (tests/clients/), from the npm registry.
NODE_CLIENTS := tests/clients/node
$(NODE_CLIENTS)/node_modules/.package-lock.json: $(NODE_CLIENTS)/package.json $(NODE_CLIENTS)/package-lock.json
	npm ci --prefix $(NODE_CLIENTS) --no-audit --no-fund --loglevel=error

# axe-core, for the dashboard's accessibility check in Chromium (tests/test_browser.py).
BROWSER_CHECKS := tests/browser
$(BROWSER_CHECKS)/node_modules/.package-lock.json: $(BROWSER_CHECKS)/package.json $(BROWSER_CHECKS)/package-lock.json
	npm ci --prefix $(BROWSER_CHECKS) --no-audit --no-fund --loglevel=error

test: $(VENV)/.dev $(NODE_CLIENTS)/node_modules/.package-lock.json $(BROWSER_CHECKS)/node_modules/.package-lock.json
	$(BIN)/python -m pytest -n 3 --dist worksteal

# What the gateway adds on top of the upstream; needs PostgreSQL (BENCH_DATABASE_URL).
bench: $(VENV)/.dev
	$(BIN)/python -m bench.run

# LiteLLM's proxy, the benchmark's peer (bench/litellm.py), in a virtualenv of its own: it pins
# its own versions of libraries the app uses too. `make bench` includes it once this exists.
bench-litellm: .venv-litellm/bin/litellm
.venv-litellm/bin/litellm: bench/requirements-litellm.txt
	$(PYTHON) -m venv .venv-litellm
	.venv-litellm/bin/pip install -q -r bench/requirements-litellm.txt
	touch $@

# Mutation testing of the money modules (slow, not part of CI): mutmut breaks them on purpose,
# one small change at a time, and the tests must notice. Scores go to mutation/RESULTS.md.
# mutmut runs on SQLite, two mutants at a time; with TEST_DATABASE_URL set, each survivor then
# meets the PostgreSQL-only tests (locks, races) and the PostgreSQL side of the tests that reach
# its function, one at a time (mutation/postgresql.py).
mutate: $(VENV)/.dev
	$(BIN)/python -m mutation.state restore
	env -u TEST_DATABASE_URL $(BIN)/mutmut run --max-children 2
	$(BIN)/python -m mutation.state save
	$(if $(TEST_DATABASE_URL),$(BIN)/python -m mutation.postgresql)
	$(BIN)/python -m mutation.report $(if $(TEST_DATABASE_URL),PostgreSQL)
