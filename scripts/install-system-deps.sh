#!/usr/bin/env bash
# Installs the Debian packages the tests and the lab use, only if missing.
set -euo pipefail
pkgs=(prometheus prometheus-alertmanager dnsperf)
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
