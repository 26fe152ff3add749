#!/usr/bin/env bash
# Builds the Kiln guest images:
#   OUTDIR/{vmlinuz,initramfs}      the default guest: Debian trixie's cloud
#                                   kernel, kiln-agent as /init, busybox, the
#                                   virtio modules (docs/guest-image.md)
#   OUTDIR/gpu/{vmlinuz,initramfs}  the GPU guest: trixie's generic kernel
#                                   (the cloud one has no DRM) and the same
#                                   initramfs plus virtio-gpu and its DRM
#                                   modules (docs/gpu.md)
#
#   guest/build-image.sh OUTDIR
#
# Each image is rebuilt only when one of its inputs changed: the agent and
# proto sources, this script, its helper, the resolved kernel and busybox
# package versions and the settings below (hashed into its .stamp).
# Downloads are cached in OUTDIR/cache, shared by both images.
#
# Settings (environment):
#   KILN_GUEST_SUITE            Debian suite of kernel and busybox (trixie)
#   KILN_INITRAMFS_COMPRESSION  none (default, boots faster under TCG) | gzip
#   KILN_CONTAINER_MODULES      how the container modules (loaded on the first
#                               StartContainer) are stored: compressed (default,
#                               as Debian ships them, the kernel decompresses
#                               them) | plain
#   KILN_GUEST_VARIANTS         images to build: "default gpu" (default);
#                               "default" skips the GPU guest (its kernel
#                               package is a 108 MB download)
#   CARGO, CARGO_TARGET_DIR     as usual
set -euo pipefail

usage() { echo "usage: $0 OUTDIR" >&2; exit 2; }
[ $# -eq 1 ] || usage

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST="$REPO/guest"
mkdir -p "$1"
OUTROOT=$(cd "$1" && pwd)
CACHE="$OUTROOT/cache"
SUITE=${KILN_GUEST_SUITE:-trixie}
COMPRESSION=${KILN_INITRAMFS_COMPRESSION:-none}
CONTAINER_MODULES_FORM=${KILN_CONTAINER_MODULES:-compressed}
VARIANTS=${KILN_GUEST_VARIANTS:-default gpu}
CARGO=${CARGO:-cargo}
PYTHON=${PYTHON:-python3}
TARGET_TRIPLE=x86_64-unknown-linux-gnu
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO/$TARGET_DIR" ;; esac   # cargo runs in $REPO
# Modules a `-M microvm,acpi=on` or q35 guest needs; dependencies are added
# and built-in ones (virtio_pci, virtio_console on trixie) skipped.
MODULES_DEFAULT=(virtio_mmio virtio_pci virtio_console virtio_net virtio_blk virtio_rng virtio_balloon)
# The GPU guest adds the virtio-gpu DRM driver; image-tool.py pulls in its
# dependencies (drm, drm_kms_helper, drm_shmem_helper, virtio_dma_buf).
MODULES_GPU=("${MODULES_DEFAULT[@]}" virtio_gpu)
# What containers need (StartContainer): the SCSI controller disks are
# hot-plugged into, SCSI disks, erofs layers and the overlay. A second list,
# loaded by the agent on first use (docs/guest-image.md has the numbers).
# crc32c_generic first: erofs's libcrc32c asks the crypto API for crc32c
# when it loads (a soft dependency, not in `depends=`); the cloud kernel
# has it built in, the GPU guest's generic kernel as a module. ext4 (for an
# upper disk) likewise: built into the cloud kernel, a module of the generic.
MODULES_CONTAINERS=(crc32c_generic virtio_scsi sd_mod erofs overlay ext4)

log() { echo "build-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

case "$COMPRESSION" in none|gzip) ;; *) die "KILN_INITRAMFS_COMPRESSION must be none or gzip" ;; esac
case "$CONTAINER_MODULES_FORM" in compressed|plain) ;; *) die "KILN_CONTAINER_MODULES must be compressed or plain" ;; esac
for variant in $VARIANTS; do
    case "$variant" in default|gpu) ;; *) die "KILN_GUEST_VARIANTS: unknown image '$variant' (default, gpu)" ;; esac
done
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

# The versioned kernel package META (e.g. linux-image-cloud-amd64) depends on.
kernel_package() {
    local meta
    meta=$(suite_version "$1")
    [ -n "$meta" ] || return 0
    apt-cache "${APT_OPTS[@]}" show "$1=$meta" 2>/dev/null \
        | awk '/^Depends:/ { for (i = 2; i <= NF; i++) if ($i ~ /^linux-image-[0-9]/) { sub(/,$/, "", $i); print $i; exit } }'
}

