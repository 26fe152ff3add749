#!/usr/bin/env bash
# `make run`: kilnd in the foreground, unprivileged paths under target/dev,
# the built-in guest image from target/guest.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
dev="$target/dev"
mkdir -p "$dev"
config="$dev/kilnd.toml"
cat > "$config" <<TOML
# Written by scripts/run-dev.sh; see docs/configuration.md.
state_dir = "$dev/state"
runtime_dir = "$dev/run"
guest_dir = "$target/guest"
accel = "auto"
TOML
echo "kilnd: config $config (state in $dev); Ctrl-C stops kilnd, VMs keep running and are re-adopted next time" >&2
exec "$target/release/kilnd" --config "$config"
