//! The rootfs containerd prepared, as Kiln takes it: the layer directories
//! of the overlay mount the overlayfs snapshotter returns (`lowerdir=`,
//! nearest parent first), lowest first for `ImportRootfs`. Each is a
//! committed snapshot's `fs/`: one layer's diff with overlay whiteouts,
//! which kilnd turns into one erofs disk, cached by the directory. The
//! writable `upperdir` is not used: the container writes to its guest's
//! own writable layer.

use containerd_shim_protos::types::mount::Mount;

/// Why the rootfs cannot become a Kiln image.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RootfsError {
    #[error("the task has no rootfs mount: Kiln runs images unpacked by containerd's overlayfs snapshotter (ctr run --rootfs is not supported)")]
    Missing,
    #[error("rootfs mount of type {0:?}: Kiln needs containerd's overlayfs snapshotter and an image with at least one layer")]
    Unsupported(String),
    #[error("the overlay rootfs mount has no lowerdir (an image with no layers?)")]
    NoLayers,
}

/// The layer directories of `mounts`, lowest first.
pub fn layer_dirs(mounts: &[Mount]) -> Result<Vec<String>, RootfsError> {
    let [mount] = mounts else {
        return Err(match mounts.first() {
            None => RootfsError::Missing,
            Some(m) => {
                RootfsError::Unsupported(format!("{} (and {} more)", m.type_, mounts.len() - 1))
            }
        });
    };
    if mount.type_ != "overlay" {
        return Err(RootfsError::Unsupported(mount.type_.clone()));
    }
    let lower = mount
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .filter(|l| !l.is_empty())
        .ok_or(RootfsError::NoLayers)?;
    Ok(lower.split(':').rev().map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mount(type_: &str, options: &[&str]) -> Mount {
        Mount {
            type_: type_.into(),
            source: type_.into(),
            options: options.iter().map(|o| (*o).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn overlay_lowerdirs_come_lowest_first() {
        let s = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots";
        let m = mount(
            "overlay",
            &[
                "index=off",
                &format!("workdir={s}/9/work"),
                &format!("upperdir={s}/9/fs"),
                &format!("lowerdir={s}/3/fs:{s}/2/fs:{s}/1/fs"),
            ],
        );
        assert_eq!(
            layer_dirs(&[m]).unwrap(),
            [
                format!("{s}/1/fs"),
                format!("{s}/2/fs"),
                format!("{s}/3/fs")
            ]
        );
    }

    #[test]
    fn other_rootfs_shapes_are_refused_clearly() {
        assert_eq!(layer_dirs(&[]), Err(RootfsError::Missing));
        assert_eq!(
            layer_dirs(&[mount("bind", &["rbind", "rw"])]),
            Err(RootfsError::Unsupported("bind".into()))
        );
        assert_eq!(
            layer_dirs(&[mount("overlay", &["upperdir=/u", "workdir=/w"])]),
            Err(RootfsError::NoLayers)
        );
    }
}
