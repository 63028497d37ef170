# Two commands a user needs: `make demo` and `make test`. Both create (or reuse) .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedward-installed

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and alone: the pinned CPU build; a looser request would pull CUDA packages.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedward run --config configs/demo.yaml

# Two workers: most tests are single-threaded tiny runs, and the Flower deployment tests mostly
# wait on their processes; whole files go to a worker (their module fixtures start once). The 20
# slowest tests are listed at the end, to keep the suite within its time.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf runs/ .pytest_cache