# Sets KERNEL_PKG_<variant>, KERNEL_VERSION_<variant> and BUSYBOX_VERSION.
resolve() {
    local variant meta pkg
    for variant in $VARIANTS; do
        case "$variant" in
            default) meta=linux-image-cloud-amd64 ;;
            gpu) meta=linux-image-amd64 ;;
        esac
        pkg=$(kernel_package "$meta")
        printf -v "KERNEL_META_$variant" '%s' "$meta"
        printf -v "KERNEL_PKG_$variant" '%s' "$pkg"
        printf -v "KERNEL_VERSION_$variant" '%s' "${pkg:+$(suite_version "$pkg")}"
    done
    BUSYBOX_VERSION=$(suite_version busybox-static)
}

resolved() {
    local variant pkg version
    for variant in $VARIANTS; do
        pkg=KERNEL_PKG_$variant version=KERNEL_VERSION_$variant
        [ -n "${!pkg}" ] && [ -n "${!version}" ] || return 1
    done
    [ -n "$BUSYBOX_VERSION" ]
}

resolve
if ! resolved; then
    log "package lists do not know $SUITE's kernel or busybox-static packages; running apt-get update"
    apt-get update -qq || die "apt-get update failed"
    resolve
fi
for variant in $VARIANTS; do
    meta=KERNEL_META_$variant pkg=KERNEL_PKG_$variant version=KERNEL_VERSION_$variant
    [ -n "${!pkg}" ] && [ -n "${!version}" ] || die "cannot resolve ${!meta} in $SUITE (is the $SUITE apt source configured? see scripts/setup-host.sh)"
done
[ -n "$BUSYBOX_VERSION" ] || die "cannot resolve busybox-static in $SUITE"

# --- helpers ----------------------------------------------------------------

# inputs_hash VARIANT KERNEL_PKG KERNEL_VERSION MODULE...
inputs_hash() {
    local variant=$1 kernel_pkg=$2 kernel_version=$3
    shift 3
    {
        echo "kernel=$kernel_pkg=$kernel_version busybox=$BUSYBOX_VERSION"
        echo "compression=$COMPRESSION modules=$*"
        echo "container-modules=${MODULES_CONTAINERS[*]} form=$CONTAINER_MODULES_FORM"
        if [ "$variant" != default ]; then echo "variant=$variant"; fi
        "${RUSTC:-rustc}" -V 2>/dev/null || true
        cd "$REPO"
        find guest/agent guest/proto -type f \( -name '*.rs' -o -name Cargo.toml \) -print0 \
            | sort -z | xargs -0 sha256sum
        sha256sum guest/build-image.sh guest/image-tool.py guest/io.kiln.Agent.varlink Cargo.toml
        if [ -f Cargo.lock ]; then sha256sum Cargo.lock; fi
    } | sha256sum | cut -d' ' -f1
}

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

# Busybox and the agent are the same in every image: prepared once, and
# only when some image is out of date.
BUSYBOX=
prepare_busybox() {
    [ -z "$BUSYBOX" ] || return 0
    local deb dir
    deb=$(fetch busybox-static "$BUSYBOX_VERSION")
    dir="$CACHE/busybox-${BUSYBOX_VERSION//:/_}"
    unpack "$deb" "$dir"
    BUSYBOX="$dir/usr/bin/busybox"         # trixie
    [ -x "$BUSYBOX" ] || BUSYBOX="$dir/bin/busybox"   # bookworm
    [ -x "$BUSYBOX" ] || die "no busybox binary in $deb"
}

AGENT=
build_agent() {
    [ -z "$AGENT" ] || return 0
    log "building kiln-agent (static)"
    # --target keeps the flags off build scripts and proc-macros.
    (cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
        "$CARGO" build --quiet --release --target "$TARGET_TRIPLE" -p kiln-agent)
    AGENT="$TARGET_DIR/$TARGET_TRIPLE/release/kiln-agent"
    [ -x "$AGENT" ] || die "no agent binary at $AGENT"
    "$PYTHON" "$GUEST/image-tool.py" check-static "$AGENT"
    AGENT_VERSION=$("$AGENT" --version | awk '{ print $2 }')
}

# --- one image ----------------------------------------------------------------

