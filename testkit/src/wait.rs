//! Waiting for a condition instead of sleeping a fixed time: the wait ends
//! as soon as the condition holds, and a timeout says what was awaited and
//! what was seen last (Cloud Hypervisor's `test_infra::wait_until`).
//!
//! A negative assertion ("X did not happen") waits for the positive
//! evidence that the system has settled (the process is gone, the count is
//! final) and then asserts; it never sleeps and hopes.

use std::fmt;
use std::time::{Duration, Instant};

/// The first pause between polls; it doubles up to [`MAX_PAUSE`], so fast
/// conditions are seen at once and slow ones (a process per poll) are not
/// hammered on the 2-core test machines.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_millis(250);

/// What a polled condition returns: ready, with a value, or not yet, with
/// what it saw (for the timeout message).
pub trait Poll {
    /// The value a ready condition yields.
    type Ready;
    /// `Ok(value)` when ready; `Err(what was seen)` when not.
    fn poll(self) -> Result<Self::Ready, Option<String>>;
}

impl Poll for bool {
    type Ready = ();
    fn poll(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T> Poll for Option<T> {
    type Ready = T;
    fn poll(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

/// `Err(e)`: not yet; `e` is what was seen, printed if the wait times out.
impl<T, E: fmt::Display> Poll for Result<T, E> {
    type Ready = T;
    fn poll(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(e.to_string()))
    }
}

/// A condition that did not hold in time.
#[derive(Debug)]
pub struct TimedOut {
    /// How long it was polled.
    pub waited: Duration,
    /// What the last poll saw, if the condition said.
    pub last: Option<String>,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timed out after {:?}", self.waited)?;
        match &self.last {
            Some(last) => write!(f, "; last seen: {last}"),
            None => Ok(()),
        }
    }
}

/// Poll `condition` until it is ready or `timeout` passes; it is polled
/// once more at the deadline, so a slow poll never loses the last chance.
pub fn try_wait_until<P: Poll>(
    timeout: Duration,
    mut condition: impl FnMut() -> P,
) -> Result<P::Ready, TimedOut> {
    let started = Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        let last = match condition().poll() {
            Ok(ready) => return Ok(ready),
            Err(last) => last,
        };
        let waited = started.elapsed();
        if waited >= timeout {
            return Err(TimedOut { waited, last });
        }
        std::thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Poll `condition` until it is ready and return its value; panic with
/// `what` (what was awaited) and the last thing seen after `timeout`.
pub fn wait_until<P: Poll>(
    timeout: Duration,
    what: &str,
    condition: impl FnMut() -> P,
) -> P::Ready {
    try_wait_until(timeout, condition).unwrap_or_else(|t| panic!("waiting for {what}: {t}"))
}

/// [`wait_until`] for async conditions (tests on a tokio runtime).
pub async fn wait_until_async<P: Poll>(
    timeout: Duration,
    what: &str,
    mut condition: impl AsyncFnMut() -> P,
) -> P::Ready {
    let started = Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        let last = match condition().await.poll() {
            Ok(ready) => return ready,
            Err(last) => last,
        };
        let waited = started.elapsed();
        if waited >= timeout {
            panic!("waiting for {what}: {}", TimedOut { waited, last });
        }
        tokio::time::sleep(pause.min(timeout - waited)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_at_once_returns_the_value() {
        assert_eq!(wait_until(Duration::ZERO, "a value", || Some(7)), 7);
    }

    #[test]
    fn becomes_ready_after_a_few_polls() {
        let mut polls = 0;
        wait_until(Duration::from_secs(5), "the third poll", || {
            polls += 1;
            polls == 3
        });
        assert_eq!(polls, 3);
    }

    #[test]
    fn a_timeout_says_what_was_seen_last() {
        let mut n = 0;
        let err = try_wait_until(Duration::from_millis(30), || {
            n += 1;
            Err::<(), _>(format!("poll {n}"))
        })
        .unwrap_err();
        assert!(err.waited >= Duration::from_millis(30), "{err}");
        assert_eq!(err.last, Some(format!("poll {n}")));
        assert!(err.to_string().contains("last seen: poll"), "{err}");
    }

    #[test]
    #[should_panic(expected = "waiting for the impossible: timed out")]
    fn wait_until_panics_with_what() {
        wait_until(Duration::from_millis(10), "the impossible", || false);
    }

    #[tokio::test]
    async fn async_conditions_are_awaited() {
        let mut polls = 0;
        let v = wait_until_async(Duration::from_secs(5), "an async value", || {
            polls += 1;
            let ready = polls > 1;
            async move { ready.then_some("done") }
        })
        .await;
        assert_eq!((v, polls), ("done", 2));
    }
}
