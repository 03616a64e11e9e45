#!/usr/bin/env bash
# Installs Debian packages only if missing: the ones named, or (none named) those the tests and
# the lab use.
set -euo pipefail
pkgs=("$@")
[ ${#pkgs[@]} -gt 0 ] || pkgs=(prometheus prometheus-alertmanager dnsperf curl unzip chromium chromium-driver)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
# Debian starts packaged services where an init system runs; the tests start their own.
for svc in prometheus prometheus-alertmanager prometheus-node-exporter; do
  $sudo service "$svc" stop >/dev/null 2>&1 || true
done
