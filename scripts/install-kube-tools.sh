#!/usr/bin/env bash
# Installs what tests/deploy/ checks the Kubernetes manifests with, pinned, under .cache/kube-tools/:
# kustomize (built from its Go module), psscheck (scripts/psscheck/: the real Pod Security
# admission checks), the OpenAPI spec of a Kubernetes release and the prometheus-operator CRDs
# (both read from their Go module zips through the Go proxy, checked against pinned sums).
# Does nothing when everything is there. Prints the cache directory:
#   bin/kustomize, bin/psscheck, schemas/kubernetes/swagger.json, schemas/prometheus-operator/*.yaml
set -euo pipefail
cd "$(dirname "$0")/.."

kustomize_version=v5.8.2  # v5.8.3 needs Go 1.27
kubernetes_version=v1.37.2
kubernetes_sum=h1:A2VDEiObzkYqFTKhSsn0ZEb0RlLEXpHWj93gi2HqEwE=
prometheus_operator_version=v0.85.0
prometheus_operator_sum=h1:M5xLCLEoaW2IJfnuCwFzzpL+jSVQu3KGT84Pye+fW8s=

out=.cache/kube-tools
kustomize="$out/bin/kustomize-$kustomize_version"
psscheck="$out/bin/psscheck-$(sha256sum scripts/psscheck/main.go scripts/psscheck/go.mod scripts/psscheck/go.sum | sha256sum | cut -c1-12)"
k8s_schemas="$out/schemas/kubernetes-$kubernetes_version"
po_schemas="$out/schemas/prometheus-operator-$prometheus_operator_version"

link() {  # link TARGET NAME: NAME points at TARGET (both under the same directory)
  ln -sfn "$(basename "$1")" "$(dirname "$1")/$2"
}

if [ -x "$kustomize" ] && [ -x "$psscheck" ] && [ -f "$k8s_schemas/swagger.json" ] && [ -f "$po_schemas/.complete" ]; then
  link "$kustomize" kustomize
  link "$psscheck" psscheck
  link "$k8s_schemas" kubernetes
  link "$po_schemas" prometheus-operator
  echo "$PWD/$out"
  exit 0
fi

go=$(command -v go || true)
[ -n "$go" ] || [ ! -x /usr/local/go/bin/go ] || go=/usr/local/go/bin/go
if [ -z "$go" ]; then
  echo "install-kube-tools: Go >= 1.26 is needed (apt-get install golang-go, or go.dev/dl)" >&2
  exit 1
fi
mkdir -p "$out/bin" "$out/schemas"
start=$(date +%s)

if ! [ -x "$kustomize" ]; then
  echo "building kustomize $kustomize_version ..." >&2
  # go install of an exact version builds it with kustomize's own go.mod and go.sum.
  tmpbin=$(mktemp -d "$out/bin/.tmp.XXXXXX")
  GOBIN="$PWD/$tmpbin" GOFLAGS=-buildvcs=false CGO_ENABLED=0 \
    "$go" install -trimpath "sigs.k8s.io/kustomize/kustomize/v5@$kustomize_version"
  mv -f "$tmpbin/kustomize" "$kustomize"
  rmdir "$tmpbin"
fi

if ! [ -x "$psscheck" ]; then
  echo "building psscheck (k8s.io/pod-security-admission $(grep -oE 'k8s.io/pod-security-admission v[0-9.]+' scripts/psscheck/go.mod | cut -d' ' -f2)) ..." >&2
  # go.sum is committed: -mod=readonly fails rather than resolve other versions.
  (cd scripts/psscheck && GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 "$go" build -trimpath -o "../../$psscheck.tmp.$$" .)
  mv -f "$psscheck.tmp.$$" "$psscheck"
fi

module_dir() {  # module_dir PATH VERSION SUM: the module's extracted directory, its sum checked
  local json dir sum
  json=$("$go" mod download -json "$1@$2")
  dir=$(printf '%s\n' "$json" | sed -n 's/^\t"Dir": "\(.*\)",\{0,1\}$/\1/p')
  sum=$(printf '%s\n' "$json" | sed -n 's/^\t"Sum": "\(.*\)",\{0,1\}$/\1/p')
  if [ "$sum" != "$3" ] || [ -z "$dir" ]; then
    echo "install-kube-tools: $1@$2 has sum '$sum', expected $3" >&2
    return 1
  fi
  echo "$dir"
}

if ! [ -f "$k8s_schemas/swagger.json" ]; then
  echo "fetching the OpenAPI spec of Kubernetes $kubernetes_version ..." >&2
  dir=$(module_dir k8s.io/kubernetes "$kubernetes_version" "$kubernetes_sum")
  mkdir -p "$k8s_schemas"
  install -m 0644 "$dir/api/openapi-spec/swagger.json" "$k8s_schemas/swagger.json.tmp.$$"
  mv -f "$k8s_schemas/swagger.json.tmp.$$" "$k8s_schemas/swagger.json"
fi

if ! [ -f "$po_schemas/.complete" ]; then
  echo "fetching the prometheus-operator $prometheus_operator_version CRDs ..." >&2
  dir=$(module_dir github.com/prometheus-operator/prometheus-operator "$prometheus_operator_version" "$prometheus_operator_sum")
  mkdir -p "$po_schemas"
  install -m 0644 "$dir"/example/prometheus-operator-crd/*.yaml "$po_schemas/"
  touch "$po_schemas/.complete"
fi

link "$kustomize" kustomize
link "$psscheck" psscheck
link "$k8s_schemas" kubernetes
link "$po_schemas" prometheus-operator
echo "installed kube tools in $(( $(date +%s) - start ))s" >&2
echo "$PWD/$out"
