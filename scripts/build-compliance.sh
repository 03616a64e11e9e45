#!/usr/bin/env bash
# Builds the remote-write 2.0 receiver compliance suite (prometheus/compliance, remotewrite/receiver)
# at a pinned pseudo-version, from the Go module proxy, into a test binary cached under
# .cache/compliance/. Does nothing when the cached binary is there and runs. Prints its path.
#
# The module's go.mod declares its path as github.com/prometheus/complicance/remotewrite2 (sic),
# so `go get` refuses it; its zip is fetched from the proxy as it is, checked against the pinned
# SHA-256, and built as a main module of its own (its committed go.sum pins every dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
module=github.com/prometheus/compliance/remotewrite/receiver
version=v0.0.0-20260806071727-67b8327a2e93
sha256=ff71886a055b1fbf47086b52486c0da40b74839230c5ebd6b0698c0e37ce8a3c
out=.cache/compliance
bin="$out/receiver-$version.test"
runs() {
  # Its TestMain reads a remote_write config before it lists anything.
  [ -x "$bin" ] && printf 'remote_write: []\n' >"$out/list.yml" &&
    PROMETHEUS_RW2_COMPLIANCE_CONFIG_FILE="$out/list.yml" "$bin" -test.list TestBadContentTypes 2>/dev/null |
    grep -q TestBadContentTypes
}
if runs; then
  ln -sfn "$(basename "$bin")" "$out/receiver.test"
  echo "$PWD/$out/receiver.test"
  exit 0
fi
go=$(command -v go || true)
[ -n "$go" ] || [ ! -x /usr/local/go/bin/go ] || go=/usr/local/go/bin/go
if [ -z "$go" ]; then
  echo "build-compliance: Go >= 1.25 is needed to build the compliance suite (apt-get install golang-go, or go.dev/dl)" >&2
  exit 1
fi
proxy=$("$go" env GOPROXY | tr ',|' '\n\n' | grep -E '^https?://' | head -1)
proxy=${proxy:-https://proxy.golang.org}
mkdir -p "$out"
zip="$out/receiver-$version.zip"
if ! echo "$sha256  $zip" | sha256sum -c --status 2>/dev/null; then
  echo "fetching $module@$version from $proxy ..." >&2
  curl -fsSL --retry 3 -o "$zip.tmp.$$" "$proxy/$module/@v/$version.zip"
  mv -f "$zip.tmp.$$" "$zip"
  echo "$sha256  $zip" | sha256sum -c --status || { echo "build-compliance: $zip does not match the pinned SHA-256" >&2; exit 1; }
fi
src="$out/src-$version"
rm -rf "$src" "$src.tmp.$$"
mkdir -p "$src.tmp.$$"
(cd "$src.tmp.$$" && unzip -q "../receiver-$version.zip")
mv "$src.tmp.$$/$module@$version" "$src"
rm -rf "$src.tmp.$$"
chmod -R u+w "$src"
echo "building the remote-write receiver compliance suite $version ..." >&2
start=$(date +%s)
(cd "$src" && GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 "$go" test -c -trimpath -o "../$(basename "$bin").tmp.$$" .)
mv -f "$bin.tmp.$$" "$bin"
rm -rf "$src"
ln -sfn "$(basename "$bin")" "$out/receiver.test"
echo "built $(basename "$bin") in $(( $(date +%s) - start ))s" >&2
echo "$PWD/$out/receiver.test"
