//! What the exported VM, pool and GPU objects have in common: each mirrors
//! one engine value ([`Mirror`]), which [`upsert`] exports or updates
//! (emitting PropertiesChanged for what differs) and [`unexport`] removes.
//! The object modules implement [`Mirror`]; `objects.rs` drives them from
//! engine events; the manager exports what it creates at once.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use kiln_engine::EngineHandle;
use tokio::sync::watch;
use tracing::warn;
use zbus::fdo::Properties;
use zbus::names::InterfaceName;
use zbus::object_server::Interface;
use zbus::zvariant::{OwnedObjectPath, Value};
use zbus::ObjectServer;

use crate::auth::Authorizer;

/// What objects need to serve methods.
#[derive(Debug, Clone)]
pub struct Context {
    /// The engine.
    pub engine: EngineHandle,
    /// The authorization policy.
    pub auth: Authorizer,
}

/// An object that mirrors one engine value (a VM, a pool): its properties
/// read a view that only the event task writes.
pub trait Mirror: Interface + Sized {
    /// The engine value.
    type Info: Clone + Send + Sync + 'static;
    /// Interface name, for PropertiesChanged.
    const INTERFACE: &'static str;
    /// A new object showing `info`.
    fn new_object(info: Self::Info, context: &Context) -> Self;
    /// The view the event task updates.
    fn view(&self) -> Arc<watch::Sender<Self::Info>>;
    /// Where the object lives.
    fn path(info: &Self::Info) -> Result<OwnedObjectPath, zbus::zvariant::Error>;
    /// Every property as (D-Bus name, value), for PropertiesChanged diffs.
    fn properties(info: &Self::Info) -> Vec<(&'static str, Value<'static>)>;
}

/// The wire spelling of an engine enum (`template`, `building-template`,
/// `virtio-gpu`, …), as varlink shows it.
pub fn wire_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Whether [`upsert`] may create a missing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Export it (a VM that was just created, or listed).
    Export,
    /// Leave it missing: a change event can be older than a `Delete` that
    /// already removed the object, which must not come back.
    Ignore,
}

/// Update the view of `info`'s object (emitting PropertiesChanged for what
/// differs) or export it.
pub async fn upsert<T: Mirror>(
    server: &ObjectServer,
    context: &Context,
    info: T::Info,
    missing: Missing,
) -> zbus::Result<()> {
    let path = T::path(&info)?;
    match server.interface::<_, T>(&path).await {
        Ok(iface) => {
            let view = iface.get().await.view();
            let old = view.send_replace(info);
            let new = T::properties(&view.borrow());
            let old = T::properties(&old);
            let changed: HashMap<&str, Value<'_>> = new
                .into_iter()
                .zip(old)
                .filter(|((_, n), (_, o))| n != o)
                .map(|((name, n), _)| (name, n))
                .collect();
            if !changed.is_empty() {
                Properties::properties_changed(
                    iface.signal_emitter(),
                    InterfaceName::from_static_str_unchecked(T::INTERFACE),
                    changed,
                    Cow::Borrowed(&[]),
                )
                .await?;
            }
            Ok(())
        }
        Err(zbus::Error::InterfaceNotFound) if missing == Missing::Ignore => Ok(()),
        Err(zbus::Error::InterfaceNotFound) => {
            // Ok(false) means another caller exported it in between:
            // nothing to do, the next event updates it.
            server
                .at(&path, T::new_object(info, context))
                .await
                .map(drop)
        }
        Err(e) => Err(e),
    }
}

/// Remove an object if it is exported.
pub async fn unexport<T: Mirror>(server: &ObjectServer, path: OwnedObjectPath) {
    match server.remove::<T, _>(&path).await {
        Ok(_) | Err(zbus::Error::InterfaceNotFound) => {}
        Err(e) => warn!(path = %path, error = %e, "dbus: cannot remove object"),
    }
}
