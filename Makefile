# ems-yolo: every target installs what it needs first, so each one works as the first command on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# options of tools/demo.py, e.g. make demo DEMO_ARGS="--epochs 1 --imgsz 64" (as tests/test_readme.py runs it)
DEMO_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch torchvision
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: install
	$(PY) tools/demo.py $(DEMO_ARGS)

bench: install
	$(PY) -m pip install -q -e ".[bench]" || echo "expelliarmus unavailable: bench_events.py reports ems-yolo's .raw rates only"
	$(PY) tools/bench_learning.py
	$(PY) tools/bench_events.py
	$(PY) tools/bench_preprocess.py
	$(PY) tools/bench_speed.py

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache
