//! Task events to containerd (`/tasks/create`, `/tasks/exit`, ...) over
//! its ttrpc `Events` service: the publisher containerd-shim connected,
//! connected again once if a publish fails (containerd restarted).

use std::sync::{Mutex, PoisonError};

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Context;
use containerd_shim_protos::protobuf::MessageDyn;

/// Publishes task events for one containerd namespace.
pub struct Events {
    publisher: Mutex<RemotePublisher>,
    namespace: String,
    /// containerd's ttrpc address (`TTRPC_ADDRESS`), to connect again.
    address: String,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("namespace", &self.namespace)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: String) -> Self {
        Self {
            publisher: Mutex::new(publisher),
            namespace,
            address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        }
    }

    /// Publish `event` on `topic`; failures are logged (containerd also
    /// asks `State` and `Wait`, events only speed it up — except
    /// `TaskExit`, for which one reconnect is tried).
    pub fn publish(&self, topic: &str, event: impl MessageDyn + Clone) {
        let mut publisher = self
            .publisher
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let sent = publisher.publish(
            Context::default(),
            topic,
            &self.namespace,
            Box::new(event.clone()),
        );
        let Err(e) = sent else { return };
        log::warn!("publishing {topic}: {e}; connecting to containerd again");
        match RemotePublisher::new(&self.address) {
            Ok(again) => {
                *publisher = again;
                if let Err(e) =
                    publisher.publish(Context::default(), topic, &self.namespace, Box::new(event))
                {
                    log::error!("publishing {topic}: {e}");
                }
            }
            Err(e) => log::error!("connecting to containerd at {}: {e}", self.address),
        }
    }
}
