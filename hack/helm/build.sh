#!/usr/bin/env bash
# Builds the helm CLI pinned by go.mod/go.sum beside this script, once per pin, and prints its path.
# The binary is cached outside the work tree, keyed by the pins and this script:
# ~/.cache/kaos-modelapi/helm/<hash>/helm.
# Used by `make helm` and by tests/test_packaging.py, so both run the same helm.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
key="$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)"  # a new pin or build flag: a new binary
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kaos-modelapi/helm/$key"
bin="$cache/helm"
if [[ ! -x "$bin" ]]; then
  helm_version="$(awk '$1 == "helm.sh/helm/v3" {print $2}' "$here/go.mod")"
  kube_minor="$(awk '$1 == "k8s.io/client-go" {split($2, v, "."); print v[2]}' "$here/go.mod")"
  pkg=helm.sh/helm/v3
  # The same -X flags helm's own release build sets: its version, and the Kubernetes version that
  # `helm template`/`helm lint` assume (the client-go minor it is built with) instead of the v1.20 fallback.
  ldflags="-s -w -X $pkg/internal/version.version=$helm_version"
  for p in pkg/chartutil pkg/lint/rules; do
    ldflags+=" -X $pkg/$p.k8sVersionMajor=1 -X $pkg/$p.k8sVersionMinor=$kube_minor"
  done
  mkdir -p "$cache"
  tmp="$(mktemp "$cache/helm.XXXXXX")"
  trap 'rm -f "$tmp"' EXIT
  echo "building helm $helm_version into $cache (once per pin)" >&2
  (cd "$here" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp" $pkg/cmd/helm)
  mv -f "$tmp" "$bin"   # atomic: a concurrent reader sees either no binary or a whole one
fi
echo "$bin"
