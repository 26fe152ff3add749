//! How kilnd's objects are shown: for each IDL type, the fields of its
//! table and of its `show` block, as (label, key, how). Read from the reply
//! as kilnd sent it, so a field kilnd adds is simply not shown and one it
//! leaves out is blank; a test checks every key against the IDL, so a
//! renamed field fails here and not on an operator's screen.

use serde_json::Value;

use crate::output::{
    bytes, cpu_time, relative, shell_words, short_digest, utc, Column, Fields, Table,
};

/// How one value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// A string or a number, as it is.
    Text,
    /// The same, in a column that may be cut to fit (names, errors).
    Cut,
    /// MiB: `128M` (as `--memory` takes it).
    MiB,
    /// Bytes: `4.0 MiB`.
    Bytes,
    /// A cap in bytes, 0 being none: `300.0 MiB`, `none`.
    Cap,
    /// CPU time in microseconds: `1.52s`, `3min 04s`.
    CpuTime,
    /// A digest's first 12 hex digits, as `image ls` shows it.
    Digest,
    /// How many entries a list has.
    Count,
    /// A command line (a list of strings), quoted as a shell would take it.
    Argv,
    /// A timestamp (µs) as its age: `3min ago`.
    Age,
    /// A timestamp (µs): `2026-05-01 12:00:03 UTC (3min ago)`.
    Time,
    /// `yes` or `no`.
    YesNo,
    /// A list of strings: `a, b`.
    List,
    /// A string map: `k=v, k2=v2`.
    Map,
    /// The addresses of a `[]NIC`.
    Addresses,
    /// Compact JSON.
    Json,
}

impl Show {
    /// As a column, whether it may be cut to fit the terminal: names and
    /// anything that is a list; never ids, states, numbers or times.
    fn may_cut(self) -> bool {
        matches!(self, Cut | List | Map | Addresses | Json | Argv)
    }
}

/// One field of an IDL type as a column or a `Key: value` line.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub label: &'static str,
    pub key: &'static str,
    pub show: Show,
}

/// `label key how, ...`: the fields of one view, in order.
macro_rules! fields {
    ($($label:literal $key:ident $show:ident),* $(,)?) => {
        &[$(Field { label: $label, key: stringify!($key), show: $show }),*]
    };
}

use Show::*;

#[rustfmt::skip]
pub const VM_COLUMNS: &[Field] = fields![
    "ID" id Text, "NAME" name Cut, "STATE" state Text, "POOL" pool Cut, "CPUS" vcpus Text,
    "MEMORY" memoryMiB MiB, "ADDRESS" network Addresses, "CREATED" createdAt Age,
];

#[rustfmt::skip]
pub const VM_FIELDS: &[Field] = fields![
    "Id" id Text, "Name" name Text, "State" state Text, "Pool" pool Text,
    "Leased by" leasedBy Text, "Acquired" acquiredAt Time, "Lease ends" leaseExpiresAt Time,
    "Ends on disconnect" releaseOnDisconnect YesNo, "Labels" labels Map,
    "vCPUs" vcpus Text, "Memory" memoryMiB MiB, "Accel" accel Text, "Display" display Text,
    "GPUs" gpus List, "PID" pid Text,
    "Created" createdAt Time, "Started" startedAt Time, "Ready" readyAt Time,
    "QEMU" qemuVersion Text, "Agent" agentVersion Text, "Kernel" kernelRelease Text,
    "Boot ID" bootId Text, "Last error" lastError Text,
];

#[rustfmt::skip]
pub const NIC_COLUMNS: &[Field] = fields![
    "INDEX" index Text, "TAP" tap Text, "IFINDEX" ifindex Text, "MAC" mac Text,
    "ADDRESS" address Text, "NETNS" netns Cut,
];

#[rustfmt::skip]
pub const POOL_COLUMNS: &[Field] = fields![
    "NAME" name Cut, "MODE" mode Text, "STATE" state Text, "WARM" warm Text, "MAX" max Text,
    "HOT" hot Text, "BOOTING" booting Text, "LEASED" leased Text, "FAILED" failed Text,
    "WAITING" waiting Text, "ERROR" lastError Cut,
];

