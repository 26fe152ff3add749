//! Tests that cannot run here. Locally (no root, a tool missing) they print
//! why and pass; in CI (`CI` set, as `.ci/run` does) they fail, because CI
//! runs as root with every tool `make deps` installs, and a skip there would
//! hide a test that no longer runs. Missing hardware (a host render node) is
//! not a reason to fail and does not come here.

/// Whether the suite runs in CI: `CI` is set and not empty.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// The running test's name (libtest names each test's thread after it).
fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned()
}

/// The running test cannot run here because of `why`: prints
/// `SKIPPED <test>: <why>` and returns, so the caller returns; in CI it
/// panics instead.
pub fn skip(why: &str) {
    let test = current_test();
    assert!(
        !in_ci(),
        "{test} cannot run: {why}; CI (CI is set) must run every test"
    );
    eprintln!("SKIPPED {test}: {why}");
}

/// True when running as root. Otherwise [`skip`] with "needs root
/// (`needs`)" (a failure in CI) and false, so the test returns.
pub fn require_root(needs: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(&format!("needs root ({needs})"));
    false
}
