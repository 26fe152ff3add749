//! A blocking client of kilnd's varlink API (`io.kiln.Manager`): the
//! connection and its framing ([`client`]), descriptors passed with calls
//! and replies ([`fds`]), and one typed method per varlink method
//! ([`api`]). kilnctl and `containerd-shim-kiln-v1` use it; it links no
//! other Kiln crate and no async runtime.

pub mod api;
pub mod client;
pub mod fds;
