//! What the subcommands share: connection flags, configuration loading, the
//! client node, logging, and turning errors into clear messages and exit
//! codes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use courier::{Config, ConfigError, Node, RemoteError};

/// How a command failed; the exit code says which way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Something else went wrong (exit 1).
    Failed = 1,
    /// Bad flags or configuration (exit 2, as clap's own usage errors).
    Usage = 2,
    /// Nothing answered, or the connection was refused (exit 3).
    Unreachable = 3,
    /// The peer and we do not share a key (exit 4).
    Authentication = 4,
    /// A QUIC certificate was not trusted (exit 5).
    Certificate = 5,
}

/// A failed command: what happened, and what to try.
#[derive(Debug)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
    pub hint: Option<String>,
}

impl Failure {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Kind::Usage, message)
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(Kind::Failed, message)
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Prints the failure to stderr and gives the exit code.
    pub fn report(&self, program: &str) -> ExitCode {
        eprintln!("{program}: error: {}", self.message);
        if let Some(h) = &self.hint {
            eprintln!("{program}: hint: {h}");
        }
        ExitCode::from(self.kind as u8)
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::usage(e.to_string())
    }
}

/// Explains a failure to reach or use the node at `addr`.
pub fn classify(e: &RemoteError, addr: &str) -> Failure {
    let text = e.to_string();
    let lower = text.to_lowercase();
    if lower.contains("not pinned") || lower.contains("certificate") {
        let fp = fingerprint_in(&text);
        let (message, hint) = if lower.contains("peer refused") {
            (
                format!(
                    "{addr} does not trust our QUIC certificate{}",
                    fp.map(|f| format!(" (sha256:{f})")).unwrap_or_default()
                ),
                "add it to the node's pins (quic.pins, COURIER_QUIC_PINS, --pin), or give both \
                 sides one keys directory (courier keygen; --quic-dir)"
                    .to_owned(),
            )
        } else {
            (
                format!(
                    "the QUIC certificate of {addr}{} is not pinned here",
                    fp.map(|f| format!(" (sha256:{f})")).unwrap_or_default()
                ),
                match fp {
                    Some(f) => format!("if that is the node you expect, trust it with --pin {f}"),
                    None => "pin the node's fingerprint with --pin".to_owned(),
                },
            )
        };
        return Failure::new(Kind::Certificate, message).hint(format!("{hint}\n  ({text})"));
    }
    match e {
        RemoteError::Authentication { reason, .. } => Failure::new(
            Kind::Authentication,
            if reason.contains("refused") {
                format!("{addr} refused our cookie: wrong key ({reason})")
            } else {
                format!("{addr} could not prove it has our cookie: wrong key ({reason})")
            },
        )
        .hint(
            "both nodes need the same cookie: check COURIER_COOKIE, COURIER_COOKIE_FILE, \
             --cookie-file or cookie_file in the config",
        ),
        RemoteError::Unreachable { reason, .. } if reason.to_lowercase().contains("refused") => {
            Failure::new(
                Kind::Unreachable,
                format!("connection refused by {addr}: nothing listens there ({reason})"),
            )
            .hint("is `courier node` (or your node) running, on that address and port?")
        }
        RemoteError::Unreachable { reason, .. } if reason.contains("within") => Failure::new(
            Kind::Unreachable,
            format!("{addr} did not answer: {reason}"),
        )
        .hint(
            "the address may be wrong, filtered by a firewall, or not a Courier node; \
             --timeout waits longer",
        ),
        RemoteError::Unreachable { .. } => {
            Failure::new(Kind::Unreachable, format!("cannot reach {addr}: {text}"))
        }
        _ => Failure::failed(text),
    }
}

/// Checks an address to connect to: it must parse, and not be `fd://`
/// (a descriptor is inherited, not dialed).
pub fn check_dial_addr(addr: &str) -> Result<(), Failure> {
    match addr.parse::<courier::Address>() {
        Err(e) => Err(Failure::usage(e.to_string())),
        Ok(courier::Address::Fd { .. }) => Err(Failure::usage(format!(
            "{addr}: an fd:// address names an inherited descriptor; give the node's \
             tcp://, unix:// or quic:// address"
        ))),
        Ok(_) => Ok(()),
    }
}

