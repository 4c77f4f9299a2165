# datacredit: `make demo` runs the digits valuation on CPU, `make test` runs every test tier.
# Heavy things (virtualenv with torch, Go-built binaries) are cached outside the repo in $(CACHE).
SHELL := /bin/bash
PYTHON ?= python3
CACHE ?= $(HOME)/.cache/datacredit
ENV_KEY := $(shell cat pyproject.toml requirements/constraints.txt 2>/dev/null | sha256sum | cut -c1-12)
VENV ?= $(CACHE)/venv-$(ENV_KEY)
PY := $(VENV)/bin/python
# Console scripts, never `python -m` from the repo root: there ./operator/ would shadow the stdlib's operator.
PIP := $(VENV)/bin/pip --cache-dir $(CACHE)/pip --disable-pip-version-check
REGISTRY ?= registry.example.com
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
export DATACREDIT_CACHE := $(CACHE)
export PATH := $(VENV)/bin:$(PATH)

.PHONY: help install binaries demo demo-quick test test-fast lint crds dashboards images push-images bench bench-quick bench-peers bench-peers-quick bench-paper bench-paper-quick bench-paper-ldm bench-paper-sd-lora bench-trust bench-trust-quick bench-packing clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	@mkdir -p $(CACHE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c requirements/constraints.txt -e '.[jobs,operator,dev]'
	touch $@

install: $(VENV)/.installed ## create the cached virtualenv and install datacredit (editable) into it
	@$(PIP) install -q --no-deps -e . >/dev/null

binaries: ## build etcd, kube-apiserver, kube-controller-manager, MinIO, helm, prometheus (cached)
	bash hack/build-binaries.sh

demo: install ## value 6 digit contributors (3 planted bad) exactly on CPU, 4-7 minutes on 2 cores
	$(VENV)/bin/datacredit demo

demo-quick: install ## the same at toy size, about a minute
	$(VENV)/bin/datacredit demo --quick --dir demo-quick

test: install binaries ## every test tier: unit, workload, storage (MinIO), control plane, chart, observability
	$(VENV)/bin/pytest -ra -p no:cacheprovider tests

test-fast: install ## unit tests only (no torch workloads, no servers)
	$(VENV)/bin/pytest -ra -p no:cacheprovider -m "not workload and not s3 and not controlplane and not chart and not observability and not images and not browser" tests

lint: install ## ruff, and the layering contract (the core loads no torch/kopf; the operator no GPU code)
	$(VENV)/bin/ruff check datacredit jobs operator tests benchmarks dashboards hack
	$(PY) hack/lint_imports.py
	$(PY) hack/check_layers.py

crds: install ## regenerate crds/ from the spec model (and the chart's copy)
	$(VENV)/bin/datacredit crd > crds/valuationruns.datacredit.dev.yaml
	cp crds/valuationruns.datacredit.dev.yaml charts/datacredit/crds-src/valuationruns.yaml

dashboards: install ## regenerate the Grafana dashboards (charts/datacredit/dashboards/*.json)
	$(PY) dashboards/generate.py

images: ## build the operator and worker images (needs Docker)
	docker build -f images/operator.Dockerfile -t $(REGISTRY)/datacredit-operator:$(IMAGE_TAG) .
	docker build -f images/worker.Dockerfile -t $(REGISTRY)/datacredit-worker:$(IMAGE_TAG) .

push-images: images ## push both images to $(REGISTRY)
	docker push $(REGISTRY)/datacredit-operator:$(IMAGE_TAG)
	docker push $(REGISTRY)/datacredit-worker:$(IMAGE_TAG)

bench: install ## estimator benchmark (full, a few minutes): writes benchmarks/results/estimators.json
	$(PY) benchmarks/estimators.py --out benchmarks/results/estimators.json

bench-quick: install ## estimator benchmark at a small size (CI)
	$(PY) benchmarks/estimators.py --quick

# The peer libraries (shapiq, pyDVL; pyDVL pins numpy < 2) get a virtualenv of their own, without torch.
BENCH_VENV ?= $(CACHE)/venv-bench-$(ENV_KEY)

$(BENCH_VENV)/.installed: pyproject.toml
	@mkdir -p $(CACHE)
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip --cache-dir $(CACHE)/pip --disable-pip-version-check install -q -e '.[bench]'
	touch $@

bench-peers: $(BENCH_VENV)/.installed ## ours vs shapiq and pyDVL on interaction-heavy games (~10 min): results/peers.json
	$(BENCH_VENV)/bin/python benchmarks/peers.py

bench-peers-quick: $(BENCH_VENV)/.installed ## the same at n = 10, 16 and one seed (about a minute; prints only)
	$(BENCH_VENV)/bin/python benchmarks/peers.py --quick

bench-paper: install ## paper Table 1/2 at CPU scale (retrains; ~40 min): benchmarks/results/paper_table.json
	$(PY) benchmarks/paper_table.py

bench-paper-quick: install ## the paper-table benchmark at toy size (CI; results stay in a temp folder)
	$(PY) benchmarks/paper_table.py --tiny

bench-paper-ldm: install ## the paper table for a UNet on a tiny pretrained VQ-VAE's latents (~10 min)
	$(PY) benchmarks/paper_table.py --family ldm

bench-paper-sd-lora: install ## the paper table for a LoRA on a tiny pretrained SD, with the caption proxy (~20 min)
	$(PY) benchmarks/paper_table.py --family sd-lora

bench-packing: install ## coalitions/hour packed vs one per process vs one at a time (~3 min): results/packing.json
	$(PY) benchmarks/packing.py

bench-trust: install ## the demo over 5 run seeds, CRN on and off (~60 min on 2 cores): benchmarks/results/trust.json
	$(PY) benchmarks/trust.py

bench-trust-quick: install ## the same on the quick demo, 3 seeds (CI; results stay in a temp folder)
	$(PY) benchmarks/trust.py --quick

clean: ## remove local run outputs
	rm -rf demo-run demo-quick .pytest_cache
