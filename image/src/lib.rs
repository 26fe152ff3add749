//! Kiln's image store: OCI images pulled from registries or imported from
//! OCI layouts and archives, verified by digest while they stream, checked
//! for unsafe layer tars, converted to one erofs image per layer, and kept
//! content-addressed under `<state_dir>/images` (docs/images.md).
//!
//! The crate imports no IPC and no engine: the engine calls [`ImageStore`]
//! and maps [`ImageError::name`] to the wire. Every write is crash-only
//! (temp file, fsync, rename, directory fsync); cooperating processes and
//! concurrent pulls coordinate through `flock` files.
//!
//! - [`ImageStore::pull`], [`ImageStore::import`]: bring an image in, with
//!   [`Progress`] reports; [`ImageStore::import_rootfs`]: an image made of
//!   layer directories (a containerd snapshot).
//! - [`ImageStore::list`], [`ImageStore::describe`]: stored images.
//! - [`ImageStore::acquire`], [`ImageStore::release`]: who uses an image;
//!   [`ImageStore::remove`] refuses while anyone does.
//! - [`ImageStore::gc`]: free blobs and layers no image needs.
//! - [`ImageStore::boot_files`]: an OS image's kernel and the modules
//!   Kiln's initramfs loads for it (`VMSpec.boot: "image"`).

mod auth;
mod boot;
mod convert;
mod digest;
mod error;
mod fsio;
mod ingest;
mod manifest;
mod meta;
pub mod newc;
mod paths;
mod progress;
mod record;
mod reference;
mod rootfs;
mod scan;
mod source;
mod store;

pub use boot::BootFiles;
pub use digest::Digest;
pub use error::{ImageError, InvalidReason};
pub use meta::{Acquired, GcReport, Released, Removed};
pub use progress::{no_progress, LayerStep, Progress, ProgressFn};
pub use record::{Image, ImageRecord, LayerRecord, Platform, ProcessConfig, RECORD_VERSION};
pub use rootfs::{DIR_LAYER_MEDIA_TYPE, MAX_ROOTFS_LAYERS, ROOTFS_MEDIA_TYPE};
pub use store::{ImageStore, StoreConfig};
