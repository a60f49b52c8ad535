# Two commands: `make book` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: book test venv demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# Until the book lands, the main job is the UNIT demo: BadNets at the `cpu` profile on cifar10-jpeg, defended by
# UNIT; the record goes to build/results (the committed records in results/ are not touched).
book: demo

demo: $(STAMP)
	$(PY) -m unitlib run --profile cpu --attack badnets --defense unit --results build/results

bench: $(STAMP)
	$(PY) benchmarks/bench.py

clean:
	rm -rf build _build .pytest_cache
