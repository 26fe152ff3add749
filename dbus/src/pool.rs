//! `io.kiln.Kiln1.Pool`: one object per pool at
//! `/io/kiln/Kiln1/pool/<escaped name>`, properties only (pools are changed
//! through the manager). Like VM objects, properties read a view the event
//! task in `objects.rs` updates.

use std::sync::Arc;

use kiln_engine::PoolInfo;
use tokio::sync::watch;
use zbus::zvariant::{OwnedObjectPath, Value};
use zbus::{interface, ObjectServer};

use crate::mirror::{unexport, wire_name, Context, Mirror};
use crate::names::{pool_path, POOL_INTERFACE};

/// One exported pool.
#[derive(Debug)]
pub struct Pool {
    view: Arc<watch::Sender<PoolInfo>>,
}

impl Mirror for Pool {
    type Info = PoolInfo;
    const INTERFACE: &'static str = POOL_INTERFACE;

    fn new_object(info: PoolInfo, _context: &Context) -> Self {
        Self {
            view: Arc::new(watch::Sender::new(info)),
        }
    }
    fn view(&self) -> Arc<watch::Sender<PoolInfo>> {
        self.view.clone()
    }
    fn path(info: &PoolInfo) -> Result<OwnedObjectPath, zbus::zvariant::Error> {
        pool_path(&info.name)
    }
    fn properties(info: &PoolInfo) -> Vec<(&'static str, Value<'static>)> {
        vec![
            ("Name", Value::from(info.name.clone())),
            ("Mode", Value::from(mode(info))),
            ("State", Value::from(state(info))),
            ("Warm", Value::from(info.warm)),
            ("Max", Value::from(info.max)),
            ("RefillConcurrency", Value::from(info.refill_concurrency)),
            ("Hot", Value::from(info.hot)),
            ("Booting", Value::from(info.booting)),
            ("Leased", Value::from(info.leased)),
            ("Failed", Value::from(info.failed)),
            ("Waiting", Value::from(info.waiting)),
            ("TemplateReady", Value::from(info.template_ready)),
            (
                "LastError",
                Value::from(info.last_error.clone().unwrap_or_default()),
            ),
            (
                "Source",
                Value::from(info.source.to_string_lossy().into_owned()),
            ),
        ]
    }
}

/// Remove a pool's object if it is exported.
pub async fn unexport_pool(server: &ObjectServer, name: &str) {
    if let Ok(path) = pool_path(name) {
        unexport::<Pool>(server, path).await;
    }
}

fn mode(info: &PoolInfo) -> String {
    wire_name(&info.mode)
}

fn state(info: &PoolInfo) -> String {
    wire_name(&info.state)
}

impl Pool {
    fn info(&self) -> watch::Ref<'_, PoolInfo> {
        self.view.borrow()
    }
}

#[interface(name = "io.kiln.Kiln1.Pool")]
impl Pool {
    /// Pool name.
    #[zbus(property)]
    fn name(&self) -> String {
        self.info().name.clone()
    }

    /// `template` or `cold`.
    #[zbus(property)]
    fn mode(&self) -> String {
        mode(&self.info())
    }

    /// `filling`, `ready`, `building-template`, `backoff` or `failed`.
    #[zbus(property)]
    fn state(&self) -> String {
        state(&self.info())
    }

    /// Hot VMs kept ready.
    #[zbus(property)]
    fn warm(&self) -> u32 {
        self.info().warm
    }

    /// Cap of VMs the pool owns (hot + booting + leased).
    #[zbus(property)]
    fn max(&self) -> u32 {
        self.info().max
    }

    /// Boots run at once while refilling.
    #[zbus(property)]
    fn refill_concurrency(&self) -> u32 {
        self.info().refill_concurrency
    }

    /// Ready, unleased VMs.
    #[zbus(property)]
    fn hot(&self) -> u32 {
        self.info().hot
    }

    /// VMs being booted or cloned.
    #[zbus(property)]
    fn booting(&self) -> u32 {
        self.info().booting
    }

    /// VMs handed out and not yet released.
    #[zbus(property)]
    fn leased(&self) -> u32 {
        self.info().leased
    }

    /// Boots that failed since the last one that worked.
    #[zbus(property)]
    fn failed(&self) -> u32 {
        self.info().failed
    }

    /// Acquire calls waiting for a VM.
    #[zbus(property)]
    fn waiting(&self) -> u32 {
        self.info().waiting
    }

    /// Whether the template is built (template pools).
    #[zbus(property)]
    fn template_ready(&self) -> bool {
        self.info().template_ready
    }

    /// Last boot or template error ("" = none).
    #[zbus(property)]
    fn last_error(&self) -> String {
        self.info().last_error.clone().unwrap_or_default()
    }

    /// The definition file.
    #[zbus(property)]
    fn source(&self) -> String {
        self.info().source.to_string_lossy().into_owned()
    }
}
