# make demo: set up, then teacher → pretrain → onpolicy → sample (nfe=4) → evaluation sweep on the embedded toy.
# make test: the test suite (what CI runs).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= outputs

.PHONY: setup demo teacher test clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"

setup: $(PY)

demo: $(PY)
	rm -rf $(OUT)/teacher/shipped && mkdir -p $(OUT)/teacher/shipped
	cp -r assets/toy_teacher $(OUT)/teacher/shipped/export && touch $(OUT)/teacher/shipped/export/anyflow.json
	$(PY) train.py experiment=demo_pretrain paths.output_dir=$(OUT)
	$(PY) train.py experiment=demo_onpolicy paths.output_dir=$(OUT)
	$(PY) sample.py nfe=4 paths.output_dir=$(OUT)
	$(PY) -m anyflow.evaluate paths.output_dir=$(OUT)

# Reproduce assets/toy_teacher (24k iterations, ~42 min on one core); its export lands in $(OUT)/teacher/.
teacher: $(PY)
	$(PY) train.py experiment=toy_teacher paths.output_dir=$(OUT)

test: $(PY)
	$(PY) -m pytest -q

clean:
	rm -rf $(OUT) .pytest_cache
