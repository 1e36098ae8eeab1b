//! Descriptors as links and listeners: a child process on an inherited
//! socketpair end, socket activation (`fd://listen`), a connection handed
//! over with `SCM_RIGHTS`, and the rules for adopting numbers.

mod common;

use std::os::fd::{AsFd, IntoRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use courier_runtime::transport::{Address, Frame, Transport, TransportError};
use courier_transports::fd::{self, FdTransport};
use courier_transports::tcp::TcpTransport;
use courier_transports::unix::UnixTransport;
use courier_transports::{LinkExt, ListenerExt, StreamConfig};

const CHILD: &str = env!("CARGO_BIN_EXE_courier-fd-child");

/// Waits for a child process, with a bound.
async fn wait(mut child: std::process::Child) -> std::process::Output {
    let out = within(STEP, "child exit", async {
        tokio::task::spawn_blocking(move || {
            let status = child.wait().expect("wait");
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut stderr);
            }
            (status, stderr)
        })
        .await
        .unwrap()
    })
    .await;
    std::process::Output {
        status: out.0,
        stdout: Vec::new(),
        stderr: out.1.into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_talks_over_an_inherited_socketpair() {
    let mut cmd = Command::new(CHILD);
    cmd.stderr(Stdio::piped());
    let (mut link, child_addr) =
        fd::socketpair_for_child(&mut cmd, &StreamConfig::default()).unwrap();
    assert!(matches!(child_addr, Address::Fd { fd: Some(n) } if n > 2));
    cmd.arg("connect").arg(child_addr.to_string());
    let child = cmd.spawn().expect("spawn the child");
    // Our copy of the child's end goes with the command.
    drop(cmd);
    assert!(link.caps().carries_fds && link.caps().kernel_local);

    // Plain frames, then one carrying a pipe end the child sends back.
    link.send(Frame::new(&b"hello"[..])).await.unwrap();
    assert_eq!(&recv_frame(link.as_mut()).await.payload[..], b"child:hello");
    let (r, w) = pipe();
    link.send(Frame {
        payload: (&b"fd"[..]).into(),
        fds: vec![w],
    })
    .await
    .unwrap();
    let back = recv_frame(link.as_mut()).await;
    assert_eq!(&back.payload[..], b"child:fd");
    assert_eq!(back.fds.len(), 1, "the descriptor made the round trip");
    write_fd(&back.fds[0], b"through the child");
    assert_eq!(read_fd(&r, 17), b"through the child");
    let big = payload(9, 3 * 1024 * 1024);
    link.send(Frame::new(big.clone())).await.unwrap();
    let echoed = recv_frame(link.as_mut()).await;
    assert_eq!(&echoed.payload[..6], b"child:");
    assert_eq!(echoed.payload.slice(6..), big);

    link.close().await.unwrap();
    assert!(within(STEP, "child's end", link.recv()).await.is_none());
    let out = wait(child).await;
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_dying_ends_the_link() {
    let mut cmd = Command::new(CHILD);
    cmd.stderr(Stdio::null());
    let (mut link, child_addr) =
        fd::socketpair_for_child(&mut cmd, &StreamConfig::default()).unwrap();
    cmd.arg("connect").arg(child_addr.to_string());
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    link.send(Frame::new(&b"ping"[..])).await.unwrap();
    assert_eq!(&recv_frame(link.as_mut()).await.payload[..], b"child:ping");
    child.kill().unwrap();
    match within(STEP, "after kill", link.recv()).await {
        None | Some(Err(_)) => {}
        Some(Ok(f)) => panic!("unexpected frame {:?}", f.payload),
    }
    let _ = wait(child).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_passes_a_listener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("activated.sock");
    // The child binds descriptor 3 and re-executes itself with LISTEN_PID
    // set to its own (unchanged) process id, as a service manager would.
    let child = Command::new(CHILD)
        .arg("activate")
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let to = Address::Unix { path: path.clone() };
    let connected = within(STEP, "connect", async {
        loop {
            match UnixTransport::default().connect(&to).await {
                Ok(l) => break Ok(l),
                // Not bound yet, or bound and not yet listening.
                Err(TransportError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound
                        || source.kind() == std::io::ErrorKind::ConnectionRefused =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => break Err(e),
            }
        }
    })
    .await;
    let mut link = match connected {
        Ok(l) => l,
        Err(e) => {
            let out = wait(child).await;
            panic!(
                "connect: {e}; child: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    link.send(Frame::new(&b"activated"[..])).await.unwrap();
    assert_eq!(
        &recv_frame(link.as_mut()).await.payload[..],
        b"child:activated"
    );
    link.close().await.unwrap();
    assert!(within(STEP, "end", link.recv()).await.is_none());
    let out = wait(child).await;
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_errors_are_clear() {
    for (env, needle) in [
        (vec![], "LISTEN_PID is not set"),
        (
            vec![("LISTEN_PID", "1"), ("LISTEN_FDS", "1")],
            "names another process",
        ),
        (
            vec![("LISTEN_PID", "abc"), ("LISTEN_FDS", "1")],
            "not a process id",
        ),
    ] {
        let mut cmd = Command::new(CHILD);
        cmd.arg("listen").arg("fd://listen").stderr(Stdio::piped());
        cmd.env_remove("LISTEN_PID").env_remove("LISTEN_FDS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = wait(cmd.spawn().unwrap()).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    }
    // LISTEN_FDS=0 with our own pid.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=0 exec \"$0\" listen fd://listen")
        .arg(CHILD)
        .stderr(Stdio::piped());
    let out = wait(cmd.spawn().unwrap()).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no socket was passed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_handed_over_with_scm_rights_becomes_a_link() {
    // A front process accepts a TCP connection and hands it to a worker.
    let tcp = TcpTransport::default();
    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: Address = format!("tcp://{}", front.local_addr().unwrap())
        .parse()
        .unwrap();
    let (ctl_front, ctl_worker) = tokio::net::UnixStream::pair().unwrap();
    let accept = tokio::task::spawn_blocking(move || front.accept().unwrap().0);
    let mut client = within(STEP, "connect", tcp.connect(&addr)).await.unwrap();
    let accepted = accept.await.unwrap();
    fd::send_fd(&ctl_front, accepted.as_fd()).await.unwrap();
    drop(accepted);
    let mut worker = within(
        STEP,
        "handover",
        fd::receive_link(&ctl_worker, &StreamConfig::default()),
    )
    .await
    .unwrap();
    assert!(
        !worker.caps().carries_fds,
        "a handed-over TCP connection stays TCP"
    );
    client
        .send(Frame::new(&b"to the worker"[..]))
        .await
        .unwrap();
    assert_eq!(
        &recv_frame(worker.as_mut()).await.payload[..],
        b"to the worker"
    );
    worker
        .send(Frame::new(&b"from the worker"[..]))
        .await
        .unwrap();
    assert_eq!(
        &recv_frame(client.as_mut()).await.payload[..],
        b"from the worker"
    );

    // A handed-over Unix connection carries descriptors.
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    fd::send_fd(&ctl_front, b.as_fd()).await.unwrap();
    drop(b);
    let mut handed = fd::receive_link(&ctl_worker, &StreamConfig::default())
        .await
        .unwrap();
    let mut ours = fd::link_from_fd(OwnedFd::from(a), &StreamConfig::default()).unwrap();
    let (r, w) = pipe();
    ours.send(Frame {
        payload: (&b"x"[..]).into(),
        fds: vec![w],
    })
    .await
    .unwrap();
    let got = recv_frame(handed.as_mut()).await;
    write_fd(&got.fds[0], b"ok");
    assert_eq!(read_fd(&r, 2), b"ok");

    // The end of the control socket is reported as Closed.
    drop(ctl_front);
    assert!(fd::receive_fd(&ctl_worker).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_numbers_are_adopted_once_and_checked() {
    let t = FdTransport::default();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let n = OwnedFd::from(a).into_raw_fd();
    let addr = Address::Fd { fd: Some(n) };
    let mut link = t.connect(&addr).await.expect("adopt a connected socket");
    let err = t.connect(&addr).await.unwrap_err();
    assert!(err.to_string().contains("already owned"), "{err}");
    let mut other = fd::link_from_fd(OwnedFd::from(b), &StreamConfig::default()).unwrap();
    link.send(Frame::new(&b"adopted"[..])).await.unwrap();
    assert_eq!(&recv_frame(other.as_mut()).await.payload[..], b"adopted");

    // Not a socket.
    let (r, _w) = pipe();
    let n = r.into_raw_fd();
    let err = t.connect(&Address::Fd { fd: Some(n) }).await.unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");

    // A listening socket is refused by connect and taken by listen.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let n = OwnedFd::from(l).into_raw_fd();
    let err = t.connect(&Address::Fd { fd: Some(n) }).await.unwrap_err();
    assert!(err.to_string().contains("listening socket"), "{err}");
    let l = std::os::unix::net::UnixListener::bind(dir.path().join("l2.sock")).unwrap();
    let n = OwnedFd::from(l).into_raw_fd();
    let mut listener = t.listen(&Address::Fd { fd: Some(n) }).await.unwrap();
    let local = listener.local_addr();
    assert_eq!(
        local,
        Address::Unix {
            path: dir.path().join("l2.sock")
        }
    );
    let (c, s) = tokio::join!(UnixTransport::default().connect(&local), listener.accept());
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    c.send(Frame::new(&b"via fd listener"[..])).await.unwrap();
    assert_eq!(
        &recv_frame(s.as_mut()).await.payload[..],
        b"via fd listener"
    );

    // A connected socket given to listen yields that one link.
    let (x, y) = std::os::unix::net::UnixStream::pair().unwrap();
    let n = OwnedFd::from(x).into_raw_fd();
    let mut one = t.listen(&Address::Fd { fd: Some(n) }).await.unwrap();
    let mut first = one.accept().await.unwrap();
    let mut peer = fd::link_from_fd(OwnedFd::from(y), &StreamConfig::default()).unwrap();
    peer.send(Frame::new(&b"one"[..])).await.unwrap();
    assert_eq!(&recv_frame(first.as_mut()).await.payload[..], b"one");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), one.accept())
            .await
            .is_err()
    );
}