#[rustfmt::skip]
pub const POOL_FIELDS: &[Field] = fields![
    "Name" name Text, "Mode" mode Text, "State" state Text, "Warm" warm Text, "Max" max Text,
    "Refill at once" refillConcurrency Text, "Recycle on expiry" recycleOnExpiry YesNo,
    "Hot" hot Text, "Booting" booting Text, "Leased" leased Text, "Failed" failed Text,
    "Waiting" waiting Text, "Template ready" templateReady YesNo, "Last error" lastError Text,
    "Source" source Text, "VM spec" vm Json,
];

#[rustfmt::skip]
pub const GPU_COLUMNS: &[Field] = fields![
    "NAME" name Text, "VENDOR" vendorId Text, "DEVICE" deviceId Text, "DRIVER" driver Cut,
    "PCI" pciAddress Text, "USABLE" usable YesNo, "MODE" mode Text, "FREE" freeSlots Text,
    "VMS" vmIds List,
];

#[rustfmt::skip]
pub const CONTAINER_COLUMNS: &[Field] = fields![
    "NAME" name Text, "IMAGE" image Cut, "STATE" state Text, "PID" pid Text, "EXIT" exitCode Text,
    "RESTART" restartPolicy Text, "RESTARTS" restarts Text, "COMMAND" command Argv,
    "ERROR" error Cut,
];

#[rustfmt::skip]
pub const IMAGE_COLUMNS: &[Field] = fields![
    "DIGEST" digest Digest, "REFERENCES" references List, "PLATFORM" platform Text,
    "SIZE" size Bytes, "LAYERS" layers Count, "STORED" storedAt Age, "USERS" users List,
];

#[rustfmt::skip]
pub const IMAGE_FIELDS: &[Field] = fields![
    "Digest" digest Text, "References" references List, "Platform" platform Text,
    "Size" size Bytes, "Layers" layers Count, "Created" created Text, "Stored" storedAt Time,
    "Source" source Text, "Users" users List, "Media type" mediaType Text,
    "Index" indexDigest Text, "Config" configDigest Text,
];

/// An image's `process`, shown under its other fields.
#[rustfmt::skip]
pub const PROCESS_FIELDS: &[Field] = fields![
    "Entrypoint" entrypoint Argv, "Cmd" cmd Argv, "Env" env List, "Workdir" workingDir Text,
    "User" user Text,
];

#[rustfmt::skip]
pub const LAYER_COLUMNS: &[Field] = fields![
    "DIGEST" digest Digest, "DIFF ID" diffId Digest, "SIZE" size Bytes,
    "EROFS" erofsSize Bytes, "TYPE" mediaType Cut,
];

/// A running VM's `usage`, shown under its other fields.
#[rustfmt::skip]
pub const USAGE_FIELDS: &[Field] = fields![
    "CPU time" cpuUsec CpuTime, "Memory used" memoryBytes Bytes, "Memory cap" memoryLimitBytes Cap,
    "RSS" rssBytes Bytes, "PSS" pssBytes Bytes, "Disk read" diskReadBytes Bytes,
    "Disk written" diskWriteBytes Bytes, "Net received" netRxBytes Bytes,
    "Net sent" netTxBytes Bytes, "OOM kills" oomKills Text,
];

#[rustfmt::skip]
pub const SNAPSHOT_COLUMNS: &[Field] = fields![
    "NAME" name Cut, "SOURCE" sourceName Cut, "SOURCE ID" sourceId Text, "CREATED" createdAt Age,
    "CPUS" vcpus Text, "MEMORY" memoryMiB MiB, "SIZE" sizeBytes Bytes, "CONTAINERS" containers List,
];

