#!/usr/bin/env bash
# Installs every system package Kiln needs to build, run and test, on a fresh
# Debian 12 (bookworm) or 13 (trixie) machine. Idempotent: a second run with
# everything present does no network I/O.
#
# QEMU 10, systemd 257 (varlinkctl, systemd-dissect), mmdebstrap and
# erofs-utils come from trixie; on bookworm a trixie source is added with a
# low pin (100) so nothing else is upgraded unless asked for (DESIGN.md §8).
set -euo pipefail

# Packages taken from trixie when the host is bookworm.
# qemu-system-modules-opengl: virtio-gpu-gl and egl-headless for GPU pools (docs/gpu.md).
# libssl-dev: kiln-image's registry client links the system OpenSSL
# (native-tls, docs/decisions.md "Images"); from trixie, because trixie's
# QEMU and systemd bring trixie's libssl3t64, which bookworm's headers
# package cannot go with.
TRIXIE_PACKAGES=(qemu-system-x86 qemu-system-modules-opengl qemu-utils systemd systemd-container mmdebstrap erofs-utils
                 libssl-dev)
# Packages the host's own release provides well enough.
BASE_PACKAGES=(dbus iproute2 nftables xz-utils zstd python3 make gcc pkg-config ca-certificates
               procps psmisc util-linux kmod jq
               # make packages and the system test (docs/packaging.md): strip,
               # dpkg-shlibdeps for cargo-deb, lintian, rpm.
               binutils dpkg-dev lintian rpm
               # kiln-image's tests (docs/images.md): a real registry on
               # 127.0.0.1, skopeo to push and to write archives, htpasswd
               # for its basic auth, busybox-static for the test images.
               docker-registry skopeo apache2-utils busybox-static
               # make bench's image rows (docs/benchmarks.md): runc runs the
               # same image on the host, the floor for a container's first output.
               runc
               # kilnctl's tests render the man pages with `man -l`.
               man-db
               # The containerd shim's tests (shim/tests/ctr.rs) run a real containerd
               # of their own; CNI plugins (bridge, host-local, loopback) for
               # its pod networking in shim/tests/cri.rs, and protoc for the
               # build of that test's CRI client (k8s-cri, docs/decisions.md).
               containerd containernetworking-plugins protobuf-compiler
               # daemon/tests/metrics.rs: promtool checks the exposition, a
               # real Prometheus scrapes kilnd (docs/metrics.md).
               prometheus)
# Cargo subcommands for `make packages`, built once with their own lock files.
CARGO_TOOLS=("cargo-deb@3.8.0" "cargo-generate-rpm@0.21.1")

# Installed by cargo, not apt: run on every call, before the apt part can
# end the script early.
install_cargo_tools() {
    local tool
    for tool in "${CARGO_TOOLS[@]}"; do
        if ! command -v "${tool%@*}" >/dev/null; then
            echo "setup-host: cargo install --locked $tool" >&2
            # Its own temporary target dir: a CARGO_TARGET_DIR shared with
            # the workspace (the Makefile exports one) races with builds.
            env -u CARGO_TARGET_DIR cargo install --locked --quiet "${tool%@*}" --version "${tool#*@}"
        fi
    done
}
trap install_cargo_tools EXIT

missing=()
for pkg in "${TRIXIE_PACKAGES[@]}" "${BASE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# varlinkctl arrives with systemd >= 255; bookworm's systemd 252 lacks it.
command -v varlinkctl >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "setup-host: installing ${missing[*]}" >&2

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host: must run as root to install packages (or install them yourself): ${missing[*]}" >&2
    exit 1
fi

. /etc/os-release
export DEBIAN_FRONTEND=noninteractive
if [ "${VERSION_CODENAME:-}" = "bookworm" ]; then
    if [ ! -e /etc/apt/sources.list.d/kiln-trixie.sources ]; then
        cat > /etc/apt/sources.list.d/kiln-trixie.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        cat > /etc/apt/preferences.d/kiln-trixie.pref <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${BASE_PACKAGES[@]}"
    apt-get install -y -qq --no-install-recommends -t trixie "${TRIXIE_PACKAGES[@]}"
else
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${BASE_PACKAGES[@]}" "${TRIXIE_PACKAGES[@]}"
fi
# The shim's tests start a containerd of their own (own root, state and
# socket); the system service the package enables is not needed.
if [[ " ${missing[*]} " == *" containerd "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now containerd.service >/dev/null 2>&1 || true
fi
