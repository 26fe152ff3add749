//! `io.kiln.Kiln1.Manager` at `/io/kiln/Kiln1/Manager`.

use std::collections::HashMap;

use kiln_engine::EngineHandle;
use zbus::message::Header;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};
use zbus::{fdo, interface, Connection};

use crate::auth::Authorizer;
use crate::error::KilnError;
use crate::objects::{self, Missing};

/// The manager object: a handle and a policy, nothing else.
#[derive(Debug)]
pub struct Manager {
    engine: EngineHandle,
    auth: Authorizer,
}

impl Manager {
    /// A manager driving `engine`.
    pub fn new(engine: EngineHandle, auth: Authorizer) -> Self {
        Self { engine, auth }
    }
}

#[interface(name = "io.kiln.Kiln1.Manager")]
impl Manager {
    /// Define a VM (not started). `spec` takes the VMSpec keys (`vcpus`,
    /// `memoryMiB`, `kernel`, `initrd`, `cmdline`, `accel`); unknown keys or
    /// wrong types are `InvalidSpec`. Returns the VM's object path.
    #[zbus(name = "CreateVM", out_args("vm"))]
    async fn create_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        spec: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, KilnError> {
        self.auth.check_manage(conn, &header, "CreateVM").await?;
        let spec = crate::spec::vm_spec(&spec)?;
        let vm = self.engine.create_vm(&name, spec).await?;
        let path = objects::vm_path(&vm.id).map_err(zbus::Error::from)?;
        // Export now, not only when the event task gets to it, so the
        // returned path answers as soon as the caller has it.
        objects::upsert(
            conn.object_server(),
            &self.engine,
            self.auth,
            vm,
            Missing::Export,
        )
        .await?;
        Ok(path)
    }

    /// Object paths of all VMs.
    #[zbus(name = "ListVMs", out_args("vms"))]
    async fn list_vms(&self) -> Result<Vec<OwnedObjectPath>, KilnError> {
        let vms = self.engine.list_vms().await?;
        vms.iter()
            .map(|vm| objects::vm_path(&vm.id).map_err(|e| KilnError::ZBus(e.into())))
            .collect()
    }

    /// kilnd version.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn version(&self) -> fdo::Result<String> {
        let status = self
            .engine
            .status()
            .await
            .map_err(|e| fdo::Error::Failed(e.message()))?;
        Ok(status.version)
    }

    /// Accelerator VMs get by default (`kvm` or `tcg`).
    #[zbus(property(emits_changed_signal = "const"))]
    async fn accel(&self) -> fdo::Result<String> {
        let status = self
            .engine
            .status()
            .await
            .map_err(|e| fdo::Error::Failed(e.message()))?;
        Ok(status.accel.to_string())
    }
}
