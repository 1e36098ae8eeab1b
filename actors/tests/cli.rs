//! The `courier` command, run as the built binary against real nodes on
//! loopback: every subcommand, its failures (wrong key, refused and silent
//! addresses, unpinned QUIC certificates, bad input), and configuration
//! layered from a file, the environment and flags.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use courier::echo::{Echo, EchoRequest, Payload, ECHO};
use courier::info::{node_hex, NodeListing, StatsReport};

const COURIER: &str = env!("CARGO_BIN_EXE_courier");
/// Without spaces: a cookie file's whitespace is not part of the cookie.
const COOKIE: &str = "courier-cli-test-cookie-not-secret";
/// Generous: the machine is small and shared.
const WAIT: Duration = Duration::from_secs(60);

/// The command with a clean environment: no COURIER_* variables from the
/// caller, and a home directory of its own (so no real cookie is read).
fn courier(home: &Path) -> Command {
    let mut c = Command::new(COURIER);
    for (k, _) in std::env::vars() {
        if k.starts_with("COURIER_") || k == "XDG_CONFIG_HOME" || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c.env("HOME", home);
    c.stdin(Stdio::null());
    c
}

/// Runs a command to the end, within [`WAIT`].
fn run(mut c: Command) -> Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("the courier binary runs");
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{c:?} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn expect_ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// Asserts the exit code and that stderr says `needle`; returns stderr.
#[track_caller]
fn expect_fail(o: &Output, code: i32, needle: &str) -> String {
    let err = text(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{err}",
        text(&o.stdout)
    );
    assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A `courier node` process; killed when dropped.
struct NodeProc {
    child: Child,
    lines: Vec<String>,
}

impl NodeProc {
    /// Starts `courier node` with `args` and waits for "ready".
    fn start(mut c: Command) -> NodeProc {
        c.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = c.spawn().expect("the courier binary runs");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut node = NodeProc {
            child,
            lines: Vec::new(),
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l == "ready" => return node,
                Ok(l) => node.lines.push(l),
                Err(_) => {
                    let status = node.child.try_wait();
                    panic!(
                        "courier node not ready within {WAIT:?} ({status:?}); printed {:?}",
                        node.lines
                    )
                }
            }
        }
    }

    /// The first address it listens on.
    fn addr(&self) -> String {
        self.line("listening on ").to_owned()
    }

    /// Its node id (32 hex digits).
    fn id(&self) -> String {
        let l = self.line("node ");
        l.split_whitespace().next().unwrap().to_owned()
    }

    fn line(&self, prefix: &str) -> &str {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in {:?}", self.lines))
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `courier node --listen <listen> ...` with the test cookie.
fn node(home: &Path, listen: &str, extra: &[&str]) -> NodeProc {
    let mut c = courier(home);
    c.env("COURIER_COOKIE", COOKIE)
        .args(["node", "--listen", listen])
        .args(extra);
    NodeProc::start(c)
}

fn client(home: &Path, args: &[&str]) -> Output {
    let mut c = courier(home);
    c.env("COURIER_COOKIE", COOKIE).args(args);
    run(c)
}

fn keygen(home: &Path, dir: &Path) -> String {
    let o = run({
        let mut c = courier(home);
        c.args(["keygen", "--dir"]).arg(dir);
        c
    });
    let out = expect_ok(&o);
    out.lines()
        .find_map(|l| l.strip_prefix("fingerprint sha256:"))
        .expect("a fingerprint line")
        .to_owned()
}

/// A loopback port that refuses connections: a TCP socket bound to it but
/// not listening, kept open so no other process can take the port.
fn refusing_port() -> (rustix::fd::OwnedFd, u16) {
    use rustix::net::{bind, getsockname, socket, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    bind(
        &fd,
        &std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0),
    )
    .unwrap();
    let a: std::net::SocketAddrV4 = getsockname(&fd).unwrap().try_into().unwrap();
    (fd, a.port())
}

#[test]
fn keygen_writes_a_cookie_and_a_certificate() {
    let home = tempfile::tempdir().unwrap();
    let keys = home.path().join("keys");
    let fp = keygen(home.path(), &keys);
    assert_eq!(fp.len(), 64, "{fp}");
    assert!(fp.bytes().all(|b| b.is_ascii_hexdigit()));
    let cookie = std::fs::read_to_string(keys.join("cookie")).unwrap();
    assert_eq!(cookie.len(), 64, "32 random bytes, hex");
    assert!(cookie.bytes().all(|b| b.is_ascii_hexdigit()));
    for f in ["cookie", "key.pem"] {
        let mode = std::fs::metadata(keys.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    assert!(keys.join("cert.pem").is_file());

    // Existing keys are kept unless --force.
    let mut c = courier(home.path());
    c.args(["keygen", "--dir"]).arg(&keys);
    let err = expect_fail(&run(c), 2, "already exist");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read_to_string(keys.join("cookie")).unwrap(),
        cookie
    );
    let mut c = courier(home.path());
    c.args(["keygen", "--force", "--dir"]).arg(&keys);
    let out = expect_ok(&run(c));
    assert!(!out.contains(&fp), "a new certificate");
    assert_ne!(
        std::fs::read_to_string(keys.join("cookie")).unwrap(),
        cookie
    );

    // Without --dir: beside the default cookie file, in the home directory.
    let mut c = courier(home.path());
    c.args(["keygen", "--no-quic"]);
    let out = expect_ok(&run(c));
    let default = home.path().join(".config/courier/cookie");
    assert!(out.contains(&default.display().to_string()), "{out}");
    assert!(default.is_file());

    // An unusable directory is named.
    let mut c = courier(home.path());
    c.args(["keygen", "--dir", "/proc/self/courier-keys"]);
    expect_fail(&run(c), 1, "/proc/self/courier-keys");
}

#[test]
fn node_prints_its_id_and_addresses() {
    let home = tempfile::tempdir().unwrap();
    let sock = home.path().join("n.sock");
    let unix = format!("unix://{}", sock.display());
    let n = node(
        home.path(),
        "tcp://127.0.0.1:0",
        &["--listen", &unix, "--name", "n1"],
    );
    let id = n.id();
    assert_eq!(id.len(), 32, "{:?}", n.lines);
    assert!(n.line("node ").ends_with("(n1)"));
    let tcp = n.addr();
    assert!(
        tcp.starts_with("tcp://127.0.0.1:") && !tcp.ends_with(":0"),
        "{tcp}"
    );
    assert!(
        n.lines.iter().any(|l| l == &format!("listening on {unix}")),
        "{:?}",
        n.lines
    );
    assert!(n.lines.iter().any(|l| l.contains("courier.echo")));

    // Bad listen addresses are named: syntax, and descriptors that are not
    // inherited sockets.
    for (listen, needle) in [
        ("bogus", "bad --listen address"),
        ("tcp://127.0.0.1:99999", "99999"),
        ("fd://57", "descriptor 57 is not open"),
    ] {
        let mut c = courier(home.path());
        c.env("COURIER_COOKIE", COOKIE)
            .args(["node", "--listen", listen]);
        expect_fail(&run(c), 2, needle);
    }
    // Without an address it says what to give.
    let mut c = courier(home.path());
    c.env("COURIER_COOKIE", COOKIE).arg("node");
    expect_fail(&run(c), 2, "--listen");
    // A port in use is named.
    let port = tcp.rsplit(':').next().unwrap();
    let mut c = courier(home.path());
    c.env("COURIER_COOKIE", COOKIE)
        .args(["node", "--listen", &format!("tcp://127.0.0.1:{port}")]);
    expect_fail(&run(c), 1, &format!("127.0.0.1:{port}"));
}

#[test]
fn ping_reports_round_trips() {
    let home = tempfile::tempdir().unwrap();
    let n = node(home.path(), "tcp://127.0.0.1:0", &[]);
    let addr = n.addr();
    let o = client(
        home.path(),
        &["ping", &addr, "--count", "20", "--interval-ms", "5"],
    );
    let out = expect_ok(&o);
    assert!(out.contains(&format!("node {}", n.id())), "{out}");
    assert!(out.contains("20 sent, 20 received, 0 lost"), "{out}");
    let rtt = out
        .lines()
        .find_map(|l| l.strip_prefix("rtt min/avg/p50/p99/max = "))
        .expect("a summary line");
    let ms: Vec<f64> = rtt
        .trim_end_matches(" ms")
        .split('/')
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(ms.len(), 5, "{rtt}");
    assert!(
        ms[0] > 0.0 && ms[0] <= ms[2] && ms[2] <= ms[3] && ms[3] <= ms[4],
        "{rtt}"
    );
    println!("loopback tcp ping: {rtt}");

    // The same over a unix socket.
    let sock = home.path().join("p.sock");
    let unix = format!("unix://{}", sock.display());
    let u = node(home.path(), &unix, &[]);
    let out = expect_ok(&client(
        home.path(),
        &["ping", &u.addr(), "-c", "3", "-i", "0"],
    ));
    assert!(out.contains("3 sent, 3 received, 0 lost"), "{out}");
}

#[test]
fn ping_with_the_wrong_key_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let n = node(home.path(), "tcp://127.0.0.1:0", &[]);
    let mut c = courier(home.path());
    c.env("COURIER_COOKIE", "another cookie, 16 bytes or more")
        .args(["ping", &n.addr()]);
    let err = expect_fail(&run(c), 4, "wrong key");
    assert!(err.contains("cookie"), "the hint says what to check: {err}");
    // A cookie file with the right cookie, given on the command line, wins
    // over the wrong one in the environment.
    let file = home.path().join("cookie");
    std::fs::write(&file, COOKIE).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = courier(home.path());
    c.env("COURIER_COOKIE", "another cookie, 16 bytes or more")
        .args(["ping", &n.addr(), "-c", "1", "--cookie-file"])
        .arg(&file);
    expect_ok(&run(c));
}

#[test]
fn ping_refused_silent_and_bad_addresses() {
    let home = tempfile::tempdir().unwrap();
    // Nothing listens.
    let (_bound, port) = refusing_port();
    let o = client(home.path(), &["ping", &format!("tcp://127.0.0.1:{port}")]);
    expect_fail(&o, 3, "refused");
    // Something listens but never speaks: no authenticated connection.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp://{}", silent.local_addr().unwrap());
    let started = Instant::now();
    let o = client(home.path(), &["ping", &addr, "--timeout", "1"]);
    expect_fail(&o, 3, "no authenticated connection");
    assert!(started.elapsed() < Duration::from_secs(30));
    // No QUIC endpoint on a UDP port: unreachable within the timeout.
    let keys = home.path().join("keys");
    keygen(home.path(), &keys);
    // (A UDP socket that never answers holds the port.)
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    let mut c = courier(home.path());
    c.env("COURIER_COOKIE", COOKIE)
        .args([
            "ping",
            &format!("quic://127.0.0.1:{port}"),
            "--timeout",
            "1",
            "--quic-dir",
        ])
        .arg(&keys);
    expect_fail(&run(c), 3, &format!("127.0.0.1:{port}"));
    // Not an address at all, or not one to dial.
    let o = client(home.path(), &["ping", "tcp:/nowhere"]);
    expect_fail(&o, 2, "tcp:/nowhere");
    let o = client(home.path(), &["ls", "fd://3"]);
    expect_fail(&o, 2, "inherited descriptor");
    let o = client(home.path(), &["ping", "tcp://127.0.0.1:1", "--timeout=-3"]);
    expect_fail(&o, 2, "--timeout");
}

#[test]
fn quic_ping_needs_pinned_certificates() {
    let home = tempfile::tempdir().unwrap();
    let server_keys = home.path().join("server");
    let other_keys = home.path().join("other");
    let server_fp = keygen(home.path(), &server_keys);
    let other_fp = keygen(home.path(), &other_keys);
    let server_dir = server_keys.to_str().unwrap();
    let n = node(
        home.path(),
        "quic://127.0.0.1:0",
        &["--quic-dir", server_dir],
    );
    assert_eq!(
        n.line("quic certificate sha256:").split(' ').next(),
        Some(server_fp.as_str())
    );
    let addr = n.addr();
    assert!(addr.starts_with("quic://"), "{addr}");

    // Sharing the keys directory: both trust the one certificate.
    let out = expect_ok(&client(
        home.path(),
        &[
            "ping",
            &addr,
            "-c",
            "2",
            "-i",
            "0",
            "--quic-dir",
            server_dir,
        ],
    ));
    assert!(out.contains("over quic"), "{out}");

    // Our certificate is another, and we pin only it: the node's is not
    // pinned here.
    let other_dir = other_keys.to_str().unwrap();
    let o = client(
        home.path(),
        &["ping", &addr, "--quic-dir", other_dir, "--timeout", "5"],
    );
    let err = expect_fail(&o, 5, "is not pinned here");
    assert!(
        err.contains(&format!("--pin {server_fp}")),
        "names the pin: {err}"
    );

    // We pin the node, but the node does not pin us.
    let o = client(
        home.path(),
        &[
            "ping",
            &addr,
            "--quic-dir",
            other_dir,
            "--pin",
            &server_fp,
            "--timeout",
            "5",
        ],
    );
    let err = expect_fail(&o, 5, "does not trust our QUIC certificate");
    assert!(err.contains(&other_fp), "names our fingerprint: {err}");

    // No identity at all: a throw-away certificate, refused likewise.
    let o = client(
        home.path(),
        &["ping", &addr, "--pin", &server_fp, "--timeout", "5"],
    );
    expect_fail(&o, 5, "does not trust our QUIC certificate");
}

#[test]
fn ls_shows_names_peers_and_who_holds_what() {
    let home = tempfile::tempdir().unwrap();
    let n = node(home.path(), "tcp://127.0.0.1:0", &[]);
    let addr = n.addr();
    let h = home.path().to_owned();
    actix::System::new().block_on(async move {
        // A peer in this process holds a reference to the echo actor.
        let holder = courier::Node::builder()
            .cookie(COOKIE)
            .start()
            .await
            .unwrap();
        let echo = holder.lookup::<Echo>(&addr, ECHO).await.unwrap();
        let back = echo
            .send(EchoRequest(Payload(vec![1, 2, 3])))
            .await
            .unwrap();
        assert_eq!(back.0, [1, 2, 3]);
        assert!(
            holder.stats().latency.count >= 1,
            "the holder timed its call"
        );
        let me = node_hex(&holder.id());

        let (a, hh) = (addr.clone(), h.clone());
        let out = tokio::task::spawn_blocking(move || client(&hh, &["ls", &a]))
            .await
            .unwrap();
        let out = expect_ok(&out);
        assert!(out.contains("courier.echo"), "{out}");
        assert!(out.contains(&format!("held by {me}: 1 reference")), "{out}");
        assert!(out.contains(&me), "the holder is a peer: {out}");
        assert!(out.contains("(this command)"), "{out}");
        assert!(out.contains("names: 1"), "{out}");

        // The JSON listing parses into the shared type.
        let (a, hh) = (addr.clone(), h.clone());
        let listing = tokio::task::spawn_blocking(move || ls_json(&hh, &a))
            .await
            .unwrap();
        let e = listing
            .exports
            .iter()
            .find(|e| e.name.as_deref() == Some(ECHO))
            .expect("the echo actor");
        assert_eq!(e.holders.len(), 1);
        assert_eq!(
            (e.holders[0].peer.as_str(), e.holders[0].count),
            (me.as_str(), 1)
        );

        // Dropping the reference releases it: the leak detector sees it go.
        drop(echo);
        let deadline = Instant::now() + WAIT;
        loop {
            let (a, hh) = (addr.clone(), h.clone());
            let l = tokio::task::spawn_blocking(move || ls_json(&hh, &a))
                .await
                .unwrap();
            let e = l
                .exports
                .iter()
                .find(|e| e.name.as_deref() == Some(ECHO))
                .unwrap();
            if e.holders.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the release never arrived: {e:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        holder.shutdown().await;
    });
}

fn ls_json(home: &Path, addr: &str) -> NodeListing {
    let out = expect_ok(&client(home, &["ls", addr, "--json"]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn stats_json(home: &Path, addr: &str) -> StatsReport {
    let out = expect_ok(&client(home, &["stats", addr, "--json"]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn stats_counts_calls_bytes_peers_and_failures() {
    let home = tempfile::tempdir().unwrap();
    let n = node(home.path(), "tcp://127.0.0.1:0", &["--name", "counted"]);
    let addr = n.addr();
    let before = stats_json(home.path(), &addr);
    assert_eq!(before.identity.node, n.id());
    assert_eq!(before.identity.name.as_deref(), Some("counted"));
    assert_eq!(before.stats.connections, 1, "the stats command itself");
    assert_eq!(before.stats.handshakes_failed, 0);

    expect_ok(&client(
        home.path(),
        &["ping", &addr, "-c", "10", "-i", "0"],
    ));
    let mut c = courier(home.path());
    c.env("COURIER_COOKIE", "another cookie, 16 bytes or more")
        .args(["ping", &addr]);
    expect_fail(&run(c), 4, "wrong key");

    // The clients are gone once the node has seen them leave.
    let deadline = Instant::now() + WAIT;
    let after = loop {
        let r = stats_json(home.path(), &addr);
        if r.stats.peers_lost >= 2 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (b, a) = (&before.stats, &after.stats);
    // The ping: a lookup and ten pings; this stats command: a lookup and
    // the stats request.
    assert!(a.calls_in >= b.calls_in + 13, "{b:?} -> {a:?}");
    assert!(
        a.bytes_in > b.bytes_in && a.bytes_out > b.bytes_out,
        "{a:?}"
    );
    assert_eq!(a.handshakes_failed, 1, "{a:?}");
    assert!(
        a.peers_lost >= 2,
        "the earlier stats and ping clients left: {a:?}"
    );
    assert_eq!(a.exports, 1, "the echo actor");
    assert!(after.uptime_secs >= before.uptime_secs);

    let out = expect_ok(&client(home.path(), &["stats", &addr]));
    for needle in [
        "connections ",
        "handshake failures 1",
        "calls ",
        "bytes ",
        "exported           1 actors",
        "latency",
    ] {
        assert!(out.contains(needle), "{needle:?} missing:\n{out}");
    }
}

#[test]
fn bench_against_a_local_pair_and_a_node() {
    let home = tempfile::tempdir().unwrap();
    let out = expect_ok(&client(
        home.path(),
        &["bench", "--requests", "300", "--one-way", "3000"],
    ));
    assert!(out.contains("local pair over tcp://127.0.0.1:"), "{out}");
    let rr = out
        .lines()
        .find(|l| l.starts_with("request/reply"))
        .expect(&out);
    let ow = out.lines().find(|l| l.starts_with("one-way")).expect(&out);
    assert!(rr.contains("median") && rr.contains("calls/s"), "{rr}");
    assert!(ow.contains("messages/s"), "{ow}");
    println!("{out}");

    let n = node(home.path(), "tcp://127.0.0.1:0", &[]);
    let out = expect_ok(&client(
        home.path(),
        &[
            "bench",
            &n.addr(),
            "--requests",
            "200",
            "--one-way",
            "2000",
            "--size",
            "256",
            "--json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["payload_bytes"], 256);
    assert_eq!(v["request_reply"]["calls"], 200);
    assert!(v["request_reply"]["median_us"].as_f64().unwrap() > 0.0);
    assert_eq!(v["one_way"]["messages"], 2000);
    assert!(v["one_way"]["messages_per_sec"].as_f64().unwrap() > 0.0);

    // Nothing to measure is a usage error; a refused address is named.
    let o = client(home.path(), &["bench", "--requests", "0", "--one-way", "0"]);
    expect_fail(&o, 2, "nothing to measure");
    let (_bound, port) = refusing_port();
    let o = client(home.path(), &["bench", &format!("tcp://127.0.0.1:{port}")]);
    expect_fail(&o, 3, "refused");
}

#[test]
fn configuration_layers_through_file_environment_and_flags() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let file_cookie = dir.join("file-cookie");
    let file_sock = dir.join("file.sock");
    let env_sock = dir.join("env.sock");
    let config = dir.join("courier.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"from-file\"\nlisten = [\"unix://{}\"]\ncookie_file = \"{}\"\n\
             heartbeat_ms = 200\n[limits]\nmax_frame = 1048576\n",
            file_sock.display(),
            file_cookie.display()
        ),
    )
    .unwrap();
    let other = dir.join("other.toml");
    std::fs::write(&other, "name = \"from-other-file\"\n").unwrap();

    // COURIER_CONFIG names the file; COURIER_LISTEN beats its `listen`; the
    // --name flag beats its `name`; its cookie_file beats the default.
    let mut c = courier(dir);
    c.env("COURIER_CONFIG", &config)
        .env("COURIER_LISTEN", format!("unix://{}", env_sock.display()))
        .args(["node", "--name", "from-flag"]);
    let n = NodeProc::start(c);
    assert!(n.line("node ").ends_with("(from-flag)"), "{:?}", n.lines);
    assert_eq!(n.addr(), format!("unix://{}", env_sock.display()));
    assert!(!file_sock.exists(), "the file's address was overridden");
    assert!(file_cookie.is_file(), "the file's cookie_file was created");
    let addr = n.addr();

    // A client reading the same file has the same cookie.
    let mut c = courier(dir);
    c.env("COURIER_CONFIG", &config)
        .args(["ping", &addr, "-c", "1"]);
    expect_ok(&run(c));
    // COURIER_COOKIE beats the file's cookie_file...
    let mut c = courier(dir);
    c.env("COURIER_CONFIG", &config)
        .env("COURIER_COOKIE", "an environment cookie, wrong here")
        .args(["ping", &addr, "-c", "1"]);
    expect_fail(&run(c), 4, "wrong key");
    // ...and --cookie-file beats COURIER_COOKIE.
    let mut c = courier(dir);
    c.env("COURIER_CONFIG", &config)
        .env("COURIER_COOKIE", "an environment cookie, wrong here")
        .args(["ping", &addr, "-c", "1", "--cookie-file"])
        .arg(&file_cookie);
    expect_ok(&run(c));
    drop(n);

    // --config beats COURIER_CONFIG.
    let mut c = courier(dir);
    c.env("COURIER_CONFIG", &config)
        .env("COURIER_COOKIE", COOKIE)
        .arg("--config")
        .arg(&other)
        .args(["node", "--listen", "tcp://127.0.0.1:0"]);
    let n = NodeProc::start(c);
    assert!(
        n.line("node ").ends_with("(from-other-file)"),
        "{:?}",
        n.lines
    );
    drop(n);

    // Bad values are named, with exit code 2.
    let mut c = courier(dir);
    c.env("COURIER_HEARTBEAT_MS", "soon")
        .args(["node", "--listen", "tcp://127.0.0.1:0"]);
    expect_fail(&run(c), 2, "COURIER_HEARTBEAT_MS");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "listen = [\"tcp://127.0.0.1:0\"]\nhartbeat_ms = 5\n").unwrap();
    let mut c = courier(dir);
    c.arg("--config").arg(&bad).args(["node"]);
    expect_fail(&run(c), 2, "hartbeat_ms");
    let mut c = courier(dir);
    c.env("COURIER_COOKIE", COOKIE)
        .args([
            "ping",
            "tcp://127.0.0.1:1",
            "--pin",
            "not-a-fingerprint",
            "--quic-dir",
        ])
        .arg(dir.join("k"));
    expect_fail(&run(c), 2, "not-a-fingerprint");
    let mut c = courier(dir);
    c.env("COURIER_COOKIE", COOKIE)
        .args(["node", "--listen", "quic://127.0.0.1:0"]);
    expect_fail(&run(c), 2, "QUIC identity");
    let mut c = courier(dir);
    c.arg("--config")
        .arg(dir.join("missing.toml"))
        .args(["ls", "tcp://127.0.0.1:1"]);
    expect_fail(&run(c), 2, "missing.toml");
}

#[test]
fn nothing_is_answered_before_the_handshake() {
    use courier_runtime::wire::{encode_call, CallHeader};
    let home = tempfile::tempdir().unwrap();
    let n = node(home.path(), "tcp://127.0.0.1:0", &[]);
    let addr = n.addr();
    // A node-info `ls` call as the first frame, with no handshake.
    let listing = client_listing_target(home.path(), &addr);
    let mut body = bytes::BytesMut::new();
    encode_call(
        &mut body,
        &CallHeader {
            request: 1,
            incarnation: listing.0,
            target: listing.1,
            fds: 0,
        },
        "courier.node-info.ls",
        &[],
        &[0xf6], // CBOR null: the unit struct `Ls`
    );
    let mut s = std::net::TcpStream::connect(addr.trim_start_matches("tcp://")).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    s.write_all(&body).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got); // until the node closes the connection
    let mut rest = &got[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let kind = rest[4];
        assert_ne!(kind, 0x12, "a reply before authentication");
        assert_eq!(
            kind, 0x05,
            "only a refusal may come back, got kind {kind:#x}"
        );
        rest = &rest[(4 + len).min(rest.len())..];
    }
    let report = stats_json(home.path(), &addr);
    assert_eq!(report.stats.handshakes_failed, 1, "{report:?}");
}

/// The node-info actor's incarnation and local id, as `ls` would reach it.
fn client_listing_target(home: &Path, addr: &str) -> (courier::Incarnation, courier::LocalId) {
    let report = stats_json(home, addr);
    let inc = u64::from_str_radix(&report.identity.incarnation, 16).unwrap();
    // The root is slot 0, the node-info actor slot 1.
    (
        courier::Incarnation(inc),
        courier::LocalId {
            index: 1,
            generation: 0,
        },
    )
}