/// Checks an address to listen on. `fd://N` must be a socket this process
/// inherited: checked before the runtime opens descriptors of its own, so
/// a wrong number is refused rather than taken from the runtime.
pub fn check_listen_addr(addr: &str) -> Result<(), Failure> {
    match addr.parse::<courier::Address>() {
        Err(e) => Err(Failure::usage(format!("bad --listen address: {e}"))),
        Ok(courier::Address::Fd { fd: Some(n) }) => {
            let target = std::fs::read_link(format!("/proc/self/fd/{n}"));
            match target {
                Ok(t) if t.to_string_lossy().starts_with("socket:") => Ok(()),
                Ok(t) => Err(Failure::usage(format!(
                    "{addr}: descriptor {n} is {}, not a socket",
                    t.display()
                ))),
                Err(_) => Err(Failure::usage(format!(
                    "{addr}: descriptor {n} is not open in this process"
                ))),
            }
        }
        Ok(_) => Ok(()),
    }
}

/// The first SHA-256 fingerprint (64 hex digits) in `text`.
fn fingerprint_in(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    (0..b.len().saturating_sub(63)).find_map(|i| {
        let w = &b[i..i + 64];
        let before_ok = i == 0 || !b[i - 1].is_ascii_hexdigit();
        let after_ok = b.get(i + 64).is_none_or(|c| !c.is_ascii_hexdigit());
        (before_ok && after_ok && w.iter().all(u8::is_ascii_hexdigit)).then(|| &text[i..i + 64])
    })
}

/// Flags for reaching other nodes, shared by every command that does.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnArgs {
    /// The cookie file (default: $COURIER_COOKIE, then $COURIER_COOKIE_FILE,
    /// then ~/.config/courier/cookie).
    #[arg(long, value_name = "FILE")]
    pub cookie_file: Option<PathBuf>,

    /// A directory with the QUIC `cert.pem` and `key.pem` (default:
    /// $COURIER_QUIC_DIR, else the cookie file's directory if they are
    /// there).
    #[arg(long, value_name = "DIR")]
    pub quic_dir: Option<PathBuf>,

    /// Trust the QUIC peer whose certificate has this SHA-256 fingerprint
    /// (repeatable; default: $COURIER_QUIC_PINS, else only our own
    /// certificate).
    #[arg(long = "pin", value_name = "SHA256")]
    pub pins: Vec<String>,

    /// Seconds that connecting (and each reply) may take (default 5).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
}

impl ConnArgs {
    /// The settings these flags give (the top layer).
    pub fn overrides(&self) -> Result<Config, Failure> {
        let mut c = Config {
            cookie_file: self.cookie_file.clone(),
            ..Config::default()
        };
        c.quic.dir = self.quic_dir.clone();
        c.quic.pins = self.pins.clone();
        if let Some(t) = self.timeout {
            c.limits.connect_timeout_ms = Some(secs_to_ms(t, "--timeout")?);
        }
        Ok(c)
    }
}

pub fn secs_to_ms(t: f64, flag: &str) -> Result<u64, Failure> {
    if !t.is_finite() || t <= 0.0 || t > 86_400.0 {
        return Err(Failure::usage(format!(
            "{flag} {t} is not a number of seconds between 0 and 86400"
        )));
    }
    Ok(((t * 1000.0).ceil() as u64).max(1))
}

/// Loads the layered configuration and fills in the command's defaults.
pub fn load(file: Option<&Path>, overrides: Config) -> Result<Config, Failure> {
    let mut cfg = Config::load(file, overrides)?;
    if !cfg.quic.has_identity() {
        // `courier keygen` with no --dir writes beside the default cookie.
        let cookie = cfg
            .cookie_file
            .clone()
            .or_else(courier::cookie::default_cookie_path);
        if let Some(dir) = cookie.as_deref().and_then(Path::parent) {
            if dir.join("cert.pem").is_file() && dir.join("key.pem").is_file() {
                cfg.quic.dir = Some(dir.to_owned());
            }
        }
    }
    Ok(cfg)
}

/// How long connecting and each reply may take.
pub fn timeout(cfg: &Config) -> Duration {
    Duration::from_millis(cfg.limits.connect_timeout_ms.unwrap_or(5_000))
}

/// `f`, or [`RemoteError::Timeout`] if it takes longer than `after`.
pub async fn within<T>(
    after: Duration,
    f: impl Future<Output = Result<T, RemoteError>>,
) -> Result<T, RemoteError> {
    tokio::time::timeout(after, f)
        .await
        .unwrap_or(Err(RemoteError::Timeout { after }))
}

