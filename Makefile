# `make run` and `make test` work in a fresh clone: each first builds .venv with what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= ROMEO:

.PHONY: run test install clean

$(BIN)/kvgen: pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-ci.txt
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/kvgen

install: $(BIN)/kvgen

run: install
	$(BIN)/kvgen generate --prompt "$(PROMPT)" --max-new-tokens 200

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