/// Every view with the IDL type it shows (for the test against the IDL).
#[cfg(test)]
const VIEWS: &[(&str, &[Field])] = &[
    ("VM", VM_COLUMNS),
    ("VM", VM_FIELDS),
    ("NIC", NIC_COLUMNS),
    ("Pool", POOL_COLUMNS),
    ("Pool", POOL_FIELDS),
    ("Gpu", GPU_COLUMNS),
    ("Container", CONTAINER_COLUMNS),
    ("Image", IMAGE_COLUMNS),
    ("Image", IMAGE_FIELDS),
    ("ImageProcess", PROCESS_FIELDS),
    ("ImageLayer", LAYER_COLUMNS),
    ("Usage", USAGE_FIELDS),
    ("Snapshot", SNAPSHOT_COLUMNS),
];

/// The text of a string or number field; "" when absent or null.
pub fn text(object: &Value, key: &str) -> String {
    match object.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// `field` of `object`, written as the field says; "" when absent.
pub fn cell(object: &Value, field: &Field, now: u64) -> String {
    let value = object.get(field.key).unwrap_or(&Value::Null);
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|s| s.as_str().map_or_else(|| s.to_string(), str::to_owned))
            .collect()
    };
    match (field.show, value) {
        (_, Value::Null) => String::new(),
        (Text | Cut, _) => text(object, field.key),
        (MiB, v) => format!("{v}M"),
        (Bytes, v) => v.as_u64().map(bytes).unwrap_or_else(|| v.to_string()),
        // The API's 0: no cgroup to cap it.
        (Cap, v) => match v.as_u64() {
            Some(0) => "none".into(),
            Some(n) => bytes(n),
            None => v.to_string(),
        },
        (CpuTime, v) => v.as_u64().map(cpu_time).unwrap_or_else(|| v.to_string()),
        (Digest, v) => short_digest(v.as_str().unwrap_or_default()),
        (Count, v) => v.as_array().map_or(0, Vec::len).to_string(),
        (Argv, v) => {
            let words = strings(v);
            shell_words(&words.iter().map(String::as_str).collect::<Vec<_>>())
        }
        (Age, v) => v.as_u64().map(|us| relative(us, now)).unwrap_or_default(),
        (Time, v) => match v.as_u64() {
            Some(us) if us > 0 => format!("{} ({})", utc(us), relative(us, now)),
            _ => String::new(),
        },
        (YesNo, v) => match v.as_bool() {
            Some(true) => "yes".into(),
            Some(false) => "no".into(),
            None => v.to_string(),
        },
        (List, v) => strings(v).join(", "),
        (Map, v) => v
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(", "),
        (Addresses, v) => v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|nic| nic.get("address").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(","),
        (Json, v) => v.to_string(),
    }
}

/// `objects` under the headers of `fields`; an empty cell is `-`.
pub fn table(fields: &[Field], objects: &[Value], now: u64) -> Table {
    let columns: Vec<Column> = fields
        .iter()
        .map(|f| Column {
            header: f.label,
            shrink: f.show.may_cut(),
        })
        .collect();
    let mut table = Table::new(&columns);
    for object in objects {
        table.row(
            fields
                .iter()
                .map(|f| match cell(object, f, now) {
                    c if c.is_empty() => "-".to_owned(),
                    c => c,
                })
                .collect(),
        );
    }
    table
}

/// `object` as `Key: value` lines; empty fields are left out.
pub fn block(fields: &[Field], object: &Value, now: u64) -> Fields {
    let mut block = Fields::default();
    add_to_block(&mut block, fields, object, now);
    block
}

/// More lines for `block`, from another object (an image's `process`).
pub fn add_to_block(block: &mut Fields, fields: &[Field], object: &Value, now: u64) {
    for field in fields {
        block.add(field.label, cell(object, field, now));
    }
}

