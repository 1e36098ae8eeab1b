//! Remote message types: an actix `Message` plus serde, with a stable name.

use actix::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use courier_runtime::id::MessageType;

/// A message that can cross the wire.
///
/// Implement it with [`remote_message!`](crate::remote_message), which checks
/// the wire name at compile time. The reply type (`Message::Result`) must be
/// serde too; see [`RemoteReply`].
pub trait RemoteMessage: Message + Serialize + DeserializeOwned + Send + 'static {
    /// The stable wire name, such as `"counter.add"`.
    const TYPE: MessageType;
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
#[macro_export]
macro_rules! remote_message {
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
