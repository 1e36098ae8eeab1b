//! The key-value example switched between tcp, unix and quic by its address
//! argument alone: the same server and client programs, real processes.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVER: &str = env!("CARGO_BIN_EXE_kv_server");
const CLIENT: &str = env!("CARGO_BIN_EXE_kv_client");

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn client(addr: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(CLIENT)
        .arg(addr)
        .args(args)
        .env("TMPDIR", std::env::temp_dir())
        .output()
        .expect("client runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn same_programs_over_tcp_unix_and_quic() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = [
        format!("tcp://127.0.0.1:{}", free_port()),
        format!("unix://{}/kv.sock", dir.path().display()),
        format!("quic://127.0.0.1:{}", free_udp_port()),
    ];
    for addr in &addrs {
        let _server = Server(
            Command::new(SERVER)
                .arg(addr)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Wait (bounded) until the server answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = loop {
            let r = client(addr, &["incr", "visits", "5"]);
            if r.0 || Instant::now() > deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(first, (true, "visits = 5\n".to_owned()), "{addr}");
        assert_eq!(client(addr, &["incr", "visits", "2"]).1, "visits = 7\n");
        assert_eq!(
            client(addr, &["incr", "", "1"]).1,
            "the store refused: keys may not be empty\n"
        );
        assert_eq!(client(addr, &["get", "nothing"]).1, "nothing is not set\n");
        let (ok, text) = client(addr, &["bogus"]);
        assert!(!ok && text.contains("usage"), "{text}");
    }
}
