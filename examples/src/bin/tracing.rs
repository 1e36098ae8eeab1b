//! Courier's tracing, printed with tracing-subscriber: a `conn` span per
//! connection (id, scheme, remote address, role, and the peer's node id
//! once authenticated) and a `call` span per call (actor, message type,
//! request id), with events for handshake results, limits reached and dead
//! peers.
//!
//! ```sh
//! cargo run -p courier-examples --bin tracing
//! COURIER_LOG=courier=trace cargo run -p courier-examples --bin tracing   # more
//! ```
//!
//! It runs two nodes over TCP in this process and makes each event happen
//! once: a successful handshake and a few calls, a handshake with the wrong
//! cookie, the pending-calls limit, and a peer going away.

use std::time::Duration;

use courier::{Limits, Node};
use courier_examples::{export_store, Fetch, Incr, Store, EXAMPLE_COOKIE};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter: Targets = std::env::var("COURIER_LOG")
        .unwrap_or_else(|_| "courier=debug,warn".into())
        .parse()?;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                // A line when a connection span ends, with how long it was busy.
                .with_span_events(FmtSpan::CLOSE)
                .with_target(false),
        )
        .with(filter)
        .init();

    actix::System::new().block_on(async {
        let server = Node::builder()
            .name("server")
            .cookie(EXAMPLE_COOKIE)
            .listen("tcp://127.0.0.1:0")
            .start()
            .await?;
        export_store(&server, "kv")?;
        let addr = server.local_addrs()[0].to_string();

        println!("\n== a client connects, authenticates and calls (conn and call spans)");
        let client = Node::builder()
            .name("client")
            .cookie(EXAMPLE_COOKIE)
            // One call awaiting its reply at a time, to show a limit below.
            .limits(Limits {
                max_pending_calls: 1,
                ..Limits::default()
            })
            .start()
            .await?;
        let kv = client.lookup::<Store>(&addr, "kv").await?;
        kv.send(Incr {
            key: "visits".into(),
            by: 1,
        })
        .await??;
        kv.send(Fetch("visits".into())).await?;

        println!("\n== a node with the wrong cookie is refused (handshake events)");
        let intruder = Node::builder()
            .name("intruder")
            .cookie("not the example cookie at all")
            .start()
            .await?;
        if let Err(e) = intruder.lookup::<Store>(&addr, "kv").await {
            println!("intruder: {e}");
        }

        println!("\n== two calls at once over a connection allowing one (a limit hit)");
        let (a, b) = tokio::join!(kv.send(Fetch("visits".into())), kv.send(Fetch("x".into())));
        for r in [a.map(drop), b.map(drop)] {
            if let Err(e) = r {
                println!("client: {e}");
            }
        }

        println!("\n== the client goes away (connection closed, peer down)");
        client.shutdown().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.shutdown().await;
        intruder.shutdown().await;
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(())
}
