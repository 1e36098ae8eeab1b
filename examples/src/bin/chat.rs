//! A chat room that hands out member references: three nodes (in one
//! process here, each with its own Unix socket) pass references around and
//! call each other directly.
//!
//! `cargo run -p courier-examples --bin chat`

use courier_examples::*;

#[actix::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("chat: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), courier::RemoteError> {
    let dir = std::env::temp_dir().join(format!("courier-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| courier::RemoteError::Protocol {
        peer: "chat".into(),
        reason: e.to_string(),
    })?;
    let sock = |n: &str| format!("unix://{}/{n}.sock", dir.display());
    let host = builder(&dir)?
        .name("host")
        .listen(sock("host"))
        .start()
        .await?;
    export_room(&host, "lobby")?;
    let mut people = Vec::new();
    for name in ["ann", "bo", "cy"] {
        let node = builder(&dir)?.name(name).listen(sock(name)).start().await?;
        let me = member(&node, name);
        let room = node.lookup::<Room>(&sock("host"), "lobby").await?;
        let already = room
            .send(Join {
                name: name.into(),
                member: me.clone(),
            })
            .await?;
        println!(
            "{name} joined; already there: {:?}",
            already.iter().map(|m| &m.0).collect::<Vec<_>>()
        );
        // Greet everyone who was already there, directly (not via the host).
        for (other, r) in already {
            let reply = r
                .send(Say {
                    from: name.into(),
                    text: format!("hi {other}"),
                })
                .await?;
            println!("  {reply}");
        }
        people.push((node, me, room));
    }
    for (node, _, _) in &people {
        println!(
            "node {} exports {} member(s), held by {} peer(s)",
            node.id(),
            node.exports().len(),
            node.exports()
                .iter()
                .map(|e| e.holders.len())
                .sum::<usize>()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
