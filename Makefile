# Entry points for developers and CI. `make help` lists the targets.
# Recipes run from the repository root, whatever the current directory.

ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
# e2e/cluster.py needs only the standard library, so the cluster targets work before the venv exists.
PYTHON := $(if $(wildcard $(ROOT)/.venv/bin/python),$(ROOT)/.venv/bin/python,python3)

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: controlplane
controlplane: ## Build the local control plane (e2e/controlplane) unless cached in ~/.cache/kaos-modelapi
	@$(PYTHON) $(ROOT)/e2e/cluster.py build

.PHONY: cluster
cluster: ## Start the local cluster (control plane + stand-in node + real node when root; KAOS_REAL_NODE=0|1) in the background
	@$(PYTHON) $(ROOT)/e2e/cluster.py up

.PHONY: cluster-down
cluster-down: ## Stop the local cluster, remove .cluster and any real node left by a crashed session
	@$(PYTHON) $(ROOT)/e2e/cluster.py down

VENV := $(ROOT)/.venv
UV_VERSION := 0.13.8
KUBECTL := kubectl --kubeconfig $(ROOT)/.cluster/kubeconfig

.PHONY: venv
venv: $(VENV)/.installed ## Install the pinned Python environment (.venv) from requirements.lock

# Bytecode compiled at install, as the image does (UV_COMPILE_BYTECODE): with PYTHONDONTWRITEBYTECODE set (as
# on this machine) nothing is cached at import, and every operator start compiled kubernetes_asyncio's ~1,000
# modules again (3.7 s of CPU before the first reconcile instead of 0.7 s).
$(VENV)/.installed: $(ROOT)/requirements.lock $(ROOT)/pyproject.toml $(ROOT)/Makefile
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	@$(VENV)/bin/pip install -q uv==$(UV_VERSION)
	@$(VENV)/bin/uv pip sync -q --compile-bytecode --python $(VENV)/bin/python $(ROOT)/requirements.lock
	@$(VENV)/bin/uv pip install -q --python $(VENV)/bin/python --no-deps -e $(ROOT)
	@touch $@

# What e2e/images.py builds with (Debian packages): the OCI runtime here is runc (crun refuses this host's
# cgroups), debootstrap makes the Python base image's rootfs.
IMAGE_PACKAGES := buildah podman runc debootstrap

.PHONY: images
images: ## Build the local node's container images (e2e/images.py) unless cached in ~/.cache/kaos-modelapi/images
	@missing="$$(for p in $(IMAGE_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q 'ok installed' || echo $$p; done)"; \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@$(PYTHON) $(ROOT)/e2e/images.py build >/dev/null

.PHONY: deps
deps: venv images ## Install everything the tests run: .venv, LiteLLM (e2e/.venv-litellm), helm, ollama, the control plane, the images, the real node
	@$(PYTHON) $(ROOT)/e2e/node.py deps  # Debian packages of the real node, when missing (root only)
	@bash $(ROOT)/e2e/install-litellm.sh
	@$(ROOT)/hack/helm/build.sh >/dev/null
	@$(PYTHON) $(ROOT)/e2e/ollama_build.py >/dev/null
	@$(PYTHON) $(ROOT)/e2e/cluster.py build
	@$(PYTHON) $(ROOT)/e2e/node.py build  # CoreDNS, the pause and test images (when the node can run here)

.PHONY: ollama
ollama: venv ## Build ollama (the release kaos_modelapi/ollama.py pins, CPU only) unless cached in ~/.cache/kaos-modelapi/ollama; print its path
	@$(PYTHON) $(ROOT)/e2e/ollama_build.py

.PHONY: lint
lint: venv ## ruff and mypy --strict
	cd $(ROOT) && $(VENV)/bin/ruff check . && $(VENV)/bin/mypy

.PHONY: test
test: deps lint ## Run every test (they start a control plane, or use KUBECONFIG's or `make cluster`'s)
	cd $(ROOT) && $(VENV)/bin/python -m pytest -q