# build_image VARIANT OUT: the kernel of VARIANT and an initramfs with its
# modules into OUT (unless OUT/.stamp says it is up to date).
build_image() {
    local variant=$1 OUT=$2
    local pkg_var=KERNEL_PKG_$variant version_var=KERNEL_VERSION_$variant
    local KERNEL_PKG=${!pkg_var}
    local KERNEL_VERSION=${!version_var}
    local -a MODULES
    case "$variant" in
        default) MODULES=("${MODULES_DEFAULT[@]}") ;;
        gpu) MODULES=("${MODULES_GPU[@]}") ;;
    esac
    mkdir -p "$OUT"

    local HASH
    HASH=$(inputs_hash "$variant" "$KERNEL_PKG" "$KERNEL_VERSION" "${MODULES[@]}")
    if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$HASH" ] \
        && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs" ]; then
        log "up to date ($OUT)"
        return 0
    fi

    # --- fetch and unpack packages ---

    local KERNEL_DEB KERNEL_DIR
    KERNEL_DEB=$(fetch "$KERNEL_PKG" "$KERNEL_VERSION")
    # Both kernels have the same Debian version: the generic one is unpacked
    # beside the cloud one under its flavour's name.
    case "$variant" in
        default) KERNEL_DIR="$CACHE/kernel-$KERNEL_VERSION" ;;
        *) KERNEL_DIR="$CACHE/kernel-$variant-$KERNEL_VERSION" ;;
    esac
    unpack "$KERNEL_DEB" "$KERNEL_DIR"
    prepare_busybox

    local MODDIR= dir
    for dir in "$KERNEL_DIR"/usr/lib/modules/* "$KERNEL_DIR"/lib/modules/*; do
        if [ -d "$dir/kernel" ]; then MODDIR=$dir; break; fi
    done
    [ -n "$MODDIR" ] || die "no lib/modules/RELEASE in $KERNEL_DEB"
    local KERNEL_RELEASE VMLINUZ
    KERNEL_RELEASE=$(basename "$MODDIR")
    VMLINUZ="$KERNEL_DIR/boot/vmlinuz-$KERNEL_RELEASE"
    [ -f "$VMLINUZ" ] || die "no boot/vmlinuz-$KERNEL_RELEASE in $KERNEL_DEB"

    build_agent

    # --- stage the root file system ---

    local ROOT="$OUT/rootfs"
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

    local LOADED CONTAINER_LOADED
    LOADED=$("$PYTHON" "$GUEST/image-tool.py" modules --moddir "$MODDIR" --dest "$ROOT" "${MODULES[@]}")
    local -a FORM_ARGS=()
    [ "$CONTAINER_MODULES_FORM" = compressed ] && FORM_ARGS=(--compressed)
    CONTAINER_LOADED=$("$PYTHON" "$GUEST/image-tool.py" modules --moddir "$MODDIR" --dest "$ROOT" \
        --list modules.containers --have "$ROOT/etc/kiln/modules" "${FORM_ARGS[@]}" "${MODULES_CONTAINERS[@]}")

    {
        if [ "$variant" != default ]; then echo "KILN_IMAGE_VARIANT=$variant"; fi
        cat <<EOF
KILN_AGENT_VERSION=$AGENT_VERSION
KERNEL_PACKAGE=$KERNEL_PKG
KERNEL_VERSION=$KERNEL_VERSION
KERNEL_RELEASE=$KERNEL_RELEASE
BUSYBOX_VERSION=$BUSYBOX_VERSION
MODULES="$LOADED"
CONTAINER_MODULES="$CONTAINER_LOADED"
INPUTS_SHA256=$HASH
EOF
    } > "$ROOT/etc/kiln/image-info"

    # --- write the outputs ---

    local -a CPIO_ARGS=(cpio --root "$ROOT" --out "$OUT/initramfs")
    [ "$COMPRESSION" = gzip ] && CPIO_ARGS+=(--gzip)
    "$PYTHON" "$GUEST/image-tool.py" "${CPIO_ARGS[@]}"
    cp "$VMLINUZ" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
    echo "$KERNEL_RELEASE" > "$OUT/kernel-release"
    local variant_json=
    if [ "$variant" != default ]; then variant_json="\"variant\": \"$variant\","; fi
    "$PYTHON" - "$OUT/image-info.json" <<EOF
import json, sys
json.dump({$variant_json
    "agentVersion": "$AGENT_VERSION",
    "kernelPackage": "$KERNEL_PKG",
    "kernelVersion": "$KERNEL_VERSION",
    "kernelRelease": "$KERNEL_RELEASE",
    "busyboxVersion": "$BUSYBOX_VERSION",
    "modules": "$LOADED".split(),
    "containerModules": "$CONTAINER_LOADED".split(),
    "containerModulesForm": "$CONTAINER_MODULES_FORM",
    "initramfsCompression": "$COMPRESSION",
    "initramfsBytes": $(stat -c %s "$OUT/initramfs"),
    "inputsSha256": "$HASH",
}, open(sys.argv[1], "w"), indent=2)
EOF
    echo "$HASH" > "$OUT/.stamp"
    log "built $OUT/vmlinuz ($KERNEL_RELEASE) and $OUT/initramfs ($(du -h "$OUT/initramfs" | cut -f1), $COMPRESSION)"
}

for variant in $VARIANTS; do
    case "$variant" in
        default) build_image default "$OUTROOT" ;;
        gpu) build_image gpu "$OUTROOT/gpu" ;;
    esac
done
