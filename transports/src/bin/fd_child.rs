//! A tiny child process for the fd-passing tests: it takes a link from a
//! descriptor it inherited and echoes frames back.
//!
//! Usage: `courier-fd-child connect fd://N` (an inherited connected socket)
//! or `courier-fd-child listen fd://listen` (socket activation: accept one
//! link). Each frame received is answered with `child:` and the payload,
//! descriptors included. At the peer's end of stream the child closes its
//! side and exits 0.
//!
//! `courier-fd-child activate PATH` plays the service manager: it binds a
//! listening socket at PATH as descriptor 3, then executes itself (keeping
//! its process id) as `listen fd://listen` with `LISTEN_PID` and
//! `LISTEN_FDS=1` set, as systemd does.

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
    if mode == "activate" {
        return activate(addr);
    }
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

/// Binds a listener at `path` as descriptor 3 and re-executes this program
/// with the socket-activation variables; returns only on failure.
fn activate(path: &str) -> ExitCode {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    let listener = match std::os::unix::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("child: bind {path}: {e}");
            return ExitCode::from(1);
        }
    };
    if listener.as_raw_fd() != 3 {
        eprintln!(
            "child: the listener is descriptor {}, not 3",
            listener.as_raw_fd()
        );
        return ExitCode::from(1);
    }
    if let Err(e) = rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty()) {
        eprintln!("child: clear close-on-exec: {e}");
        return ExitCode::from(1);
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("child: {e}");
            return ExitCode::from(1);
        }
    };
    let err = std::process::Command::new(exe)
        .args(["listen", "fd://listen"])
        .env("LISTEN_PID", std::process::id().to_string())
        .env("LISTEN_FDS", "1")
        .exec();
    drop(listener);
    eprintln!("child: exec: {err}");
    ExitCode::from(1)
}
