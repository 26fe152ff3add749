#!/usr/bin/env bash
# `make packages`: the deb (cargo-deb), the rpm (cargo-generate-rpm) and the
# sysext image (sysext/build.sh) into $CARGO_TARGET_DIR/packages/.
# Expects a release kilnd and the guest image (`make build guest`); builds
# the release kilnctl and containerd shim itself.
#
# What each package holds comes from packaging/manifest.toml alone
# (packaging/manifest.py): the deb takes the tree staged here, the rpm a
# generated asset list, the sysext its own tree; all three are checked
# against the manifest at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
target="${CARGO_TARGET_DIR:-$repo/target}"
guest="${KILN_GUEST_DIR:-$target/guest}"
out="$target/packages"
# cargo-deb reads its assets at a fixed path relative to the repository
# (daemon/Cargo.toml): stage what is built elsewhere there.
stage="$repo/target/packaging-stage"

# kilnctl, the operator CLI, and the containerd shim: `make build` builds
# kilnd only.
cargo build --release --quiet -p kiln-ctl --bin kilnctl
cargo build --release --quiet -p kiln-shim --bin containerd-shim-kiln-v1
for f in "$target/release/kilnd" "$target/release/kilnctl" "$target/release/containerd-shim-kiln-v1" "$guest/vmlinuz" "$guest/initramfs" "$guest/image-info.json"; do
    [ -e "$f" ] || { echo "packages: $f is missing (run make build guest)" >&2; exit 1; }
done
version=$(cargo metadata --no-deps --format-version 1 --offline \
    | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="kilnd"))')

# The build outputs the manifest calls `staged`.
rm -rf "$stage" "$out"
mkdir -p "$stage/guest" "$out"
cp "$guest/vmlinuz" "$guest/initramfs" "$guest/image-info.json" "$stage/guest/"
cp "$target/release/kilnd" "$stage/kilnd"
strip --strip-unneeded "$stage/kilnd"
cp "$target/release/kilnctl" "$stage/kilnctl"
strip --strip-unneeded "$stage/kilnctl"
cp "$target/release/containerd-shim-kiln-v1" "$stage/containerd-shim-kiln-v1"
strip --strip-unneeded "$stage/containerd-shim-kiln-v1"
# Man pages: kilnd(8) and kilnd.toml(5) are written by hand; kilnctl(1) and
# the completions are generated from kilnctl's clap definition.
gzip -9n < packaging/kilnd.8 > "$stage/kilnd.8.gz"
gzip -9n < packaging/kilnd.toml.5 > "$stage/kilnd.toml.5.gz"
"$stage/kilnctl" __generate-man | gzip -9n > "$stage/kilnctl.1.gz"
"$stage/kilnctl" completions bash > "$stage/kilnctl.bash"
"$stage/kilnctl" completions zsh > "$stage/_kilnctl"
"$stage/kilnctl" completions fish > "$stage/kilnctl.fish"

echo "packages: deb" >&2
python3 packaging/manifest.py tree deb "$stage" "$stage/deb"
cargo deb -p kilnd --no-build --quiet --output "$out/kiln_${version}-1_amd64.deb"

echo "packages: rpm" >&2
python3 packaging/manifest.py rpm-assets "$stage" > "$stage/rpm-assets.toml"
cargo generate-rpm -p daemon --metadata-overwrite "$stage/rpm-assets.toml" \
    --output "$out/kiln-${version}-1.x86_64.rpm"

echo "packages: sysext" >&2
./sysext/build.sh "$stage" "$out/kiln.raw" "$version"

python3 packaging/manifest.py check "$out"
ls -l "$out" >&2
