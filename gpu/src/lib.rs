//! GPU render node inventory and leases (work in progress: see issue 7).
