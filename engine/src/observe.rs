//! Watching the calls made through one `EngineHandle` (module `api`): which
//! failed and by what error name, how long each `Acquire` took, how each
//! pull or import ended.
//!
//! kilnd hands each adapter a handle observed for its transport
//! (`EngineHandle::observed`), and its metrics count what the observer is
//! told. The engine knows nothing of metrics: it reports plain facts, and
//! an unobserved handle (every other caller) reports nothing.

use std::fmt::Debug;
use std::time::Duration;

use crate::error::ErrorName;

/// Which image job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageJobKind {
    /// `PullImage`.
    Pull,
    /// `ImportImage`.
    Import,
}

/// Told about the calls made through an observed handle. Called on the
/// caller's task (or, for image jobs, on a small task of the handle's), so
/// it must not block.
pub trait CallObserver: Send + Sync + Debug {
    /// A call failed with `name` (also for `Acquire` and image jobs).
    fn failed(&self, name: ErrorName);
    /// An `Acquire` of `pool` ended after `elapsed`, waiting for a boot
    /// included: `Ok`, or the error name.
    fn acquired(&self, pool: &str, elapsed: Duration, outcome: Result<(), ErrorName>);
    /// A pull or import ended, whether or not its caller was still there
    /// to hear of it.
    fn image_job(&self, kind: ImageJobKind, outcome: Result<(), ErrorName>);
}
