#!/usr/bin/env bash
# Builds jocor-test-base:local, a local stand-in for the PyTorch base image of the Dockerfile
# (pytorch/pytorch:*-runtime), for machines that can reach no image registry: a minimal
# Debian bookworm with `python` and `pip` on PATH (a venv at /opt/venv, as the real base has
# /opt/conda), torch, torchvision and numpy installed there by this host's pip (which finds
# torch in its local wheel copy, much faster than downloading it inside a build), and this
# host's CA bundle, so that `pip install` in the Dockerfile can reach PyPI through a
# TLS-intercepting proxy (PIP_CERT). Needs root (debootstrap, chroot) and a running engine.
#
#   tests/docker/build_test_base.sh            # reuses the image when it exists
#   REBUILD=1 tests/docker/build_test_base.sh  # builds it again
#
# BASE_TAG (default jocor-test-base:local), PYTHON (the host interpreter whose pip installs
# torch; its minor version must be the image's, 3.11 for bookworm), TORCH_PACKAGES (default
# "torch==2.14.1 torchvision==0.29.1 numpy"), DEBIAN_MIRROR (default deb.debian.org).
set -euo pipefail
tag=${BASE_TAG:-jocor-test-base:local}
py=${PYTHON:-python3}
packages=${TORCH_PACKAGES:-torch==2.14.1 torchvision==0.29.1 numpy}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ca=/etc/ssl/certs/ca-certificates.crt

if [[ ${REBUILD:-0} != 1 ]] && docker image inspect "$tag" > /dev/null 2>&1; then
  echo "build_test_base: reusing $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1 / 1e9}')); REBUILD=1 builds it again"
  exit 0
fi
if [[ $(id -u) != 0 ]]; then echo "build_test_base: needs root (debootstrap and chroot)" >&2; exit 2; fi
for tool in debootstrap docker; do
  command -v "$tool" > /dev/null || { echo "build_test_base: $tool not found (apt-get install debootstrap docker.io)" >&2; exit 2; }
done
[[ -f $ca ]] || { echo "build_test_base: $ca not found" >&2; exit 2; }
docker info > /dev/null 2>&1 || { echo "build_test_base: no Docker engine answers (start dockerd)" >&2; exit 2; }

start=$SECONDS
work=$(mktemp -d "${TMPDIR:-/var/tmp}/jocor-test-base.XXXXXX")
rootfs=$work/rootfs
cleanup() {
  # debootstrap mounts /proc (and more) inside the rootfs while it runs: unmount whatever a
  # failure left there before deleting, and never cross into another file system.
  findmnt -rn -o TARGET | { grep -F "$rootfs/" || true; } | sort -r | while read -r mnt; do umount -l "$mnt" || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

echo "build_test_base: debootstrap bookworm (minbase + python3) into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; echo "build_test_base: debootstrap failed" >&2; exit 1; }
echo "build_test_base: debootstrap done after $((SECONDS - start)) s"

image_py=$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
host_py=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ $image_py != "$host_py" ]]; then
  echo "build_test_base: the image has Python $image_py but $py is $host_py; set PYTHON to a python$image_py" >&2
  exit 2
fi
chroot "$rootfs" python3 -m venv /opt/venv

# The host's pip installs into the image's venv: --root/--prefix place the files, and
# --ignore-installed keeps it from skipping what the host itself has.
echo "build_test_base: installing $packages into /opt/venv with $py's pip"
# shellcheck disable=SC2086  # the package list is split on purpose
PIP_ROOT_USER_ACTION=ignore "$py" -m pip install -q --root "$rootfs" --prefix /opt/venv --ignore-installed \
  --no-warn-script-location $packages 2> >(grep -v "is ignored: it is neither" >&2)
# Scripts got the host interpreter in their #! line: point them at the image's.
{ grep -lsI '^#!.*python' "$rootfs"/opt/venv/bin/* || true; } | while read -r script; do
  [[ -L $script ]] || sed -i '1s|^#!.*python.*$|#!/opt/venv/bin/python|' "$script"
done
chroot "$rootfs" /opt/venv/bin/python -c 'import numpy, torch, torchvision; print("build_test_base: torch", torch.__version__, "torchvision", torchvision.__version__, "numpy", numpy.__version__)'

install -m 0644 "$ca" "$rootfs/etc/ssl/certs/host-ca-bundle.crt"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/root/.cache

echo "build_test_base: importing $tag"
tar -C "$rootfs" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt' \
  --change 'WORKDIR /workspace' \
  --change 'CMD ["python"]' \
  - "$tag" > /dev/null
size=$(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1 / 1e9}')
echo "build_test_base: built $tag ($size) in $((SECONDS - start)) s"
