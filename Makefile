# Two commands: `make book` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: book section book-html book-assets test venv demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[book,test]'
	rm -f $(VENV)/.installed-*
	touch $@
	@date -u +"[make] %H:%M:%S installed into $(VENV)"

test: $(STAMP)
	@date -u +"[make] %H:%M:%S running the tests"
	$(PY) -m pytest -q

# The book: execute every page and section with papermill (NB_TIMEOUT seconds per cell) into build/, then
# `jupyter-book build -W` into _build/html. Offline: the JavaScript comes from npm into build/static/vendor.
# Trains nothing at the cpu or paper profile: the sections read the committed records in results/.
NB_TIMEOUT ?= 900
book: $(STAMP)
	$(PY) -m unitlib.book build --timeout $(NB_TIMEOUT)

# Re-execute one section with new parameters and re-render, e.g.
#   make section NB=a1_attacks PARAMS="-p profile smoke"
#   make section NB=a5_ablations PARAMS="-p profile cpu -p compute_missing True"
section: $(STAMP)
	$(PY) -m unitlib.book section $(NB) $(PARAMS) --timeout $(NB_TIMEOUT)

book-html: $(STAMP)
	$(PY) -m unitlib.book html

book-assets: $(STAMP)
	$(PY) -m unitlib.book assets

# The UNIT demo: BadNets at the `cpu` profile on cifar10-jpeg, defended by UNIT; the record goes to build/results
# (the committed records in results/ are not touched).
demo: $(STAMP)
	$(PY) -m unitlib run --profile cpu --attack badnets --defense unit --results build/results

bench: $(STAMP)
	$(PY) benchmarks/bench.py

clean:
	rm -rf build _build .pytest_cache
