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
# Written by scripts/run-dev.sh; every key is described in README.md (Configuration).
state_dir = "$dev/state"
runtime_dir = "$dev/run"
guest_dir = "$target/guest"
accel = "auto"
varlink_socket = "$dev/io.kiln.Manager"
# The shipped pools (the default pool: template clones, 2 kept hot).
pool_dirs = ["$PWD/packaging/pools.d"]
TOML
cat >&2 <<MSG
kilnd: config $config, state in $dev
kilnd: reach it with  varlinkctl call unix:$dev/io.kiln.Manager io.kiln.Manager.ListPools '{}'
kilnd: take a VM:     varlinkctl call unix:$dev/io.kiln.Manager io.kiln.Manager.Acquire '{"pool":"default"}'
kilnd: Ctrl-C stops kilnd; VMs keep running and are re-adopted next time
MSG
# The environment kilnd.service gives it (its malloc tuning).
while IFS= read -r line; do
    export "${line#Environment=}"
done < <(grep '^Environment=' units/kilnd.service)
exec "$target/release/kilnd" --config "$config"
