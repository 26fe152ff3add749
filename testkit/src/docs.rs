//! The shell examples of docs/api.md, run verbatim by the API tests.

use std::process::Command;

/// The ```sh blocks of the `heading` section of docs/api.md, joined into
/// one bash script that stops at the first failure, with each `(default,
/// here)` pair applied: the examples must name `default` (a socket, an id,
/// a path as a reader would have it), which becomes `here` (this test's).
pub fn api_doc_script(heading: &str, substitutions: &[(&str, String)]) -> String {
    let doc = std::fs::read_to_string(crate::workspace_root().join("docs/api.md")).unwrap();
    let section = doc
        .split(&format!("\n{heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("docs/api.md has no section {heading:?}"))
        .split("\n## ")
        .next()
        .unwrap();
    let mut script = String::from("set -euo pipefail\n");
    for block in section.split("```sh\n").skip(1) {
        script.push_str(block.split("```").next().unwrap());
    }
    for (default, here) in substitutions {
        assert!(
            script.contains(default),
            "the examples of {heading} name {default}"
        );
        script = script.replace(default, here);
    }
    script
}

/// Run a bash script; panic with its output (and `context`) if it fails.
pub fn run_bash(script: &str, context: &str) -> String {
    let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "docs/api.md examples failed:\n{}\n{}\n{context}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
