//! VM networking (work in progress: see issue 6).
