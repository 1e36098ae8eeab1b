//! Courier's protocol core, without IO.
pub mod error;
pub mod frame;
pub mod handshake;
pub mod id;
pub mod liveness;
pub mod refs;
pub mod session;
#[cfg(test)]
mod tests;
pub mod transport;
pub mod wire;
