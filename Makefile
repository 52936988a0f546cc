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
cluster: ## Start the local control plane in the background; kubeconfig: .cluster/kubeconfig
	@$(PYTHON) $(ROOT)/e2e/cluster.py up

.PHONY: cluster-down
cluster-down: ## Stop the local control plane and remove .cluster
	@$(PYTHON) $(ROOT)/e2e/cluster.py down

.PHONY: test
test: ## Run the tests (they start a control plane, or use KUBECONFIG's or `make cluster`'s)
	cd $(ROOT) && .venv/bin/python -m pytest -q

CRD_FILES := $(ROOT)/config/crd/bases/kaos.tools_modelapis.yaml $(ROOT)/charts/kaos-modelapi/crds/modelapis.kaos.tools.yaml

.PHONY: generate
generate: ## Write the ModelAPI CRD (`kaos-modelapi crd`) into config/crd/bases/ and the chart's crds/
	@set -e; tmp="$$(mktemp)"; trap 'rm -f "$$tmp"' EXIT; \
	  $(ROOT)/.venv/bin/kaos-modelapi crd >"$$tmp"; \
	  for f in $(CRD_FILES); do cp "$$tmp" "$$f"; echo "wrote $${f#$(ROOT)/}"; done

.PHONY: helm
helm: ## Build helm (pinned in hack/helm/go.mod) unless cached in ~/.cache/kaos-modelapi/helm; print its path
	@$(ROOT)/hack/helm/build.sh
