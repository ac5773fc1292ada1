# The two commands of the README:
#   make demo   install into .venv (if needed) and run the demo study end to end
#   make test   install with the test dependencies, lint the workflow and run the test suite
# and the second embedded demo:
#   make demo-mri   the rectal multiparametric MRI study (config/mri/), in its own working directory demo-mri/
# and the simulation study of issue 18 (docs/validity.md):
#   make validity   the CT demo at ~100 patients per center (config/validity/overrides.yaml) in validity/, then
#                   bench/validity_study.py on it (100 outcome draws + 50 null draws); under an hour on 2 cores
# For development: make test-fast (the suite without the slow tests: no workflow run, no nnU-Net training)
# Switches: TORCH=cuda (CUDA build of torch, for a machine with an NVIDIA GPU), CORES=N, PYTHON=python3.11

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
CORES ?= 2
CONSTRAINTS := requirements/constraints.txt
PIP := $(VENV)/bin/python -m pip
BIN := $(VENV)/bin

.PHONY: demo demo-mri validity test test-fast install install-test lint clean-results

demo: install
	$(BIN)/snakemake --workflow-profile workflow/profiles/default --cores $(CORES)

# The MRI study is a study folder of its own (config, centers sheet, radiomics parameters; results/ beside them):
# config/mri/ is copied into demo-mri/ once (a file already there, e.g. edited, is kept) and snakemake runs there.
MRI_DIR ?= demo-mri
demo-mri: install
	mkdir -p $(MRI_DIR)
	for f in config/mri/*; do [ -e $(MRI_DIR)/$$(basename $$f) ] || cp $$f $(MRI_DIR)/; done
	$(BIN)/snakemake --workflow-profile workflow/profiles/default --cores $(CORES) \
	  --directory $(MRI_DIR) --configfile $(CURDIR)/$(MRI_DIR)/config.yaml

# The validity cohort: config/config.yaml with config/validity/overrides.yaml merged over it, written once into
# $(VALIDITY_DIR)/config/ (an edited copy is kept), the workflow run there, then the outcome draws.
VALIDITY_DIR ?= validity
VALIDITY_DRAWS ?= 100
VALIDITY_NULL_DRAWS ?= 50
validity: install
	$(BIN)/python bench/validity_cohort.py $(VALIDITY_DIR)
	$(BIN)/snakemake --workflow-profile workflow/profiles/default --cores $(CORES) \
	  --directory $(VALIDITY_DIR) --configfile $(CURDIR)/$(VALIDITY_DIR)/config/config.yaml
	$(BIN)/python bench/validity_study.py $(VALIDITY_DIR) --draws $(VALIDITY_DRAWS) \
	  --null-draws $(VALIDITY_NULL_DRAWS) --seed 18 --workers $(CORES)

test: install-test lint
	$(BIN)/pytest

test-fast: install-test
	$(BIN)/pytest -m "not slow"

lint: install-test
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

install: $(VENV)/.installed-$(TORCH)

install-test: install $(VENV)/.installed-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# torch first, pinned: otherwise a dependency asking for plain "torch" pulls several GB of CUDA wheels.
# cpu: a local/--find-links wheel of torch==X+cpu if there is one, else PyTorch's CPU index.
# cuda: PyPI's Linux wheel, which is the CUDA build.
$(VENV)/.installed-$(TORCH): $(VENV)/bin/python pyproject.toml $(CONSTRAINTS)
ifeq ($(TORCH),cuda)
	$(PIP) install --quiet -c $(CONSTRAINTS) "torch==$(TORCH_VERSION)"
else
	$(PIP) install --quiet -c $(CONSTRAINTS) "torch==$(TORCH_VERSION)+cpu" \
	  || $(PIP) install --quiet -c $(CONSTRAINTS) "torch==$(TORCH_VERSION)+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
endif
	$(PIP) install --quiet -c $(CONSTRAINTS) -e .
	rm -f $(VENV)/.installed-cpu $(VENV)/.installed-cuda
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-$(TORCH) pyproject.toml $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $@

clean-results:
	rm -rf results .snakemake
