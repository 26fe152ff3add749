//! packaging/manifest.toml is the one list of what the deb, the rpm and the
//! sysext install. These fast checks fail when it is malformed, when a
//! package build starts listing files of its own again, when
//! packaging/manifest.py (which turns it into each package's list) disagrees
//! with it, or when docs/packaging.md's table does. The built packages
//! themselves are compared with it by `make packages`
//! (`packaging/manifest.py check`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

const FORMATS: [&str; 3] = ["deb", "rpm", "sysext"];
/// The deb's only asset: the tree packaging/build.sh stages from the
/// manifest.
const DEB_ASSETS: &str = r#"[{ source = "../target/packaging-stage/deb/**/*", dest = "/" }]"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    file: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    dest: String,
    source: Option<String>,
    staged: Option<String>,
    link: Option<String>,
    made_by: Option<String>,
    mode: Option<String>,
    #[serde(default)]
    doc: bool,
    only: Option<Vec<String>>,
    why: Option<String>,
    what: String,
}

impl Entry {
    fn formats(&self) -> Vec<&str> {
        match &self.only {
            Some(only) => only.iter().map(String::as_str).collect(),
            None => FORMATS.to_vec(),
        }
    }

    fn in_format(&self, format: &str) -> bool {
        self.formats().contains(&format)
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn manifest() -> Manifest {
    toml::from_str(&read("packaging/manifest.toml")).expect("packaging/manifest.toml")
}

/// What a package holds at one path: a file with a mode, or a link.
#[derive(Debug, PartialEq, Eq)]
enum Item {
    File { mode: String },
    Link { target: String },
}

/// What `format`'s build makes from the manifest (cargo-deb's own files
/// left out).
fn wanted(manifest: &Manifest, format: &str) -> BTreeMap<String, Item> {
    manifest
        .file
        .iter()
        .filter(|e| e.in_format(format) && e.made_by.is_none())
        .map(|e| {
            let item = match &e.link {
                Some(target) => Item::Link {
                    target: target.clone(),
                },
                None => Item::File {
                    mode: e.mode.clone().unwrap(),
                },
            };
            (e.dest.clone(), item)
        })
        .collect()
}

#[test]
fn manifest_entries_are_well_formed() {
    let manifest = manifest();
    let scripts = read("packaging/build.sh") + &read("sysext/build.sh");
    let mut dests = BTreeSet::new();
    for e in &manifest.file {
        let d = &e.dest;
        assert!(dests.insert(d.clone()), "{d}: listed twice");
        assert!(
            d.starts_with("/usr/") && !d.ends_with('/') && !d.contains("/../"),
            "{d}: a file path under /usr (the sysext carries nothing else)"
        );
        assert!(!e.what.is_empty(), "{d}: `what` is empty");
        let kinds = [&e.source, &e.staged, &e.link, &e.made_by];
        assert_eq!(
            kinds.iter().filter(|k| k.is_some()).count(),
            1,
            "{d}: exactly one of source, staged, link, made_by"
        );
        if e.link.is_some() || e.made_by.is_some() {
            assert!(
                e.mode.is_none(),
                "{d}: a link or tool-made file has no mode"
            );
        } else {
            assert!(
                matches!(e.mode.as_deref(), Some("644" | "755")),
                "{d}: mode \"644\" or \"755\""
            );
        }
        if let Some(source) = &e.source {
            let meta = std::fs::metadata(repo().join(source))
                .unwrap_or_else(|err| panic!("{d}: source {source}: {err}"));
            assert!(meta.is_file(), "{d}: source {source} is not a file");
            let executable = meta.permissions().mode() & 0o111 != 0;
            assert_eq!(
                executable,
                e.mode.as_deref() == Some("755"),
                "{d}: mode {:?} but {source} is {}executable in the repository",
                e.mode,
                if executable { "" } else { "not " }
            );
        }
        if let Some(staged) = &e.staged {
            let name = Path::new(staged).file_name().unwrap().to_str().unwrap();
            assert!(
                scripts.contains(name),
                "{d}: staged {staged}, but neither packaging/build.sh nor sysext/build.sh makes it"
            );
        }
        if let Some(tool) = &e.made_by {
            assert!(
                matches!(
                    (tool.as_str(), e.only.as_deref()),
                    ("cargo-deb", Some([f])) if f == "deb"
                ) || matches!(
                    (tool.as_str(), e.only.as_deref()),
                    ("cargo-generate-rpm", Some([f])) if f == "rpm"
                ),
                "{d}: made_by {tool} belongs to that tool's package only"
            );
        }
        match &e.only {
            Some(only) => {
                assert!(
                    !only.is_empty() && only.len() < FORMATS.len(),
                    "{d}: only = {only:?}"
                );
                let set: BTreeSet<&String> = only.iter().collect();
                assert_eq!(set.len(), only.len(), "{d}: only = {only:?}");
                for f in only {
                    assert!(FORMATS.contains(&f.as_str()), "{d}: unknown package {f}");
                }
                assert!(
                    e.why.as_deref().is_some_and(|w| !w.is_empty()),
                    "{d}: an exception (`only`) says `why`"
                );
            }
            None => assert!(e.why.is_none(), "{d}: `why` without `only`"),
        }
    }
}

#[test]
fn packages_take_their_files_from_the_manifest_only() {
    let cargo: toml::Table = toml::from_str(&read("daemon/Cargo.toml")).unwrap();
    let metadata = &cargo["package"]["metadata"];
    let deb = metadata["deb"].as_table().unwrap();
    let wanted: toml::Table = toml::from_str(&format!("assets = {DEB_ASSETS}")).unwrap();
    assert_eq!(
        deb.get("assets"),
        wanted.get("assets"),
        "daemon/Cargo.toml: the deb's assets are the staged tree, nothing else"
    );
    assert!(
        !deb.contains_key("merge-assets") && !deb.contains_key("variants"),
        "daemon/Cargo.toml: no deb assets outside packaging/manifest.toml"
    );
    let rpm = metadata["generate-rpm"].as_table().unwrap();
    assert!(
        !rpm.contains_key("assets") && !rpm.contains_key("variants"),
        "daemon/Cargo.toml: the rpm's assets come from packaging/manifest.toml"
    );

    let build = read("packaging/build.sh");
    for step in [
        "manifest.py tree deb",
        "manifest.py rpm-assets",
        "--metadata-overwrite",
        "manifest.py check",
    ] {
        assert!(build.contains(step), "packaging/build.sh: no `{step}`");
    }
    let sysext = read("sysext/build.sh");
    assert!(
        sysext.contains("manifest.py tree sysext"),
        "sysext/build.sh"
    );
    for line in sysext.lines().map(str::trim_start) {
        for own in ["install ", "ln ", "cp ", "mkdir "] {
            assert!(
                !line.starts_with(own),
                "sysext/build.sh installs a file of its own: {line}"
            );
        }
    }
}

/// Run packaging/manifest.py with `args`; its stdout.
fn manifest_py(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(repo().join("packaging/manifest.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "manifest.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Files and links under `root`, by their path inside it.
fn walk(root: &Path) -> BTreeMap<String, Item> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let name = format!("/{}", path.strip_prefix(root).unwrap().display());
            if meta.is_dir() {
                dirs.push(path);
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                let target = target.to_str().unwrap().to_owned();
                found.insert(name, Item::Link { target });
            } else {
                let mode = format!("{:o}", meta.permissions().mode() & 0o7777);
                found.insert(name, Item::File { mode });
            }
        }
    }
    found
}

#[test]
fn generated_lists_match_the_manifest() {
    let manifest = manifest();
    let tmp = tempfile::tempdir().unwrap();
    // Placeholders for the build outputs.
    let stage = tmp.path().join("stage");
    for staged in manifest.file.iter().filter_map(|e| e.staged.as_ref()) {
        let path = stage.join(staged);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, staged).unwrap();
    }
    let stage_arg = stage.to_str().unwrap();

    for format in ["deb", "sysext"] {
        let root = tmp.path().join(format);
        manifest_py(&["tree", format, stage_arg, root.to_str().unwrap()]);
        assert_eq!(walk(&root), wanted(&manifest, format), "{format} tree");
    }

    let assets: toml::Table = toml::from_str(&manifest_py(&["rpm-assets", stage_arg])).unwrap();
    let mut rpm = BTreeMap::new();
    let mut docs = BTreeSet::new();
    for asset in assets["assets"].as_array().unwrap() {
        let source = asset["source"].as_str().unwrap();
        assert!(Path::new(source).is_file(), "rpm asset source {source}");
        let dest = asset["dest"].as_str().unwrap().to_owned();
        if asset.get("doc").and_then(toml::Value::as_bool) == Some(true) {
            docs.insert(dest.clone());
        }
        let mode = asset["mode"].as_str().unwrap().to_owned();
        rpm.insert(dest, Item::File { mode });
    }
    assert_eq!(rpm, wanted(&manifest, "rpm"), "rpm assets");
    let want_docs: BTreeSet<String> = manifest
        .file
        .iter()
        .filter(|e| e.in_format("rpm") && e.doc)
        .map(|e| e.dest.clone())
        .collect();
    assert_eq!(docs, want_docs, "rpm %doc files");

    for format in FORMATS {
        let listed: BTreeSet<String> = manifest_py(&["list", format])
            .lines()
            .map(str::to_owned)
            .collect();
        let want: BTreeSet<String> = manifest
            .file
            .iter()
            .filter(|e| e.in_format(format))
            .map(|e| e.dest.clone())
            .collect();
        assert_eq!(listed, want, "manifest.py list {format}");
    }
}

/// `/a/{b,c}` → `/a/b`, `/a/c` (one brace group at most).
fn expand(path: &str) -> Vec<String> {
    match (path.find('{'), path.find('}')) {
        (Some(open), Some(close)) => path[open + 1..close]
            .split(',')
            .map(|part| format!("{}{part}{}", &path[..open], &path[close + 1..]))
            .collect(),
        _ => vec![path.to_owned()],
    }
}

#[test]
fn docs_table_matches_the_manifest() {
    let manifest = manifest();
    let docs = read("docs/packaging.md");
    let section = docs
        .split("\n## What the packages ship\n")
        .nth(1)
        .expect("docs/packaging.md: ## What the packages ship")
        .split("\n#")
        .next()
        .unwrap();
    let mut table = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `/")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (path, formats) = (cells[1].trim_matches('`'), cells[2]);
        let formats: BTreeSet<String> = if formats == "all" {
            FORMATS.iter().map(|f| f.to_string()).collect()
        } else {
            formats.split(", ").map(str::to_owned).collect()
        };
        for p in expand(path) {
            assert!(
                table.insert(p.clone(), formats.clone()).is_none(),
                "{p}: twice"
            );
        }
    }
    let want: BTreeMap<String, BTreeSet<String>> = manifest
        .file
        .iter()
        .map(|e| {
            let formats = e.formats().into_iter().map(str::to_owned).collect();
            (e.dest.clone(), formats)
        })
        .collect();
    assert_eq!(
        table, want,
        "docs/packaging.md's table (path | in | what) and packaging/manifest.toml"
    );
}
