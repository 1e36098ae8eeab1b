//! A parent starts a worker process joined to it by an inherited socketpair
//! (`fd://`), and hands it an open file to write into.
//!
//! `cargo run -p courier-examples --bin worker`

use std::io::Read;
use std::process::Command;

use courier::{Fd, Node, RemoteError, Role};
use courier_examples::*;

#[actix::main]
async fn main() {
    let r = if std::env::var(courier::WORKER_ENV).is_ok() {
        as_worker().await
    } else {
        as_parent().await
    };
    if let Err(e) = r {
        eprintln!("worker example: {e}");
        std::process::exit(1);
    }
}

async fn as_worker() -> Result<(), RemoteError> {
    let link = courier::worker_link_from_env().await?;
    let node = Node::builder()
        .cookie(EXAMPLE_COOKIE)
        .link(link, Role::Initiator, "fd")
        .start()
        .await?;
    node.export(actix::Actor::start(Member::new("worker")))
        .handles::<Say>()
        .handles::<WriteLine>()
        .register("worker")?;
    std::future::pending::<()>().await;
    Ok(())
}

async fn as_parent() -> Result<(), RemoteError> {
    let node = Node::builder().cookie(EXAMPLE_COOKIE).start().await?;
    let exe = std::env::current_exe().map_err(|e| RemoteError::Protocol {
        peer: "worker".into(),
        reason: e.to_string(),
    })?;
    let mut w = node
        .spawn_worker::<Member>(Command::new(exe), "worker")
        .await?;
    println!(
        "parent {}: started worker pid {}",
        std::process::id(),
        w.child.id()
    );
    let (r, wr) = rustix::pipe::pipe().map_err(|e| RemoteError::Protocol {
        peer: "worker".into(),
        reason: e.to_string(),
    })?;
    let n = w
        .root
        .send(WriteLine {
            file: Fd(wr),
            line: "this line was written by the worker into the parent's pipe".into(),
        })
        .await?;
    println!("worker says it wrote {n:?} bytes");
    let mut text = String::new();
    let _ = std::fs::File::from(r).read_to_string(&mut text);
    print!("parent read: {text}");
    let _ = w.child.kill();
    let _ = w.child.wait();
    // The worker is gone: its reference is dead.
    let mut err = None;
    for _ in 0..100 {
        match w
            .root
            .send(Say {
                from: "parent".into(),
                text: "still there?".into(),
            })
            .await
        {
            Err(e) => {
                err = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    if let Some(e) = err {
        println!("after killing the worker: {e}");
    }
    Ok(())
}
