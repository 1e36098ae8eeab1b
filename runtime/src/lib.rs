//! Courier's protocol core, without IO.
pub mod frame;
pub mod id;
pub mod transport;
pub mod wire;
