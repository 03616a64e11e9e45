#!/usr/bin/env bash
# Builds detectord's container image with podman (scripts/podman): the base image if it is
# missing or stale (scripts/build-base-image.sh), the wheel from this checkout, then the image
# from Containerfile, tagged docker.io/detectord/detectord:VERSION and :latest.
#   scripts/build-image.sh                  # the CPU image
#   scripts/build-image.sh Containerfile.cuda   # the GPU (JAX on CUDA) image, tagged VERSION-cuda
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
containerfile=${1:-Containerfile}
podman=$root/scripts/podman
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
repo=${IMAGE_REPO:-docker.io/detectord/detectord}
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' detectord/__init__.py)
[ -n "$version" ] || { echo "no __version__ in detectord/__init__.py" >&2; exit 1; }
suffix=""
[ "$containerfile" = Containerfile ] || suffix=-${containerfile##*.}

scripts/build-base-image.sh

# The wheel and its dependencies (the requirements the Containerfile installs in a layer of its own).
out=.cache/image
rm -rf "$out"; mkdir -p "$out"
# Zip entries dated as the last commit: the same tree gives the same wheel, and the image's layers
# stay cached. The venv's setuptools where it has one (no download).
isolation=()
"$python" -c 'import setuptools' 2>/dev/null && isolation=(--no-build-isolation)
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 315532800) \
  "$python" -m pip wheel --quiet --no-deps "${isolation[@]}" -w "$out" .
"$python" - "$out" <<'PY'
import email.parser, pathlib, sys, zipfile

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

out = pathlib.Path(sys.argv[1])
(wheel,) = out.glob("detectord-*.whl")
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    msg = email.parser.Parser().parsestr(z.read(meta).decode())
reqs = [Requirement(r) for r in msg.get_all("Requires-Dist") or []]
base = [str(r) for r in reqs if r.marker is None or "extra" not in str(r.marker)]
(out / "requirements.txt").write_text("".join(r + "\n" for r in base))
# requirements-EXTRA.txt: the base install's and the extra's (as evaluated on this host: the image
# is built for the platform it is built on).
for extra in msg.get_all("Provides-Extra") or []:
    more = []
    for r in reqs:
        if r.marker is not None and "extra" in str(r.marker) and r.marker.evaluate({"extra": extra}):
            r.marker = None
            more.append(str(r))
    (out / f"requirements-{extra}.txt").write_text("".join(r + "\n" for r in base + more))
PY

# docker format: the OCI image format has no HEALTHCHECK. Network host: pip reaches PyPI
# without a bridge or iptables rules, trusting the CAs this host trusts.
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
secret=()
[ -s "$ca" ] && secret=(--secret "id=ca-certificates,src=$ca")
"$podman" build --format docker --network host --pull=never "${secret[@]}" --build-arg "VERSION=$version" \
  -f "$containerfile" -t "$repo:$version$suffix" -t "$repo:latest$suffix" .
"$podman" image ls "$repo"
