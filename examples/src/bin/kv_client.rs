//! The key-value client. Same code for every transport:
//!
//! ```text
//! cargo run -p courier-examples --bin kv_client -- tcp://127.0.0.1:7000 incr visits 5
//! cargo run -p courier-examples --bin kv_client -- unix:///tmp/kv.sock get visits
//! cargo run -p courier-examples --bin kv_client -- quic://127.0.0.1:7001 dump
//! ```

use std::time::Duration;

use courier_examples::{builder, Dump, Fetch, Incr, Store};

#[actix::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args).await {
        eprintln!("kv_client: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: kv_client ADDRESS (incr KEY N | get KEY | dump)";
    let addr = args.first().ok_or(usage)?;
    let certs = std::env::temp_dir().join("courier-example-certs");
    let node = builder(&certs)?.name("kv-client").start().await?;
    let kv = node.lookup::<Store>(addr, "kv").await?;
    let t = Duration::from_secs(5);
    match args.get(1).map(String::as_str) {
        Some("incr") => {
            let key = args.get(2).ok_or(usage)?.clone();
            let by: i64 = args.get(3).ok_or(usage)?.parse()?;
            match kv
                .send(Incr {
                    key: key.clone(),
                    by,
                })
                .timeout(t)
                .await?
            {
                Ok(v) => println!("{key} = {v}"),
                Err(e) => println!("the store refused: {e}"),
            }
        }
        Some("get") => {
            let key = args.get(2).ok_or(usage)?.clone();
            match kv.send(Fetch(key.clone())).timeout(t).await? {
                Some(v) => println!("{key} = {v}"),
                None => println!("{key} is not set"),
            }
        }
        Some("dump") => {
            for (k, v) in kv.send(Dump).timeout(t).await? {
                println!("{k} = {v}");
            }
        }
        _ => return Err(usage.into()),
    }
    node.shutdown().await;
    Ok(())
}