/// The array at `key` of a reply (`{"vms": [...]}`).
pub fn items<'a>(reply: &'a Value, key: &str) -> &'a [Value] {
    reply
        .get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The fields of `type NAME (...)` in the committed IDL.
    fn idl_fields(idl: &str, name: &str) -> Vec<String> {
        let (_, rest) = idl
            .split_once(&format!("\ntype {name} ("))
            .unwrap_or_else(|| panic!("the IDL has no type {name}"));
        let body = rest.split_once("\n)").map_or(rest, |(body, _)| body);
        body.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(':').map(|(k, _)| k.trim().to_owned()))
            .collect()
    }

    #[test]
    fn every_shown_key_is_a_field_of_its_idl_type() {
        let idl = include_str!("../../varlink/io.kiln.Manager.varlink");
        for (ty, fields) in VIEWS {
            let known = idl_fields(idl, ty);
            assert!(known.len() > 3, "{ty}: {known:?}");
            for field in *fields {
                assert!(
                    known.iter().any(|k| k == field.key),
                    "{} shows {ty}.{}, which the IDL does not declare",
                    field.label,
                    field.key
                );
            }
        }
    }

    #[test]
    fn cells_are_written_by_kind() {
        let vm = json!({
            "id": "3fa2c1d0e4b5", "vcpus": 2, "memoryMiB": 256, "createdAt": 1_000_000,
            "labels": {"job": "42", "a": "b"}, "gpus": ["renderD128"], "pid": null,
            "releaseOnDisconnect": false,
            "network": [{"address": "10.77.0.2"}, {"tap": "x"}, {"address": "10.77.0.3"}]
        });
        let now = 4_000_000;
        let cell_of = |value: &Value, key: &'static str, show| {
            let field = Field {
                label: "",
                key,
                show,
            };
            cell(value, &field, now)
        };
        let get = |key, show| cell_of(&vm, key, show);
        assert_eq!(get("id", Text), "3fa2c1d0e4b5");
        assert_eq!(get("vcpus", Text), "2");
        assert_eq!(get("memoryMiB", MiB), "256M");
        assert_eq!(get("createdAt", Age), "3s ago");
        assert_eq!(get("createdAt", Time), "1970-01-01 00:00:01 UTC (3s ago)");
        assert_eq!(get("labels", Map), "a=b, job=42");
        assert_eq!(get("gpus", List), "renderD128");
        assert_eq!(get("releaseOnDisconnect", YesNo), "no");
        assert_eq!(get("network", Addresses), "10.77.0.2,10.77.0.3");
        assert_eq!(get("pid", Text), "");
        assert_eq!(get("absent", Time), "");

        let image = json!({
            "digest": "sha256:3fa2c1d0e4b5aaaa", "size": 3_145_728, "layers": [{}, {}],
            "cmd": ["-c", "cat /etc/hello"], "users": []
        });
        let get = |key, show| cell_of(&image, key, show);
        assert_eq!(get("digest", Digest), "3fa2c1d0e4b5");
        assert_eq!(get("size", Bytes), "3.0 MiB");
        assert_eq!(get("layers", Count), "2");
        assert_eq!(get("cmd", Argv), "-c 'cat /etc/hello'");
        assert_eq!(get("users", List), "");

        let usage = json!({"cpuUsec": 1_520_000, "memoryBytes": 47_185_920,
                           "memoryLimitBytes": 314_572_800, "oomKills": 0});
        let get = |key, show| cell_of(&usage, key, show);
        assert_eq!(get("cpuUsec", CpuTime), "1.52s");
        assert_eq!(get("memoryBytes", Bytes), "45.0 MiB");
        assert_eq!(get("memoryLimitBytes", Cap), "300.0 MiB");
        assert_eq!(cell_of(&json!({"c": 0}), "c", Cap), "none");
        let shown = block(USAGE_FIELDS, &usage, now).render();
        assert!(shown.contains(" Memory cap: 300.0 MiB\n"), "{shown}");
        assert!(shown.contains("  OOM kills: 0\n"), "{shown}");
    }

    #[test]
    fn tables_mark_empty_cells_and_blocks_skip_them() {
        let vms = [json!({"id": "a", "name": "web", "state": "ready", "createdAt": 0})];
        let text = table(VM_COLUMNS, &vms, 0).render(None);
        assert_eq!(
            text.lines().nth(1),
            Some("a   web   ready  -     -     -       -        0s ago")
        );
        let shown = block(VM_FIELDS, &vms[0], 0).render();
        assert!(shown.contains(" Name: web\n"), "{shown}");
        assert!(!shown.contains("Pool"), "{shown}");
    }
}
