#!/usr/bin/env bash
# Builds detectord's base image from Debian's own packages with mmdebstrap (bookworm, minbase,
# Python 3 and CA certificates, without docs, locales or apt lists) and imports it into podman
# (scripts/podman) as localhost/detectord-base:bookworm. Skipped when that image exists and was
# made from the same inputs (this script and the Debian sources it used); FORCE=1 rebuilds it,
# e.g. for this month's security updates.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
podman=$root/scripts/podman
image=${BASE_IMAGE:-localhost/detectord-base:bookworm}
suite=bookworm
packages=python3,python3-venv,ca-certificates

# The host's own mirror when the host is bookworm (the Debian sources it is configured with);
# elsewhere Debian's own, with the updates and security suites.
sources=()
if grep -qs "^VERSION_CODENAME=$suite$" /etc/os-release; then
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && grep -qs "^[^#]*debian" "$f" && sources+=("$f")
  done
fi
if [ ${#sources[@]} -eq 0 ]; then
  sources=("deb http://deb.debian.org/debian $suite main"
           "deb http://deb.debian.org/debian $suite-updates main"
           "deb http://security.debian.org/debian-security $suite-security main")
fi

inputs=$( { cat "$0"; for s in "${sources[@]}"; do if [ -f "$s" ]; then cat "$s"; else echo "$s"; fi; done; } \
          | sha256sum | cut -c1-16)
have=$("$podman" image inspect --format '{{index .Labels "io.detectord.base.inputs"}}' "$image" 2>/dev/null || true)
if [ "$have" = "$inputs" ] && [ "${FORCE:-0}" != 1 ]; then
  echo "$image is up to date (inputs $inputs)"
  exit 0
fi

work=$root/.cache/containers/base
mkdir -p "$work"
tar=$work/rootfs.tar
trap 'rm -f "$tar"' EXIT
echo "building $image from Debian $suite ($packages)"
# merged-usr: /usr merged by the hook, not by the usrmerge package, which would pull in Perl.
mmdebstrap --variant=minbase --include="$packages" --format=tar \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/cache/debconf/*-old
                    rm -rf "$1"/var/log/* "$1"/var/lib/dpkg/*-old "$1"/tmp/* "$1"/etc/machine-id
                    find "$1"/usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete' \
  "$suite" "$tar" "${sources[@]}"
"$podman" import \
  --change "LABEL io.detectord.base.inputs=$inputs" \
  --change "LABEL org.opencontainers.image.description=Debian $suite minbase with $packages, by mmdebstrap" \
  --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --change "ENV LANG=C.UTF-8" \
  --change 'CMD ["python3"]' \
  "$tar" "$image" >/dev/null
echo "$image built (inputs $inputs)"
