#!/usr/bin/env bash
# Builds the pinned, slim CoreDNS that the tests and the lab run (scripts/coredns/: its plugin
# set and version) and caches it under .cache/coredns/. Does nothing when the cached binary
# is there and runs. Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(grep -oE 'github.com/coredns/coredns v[0-9.]+' scripts/coredns/go.mod | head -1 | cut -d' ' -f2)
out=.cache/coredns
bin="$out/coredns-$version-$(sha256sum scripts/coredns/main.go scripts/coredns/go.sum | sha256sum | cut -c1-12)"
if [ -x "$bin" ] && "$bin" -version >/dev/null 2>&1; then
  ln -sfn "$(basename "$bin")" "$out/coredns"
  echo "$PWD/$out/coredns"
  exit 0
fi
go=$(command -v go || true)
[ -n "$go" ] || [ ! -x /usr/local/go/bin/go ] || go=/usr/local/go/bin/go
if [ -z "$go" ]; then
  echo "build-coredns: Go >= 1.24 is needed to build CoreDNS $version (apt-get install golang-go, or go.dev/dl)" >&2
  exit 1
fi
mkdir -p "$out"
echo "building CoreDNS $version (slim: $(grep -c '_ "github.com/coredns' scripts/coredns/main.go) plugins) ..." >&2
start=$(date +%s)
# go.sum is committed: -mod=readonly fails rather than resolve other versions. No VCS stamping,
# so a checkout without git (or owned by another user) builds too.
(cd scripts/coredns && GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 "$go" build -trimpath -o "../../$bin.tmp.$$" .)
mv -f "$bin.tmp.$$" "$bin"
ln -sfn "$(basename "$bin")" "$out/coredns"
echo "built $("$bin" -version | head -1) in $(( $(date +%s) - start ))s" >&2
echo "$PWD/$out/coredns"
