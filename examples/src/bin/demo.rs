//! Courier's demo: five nodes in five processes, every transport.
//!
//! `alpha` (this process) listens on tcp, unix and quic and hosts a chat
//! room. It starts `beta` (joins over tcp), `gamma` (over a Unix socket),
//! `delta` (over QUIC with a pinned certificate) and a worker `epsilon`
//! (over an inherited socketpair, `fd://`). Then it shows calls on every
//! transport, a reference passed from one node to another, typed errors and
//! a remote failure with restart, an open file passed to other processes,
//! and what happens to references when a peer is killed with SIGKILL.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use actix::prelude::*;
use courier::{Fd, Node, NodeDown, RemoteAddr, RemoteError, Role};
use courier_examples::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = if std::env::var(courier::WORKER_ENV).is_ok() {
        actix::System::new().block_on(child("epsilon".into(), None, PathBuf::new()))
    } else if args.get(1).map(String::as_str) == Some("child") {
        let [_, _, name, alpha, certs] = &args[..] else {
            eprintln!("usage: demo child NAME ALPHA_ADDR CERT_DIR");
            std::process::exit(2);
        };
        actix::System::new().block_on(child(name.clone(), Some(alpha.clone()), certs.into()))
    } else {
        actix::System::new().block_on(alpha())
    };
    if let Err(e) = result {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

/// A child node: joins alpha's room with a member of its own, exports a
/// key-value store, and waits to be killed.
async fn child(name: String, alpha: Option<String>, certs: PathBuf) -> Result<(), RemoteError> {
    let node = match &alpha {
        Some(addr) => {
            let listen = match addr.split("://").next() {
                Some("unix") => format!("unix://{}/{name}.sock", certs.display()),
                Some("quic") => "quic://127.0.0.1:0".to_owned(),
                _ => "tcp://127.0.0.1:0".to_owned(),
            };
            builder(&certs)?
                .name(name.clone())
                .listen(listen)
                .start()
                .await?
        }
        None => {
            let link = courier::worker_link_from_env().await?;
            Node::builder()
                .cookie(EXAMPLE_COOKIE)
                .name(name.clone())
                .link(link, Role::Initiator, "fd")
                .start()
                .await?
        }
    };
    export_store(&node, "kv")?;
    let me = member(&node, &name);
    node.export(Member::new(name.clone()).start())
        .handles::<Say>()
        .handles::<Greet>()
        .handles::<WriteLine>()
        .register("member")?;
    if let Some(addr) = alpha {
        let room = node.lookup::<Room>(&addr, "room").await?;
        room.send(Join { name, member: me }).await?;
    }
    std::future::pending::<()>().await;
    Ok(())
}

struct Kids(Vec<(String, Child)>);

impl Drop for Kids {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Watch(Instant);
impl Actor for Watch {
    type Context = Context<Self>;
}
impl Handler<NodeDown> for Watch {
    type Result = ();
    fn handle(&mut self, m: NodeDown, _: &mut Context<Self>) {
        println!(
            "   monitor: node {} is down after {:?} ({})",
            m.node,
            self.0.elapsed(),
            m.reason
        );
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

async fn alpha() -> Result<(), RemoteError> {
    let dir = std::env::temp_dir().join(format!("courier-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| RemoteError::Protocol {
        peer: "demo".into(),
        reason: format!("cannot create {}: {e}", dir.display()),
    })?;
    let result = run_alpha(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_alpha(dir: &Path) -> Result<(), RemoteError> {
    step("alpha starts, listening on three transports");
    let node = builder(dir)?
        .name("alpha")
        .listen("tcp://127.0.0.1:0")
        .listen(format!("unix://{}/alpha.sock", dir.display()))
        .listen("quic://127.0.0.1:0")
        .start()
        .await?;
    let addrs: Vec<String> = node.local_addrs().iter().map(ToString::to_string).collect();
    for a in &addrs {
        println!("   alpha listens on {a}");
    }
    let room = export_room(&node, "room")?;

    step("beta, gamma and delta start as processes and join over tcp, unix and quic");
    let exe = std::env::current_exe().map_err(|e| RemoteError::Protocol {
        peer: "demo".into(),
        reason: e.to_string(),
    })?;
    let mut kids = Kids(Vec::new());
    for (name, addr) in [
        ("beta", &addrs[0]),
        ("gamma", &addrs[1]),
        ("delta", &addrs[2]),
    ] {
        let c = Command::new(&exe)
            .args(["child", name, addr, &dir.display().to_string()])
            .env("RUST_BACKTRACE", "0")
            .spawn()
            .map_err(|e| RemoteError::Protocol {
                peer: name.into(),
                reason: format!("cannot start: {e}"),
            })?;
        kids.0.push((name.to_owned(), c));
    }
    step("epsilon starts as a worker over an inherited socketpair (fd://)");
    let worker = node
        .spawn_worker::<Member>(
            {
                let mut c = Command::new(&exe);
                c.env("RUST_BACKTRACE", "0");
                c
            },
            "member",
        )
        .await?;
    let epsilon = worker.root.clone();
    kids.0.push(("epsilon".into(), worker.child));
    if let Some(id) = epsilon.id() {
        println!("   epsilon's member is actor {id}");
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    let members = loop {
        let m = room.send(Members).await?;
        if m.len() == 3 || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for p in node.peers() {
        println!("   alpha is connected to node {} over {}", p.node, p.scheme);
    }

    step("a call to each member, each over its own transport");
    for (name, m) in &members {
        let reply = m
            .send(Say {
                from: "alpha".into(),
                text: format!("hi {name}"),
            })
            .await?;
        println!("   {reply}");
    }
    println!(
        "   {}",
        epsilon
            .send(Say {
                from: "alpha".into(),
                text: "hi epsilon".into()
            })
            .await?
    );

    let find = |n: &str| {
        members
            .iter()
            .find(|(name, _)| name == n)
            .map(|(_, m)| m.clone())
    };
    let (Some(beta), Some(gamma), Some(delta)) = (find("beta"), find("gamma"), find("delta"))
    else {
        return Err(RemoteError::Protocol {
            peer: "demo".into(),
            reason: format!(
                "not every child joined: {:?}",
                members.iter().map(|m| &m.0).collect::<Vec<_>>()
            ),
        });
    };

    step("a reference passed on: alpha gives gamma a reference to beta's member");
    let r = gamma
        .send(Greet {
            friend: beta.clone(),
        })
        .await?;
    println!("   gamma called beta directly: {r:?}");
    let r = delta
        .send(Greet {
            friend: gamma.clone(),
        })
        .await?;
    println!("   delta (quic) called gamma (unix) directly: {r:?}");
    let r = delta
        .send(Greet {
            friend: epsilon.clone(),
        })
        .await?;
    println!("   delta cannot reach epsilon, a worker with no address: {r:?}");

    step("typed errors and a remote failure (beta's key-value store)");
    let beta_node = beta.id().map(|i| i.node).expect("remote");
    let kv = node.lookup_on::<Store>(beta_node, "kv").await?;
    println!(
        "   incr visits by 1 -> {:?}",
        kv.send(Incr {
            key: "visits".into(),
            by: 1
        })
        .await?
    );
    println!(
        "   incr \"\" by 1     -> {:?}",
        kv.send(Incr {
            key: "".into(),
            by: 1
        })
        .await?
    );
    println!(
        "   explode          -> {}",
        kv.send(Explode).await.unwrap_err()
    );
    println!(
        "   incr visits by 1 -> {:?} (the store was restarted, same id)",
        kv.send(Incr {
            key: "visits".into(),
            by: 1
        })
        .await?
    );
    println!(
        "   missing name     -> {}",
        node.lookup_on::<Store>(beta_node, "nope")
            .await
            .unwrap_err()
    );

    step("an open file passed to other processes");
    let (r, w) = rustix::pipe::pipe().map_err(|e| RemoteError::Protocol {
        peer: "demo".into(),
        reason: e.to_string(),
    })?;
    let dup = |w: &std::os::fd::OwnedFd| w.try_clone().expect("dup");
    let n = epsilon
        .send(WriteLine {
            file: Fd(dup(&w)),
            line: "written over fd://".into(),
        })
        .await?;
    println!("   epsilon wrote {n:?} bytes");
    let n = gamma
        .send(WriteLine {
            file: Fd(dup(&w)),
            line: "written over unix://".into(),
        })
        .await?;
    println!("   gamma wrote {n:?} bytes");
    let e = beta
        .send(WriteLine {
            file: Fd(dup(&w)),
            line: "never".into(),
        })
        .await
        .unwrap_err();
    println!("   beta (tcp): {e}");
    drop(w);
    let mut text = String::new();
    std::fs::File::from(r)
        .read_to_string(&mut text)
        .map_err(|e| RemoteError::Protocol {
            peer: "demo".into(),
            reason: e.to_string(),
        })?;
    for line in text.lines() {
        println!("   pipe: {line}");
    }

    step("beta is killed with SIGKILL");
    let t = Instant::now();
    node.monitor_node(beta_node, Watch(t).start().recipient());
    if let Some((_, c)) = kids.0.iter_mut().find(|(n, _)| n == "beta") {
        let _ = c.kill();
        let _ = c.wait();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match beta
            .send(Say {
                from: "alpha".into(),
                text: "still there?".into(),
            })
            .await
        {
            Err(e) => {
                println!("   alpha -> beta after {:?}: {e}", t.elapsed());
                break;
            }
            Ok(_) if Instant::now() > deadline => break,
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    match gamma
        .send(Greet {
            friend: beta.clone(),
        })
        .await?
    {
        Ok(r) => println!("   gamma -> beta: {r}"),
        Err(e) => println!("   gamma -> beta: {e}"),
    }
    let fresh: Result<RemoteAddr<Store>, _> = node.lookup_on(beta_node, "kv").await;
    println!(
        "   a fresh lookup of beta: {}",
        fresh.err().map(|e| e.to_string()).unwrap_or_default()
    );
    println!(
        "   the room still answers: {} members",
        room.send(Members).await?.len()
    );

    step("done");
    let s = node.stats();
    println!(
        "   alpha: {} connections, {} exports, {} imports, {} calls in, {} peers lost",
        s.connections, s.exports, s.imports, s.calls_in, s.peers_lost
    );
    node.shutdown().await;
    drop(kids);
    Ok(())
}
