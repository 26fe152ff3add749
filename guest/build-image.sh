#!/usr/bin/env bash
# Builds the default Kiln guest: OUTDIR/vmlinuz (Debian trixie's cloud
# kernel) and OUTDIR/initramfs (kiln-agent as /init, busybox, the virtio
# modules). See docs/guest-image.md.
#
#   guest/build-image.sh OUTDIR
#
# Rebuilds only when an input changed: the agent and proto sources, this
# script, its helper, the resolved kernel and busybox package versions and
# the settings below (hashed into OUTDIR/.stamp).
#
# Settings (environment):
#   KILN_GUEST_SUITE            Debian suite of kernel and busybox (trixie)
#   KILN_INITRAMFS_COMPRESSION  none (default, boots faster under TCG) | gzip
#   CARGO, CARGO_TARGET_DIR     as usual
set -euo pipefail

usage() { echo "usage: $0 OUTDIR" >&2; exit 2; }
[ $# -eq 1 ] || usage

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST="$REPO/guest"
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
CACHE="$OUT/cache"
SUITE=${KILN_GUEST_SUITE:-trixie}
COMPRESSION=${KILN_INITRAMFS_COMPRESSION:-none}
CARGO=${CARGO:-cargo}
PYTHON=${PYTHON:-python3}
TARGET_TRIPLE=x86_64-unknown-linux-gnu
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO/$TARGET_DIR" ;; esac   # cargo runs in $REPO
# Modules a `-M microvm,acpi=on` or q35 guest needs; dependencies are added
# and built-in ones (virtio_pci, virtio_console on trixie) skipped.
MODULES=(virtio_mmio virtio_pci virtio_console virtio_net virtio_blk virtio_rng virtio_balloon)

log() { echo "build-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

case "$COMPRESSION" in none|gzip) ;; *) die "KILN_INITRAMFS_COMPRESSION must be none or gzip" ;; esac
for tool in apt-cache apt-get dpkg-deb sha256sum "$PYTHON" "$CARGO"; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (run scripts/setup-host.sh)"
done

# --- resolve package versions (cheap: apt-cache only) -----------------------

mkdir -p "$CACHE"
# Keep apt's binary package cache in OUTDIR: Debian container images turn it
# off (docker-clean), which makes every apt-cache call take seconds.
APT_OPTS=(-o "Dir::Cache::pkgcache=$CACHE/apt-pkgcache.bin" -o "Dir::Cache::srcpkgcache=")

# Newest version of PACKAGE in SUITE (or its -security/-updates pockets).
suite_version() {
    apt-cache "${APT_OPTS[@]}" madison "$1" 2>/dev/null \
        | awk -F' *[|] *' -v s="$SUITE" '$3 ~ (" " s "(-security|-updates)?/") { print $2; exit }'
}

resolve() {
    local meta
    meta=$(suite_version linux-image-cloud-amd64)
    KERNEL_PKG=${meta:+$(apt-cache "${APT_OPTS[@]}" show "linux-image-cloud-amd64=$meta" 2>/dev/null \
        | awk '/^Depends:/ { for (i = 2; i <= NF; i++) if ($i ~ /^linux-image-[0-9]/) { sub(/,$/, "", $i); print $i; exit } }')}
    KERNEL_VERSION=${KERNEL_PKG:+$(suite_version "$KERNEL_PKG")}
    BUSYBOX_VERSION=$(suite_version busybox-static)
}
resolve
if [ -z "$KERNEL_PKG" ] || [ -z "$KERNEL_VERSION" ] || [ -z "$BUSYBOX_VERSION" ]; then
    log "package lists do not know $SUITE's linux-image-cloud-amd64/busybox-static; running apt-get update"
    apt-get update -qq || die "apt-get update failed"
    resolve
fi
[ -n "$KERNEL_PKG" ] && [ -n "$KERNEL_VERSION" ] || die "cannot resolve linux-image-cloud-amd64 in $SUITE (is the $SUITE apt source configured? see scripts/setup-host.sh)"
[ -n "$BUSYBOX_VERSION" ] || die "cannot resolve busybox-static in $SUITE"

# --- up to date? ------------------------------------------------------------

inputs_hash() {
    {
        echo "kernel=$KERNEL_PKG=$KERNEL_VERSION busybox=$BUSYBOX_VERSION"
        echo "compression=$COMPRESSION modules=${MODULES[*]}"
        "${RUSTC:-rustc}" -V 2>/dev/null || true
        cd "$REPO"
        find guest/agent guest/proto -type f \( -name '*.rs' -o -name Cargo.toml \) -print0 \
            | sort -z | xargs -0 sha256sum
        sha256sum guest/build-image.sh guest/image-tool.py guest/io.kiln.Agent.varlink Cargo.toml
        if [ -f Cargo.lock ]; then sha256sum Cargo.lock; fi
    } | sha256sum | cut -d' ' -f1
}
HASH=$(inputs_hash)
if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$HASH" ] \
    && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs" ]; then
    log "up to date ($OUT)"
    exit 0
fi

# --- fetch and unpack packages ---------------------------------------------

# deb file name apt-get download produces for PACKAGE VERSION.
deb_name() { echo "${1}_${2//:/%3a}_amd64.deb"; }

