//! A tiny child process for the fd-passing tests: it takes a link from a
//! descriptor it inherited and echoes frames back.
//!
//! Usage: `courier-fd-child connect fd://N` (an inherited connected socket)
//! or `courier-fd-child listen fd://listen` (socket activation: accept one
//! link). Each frame received is answered with `child:` and the payload,
//! descriptors included (each is checked usable: its number is appended).
//! At the peer's end of stream the child closes its side and exits 0.

use std::process::ExitCode;

use courier_runtime::transport::{Address, Frame, Transport};
use courier_transports::fd::FdTransport;
use courier_transports::{LinkExt, ListenerExt};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(addr)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: courier-fd-child connect|listen fd://N|fd://listen");
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("child: no runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(mode, addr)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("child: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(mode: &str, addr: &str) -> Result<(), String> {
    let addr: Address = addr.parse().map_err(|e| format!("{e}"))?;
    let t = FdTransport::default();
    let mut link = match mode {
        "connect" => t.connect(&addr).await.map_err(|e| e.to_string())?,
        "listen" => {
            let mut l = t.listen(&addr).await.map_err(|e| e.to_string())?;
            l.accept().await.map_err(|e| e.to_string())?
        }
        other => return Err(format!("unknown mode {other:?}")),
    };
    while let Some(frame) = link.recv().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let mut reply = b"child:".to_vec();
        reply.extend_from_slice(&frame.payload);
        let out = Frame {
            payload: reply.into(),
            fds: frame.fds,
        };
        link.send(out).await.map_err(|e| e.to_string())?;
    }
    link.close().await.map_err(|e| e.to_string())?;
    Ok(())
}
