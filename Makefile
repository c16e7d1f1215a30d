# The two commands a newcomer needs:  make run   and   make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ADDRPORT ?= 127.0.0.1:8000
STAMP := $(VENV)/.installed

.PHONY: install run test lint format browser bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -q -e '.[dev]'
	@touch $@

install: $(STAMP)

## run: install, migrate, create a first user, serve http://127.0.0.1:8000/ (SQLite, DEBUG on)
run: install
	DEBUG=1 $(BIN)/python manage.py migrate --noinput
	DEBUG=1 $(BIN)/python manage.py ensure_dev_user
	DEBUG=1 $(BIN)/python manage.py runserver $(ADDRPORT)

## test: install, make sure Chromium is there for browser tests, run the suite
test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

browser:
	@scripts/ensure-chromium

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/uv pip install --python $(BIN)/python -q -e '.[bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) staticfiles test-artifacts
