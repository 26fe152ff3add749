#!/usr/bin/env bash
# Build kiln.raw, a systemd-sysext image (erofs) with everything Kiln
# installs, all under /usr. Called by packaging/build.sh (`make packages`):
#   sysext/build.sh STAGE OUT.raw VERSION
# STAGE holds the build outputs (the stripped kilnd, guest/, kilnd.8.gz).
#
# The files are the sysext's share of packaging/manifest.toml (the list
# all three packages are made from), including what the sysext carries
# instead of a package manager's scripts: kilnd.socket wanted and upheld by
# sockets.target from /usr (a sysext cannot carry /etc), and the
# extension-release written here. docs/packaging.md says why.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$1 out=$2 version=$3
# ID=_any: the image names no distribution. What it needs from the base
# image (glibc, QEMU, systemd >= 257) is listed in docs/packaging.md.
SYSEXT_ID="${SYSEXT_ID:-_any}"

cat > "$stage/extension-release.kiln" <<REL
ID=$SYSEXT_ID
ARCHITECTURE=x86-64
EXTENSION_RELOAD_MANAGER=1
SYSEXT_ID=kiln
SYSEXT_VERSION_ID=$version
REL

tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
python3 packaging/manifest.py tree sysext "$stage" "$tree"

rm -f "$out"
# Reproducible: every file root-owned, fixed timestamps and UUID.
mkfs.erofs --quiet -zlz4hc --all-root -T 0 -U 6b696c6e-0000-4000-8000-000000000001 "$out" "$tree"
