//! The actor the benchmark calls, and its messages.

use actix::prelude::*;
use courier::{Fd, RemoteAddr};
use serde::{Deserialize, Serialize};

/// A small message: an id and 64 bytes (the same bytes the raw+cbor
/// baseline encodes).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Msg {
    pub id: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl Msg {
    pub fn new(id: u64) -> Self {
        Self {
            id,
            data: vec![0x5a; 64],
        }
    }
}

#[derive(Default)]
pub struct Sink {
    count: u64,
    kept: Vec<RemoteAddr<Sink>>,
}

impl Actor for Sink {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
    }
}

#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Msg")]
pub struct Echo(pub Msg);

#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct Cast(pub Msg);

#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "u64")]
pub struct Count;

/// Bulk data as Courier carries it best: a blob beside the payload.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "u64")]
pub struct Big(pub courier::Blob);

/// The same bytes inside the CBOR payload (a `Bytes` field), for comparison.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "u64")]
pub struct BigInline(pub bytes::Bytes);

#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct TakeRef(pub RemoteAddr<Sink>);

#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "u64")]
pub struct KeepRefs(pub Vec<RemoteAddr<Sink>>);

#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct TakeFd(pub Fd);

courier::remote_message!(
    Echo = "bench.echo",
    Cast = "bench.cast",
    Count = "bench.count",
    Big = "bench.big",
    BigInline = "bench.big_inline",
    TakeRef = "bench.take_ref",
    KeepRefs = "bench.keep_refs",
    TakeFd = "bench.take_fd",
);

impl Handler<Echo> for Sink {
    type Result = MessageResult<Echo>;
    fn handle(&mut self, m: Echo, _: &mut Context<Self>) -> Self::Result {
        MessageResult(m.0)
    }
}

impl Handler<Cast> for Sink {
    type Result = ();
    fn handle(&mut self, _: Cast, _: &mut Context<Self>) {
        self.count += 1;
    }
}

impl Handler<Count> for Sink {
    type Result = u64;
    fn handle(&mut self, _: Count, _: &mut Context<Self>) -> u64 {
        self.count
    }
}

impl Handler<Big> for Sink {
    type Result = u64;
    fn handle(&mut self, m: Big, _: &mut Context<Self>) -> u64 {
        m.0.len() as u64
    }
}

impl Handler<BigInline> for Sink {
    type Result = u64;
    fn handle(&mut self, m: BigInline, _: &mut Context<Self>) -> u64 {
        m.0.len() as u64
    }
}

impl Handler<TakeRef> for Sink {
    type Result = ();
    fn handle(&mut self, _: TakeRef, _: &mut Context<Self>) {}
}

impl Handler<KeepRefs> for Sink {
    type Result = u64;
    fn handle(&mut self, m: KeepRefs, _: &mut Context<Self>) -> u64 {
        self.kept.extend(m.0);
        self.kept.len() as u64
    }
}

impl Handler<TakeFd> for Sink {
    type Result = ();
    fn handle(&mut self, _: TakeFd, _: &mut Context<Self>) {}
}

pub fn export(node: &courier::Node, name: &str) -> RemoteAddr<Sink> {
    node.export(Sink::default().start())
        .handles::<Echo>()
        .handles::<Cast>()
        .handles::<Count>()
        .handles::<Big>()
        .handles::<BigInline>()
        .handles::<TakeRef>()
        .handles::<KeepRefs>()
        .handles::<TakeFd>()
        .register(name)
        .expect("free name")
}

pub fn anonymous(node: &courier::Node) -> RemoteAddr<Sink> {
    node.export(Sink::default().start())
        .handles::<Echo>()
        .anonymous()
}
