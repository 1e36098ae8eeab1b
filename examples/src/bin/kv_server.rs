//! A key-value service. The address picks the transport:
//!
//! ```text
//! cargo run -p courier-examples --bin kv_server -- tcp://127.0.0.1:7000
//! cargo run -p courier-examples --bin kv_server -- unix:///tmp/kv.sock
//! cargo run -p courier-examples --bin kv_server -- quic://127.0.0.1:7001
//! ```
//!
//! QUIC certificates are kept in `$TMPDIR/courier-example-certs` (made on
//! first use; the client pins the same certificate).

use courier_examples::{builder, export_store};

#[actix::main]
async fn main() {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: kv_server ADDRESS   (tcp://host:port, unix:///path, quic://host:port)");
        std::process::exit(2);
    };
    let certs = std::env::temp_dir().join("courier-example-certs");
    let node = match builder(&certs) {
        Ok(b) => b.name("kv").listen(addr.clone()).start().await,
        Err(e) => Err(e),
    };
    let node = match node {
        Ok(n) => n,
        Err(e) => {
            eprintln!("kv_server: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = export_store(&node, "kv") {
        eprintln!("kv_server: {e}");
        std::process::exit(1);
    }
    for a in node.local_addrs() {
        println!("kv_server: serving \"kv\" at {a} (node {})", node.id());
    }
    std::future::pending::<()>().await;
}
