//! The Unix transport's socket file: owner-only, stale files replaced, live
//! ones never stolen, non-sockets never removed, removed on drop.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use common::*;
use courier_runtime::transport::{Address, Frame, Transport, TransportError};
use courier_transports::unix::UnixTransport;
use courier_transports::{LinkExt, ListenerExt};

fn addr(path: &std::path::Path) -> Address {
    Address::Unix {
        path: path.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_file_is_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.sock");
    let t = UnixTransport::default();
    let l = t.listen(&addr(&path)).await.unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(l.local_addr(), addr(&path));
    drop(l);
    assert!(
        !path.exists(),
        "the socket file is removed with its listener"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    // A listener that died without removing its file.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let t = UnixTransport::default();
    let mut l = t
        .listen(&addr(&path))
        .await
        .expect("a stale file is replaced");
    let (c, s) = tokio::join!(t.connect(&addr(&path)), l.accept());
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    c.send(Frame::new(&b"hello"[..])).await.unwrap();
    assert_eq!(&recv_frame(s.as_mut()).await.payload[..], b"hello");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_socket_is_not_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.sock");
    let owner = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = UnixTransport::default();
    let err = t.listen(&addr(&path)).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, TransportError::Io { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse),
        "{msg}"
    );
    assert!(msg.contains("not taking it over"), "{msg}");
    // The owner still serves at its path: it accepts the liveness probe's
    // connection, then ours.
    let accept = std::thread::spawn(move || {
        for _ in 0..2 {
            owner.accept()?;
        }
        Ok::<_, std::io::Error>(())
    });
    std::os::unix::net::UnixStream::connect(&path).expect("the owner still listens");
    accept.join().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.sock");
    std::fs::write(&path, b"precious").unwrap();
    let err = UnixTransport::default()
        .listen(&addr(&path))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_address() {
    let t = UnixTransport::default();
    let err = t
        .connect(&"unix:///nonexistent/dir/x.sock".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("unix:///nonexistent/dir/x.sock"),
        "{err}"
    );
    let err = t
        .connect(&"tcp://127.0.0.1:1".parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Address(_)), "{err}");
}