.PHONY: dev
dev: venv controlplane ## Local control plane + CRD + samples (their pods on the real node when there is one), then the operator in the foreground
	@# As root (unless KAOS_REAL_NODE=0): the real node's Debian packages and the images its pods run.
	@if [ "$$(id -u)" = 0 ] && [ "$${KAOS_REAL_NODE:-}" != 0 ]; then \
	  $(PYTHON) $(ROOT)/e2e/node.py deps && $(MAKE) --no-print-directory images; fi
	@$(PYTHON) $(ROOT)/e2e/cluster.py dev
	@$(VENV)/bin/kaos-modelapi crd | $(KUBECTL) apply -f - >/dev/null
	@for i in $$(seq 30); do $(KUBECTL) wait --for=condition=Established crd/modelapis.kaos.tools \
	  --timeout=5s >/dev/null 2>&1 && break; sleep 1; done  # (wait fails while the CRD has no status yet)
	@$(KUBECTL) apply -k $(ROOT)/config/samples
	@echo
	@echo "The operator runs below (Ctrl-C stops it; 'make cluster-down' stops the control plane). Watch with:"
	@echo "  kubectl --kubeconfig .cluster/kubeconfig get modelapi -w"
	@echo
	@$(VENV)/bin/kaos-modelapi run --kubeconfig $(ROOT)/.cluster/kubeconfig --log-format console \
	  --gateway-name shared --gateway-namespace gateway-system \
	  --metrics-bind-address 127.0.0.1:8080 --health-probe-bind-address 127.0.0.1:8081

CRD_FILES := $(ROOT)/config/crd/bases/kaos.tools_modelapis.yaml $(ROOT)/charts/kaos-modelapi/crds/modelapis.kaos.tools.yaml

.PHONY: generate
generate: venv ## Write the ModelAPI CRD (`kaos-modelapi crd`) into config/crd/bases/ and the chart's crds/
	@set -e; tmp="$$(mktemp)"; trap 'rm -f "$$tmp"' EXIT; \
	  $(VENV)/bin/kaos-modelapi crd >"$$tmp"; \
	  for f in $(CRD_FILES); do cp "$$tmp" "$$f"; echo "wrote $${f#$(ROOT)/}"; done

.PHONY: helm
helm: ## Build helm (pinned in hack/helm/go.mod) unless cached in ~/.cache/kaos-modelapi/helm; print its path
	@$(ROOT)/hack/helm/build.sh

# The operator's runtime as its image has it, for the benchmark: the image's interpreter (Debian 12's
# python3.11, e2e/images.py; built with PGO and LTO as python:3.11-slim's is, where a pyenv build as the dev
# venv's may not be: 7 % more CPU per ModelAPI) and the runtime dependencies only. Without that interpreter
# the benchmark runs the operator on the dev venv's, and says so.
RUNTIME_PYTHON ?= /usr/bin/python3.11
RUNTIME_VENV := $(ROOT)/.venv-runtime

.PHONY: runtime-venv
runtime-venv: venv
	@if [ -x $(RUNTIME_PYTHON) ]; then \
	  test -x $(RUNTIME_VENV)/bin/python || $(VENV)/bin/uv venv -q --python $(RUNTIME_PYTHON) $(RUNTIME_VENV); \
	  $(VENV)/bin/uv pip install -q --compile-bytecode --python $(RUNTIME_VENV)/bin/python \
	    -r $(ROOT)/pyproject.toml -c $(ROOT)/requirements.lock; \
	  $(VENV)/bin/uv pip install -q --python $(RUNTIME_VENV)/bin/python --no-deps -e $(ROOT); \
	fi

.PHONY: bench
bench: runtime-venv controlplane ## Benchmark against the limit (e2e/bench): table, targets, JSON, .bench/bench.png; N=100,1000 (or BENCH_N)
	@$(VENV)/bin/python -m compileall -q $(ROOT)/kaos_modelapi $(ROOT)/e2e/bench >/dev/null  # as in the image
	cd $(ROOT) && BENCH_PYTHON=$$(test -x $(RUNTIME_VENV)/bin/python && echo $(RUNTIME_VENV)/bin/python) \
	  $(if $(N),BENCH_N=$(N) ,)$(VENV)/bin/python e2e/bench/bench.py
