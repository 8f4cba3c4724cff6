# lungxray — `make help` lists every target with its one-line description.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Local runs ------------------------------------------------------------------------------------
DATA ?=#                           npz / image folder / gs:// URI / pneumoniamnist[_64|_128|_224]
SITES ?=#                          more sites: NAME=SOURCE,..., e.g. nih=../shared/data/nih_cxr_1000/manifest.csv
HOLDOUT_SITE ?=#                   a site held out whole as test_site_NAME (never trained or selected on)
WEIGHTS ?=#                        imagenet | none | path or gs:// URI of a weights file
PROFILE ?= quick#                  quick | full | cluster (pipelines/profiles.py)
MODELS ?=#                         e.g. MODELS='[VGG16, MobileNetV2]' (default: the profile's)
PARAMS ?=#                         YAML/JSON file of pipeline parameters
CHAMPION_URI ?=#                   local path or gs:// URI of the champion (champion/challenger)
PIPELINE_ROOT ?= local_outputs
PYTEST_ARGS ?=
TEST_WORKERS ?= 2#                  pytest-xdist workers for test/test-fast (1 = one process)
# whole files per worker: a module's fixtures (a trained model, a server) are built once
XDIST = $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
BENCH_ARGS ?=#                     e.g. --only tuning input, --profiles full

# Cluster ---------------------------------------------------------------------------------------
REGISTRY ?= localhost:5001
TAG ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
IMAGE ?= $(REGISTRY)/lungxray:$(TAG)
PIPELINE_YAML := build/pipeline.yaml
KFP_HOST ?= http://localhost:8080
KFP_EXPERIMENT ?= lungxray
GPU_NODE_SELECTOR ?=#              e.g. cloud.google.com/gke-accelerator=nvidia-l4
GCS_SECRET ?=#                     Secret with key.json for gs:// (not needed with Workload Identity)
CACHE_PVC ?=#                      PVC for tuner/training state across retries, e.g. lungxray-cache
GPUS ?= 1#                         GPUs per tune/train pod
PARALLELISM ?=#                    base models at once (0 = all; default all on GPUs, 1 with CACHE_PVC or on CPU)
HEAVY_RESOURCES ?=#                tune/train CPU_REQ/CPU_LIM,MEM_REQ/MEM_LIM, e.g. 4/8,12Gi/16Gi (default: per package)
LIGHT_RESOURCES ?=#                preprocess/evaluate/compare, e.g. 1/4,4Gi/8Gi (default: per package)
IMAGE_DIGEST ?=#                   sha256:... pins the compiled image by digest; auto asks the registry
# Flags of every cluster package; GPU_FLAGS only for the GPU one.
PLATFORM_FLAGS = $(if $(GCS_SECRET),--gcs-secret $(GCS_SECRET)) \
	$(if $(CACHE_PVC),--cache-pvc $(CACHE_PVC)) $(if $(PARALLELISM),--parallelism $(PARALLELISM)) \
	$(if $(HEAVY_RESOURCES),--heavy-resources=$(HEAVY_RESOURCES)) \
	$(if $(LIGHT_RESOURCES),--light-resources=$(LIGHT_RESOURCES)) \
	$(if $(IMAGE_DIGEST),--image-digest $(IMAGE_DIGEST))
GPU_FLAGS = --gpus $(GPUS) $(if $(GPU_NODE_SELECTOR),--gpu-node-selector $(GPU_NODE_SELECTOR))
COMPILE_ARGS = --image $(IMAGE) --output $(PIPELINE_YAML) $(PLATFORM_FLAGS) $(GPU_FLAGS)
# The package is rebuilt when these arguments change, not only when the code does.
COMPILE_STAMP := build/.compile-args

.PHONY: help install local test test-fast lint format compile bench clean FORCE

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_.-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[cpu,dev]'
	touch $@

install: $(STAMP) ## Create .venv and install lungxray with CPU TensorFlow and the dev tools

local: $(STAMP) ## Run the whole pipeline on this machine via kfp.local (DATA, SITES, HOLDOUT_SITE, WEIGHTS, PROFILE, MODELS, PARAMS, CHAMPION_URI, PARALLELISM)
	$(PY) -m pipelines.local --profile $(PROFILE) --pipeline-root $(PIPELINE_ROOT) \
		$(if $(PARALLELISM),--parallelism $(PARALLELISM)) \
		$(if $(DATA),--set 'data_source=$(DATA)') $(if $(WEIGHTS),--set 'weights=$(WEIGHTS)') \
		$(if $(SITES),--set 'sites=$(SITES)') $(if $(HOLDOUT_SITE),--set 'holdout_site=$(HOLDOUT_SITE)') \
		$(if $(MODELS),--set 'base_models=$(MODELS)') $(if $(PARAMS),--params $(PARAMS)) \
		$(if $(CHAMPION_URI),--set 'champion_uri=$(CHAMPION_URI)')

test: $(STAMP) ## Run the whole test suite (what CI runs)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

test-fast: $(STAMP) ## Run the tests without the slow real-training ones
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

fuzz: $(STAMP) ## Long fuzz run of every reader (Hypothesis profile "long", ~9 min on 2 cores)
	HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/fuzz -p no:cacheprovider \
		--hypothesis-show-statistics $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check on the whole project, and lint-imports on the layering (docs/architecture.md)
	$(VENV)/bin/ruff check src components pipelines tests
	PYTHONPATH=src $(VENV)/bin/lint-imports --no-cache

format: $(STAMP) ## ruff format + import sorting
	$(VENV)/bin/ruff check --select I --fix src components pipelines tests
	$(VENV)/bin/ruff format src components pipelines tests

compile: $(STAMP) $(COMPILE_STAMP) ## Compile for a GPU cluster into build/pipeline.yaml (IMAGE, GPUS, GPU_NODE_SELECTOR, GCS_SECRET, CACHE_PVC, PARALLELISM)
	$(PY) -m pipelines.compile $(COMPILE_ARGS)

FORCE:

$(COMPILE_STAMP): FORCE
	@mkdir -p $(@D)
	@echo '$(COMPILE_ARGS)' | cmp -s - $@ || echo '$(COMPILE_ARGS)' > $@

$(PIPELINE_YAML): $(STAMP) $(COMPILE_STAMP) $(wildcard pipelines/*.py components/*.py)
	$(PY) -m pipelines.compile $(COMPILE_ARGS)

bench: $(STAMP) ## Benchmarks (not part of test): bench/results.json and bench/RESULTS.md (BENCH_ARGS)
	$(PY) -m bench.run $(BENCH_ARGS)

clean: ## Remove build outputs and local pipeline runs (keeps .venv)
	rm -rf build $(PIPELINE_ROOT) .pytest_cache .ruff_cache

-include make/cluster.mk
