# limbtrack: the two commands of the README, and the checks CI runs.
#   make demo   virtualenv, install, run the workflow on sample_data/, print the report's path
#   make test   virtualenv, install, the whole test suite
#   make lint   ruff, mypy and snakemake --lint (CI: .ci/run runs lint, then test)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: demo test install lint sample-data benchmark benchmark-cohort clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 not found (python3.11 or python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --snakefile Snakefile
	@echo ""
	@echo "Report: $(CURDIR)/results/demo/report.html"
	@echo "Tables: $(CURDIR)/results/demo/volumes.tsv, longitudinal.tsv, summary.json"

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/mypy pipeline
	$(BIN)/snakemake --lint

# Regenerate the demo patient (deterministic for the seed).
sample-data: $(STAMP)
	$(BIN)/limbtrack phantom sample_data/demo

benchmark: $(STAMP)
	$(BIN)/python benchmarks/accuracy.py

benchmark-cohort: $(STAMP)
	$(BIN)/python benchmarks/cohort_speed.py

clean:
	rm -rf results .snakemake
