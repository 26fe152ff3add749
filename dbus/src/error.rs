//! The one mapping of errors to D-Bus error names:
//! `io.kiln.Kiln1.Error.<ErrorName>`, for every name of the engine's one
//! list ([`ErrorName`], which also holds the adapters' `PermissionDenied`),
//! so no name is kept here by hand.

use kiln_engine::error::ErrorName;
use kiln_engine::EngineError;
use zbus::message::{Header, Message};

use crate::names::ERROR_PREFIX;

/// The name zbus replies bus-level failures under (what its `DBusError`
/// derive uses for a `#[zbus(error)]` variant).
const ZBUS_ERROR: &str = "org.freedesktop.zbus.Error";

/// Errors a Kiln method replies with. Clients match on the name; the
/// message is for humans.
#[derive(Debug)]
pub enum KilnError {
    /// `io.kiln.Kiln1.Error.<name>`, the message as the reply's one string.
    Kiln {
        /// Which error.
        name: ErrorName,
        /// For humans.
        message: String,
    },
    /// A bus-level failure (replied under zbus' own error name).
    ZBus(zbus::Error),
}

impl KilnError {
    /// A Kiln error named `name`.
    pub fn new(name: ErrorName, message: impl Into<String>) -> Self {
        Self::Kiln {
            name,
            message: message.into(),
        }
    }

    /// What a human reads.
    pub fn message(&self) -> String {
        match self {
            Self::Kiln { message, .. } => message.clone(),
            Self::ZBus(e) => reply_text(e),
        }
    }
}

/// What a bus-level error's reply says: the remote description of a method
/// error, else zbus' own text.
fn reply_text(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(_, Some(description), _) => description.clone(),
        other => other.to_string(),
    }
}

impl zbus::DBusError for KilnError {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        Message::error(call, self.name())?.build(&self.message())
    }

    fn name(&self) -> zbus::names::ErrorName<'_> {
        match self {
            Self::Kiln { name, .. } => zbus::names::ErrorName::from_string_unchecked(format!(
                "{ERROR_PREFIX}.{}",
                name.as_str()
            )),
            Self::ZBus(_) => zbus::names::ErrorName::from_static_str_unchecked(ZBUS_ERROR),
        }
    }

    fn description(&self) -> Option<&str> {
        match self {
            Self::Kiln { message, .. } => Some(message),
            Self::ZBus(e) => e.description(),
        }
    }
}

impl std::fmt::Display for KilnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = zbus::DBusError::name(self);
        write!(f, "{name}: {}", self.message())
    }
}

impl std::error::Error for KilnError {}

impl From<EngineError> for KilnError {
    fn from(e: EngineError) -> Self {
        Self::new(e.error_name(), e.message())
    }
}

impl From<zbus::Error> for KilnError {
    fn from(e: zbus::Error) -> Self {
        Self::ZBus(e)
    }
}

impl From<zbus::zvariant::Error> for KilnError {
    fn from(e: zbus::zvariant::Error) -> Self {
        Self::ZBus(e.into())
    }
}

impl From<zbus::fdo::Error> for KilnError {
    fn from(e: zbus::fdo::Error) -> Self {
        Self::ZBus(e.into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use zbus::DBusError;

    fn call() -> Message {
        Message::method_call("/io/kiln/Kiln1/Manager", "ListVMs")
            .unwrap()
            .sender(":1.7")
            .unwrap()
            .destination("io.kiln.Kiln1")
            .unwrap()
            .build(&())
            .unwrap()
    }

    #[test]
    fn every_name_is_a_valid_error_name_and_replies_under_it() {
        let call = call();
        for &name in ErrorName::ALL {
            let e = KilnError::new(name, "why");
            let want = format!("io.kiln.Kiln1.Error.{name}");
            // Valid by the D-Bus rules (the unchecked constructor skips them).
            zbus::names::ErrorName::try_from(want.as_str()).unwrap();
            assert_eq!(e.name().as_str(), want);
            let reply = e.create_reply(&call.header()).unwrap();
            let header = reply.header();
            assert_eq!(header.error_name().unwrap().as_str(), want);
            assert_eq!(
                header.reply_serial(),
                Some(call.primary_header().serial_num())
            );
            assert_eq!(reply.body().deserialize::<String>().unwrap(), "why");
        }
    }

    #[test]
    fn engine_errors_keep_their_names_and_messages() {
        for e in [
            EngineError::NoSuchVM("x".into()),
            EngineError::InvalidArgument("x".into()),
            EngineError::Busy { id: "x".into() },
            EngineError::ShuttingDown,
            EngineError::NoHotplugSlot("x".into()),
        ] {
            let want = format!("io.kiln.Kiln1.Error.{}", e.name());
            let message = e.message();
            let mapped = KilnError::from(e);
            assert_eq!(mapped.name().as_str(), want);
            assert_eq!(mapped.description(), Some(message.as_str()));
        }
    }

    #[test]
    fn bus_failures_reply_under_zbus_name() {
        let e = KilnError::from(zbus::fdo::Error::AccessDenied("no".into()));
        assert_eq!(e.name().as_str(), "org.freedesktop.zbus.Error");
        let reply = e.create_reply(&call().header()).unwrap();
        assert_eq!(
            reply.header().error_name().unwrap().as_str(),
            "org.freedesktop.zbus.Error"
        );
        assert!(!reply.body().deserialize::<String>().unwrap().is_empty());
    }
}
