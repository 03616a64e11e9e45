#!/usr/bin/env bash
# Installs the Debian packages that build and run detectord's container image, only if missing:
# podman (the engine; its build is buildah's), runc (crun 1.8 refuses hybrid cgroups), slirp4netns
# (published ports without a bridge or iptables rules, see scripts/podman), mmdebstrap (the base
# image from Debian's own packages), and what podman needs around them.
set -euo pipefail
exec "$(dirname "$0")/install-system-deps.sh" \
  podman runc conmon slirp4netns containernetworking-plugins uidmap fuse-overlayfs mmdebstrap
