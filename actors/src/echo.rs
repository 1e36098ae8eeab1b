//! An echo actor for smoke tests and benchmarks between machines, as
//! `courier node` exports it under [`ECHO`] and `courier bench` drives it.
//!
//! ```no_run
//! # async fn demo(node: &courier::Node) -> Result<(), courier::RemoteError> {
//! use courier::echo::{Echo, EchoRequest, Payload, ECHO};
//!
//! let echo = node.lookup::<Echo>("tcp://127.0.0.1:7000", ECHO).await?;
//! let back = echo.send(EchoRequest(Payload(vec![7; 64]))).await?;
//! assert_eq!(back.0.len(), 64);
//! # Ok(()) }
//! ```

use actix::{Actor, Context, Handler, Message, MessageResult};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Node, RemoteAddr, RemoteError};

/// The name `courier node` registers its echo actor under.
pub const ECHO: &str = "courier.echo";

/// Answers [`EchoRequest`] with its payload and counts [`OneWay`] messages.
#[derive(Debug, Default)]
pub struct Echo {
    received: u64,
}

impl Actor for Echo {
    type Context = Context<Self>;
}

/// Bytes, encoded as one CBOR byte string (not an array of numbers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payload(pub Vec<u8>);

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Payload;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Payload, E> {
                Ok(Payload(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Payload, E> {
                Ok(Payload(v))
            }
        }
        d.deserialize_byte_buf(Visitor)
    }
}

/// Replies with the same payload.
#[derive(Clone, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Payload")]
pub struct EchoRequest(pub Payload);

/// A one-way message; the actor counts it.
#[derive(Clone, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct OneWay(pub Payload);

/// Replies with how many [`OneWay`] messages arrived since the actor
/// started.
#[derive(Clone, Copy, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "u64")]
pub struct Received;

crate::remote_message!(
    EchoRequest = "courier.echo.request",
    OneWay = "courier.echo.one_way",
    Received = "courier.echo.received",
);

impl Handler<EchoRequest> for Echo {
    type Result = MessageResult<EchoRequest>;
    fn handle(&mut self, m: EchoRequest, _: &mut Context<Self>) -> Self::Result {
        MessageResult(m.0)
    }
}

impl Handler<OneWay> for Echo {
    type Result = ();
    fn handle(&mut self, _: OneWay, _: &mut Context<Self>) {
        self.received += 1;
    }
}

impl Handler<Received> for Echo {
    type Result = u64;
    fn handle(&mut self, _: Received, _: &mut Context<Self>) -> u64 {
        self.received
    }
}

/// Starts an echo actor and registers it on `node` under [`ECHO`].
pub fn export_echo(node: &Node) -> Result<RemoteAddr<Echo>, RemoteError> {
    node.export(Echo::default().start())
        .handles::<EchoRequest>()
        .handles::<OneWay>()
        .handles::<Received>()
        .register(ECHO)
}