fetch() {
    local pkg=$1 version=$2 deb
    deb="$CACHE/$(deb_name "$pkg" "$version")"
    if [ ! -f "$deb" ]; then
        log "downloading $pkg $version"
        # Sandbox user root: the cache dir need not be writable by _apt.
        if ! (cd "$CACHE" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version" >&2); then
            log "download failed; running apt-get update and retrying"
            apt-get update -qq
            (cd "$CACHE" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version" >&2)
        fi
    fi
    [ -f "$deb" ] || die "apt-get download did not produce $deb"
    echo "$deb"
}

# Unpacks DEB into DIR once (DIR/.unpacked marks a complete unpack).
unpack() {
    local deb=$1 dir=$2
    if [ ! -f "$dir/.unpacked" ]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        dpkg-deb -x "$deb" "$dir"
        touch "$dir/.unpacked"
    fi
}

KERNEL_DEB=$(fetch "$KERNEL_PKG" "$KERNEL_VERSION")
BUSYBOX_DEB=$(fetch busybox-static "$BUSYBOX_VERSION")
KERNEL_DIR="$CACHE/kernel-$KERNEL_VERSION"
BUSYBOX_DIR="$CACHE/busybox-${BUSYBOX_VERSION//:/_}"
unpack "$KERNEL_DEB" "$KERNEL_DIR"
unpack "$BUSYBOX_DEB" "$BUSYBOX_DIR"

MODDIR=
for dir in "$KERNEL_DIR"/usr/lib/modules/* "$KERNEL_DIR"/lib/modules/*; do
    if [ -d "$dir/kernel" ]; then MODDIR=$dir; break; fi
done
[ -n "$MODDIR" ] || die "no lib/modules/RELEASE in $KERNEL_DEB"
KERNEL_RELEASE=$(basename "$MODDIR")
VMLINUZ="$KERNEL_DIR/boot/vmlinuz-$KERNEL_RELEASE"
[ -f "$VMLINUZ" ] || die "no boot/vmlinuz-$KERNEL_RELEASE in $KERNEL_DEB"
BUSYBOX="$BUSYBOX_DIR/usr/bin/busybox"         # trixie
[ -x "$BUSYBOX" ] || BUSYBOX="$BUSYBOX_DIR/bin/busybox"   # bookworm
[ -x "$BUSYBOX" ] || die "no busybox binary in $BUSYBOX_DEB"

# --- build the agent --------------------------------------------------------

log "building kiln-agent (static)"
# --target keeps the flags off build scripts and proc-macros.
(cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
    "$CARGO" build --quiet --release --target "$TARGET_TRIPLE" -p kiln-agent)
AGENT="$TARGET_DIR/$TARGET_TRIPLE/release/kiln-agent"
[ -x "$AGENT" ] || die "no agent binary at $AGENT"
"$PYTHON" "$GUEST/image-tool.py" check-static "$AGENT"
AGENT_VERSION=$("$AGENT" --version | awk '{ print $2 }')

# --- stage the root file system ---------------------------------------------

ROOT="$OUT/rootfs"
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,run,etc/kiln,var}
install -d -m 0700 "$ROOT/root"
install -d -m 1777 "$ROOT/tmp" "$ROOT/var/tmp"
install -m 0755 "$AGENT" "$ROOT/init"
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
# Applets in /bin, or /sbin where busybox puts them there; the agent's PATH
# covers both. `init` and `linuxrc` are left out: kiln-agent is the init.
"$BUSYBOX" --list-full | while read -r applet; do
    name=${applet##*/}
    case "$name" in busybox|init|linuxrc|"") continue ;; esac
    case "$applet" in
        sbin/*|usr/sbin/*) [ -e "$ROOT/sbin/$name" ] || ln -s ../bin/busybox "$ROOT/sbin/$name" ;;
        *) [ -e "$ROOT/bin/$name" ] || ln -s busybox "$ROOT/bin/$name" ;;
    esac
done

echo kiln > "$ROOT/etc/hostname"
: > "$ROOT/etc/machine-id"    # set per VM by SetIdentity
printf '127.0.0.1\tlocalhost kiln\n::1\tlocalhost\n' > "$ROOT/etc/hosts"
echo 'root:x:0:0:root:/root:/bin/sh' > "$ROOT/etc/passwd"
echo 'root:x:0:' > "$ROOT/etc/group"

LOADED=$("$PYTHON" "$GUEST/image-tool.py" modules --moddir "$MODDIR" --dest "$ROOT" "${MODULES[@]}")

cat > "$ROOT/etc/kiln/image-info" <<EOF
KILN_AGENT_VERSION=$AGENT_VERSION
KERNEL_PACKAGE=$KERNEL_PKG
KERNEL_VERSION=$KERNEL_VERSION
KERNEL_RELEASE=$KERNEL_RELEASE
BUSYBOX_VERSION=$BUSYBOX_VERSION
MODULES="$LOADED"
INPUTS_SHA256=$HASH
EOF

# --- write the outputs ------------------------------------------------------

CPIO_ARGS=(cpio --root "$ROOT" --out "$OUT/initramfs")
[ "$COMPRESSION" = gzip ] && CPIO_ARGS+=(--gzip)
"$PYTHON" "$GUEST/image-tool.py" "${CPIO_ARGS[@]}"
cp "$VMLINUZ" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
echo "$KERNEL_RELEASE" > "$OUT/kernel-release"
"$PYTHON" - "$OUT/image-info.json" <<EOF
import json, sys
json.dump({
    "agentVersion": "$AGENT_VERSION",
    "kernelPackage": "$KERNEL_PKG",
    "kernelVersion": "$KERNEL_VERSION",
    "kernelRelease": "$KERNEL_RELEASE",
    "busyboxVersion": "$BUSYBOX_VERSION",
    "modules": "$LOADED".split(),
    "initramfsCompression": "$COMPRESSION",
    "initramfsBytes": $(stat -c %s "$OUT/initramfs"),
    "inputsSha256": "$HASH",
}, open(sys.argv[1], "w"), indent=2)
EOF
echo "$HASH" > "$OUT/.stamp"
log "built $OUT/vmlinuz ($KERNEL_RELEASE) and $OUT/initramfs ($(du -h "$OUT/initramfs" | cut -f1), $COMPRESSION)"
