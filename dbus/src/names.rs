//! The names of `io.kiln.Kiln1` (fixed by DESIGN.md §1): bus name,
//! interfaces, object paths and the error prefix. A leaf: every other module
//! may import it, it imports none of them.

use zbus::zvariant::OwnedObjectPath;

/// Well-known bus name.
pub const BUS_NAME: &str = "io.kiln.Kiln1";
/// ObjectManager root.
pub const ROOT_PATH: &str = "/io/kiln/Kiln1";
/// The manager object.
pub const MANAGER_PATH: &str = "/io/kiln/Kiln1/Manager";
/// Manager interface name.
pub const MANAGER_INTERFACE: &str = "io.kiln.Kiln1.Manager";
/// Parent of the VM objects.
pub const VM_PATH_PREFIX: &str = "/io/kiln/Kiln1/vm";
/// VM interface name.
pub const VM_INTERFACE: &str = "io.kiln.Kiln1.VM";
/// Parent of the pool objects.
pub const POOL_PATH_PREFIX: &str = "/io/kiln/Kiln1/pool";
/// Pool interface name.
pub const POOL_INTERFACE: &str = "io.kiln.Kiln1.Pool";
/// Parent of the GPU objects.
pub const GPU_PATH_PREFIX: &str = "/io/kiln/Kiln1/gpu";
/// GPU interface name.
pub const GPU_INTERFACE: &str = "io.kiln.Kiln1.Gpu";
/// What every Kiln error name starts with: `io.kiln.Kiln1.Error.<Name>`.
pub const ERROR_PREFIX: &str = "io.kiln.Kiln1.Error";

/// `/io/kiln/Kiln1/vm/<id>` (ids are lowercase hex: valid path elements).
pub fn vm_path(id: &str) -> Result<OwnedObjectPath, zbus::zvariant::Error> {
    OwnedObjectPath::try_from(format!("{VM_PATH_PREFIX}/{id}"))
}

/// The id in a VM object path (`/io/kiln/Kiln1/vm/<id>`), if it is one.
pub fn vm_id(path: &str) -> Option<&str> {
    path.strip_prefix(VM_PATH_PREFIX)
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// `/io/kiln/Kiln1/pool/<name>`, with every byte outside `[A-Za-z0-9]`
/// written `_xx` (hex), as systemd escapes unit names in object paths.
pub fn pool_path(name: &str) -> Result<OwnedObjectPath, zbus::zvariant::Error> {
    OwnedObjectPath::try_from(format!("{POOL_PATH_PREFIX}/{}", escape_path_element(name)))
}

/// `/io/kiln/Kiln1/gpu/<name>`, escaped like pool names.
pub fn gpu_path(name: &str) -> Result<OwnedObjectPath, zbus::zvariant::Error> {
    OwnedObjectPath::try_from(format!("{GPU_PATH_PREFIX}/{}", escape_path_element(name)))
}

/// A name as an object path element: every byte outside `[A-Za-z0-9]`
/// written `_xx` (hex).
fn escape_path_element(name: &str) -> String {
    let mut escaped = String::with_capacity(name.len() * 3);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            escaped.push(char::from(b));
        } else {
            escaped.push_str(&format!("_{b:02x}"));
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn pool_names_escape_to_valid_path_elements() {
        assert_eq!(
            pool_path("default").unwrap().as_str(),
            "/io/kiln/Kiln1/pool/default"
        );
        assert_eq!(
            pool_path("ci-runner_2.x").unwrap().as_str(),
            "/io/kiln/Kiln1/pool/ci_2drunner_5f2_2ex"
        );
        assert_ne!(pool_path("a-b").unwrap(), pool_path("a_b").unwrap());
        assert_eq!(
            gpu_path("renderD128").unwrap().as_str(),
            "/io/kiln/Kiln1/gpu/renderD128"
        );
    }

    #[test]
    fn vm_ids_come_back_out_of_their_paths() {
        let path = vm_path("0123456789ab").unwrap();
        assert_eq!(vm_id(path.as_str()), Some("0123456789ab"));
        for not_a_vm in [
            "/io/kiln/Kiln1/vm",
            "/io/kiln/Kiln1/vm/",
            "/io/kiln/Kiln1/vm/a/b",
            "/io/kiln/Kiln1/vmx",
            "/io/kiln/Kiln1/pool/a",
        ] {
            assert_eq!(vm_id(not_a_vm), None, "{not_a_vm}");
        }
    }
}
