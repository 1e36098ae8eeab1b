//! Remote message types: an actix `Message` plus serde, with a stable name.

use actix::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use courier_runtime::id::MessageType;

use crate::export::Caller;

/// A message that can cross the wire.
///
/// Implement it with [`remote_message!`](crate::remote_message), which checks
/// the wire name at compile time. The reply type (`Message::Result`) must be
/// serde too; see [`RemoteReply`].
pub trait RemoteMessage: Message + Serialize + DeserializeOwned + Send + 'static {
    /// The stable wire name, such as `"counter.add"`.
    const TYPE: MessageType;

    /// Whether [`Self::set_caller`] wants to be called; `false` spares
    /// every message of the type the work of making a [`Caller`].
    /// `remote_message!(T = "name", caller = field)` sets it.
    const WANTS_CALLER: bool = false;

    /// Called with the authenticated sender when the message arrived from a
    /// peer, before the handler runs, if [`Self::WANTS_CALLER`] is true.
    /// Declare the message with `remote_message!(T = "name", caller =
    /// field)` to store it in a `#[serde(skip)] field: Option<Caller>`.
    fn set_caller(&mut self, caller: Caller) {
        let _ = caller;
    }
}

/// What a remote handler may return: any serde type. A handler returning
/// `Result<T, E>` gives its caller the typed `Result<T, E>`.
pub trait RemoteReply: Serialize + DeserializeOwned + Send + 'static {}

impl<T: Serialize + DeserializeOwned + Send + 'static> RemoteReply for T {}

/// Makes message types remote, each under a stable wire name.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(actix::Message, Serialize, Deserialize)]
/// #[rtype(result = "u64")]
/// struct Add(u64);
///
/// courier::remote_message!(Add = "counter.add");
/// ```
///
/// A name that is empty, longer than 255 bytes, or not printable ASCII
/// without spaces fails to compile.
///
/// A handler that needs to know who sent the message (the authenticated
/// peer) names a field to receive it:
///
/// ```
/// use courier::Caller;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(actix::Message, Serialize, Deserialize)]
/// #[rtype(result = "String")]
/// struct WhoAmI {
///     #[serde(skip)]
///     caller: Option<Caller>,
/// }
///
/// courier::remote_message!(WhoAmI = "demo.whoami", caller = caller);
/// ```
#[macro_export]
macro_rules! remote_message {
    ($ty:ty = $name:literal, caller = $field:ident) => {
        impl $crate::RemoteMessage for $ty {
            const TYPE: $crate::MessageType = match $crate::MessageType::new($name) {
                Ok(t) => t,
                Err(_) => panic!(concat!("invalid remote message type name: ", $name)),
            };
            const WANTS_CALLER: bool = true;
            fn set_caller(&mut self, caller: $crate::Caller) {
                self.$field = Some(caller);
            }
        }
    };
    ($($ty:ty = $name:literal),+ $(,)?) => {
        $(
            impl $crate::RemoteMessage for $ty {
                const TYPE: $crate::MessageType = match $crate::MessageType::new($name) {
                    Ok(t) => t,
                    Err(_) => panic!(concat!("invalid remote message type name: ", $name)),
                };
            }
        )+
    };
}