/// A node that only dials out, to talk to `target`.
pub async fn client_node(cfg: &Config, target: &str) -> Result<Node, Failure> {
    check_dial_addr(target)?;
    let mut cfg = cfg.clone();
    cfg.listen.clear();
    cfg.peers.clear();
    cfg.limits.connect_timeout_ms = Some(timeout(&cfg).as_millis() as u64);
    let mut ephemeral = None;
    if target.starts_with("quic://") && !cfg.quic.has_identity() {
        // No identity of our own: a throw-away certificate. A node accepts
        // it only if it pins it, so this mostly serves to show which
        // certificate the node presents (the error names its fingerprint).
        let id = courier::transports::quic::Identity::generate("courier-cli")
            .map_err(|e| Failure::failed(format!("cannot make a QUIC certificate: {e}")))?;
        let trust = cfg.quic.trust(&id)?;
        cfg.quic.pins.clear();
        cfg.quic.ca = None;
        ephemeral = Some((id, trust));
    }
    let mut b = Node::builder().name("courier-cli").config(&cfg)?;
    if let Some((id, trust)) = ephemeral {
        let mut q = courier::transports::quic::QuicConfig::new(id, trust);
        q.server_name = cfg.quic.server_name.clone();
        let t = courier::transports::AnyTransport::builder()
            .quic(q)
            .build()
            .map_err(|e| Failure::failed(format!("cannot set up QUIC: {e}")))?;
        b = b.transport(Arc::new(t));
    }
    b.start().await.map_err(|e| match e {
        RemoteError::Authentication { reason, .. } => {
            Failure::usage(format!("no usable cookie: {reason}"))
        }
        other => Failure::failed(other.to_string()),
    })
}

/// Runs `f` inside an actix system.
pub fn block_on<F: Future>(f: F) -> F::Output {
    actix::System::new().block_on(f)
}

/// Sets up logging to stderr.
pub fn init_logging(flag: Option<&str>, default: &str) -> Result<(), Failure> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let spec = flag
        .map(str::to_owned)
        .or_else(|| std::env::var("COURIER_LOG").ok())
        .unwrap_or_else(|| default.to_owned());
    let targets: Targets = spec.parse().map_err(|e| {
        Failure::usage(format!(
            "bad log filter {spec:?} ({e}): give a level such as info, or targets such as courier=debug,warn"
        ))
    })?;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .with(targets)
        .init();
    Ok(())
}

/// Microseconds with a sensible number of digits.
pub fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{v:.1} µs")
    }
}

/// A count with thousands separators.
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in the largest unit that keeps the number readable.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Looks up the node-info actor at `addr` (through a client node made from
/// `cfg`), asks it `question`, and prints the answer as JSON or with
/// `text` (given the answer and this command's own node id). `what` names
/// the request in errors ("list", "report").
pub async fn ask_node_info<Q, R>(
    cfg: &Config,
    addr: &str,
    question: Q,
    what: &str,
    json: bool,
    text: impl FnOnce(&R, &str) -> String,
) -> Result<(), Failure>
where
    Q: courier::RemoteMessage<Result = Result<R, String>>,
    courier::info::NodeInfo: actix::Handler<Q>,
    R: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    let node = client_node(cfg, addr).await?;
    let timeout = timeout(cfg);
    let info = within(
        timeout,
        node.lookup::<courier::info::NodeInfo>(addr, courier::info::NODE_INFO),
    )
    .await
    .map_err(|e| classify(&e, addr))?;
    let answer = info
        .send(question)
        .timeout(timeout)
        .await
        .map_err(|e| classify(&e, addr))?
        .map_err(|e| Failure::failed(format!("{addr} could not {what}: {e}")))?;
    if json {
        let out = serde_json::to_string_pretty(&answer)
            .map_err(|e| Failure::failed(format!("cannot write JSON: {e}")))?;
        println!("{out}");
    } else {
        print!("{}", text(&answer, &courier::info::node_hex(&node.id())));
    }
    node.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(count(12), "12");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(us(45.25), "45.2 µs");
        assert_eq!(us(1500.0), "1.50 ms");
    }

    #[test]
    fn errors_are_classified() {
        let refused = RemoteError::Unreachable {
            address: "tcp://127.0.0.1:1".into(),
            reason: "Connection refused (os error 111)".into(),
        };
        assert_eq!(classify(&refused, "x").kind, Kind::Unreachable);
        let auth = RemoteError::Authentication {
            peer: "x".into(),
            reason: "bad proof".into(),
        };
        assert_eq!(classify(&auth, "x").kind, Kind::Authentication);
        let pin = RemoteError::Unreachable {
            address: "quic://127.0.0.1:1".into(),
            reason: "tls: the peer's certificate (sha256 ab) is not pinned".into(),
        };
        assert_eq!(classify(&pin, "x").kind, Kind::Certificate);
        let fp = "0123456789abcdef".repeat(4);
        assert_eq!(
            fingerprint_in(&format!("(sha256 {fp}) is")),
            Some(fp.as_str())
        );
        assert_eq!(fingerprint_in(&format!("x{fp}0")), None);
        assert!(secs_to_ms(-1.0, "--timeout").is_err());
        assert_eq!(secs_to_ms(0.5, "--timeout").unwrap(), 500);
    }
}
