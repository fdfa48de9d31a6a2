# Two commands on a fresh clone (only Python >= 3.11 and make needed):
#   make demo   create .venv, install, run the pipeline locally on embedded defaults (no network)
#   make test   create .venv if needed, run the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= demo

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints/dev.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/m3tune run --root runs/$(RUN) --config configs/demo.yaml
	@echo "outputs: $(CURDIR)/runs/$(RUN)  (status: $(BIN)/m3tune status --root runs/$(RUN))"

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_io.py
	$(BIN)/python benchmarks/bench_generation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
