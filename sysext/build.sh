#!/usr/bin/env bash
# Build kiln.raw, a systemd-sysext image (erofs) with everything Kiln
# installs, all under /usr. Called by packaging/build.sh (`make packages`):
#   sysext/build.sh STAGE OUT.raw VERSION
# STAGE holds the stripped kilnd and guest/{vmlinuz,initramfs,image-info.json}.
#
# Differences from the deb/rpm (docs/packaging.md): kilnd.socket is enabled
# by a symlink in /usr/lib/systemd/system/sockets.target.wants/ (a sysext
# cannot carry /etc), users and /etc/kiln/kilnd.toml come from sysusers.d
# and tmpfiles.d at boot, and the base image must provide QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$1 out=$2 version=$3
# ID=_any: the image names no distribution. What it needs from the base
# image (glibc, QEMU, systemd >= 257) is listed in docs/packaging.md.
SYSEXT_ID="${SYSEXT_ID:-_any}"

tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
u="$tree/usr"
install -D -m 755 "$stage/kilnd" "$u/bin/kilnd"
install -D -m 644 -t "$u/lib/systemd/system" units/kilnd.socket units/kilnd.service
mkdir -p "$u/lib/systemd/system/sockets.target.wants"
ln -s ../kilnd.socket "$u/lib/systemd/system/sockets.target.wants/kilnd.socket"
# The .wants link alone starts nothing when the image is merged after the
# boot transaction was built (systemd-sysext.service) or at runtime: the
# manager is reloaded, but no job is queued for new wants. Upholds= has a
# continuous effect, so the reload itself starts the socket.
install -D -m 644 /dev/stdin "$u/lib/systemd/system/sockets.target.d/50-kiln.conf" <<'DROPIN'
# From the kiln sysext: keep kilnd.socket listening while sockets.target is
# up. Stop Kiln by unmerging the image, or `systemctl mask --runtime --now
# kilnd.socket`.
[Unit]
Upholds=kilnd.socket
DROPIN
install -D -m 644 units/io.kiln.Kiln1.service "$u/share/dbus-1/system-services/io.kiln.Kiln1.service"
install -D -m 644 dbus/io.kiln.Kiln1.conf "$u/share/dbus-1/system.d/io.kiln.Kiln1.conf"
install -D -m 644 dbus/io.kiln.policy "$u/share/polkit-1/actions/io.kiln.policy"
install -D -m 644 units/kiln.sysusers "$u/lib/sysusers.d/kiln.conf"
install -D -m 644 units/kiln.tmpfiles "$u/lib/tmpfiles.d/kiln.conf"
install -D -m 644 packaging/kilnd.toml "$u/share/kiln/kilnd.toml"
install -D -m 644 packaging/pools.d/default.toml "$u/lib/kiln/pools.d/default.toml"
install -D -m 755 packaging/kiln-stop-vms "$u/lib/kiln/kiln-stop-vms"
install -D -m 644 -t "$u/lib/kiln/guest" "$stage/guest/vmlinuz" "$stage/guest/initramfs" "$stage/guest/image-info.json"
install -D -m 644 -t "$u/share/doc/kiln" README.md docs/packaging.md
install -D -m 644 "$stage/kilnd.8.gz" "$u/share/man/man8/kilnd.8.gz"
install -D -m 644 /dev/stdin "$u/lib/extension-release.d/extension-release.kiln" <<REL
ID=$SYSEXT_ID
ARCHITECTURE=x86-64
EXTENSION_RELOAD_MANAGER=1
SYSEXT_ID=kiln
SYSEXT_VERSION_ID=$version
REL

rm -f "$out"
# Reproducible: every file root-owned, fixed timestamps and UUID.
mkfs.erofs --quiet -zlz4hc --all-root -T 0 -U 6b696c6e-0000-4000-8000-000000000001 "$out" "$tree"
