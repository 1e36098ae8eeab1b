//! Configuration that picks transports, keys and limits per deployment,
//! without code changes.
//!
//! A [`Config`] comes from up to four layers, each overriding the one
//! before it:
//!
//! 1. the defaults (an empty `Config`: the builder's own defaults apply);
//! 2. a TOML file: the path given in code or with `--config`, else
//!    `$COURIER_CONFIG` ([`Config::from_file`]);
//! 3. environment variables ([`Config::from_env`], listed in [`ENV_VARS`]);
//! 4. values given in code or on the command line ([`Config::load`]'s
//!    `overrides`).
//!
//! A setting left unset in a layer does not hide the layers below it.
//! Lists (`listen`, `peers`, `quic.pins`) are replaced as a whole by the
//! first layer from the top that sets them. The cookie is one setting with
//! two forms (`cookie`, `cookie_file`): a layer giving either replaces both;
//! within one layer the inline cookie wins. The QUIC identity (`quic.dir`,
//! or `quic.cert` with `quic.key`) is likewise one setting.
//!
//! ```
//! # fn main() -> Result<(), courier::ConfigError> {
//! use courier::Config;
//!
//! let file = Config::from_toml(r#"
//!     listen = ["tcp://0.0.0.0:7000"]
//!     heartbeat_ms = 500
//!     [limits]
//!     max_frame = 1048576
//! "#)?;
//! let env = Config::from_env_with(|var| match var {
//!     "COURIER_LISTEN" => Some("unix:///run/app.sock, quic://0.0.0.0:7001".into()),
//!     _ => None,
//! })?;
//! let code = Config { heartbeat_ms: Some(250), ..Config::default() };
//! let cfg = Config::default().overlay(file).overlay(env).overlay(code);
//! assert_eq!(cfg.listen, ["unix:///run/app.sock", "quic://0.0.0.0:7001"]);
//! assert_eq!(cfg.heartbeat_ms, Some(250));
//! assert_eq!(cfg.limits.max_frame, Some(1 << 20));
//! # Ok(()) }
//! ```
//!
//! [`crate::NodeBuilder::config`] applies a `Config`, building the QUIC
//! transport from the configured identity and pins.

#[cfg(feature = "toml")]
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use courier_runtime::error::RemoteError;
use serde::{Deserialize, Serialize};

use crate::node::{Limits, NodeBuilder};

/// The environment variables [`Config::from_env`] reads, with the setting
/// each sets. Lists are comma-separated; an empty variable counts as unset.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("COURIER_CONFIG", "the TOML file to read (see Config::load)"),
    ("COURIER_NAME", "name"),
    ("COURIER_LISTEN", "listen (comma-separated)"),
    ("COURIER_PEERS", "peers (comma-separated)"),
    ("COURIER_COOKIE", "cookie"),
    ("COURIER_COOKIE_FILE", "cookie_file"),
    ("COURIER_HEARTBEAT_MS", "heartbeat_ms"),
    ("COURIER_HEARTBEAT_TIMEOUT_MS", "heartbeat_timeout_ms"),
    ("COURIER_HANDSHAKE_TIMEOUT_MS", "handshake_timeout_ms"),
    ("COURIER_QUIC_DIR", "quic.dir"),
    ("COURIER_QUIC_CERT", "quic.cert"),
    ("COURIER_QUIC_KEY", "quic.key"),
    ("COURIER_QUIC_PINS", "quic.pins (comma-separated)"),
    ("COURIER_QUIC_CA", "quic.ca"),
    ("COURIER_QUIC_SERVER_NAME", "quic.server_name"),
    ("COURIER_MAX_FRAME", "limits.max_frame"),
    ("COURIER_MAX_REFS_PER_PEER", "limits.max_refs_per_peer"),
    ("COURIER_MAX_PENDING_CALLS", "limits.max_pending_calls"),
    ("COURIER_COMMAND_QUEUE", "limits.command_queue"),
    (
        "COURIER_MAX_INBOUND_IN_FLIGHT",
        "limits.max_inbound_in_flight",
    ),
    ("COURIER_MAX_HANDSHAKING", "limits.max_handshaking"),
    ("COURIER_CONNECT_TIMEOUT_MS", "limits.connect_timeout_ms"),
];

/// A node's deployment settings. Every field is optional: unset means "the
/// layer below decides", and at the bottom, the [`NodeBuilder`] default.
/// `Debug` shows whether a cookie is set, never the cookie.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// A human name for logs (and the QUIC certificate when one is made).
    pub name: Option<String>,
    /// Addresses to listen on: `tcp://`, `unix://`, `quic://`, `fd://`.
    pub listen: Vec<String>,
    /// Peers to connect to at start.
    pub peers: Vec<String>,
    /// The shared secret itself (prefer `cookie_file`; at least 16 bytes).
    pub cookie: Option<String>,
    /// A file holding the shared secret, created (0600, 32 random bytes)
    /// if missing.
    pub cookie_file: Option<PathBuf>,
    /// Heartbeat interval in milliseconds (default 1,000). Given alone, the
    /// timeout is three times it.
    pub heartbeat_ms: Option<u64>,
    /// Silence after which a peer is dead, in milliseconds (default 3,000).
    /// Given alone, the interval is a third of it.
    pub heartbeat_timeout_ms: Option<u64>,
    /// How long a handshake may take, in milliseconds (default 10,000).
    pub handshake_timeout_ms: Option<u64>,
    /// QUIC certificates and trust.
    pub quic: QuicSettings,
    /// Limits (see [`Limits`]).
    pub limits: LimitSettings,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("cookie", &self.cookie.as_ref().map(|_| "(set, not shown)"))
            .field("cookie_file", &self.cookie_file)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("heartbeat_timeout_ms", &self.heartbeat_timeout_ms)
            .field("handshake_timeout_ms", &self.handshake_timeout_ms)
            .field("quic", &self.quic)
            .field("limits", &self.limits)
            .finish()
    }
}

/// QUIC identity and trust. An identity enables `quic://`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuicSettings {
    /// A directory with `cert.pem` and `key.pem`, generated there on first
    /// use (as `courier keygen` does).
    pub dir: Option<PathBuf>,
    /// A certificate chain PEM file (with `key`, instead of `dir`).
    pub cert: Option<PathBuf>,
    /// The private key PEM file for `cert`.
    pub key: Option<PathBuf>,
    /// SHA-256 fingerprints of the peers' certificates to accept. With no
    /// pins and no CA, only peers holding this node's own certificate are
    /// accepted (a deployment sharing one certificate).
    pub pins: Vec<String>,
    /// A PEM file of CA certificates; peers whose chain verifies are
    /// accepted.
    pub ca: Option<PathBuf>,
    /// The name the server's certificate must carry when checked against
    /// the CA (default: the host of the address).
    pub server_name: Option<String>,
}

/// Limits; each unset one keeps its default (see [`Limits`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Largest frame body after authentication, in bytes.
    pub max_frame: Option<usize>,
    /// Distinct actors of this node one peer may hold references to.
    pub max_refs_per_peer: Option<u64>,
    /// Calls awaiting replies on one connection.
    pub max_pending_calls: Option<usize>,
    /// Commands queued in front of one connection.
    pub command_queue: Option<usize>,
    /// Inbound calls handled at once per connection.
    pub max_inbound_in_flight: Option<usize>,
    /// Inbound connections still in the handshake (past it, each new one
    /// evicts the oldest).
    pub max_handshaking: Option<usize>,
    /// How long connecting may take, in milliseconds.
    pub connect_timeout_ms: Option<u64>,
}

/// A configuration that cannot be read or used. Each says which file,
/// variable or setting is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        reason: String,
    },
    /// The TOML is malformed or has unknown or mistyped settings.
    #[error("bad config {source_name}: {reason}")]
    Parse {
        /// The file (or "text" when parsed from a string).
        source_name: String,
        /// What is wrong, with its line and column.
        reason: String,
    },
    /// An environment variable holds a value that does not parse.
    #[error("bad value {value:?} in environment variable {var}: {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        reason: String,
    },
    /// A setting cannot be applied.
    #[error("bad setting {setting}: {reason}")]
    Invalid {
        /// The setting, as named in the TOML file.
        setting: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },
}

impl From<ConfigError> for RemoteError {
    fn from(e: ConfigError) -> Self {
        RemoteError::Protocol {
            peer: "this node's configuration".into(),
            reason: e.to_string(),
        }
    }
}

fn over<T>(low: Option<T>, high: Option<T>) -> Option<T> {
    high.or(low)
}

fn over_list(low: Vec<String>, high: Vec<String>) -> Vec<String> {
    if high.is_empty() {
        low
    } else {
        high
    }
}

impl Config {
    /// `self` with every setting `high` gives replaced by `high`'s (see the
    /// module docs for lists and the cookie).
    pub fn overlay(self, high: Config) -> Config {
        let (cookie, cookie_file) = if high.cookie.is_some() || high.cookie_file.is_some() {
            (high.cookie, high.cookie_file)
        } else {
            (self.cookie, self.cookie_file)
        };
        Config {
            name: over(self.name, high.name),
            listen: over_list(self.listen, high.listen),
            peers: over_list(self.peers, high.peers),
            cookie,
            cookie_file,
            heartbeat_ms: over(self.heartbeat_ms, high.heartbeat_ms),
            heartbeat_timeout_ms: over(self.heartbeat_timeout_ms, high.heartbeat_timeout_ms),
            handshake_timeout_ms: over(self.handshake_timeout_ms, high.handshake_timeout_ms),
            quic: self.quic.overlay(high.quic),
            limits: self.limits.overlay(high.limits),
        }
    }

    /// Reads the settings from environment variables (see [`ENV_VARS`]).
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_env_with(|var| std::env::var(var).ok())
    }

    /// Reads the settings from variables looked up with `get` (for tests,
    /// or another source of variables).
    pub fn from_env_with(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |var: &str| get(var).filter(|v| !v.trim().is_empty());
        let list = |var: &str| -> Vec<String> {
            get(var)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let path = |var: &str| get(var).map(PathBuf::from);
        fn num<T: std::str::FromStr>(
            var: &'static str,
            value: Option<String>,
        ) -> Result<Option<T>, ConfigError> {
            match value {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| ConfigError::Env {
                    var,
                    value: v,
                    reason: "expected a whole number".into(),
                }),
            }
        }
        Ok(Config {
            name: get("COURIER_NAME"),
            listen: list("COURIER_LISTEN"),
            peers: list("COURIER_PEERS"),
            cookie: get("COURIER_COOKIE"),
            cookie_file: path("COURIER_COOKIE_FILE"),
            heartbeat_ms: num("COURIER_HEARTBEAT_MS", get("COURIER_HEARTBEAT_MS"))?,
            heartbeat_timeout_ms: num(
                "COURIER_HEARTBEAT_TIMEOUT_MS",
                get("COURIER_HEARTBEAT_TIMEOUT_MS"),
            )?,
            handshake_timeout_ms: num(
                "COURIER_HANDSHAKE_TIMEOUT_MS",
                get("COURIER_HANDSHAKE_TIMEOUT_MS"),
            )?,
            quic: QuicSettings {
                dir: path("COURIER_QUIC_DIR"),
                cert: path("COURIER_QUIC_CERT"),
                key: path("COURIER_QUIC_KEY"),
                pins: list("COURIER_QUIC_PINS"),
                ca: path("COURIER_QUIC_CA"),
                server_name: get("COURIER_QUIC_SERVER_NAME"),
            },
            limits: LimitSettings {
                max_frame: num("COURIER_MAX_FRAME", get("COURIER_MAX_FRAME"))?,
                max_refs_per_peer: num(
                    "COURIER_MAX_REFS_PER_PEER",
                    get("COURIER_MAX_REFS_PER_PEER"),
                )?,
                max_pending_calls: num(
                    "COURIER_MAX_PENDING_CALLS",
                    get("COURIER_MAX_PENDING_CALLS"),
                )?,
                command_queue: num("COURIER_COMMAND_QUEUE", get("COURIER_COMMAND_QUEUE"))?,
                max_inbound_in_flight: num(
                    "COURIER_MAX_INBOUND_IN_FLIGHT",
                    get("COURIER_MAX_INBOUND_IN_FLIGHT"),
                )?,
                max_handshaking: num("COURIER_MAX_HANDSHAKING", get("COURIER_MAX_HANDSHAKING"))?,
                connect_timeout_ms: num(
                    "COURIER_CONNECT_TIMEOUT_MS",
                    get("COURIER_CONNECT_TIMEOUT_MS"),
                )?,
            },
        })
    }

    /// Parses TOML text (the settings are the fields of [`Config`]; QUIC's
    /// under `[quic]`, limits under `[limits]`).
    #[cfg(feature = "toml")]
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        parse_toml(text, "text")
    }

    /// Reads a TOML file.
    #[cfg(feature = "toml")]
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        parse_toml(&text, &path.display().to_string())
    }

    /// All four layers: the defaults, then the TOML file at `file` (else at
    /// `$COURIER_CONFIG`, else none), then the environment, then
    /// `overrides` (the values given in code or on the command line).
    #[cfg(feature = "toml")]
    pub fn load(file: Option<&Path>, overrides: Config) -> Result<Config, ConfigError> {
        Self::load_with(file, |var| std::env::var(var).ok(), overrides)
    }

    /// [`Config::load`] with variables looked up with `get`.
    #[cfg(feature = "toml")]
    pub fn load_with(
        file: Option<&Path>,
        get: impl Fn(&str) -> Option<String>,
        overrides: Config,
    ) -> Result<Config, ConfigError> {
        let path = file.map(Path::to_owned).or_else(|| {
            get("COURIER_CONFIG")
                .filter(|v| !v.trim().is_empty())
                .map(PathBuf::from)
        });
        let from_file = match path {
            Some(p) => Config::from_file(&p)?,
            None => Config::default(),
        };
        let from_env = Config::from_env_with(get)?;
        Ok(Config::default()
            .overlay(from_file)
            .overlay(from_env)
            .overlay(overrides))
    }

    /// The heartbeat interval and timeout these settings give, if any.
    pub fn heartbeat(&self) -> Result<Option<(Duration, Duration)>, ConfigError> {
        let ms = Duration::from_millis;
        let (interval, timeout) = match (self.heartbeat_ms, self.heartbeat_timeout_ms) {
            (None, None) => return Ok(None),
            (Some(i), Some(t)) => (ms(i), ms(t)),
            (Some(i), None) => (ms(i), ms(i.saturating_mul(3))),
            (None, Some(t)) => (ms((t / 3).max(1)), ms(t)),
        };
        if interval.is_zero() {
            return Err(ConfigError::Invalid {
                setting: "heartbeat_ms",
                reason: "must be above zero".into(),
            });
        }
        if timeout <= interval {
            return Err(ConfigError::Invalid {
                setting: "heartbeat_timeout_ms",
                reason: format!(
                    "{} ms must be longer than heartbeat_ms ({} ms)",
                    timeout.as_millis(),
                    interval.as_millis()
                ),
            });
        }
        Ok(Some((interval, timeout)))
    }
}

#[cfg(feature = "toml")]
fn parse_toml(text: &str, source_name: &str) -> Result<Config, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        source_name: source_name.to_owned(),
        reason: e.to_string().trim_end().to_owned(),
    })
}

impl QuicSettings {
    fn overlay(self, high: QuicSettings) -> QuicSettings {
        let identity_given = high.dir.is_some() || high.cert.is_some() || high.key.is_some();
        let (dir, cert, key) = if identity_given {
            (high.dir, high.cert, high.key)
        } else {
            (self.dir, self.cert, self.key)
        };
        QuicSettings {
            dir,
            cert,
            key,
            pins: over_list(self.pins, high.pins),
            ca: over(self.ca, high.ca),
            server_name: over(self.server_name, high.server_name),
        }
    }

    /// Whether an identity is configured (so `quic://` can be used).
    pub fn has_identity(&self) -> bool {
        self.dir.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// Loads the configured identity (generating it in `dir` on first
    /// use, named `name`), or `None` when none is configured.
    #[cfg(feature = "transports")]
    pub fn identity(
        &self,
        name: &str,
    ) -> Result<Option<courier_transports::quic::Identity>, ConfigError> {
        use courier_transports::quic::Identity;
        let bad = |setting, e: courier_runtime::transport::TransportError| ConfigError::Invalid {
            setting,
            reason: e.to_string(),
        };
        match (&self.dir, &self.cert, &self.key) {
            (None, None, None) => Ok(None),
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(ConfigError::Invalid {
                setting: "quic.dir",
                reason: "give either quic.dir or quic.cert with quic.key, not both".into(),
            }),
            (Some(dir), None, None) => Identity::load_or_generate(dir, name)
                .map(Some)
                .map_err(|e| bad("quic.dir", e)),
            (None, Some(cert), Some(key)) => Identity::from_pem_files(cert, key)
                .map(Some)
                .map_err(|e| bad("quic.cert", e)),
            (None, Some(_), None) => Err(ConfigError::Invalid {
                setting: "quic.key",
                reason: "quic.cert is set but quic.key is not".into(),
            }),
            (None, None, Some(_)) => Err(ConfigError::Invalid {
                setting: "quic.cert",
                reason: "quic.key is set but quic.cert is not".into(),
            }),
        }
    }

    /// The trust policy: the pins and CA given, else `own`'s fingerprint.
    #[cfg(feature = "transports")]
    pub fn trust(
        &self,
        own: &courier_transports::quic::Identity,
    ) -> Result<courier_transports::quic::PeerTrust, ConfigError> {
        use courier_transports::quic::{Fingerprint, PeerTrust};
        let mut trust = match &self.ca {
            Some(path) => PeerTrust::ca_pem_file(path).map_err(|e| ConfigError::Invalid {
                setting: "quic.ca",
                reason: e.to_string(),
            })?,
            None => PeerTrust::default(),
        };
        for p in &self.pins {
            let fp: Fingerprint =
                p.parse()
                    .map_err(|e: courier_transports::quic::FingerprintError| {
                        ConfigError::Invalid {
                            setting: "quic.pins",
                            reason: e.to_string(),
                        }
                    })?;
            trust = trust.and_pin(fp);
        }
        if trust.is_empty() {
            trust = trust.and_pin(own.fingerprint());
        }
        Ok(trust)
    }
}

impl LimitSettings {
    fn overlay(self, high: LimitSettings) -> LimitSettings {
        LimitSettings {
            max_frame: over(self.max_frame, high.max_frame),
            max_refs_per_peer: over(self.max_refs_per_peer, high.max_refs_per_peer),
            max_pending_calls: over(self.max_pending_calls, high.max_pending_calls),
            command_queue: over(self.command_queue, high.command_queue),
            max_inbound_in_flight: over(self.max_inbound_in_flight, high.max_inbound_in_flight),
            max_handshaking: over(self.max_handshaking, high.max_handshaking),
            connect_timeout_ms: over(self.connect_timeout_ms, high.connect_timeout_ms),
        }
    }

    /// `base` with every limit set here replaced.
    pub fn apply(&self, base: Limits) -> Result<Limits, ConfigError> {
        let positive = |setting: &'static str, v: Option<usize>| match v {
            Some(0) => Err(ConfigError::Invalid {
                setting,
                reason: "must be above zero".into(),
            }),
            _ => Ok(v),
        };
        let max_frame = positive("limits.max_frame", self.max_frame)?;
        let pending = positive("limits.max_pending_calls", self.max_pending_calls)?;
        let queue = positive("limits.command_queue", self.command_queue)?;
        let inflight = positive("limits.max_inbound_in_flight", self.max_inbound_in_flight)?;
        let handshaking = positive("limits.max_handshaking", self.max_handshaking)?;
        Ok(Limits {
            max_frame: max_frame.unwrap_or(base.max_frame),
            max_refs_per_peer: self.max_refs_per_peer.unwrap_or(base.max_refs_per_peer),
            max_pending_calls: pending.unwrap_or(base.max_pending_calls),
            command_queue: queue.unwrap_or(base.command_queue),
            max_inbound_in_flight: inflight.unwrap_or(base.max_inbound_in_flight),
            max_handshaking: handshaking.unwrap_or(base.max_handshaking),
            connect_timeout: self
                .connect_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(base.connect_timeout),
        })
    }
}

impl NodeBuilder {
    /// Applies a [`Config`]: name, listen addresses, peers, cookie (inline
    /// or file), heartbeat, handshake timeout, limits, and, when a QUIC
    /// identity is configured, a transport for every scheme with QUIC set
    /// up from that identity and trust. Settings the config leaves unset
    /// keep what the builder had; builder calls made after this one
    /// override it (so code beats configuration).
    ///
    /// Fails, naming the setting, when a cookie or certificate file cannot
    /// be read, a pin does not parse, or a `quic://` address is given
    /// without an identity.
    pub fn config(mut self, cfg: &Config) -> Result<Self, ConfigError> {
        if let Some(n) = &cfg.name {
            self = self.name(n.clone());
        }
        for a in &cfg.listen {
            self = self.listen(a.clone());
        }
        for p in &cfg.peers {
            self = self.peer(p.clone());
        }
        match (&cfg.cookie, &cfg.cookie_file) {
            (Some(c), _) => {
                let key = courier_runtime::handshake::Key::new("default", c.as_bytes().to_vec())
                    .map_err(|e| ConfigError::Invalid {
                        setting: "cookie",
                        reason: e.to_string(),
                    })?;
                self = self.keyring(courier_runtime::handshake::Keyring::single(key));
            }
            (None, Some(path)) => {
                let bytes = crate::cookie::load_or_create_cookie(path).map_err(|e| {
                    ConfigError::Invalid {
                        setting: "cookie_file",
                        reason: match e {
                            RemoteError::Authentication { reason, .. } => reason,
                            other => other.to_string(),
                        },
                    }
                })?;
                let key = courier_runtime::handshake::Key::new("default", bytes).map_err(|e| {
                    ConfigError::Invalid {
                        setting: "cookie_file",
                        reason: e.to_string(),
                    }
                })?;
                self = self.keyring(courier_runtime::handshake::Keyring::single(key));
            }
            (None, None) => {}
        }
        if let Some((interval, timeout)) = cfg.heartbeat()? {
            self = self.heartbeat(interval, timeout);
        }
        if let Some(ms) = cfg.handshake_timeout_ms {
            if ms == 0 {
                return Err(ConfigError::Invalid {
                    setting: "handshake_timeout_ms",
                    reason: "must be above zero".into(),
                });
            }
            self = self.handshake_timeout(Duration::from_millis(ms));
        }
        let limits = cfg.limits.apply(self.limits.clone())?;
        self = self.limits(limits);
        self = apply_quic(self, cfg)?;
        Ok(self)
    }
}

#[cfg(feature = "transports")]
fn apply_quic(b: NodeBuilder, cfg: &Config) -> Result<NodeBuilder, ConfigError> {
    use courier_transports::quic::QuicConfig;
    use courier_transports::AnyTransport;
    let name = cfg.name.as_deref().unwrap_or("courier");
    let Some(identity) = cfg.quic.identity(name)? else {
        if let Some(a) = cfg.listen.iter().find(|a| a.starts_with("quic://")) {
            return Err(ConfigError::Invalid {
                setting: "listen",
                reason: format!(
                    "{a} needs a QUIC identity: set quic.dir (COURIER_QUIC_DIR), or quic.cert \
                     and quic.key; `courier keygen` makes one"
                ),
            });
        }
        if !cfg.quic.pins.is_empty() || cfg.quic.ca.is_some() {
            return Err(ConfigError::Invalid {
                setting: "quic.pins",
                reason: "QUIC trust is configured but no identity: set quic.dir, or quic.cert \
                         and quic.key"
                    .into(),
            });
        }
        return Ok(b);
    };
    let trust = cfg.quic.trust(&identity)?;
    let fingerprint = identity.fingerprint();
    let mut q = QuicConfig::new(identity, trust);
    q.server_name = cfg.quic.server_name.clone();
    let t = AnyTransport::builder()
        .quic(q)
        .build()
        .map_err(|e| ConfigError::Invalid {
            setting: "quic",
            reason: e.to_string(),
        })?;
    tracing::debug!(%fingerprint, "QUIC configured");
    Ok(b.transport(std::sync::Arc::new(t)))
}

#[cfg(not(feature = "transports"))]
fn apply_quic(b: NodeBuilder, cfg: &Config) -> Result<NodeBuilder, ConfigError> {
    if cfg.quic.has_identity() || !cfg.quic.pins.is_empty() || cfg.quic.ca.is_some() {
        return Err(ConfigError::Invalid {
            setting: "quic",
            reason: "this build of courier has no transports (cargo feature `transports`); \
                     give the node a QUIC transport in code"
                .into(),
        });
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn each_layer_overrides_the_one_below() {
        let file = Config {
            name: Some("from-file".into()),
            listen: vec!["tcp://0.0.0.0:1".into()],
            heartbeat_ms: Some(100),
            heartbeat_timeout_ms: Some(1000),
            limits: LimitSettings {
                max_frame: Some(1),
                max_handshaking: Some(2),
                ..Default::default()
            },
            ..Default::default()
        };
        let env = Config::from_env_with(env(&[
            ("COURIER_LISTEN", "tcp://0.0.0.0:2, unix:///tmp/x.sock"),
            ("COURIER_HEARTBEAT_MS", "200"),
            ("COURIER_MAX_FRAME", "3"),
        ]))
        .unwrap();
        let code = Config {
            heartbeat_ms: Some(300),
            ..Default::default()
        };
        let defaults_then_file = Config::default().overlay(file.clone());
        assert_eq!(defaults_then_file, file, "the file overrides the defaults");
        let cfg = defaults_then_file.overlay(env).overlay(code);
        assert_eq!(cfg.name.as_deref(), Some("from-file"), "kept from the file");
        assert_eq!(
            cfg.listen,
            ["tcp://0.0.0.0:2", "unix:///tmp/x.sock"],
            "the environment's list replaces the file's"
        );
        assert_eq!(cfg.heartbeat_ms, Some(300), "code beats the environment");
        assert_eq!(cfg.heartbeat_timeout_ms, Some(1000), "kept from the file");
        assert_eq!(
            cfg.limits.max_frame,
            Some(3),
            "the environment beats the file"
        );
        assert_eq!(cfg.limits.max_handshaking, Some(2));
    }

    #[test]
    fn the_cookie_is_one_setting_with_two_forms() {
        let file = Config {
            cookie_file: Some("/etc/courier/cookie".into()),
            ..Default::default()
        };
        let env = Config::from_env_with(env(&[("COURIER_COOKIE", "0123456789abcdef!")])).unwrap();
        let cfg = file.clone().overlay(env.clone());
        assert_eq!(cfg.cookie.as_deref(), Some("0123456789abcdef!"));
        assert_eq!(
            cfg.cookie_file, None,
            "the environment's cookie hides the file's"
        );
        let cli = Config {
            cookie_file: Some("/home/me/cookie".into()),
            ..Default::default()
        };
        let cfg = file.overlay(env).overlay(cli);
        assert_eq!(
            cfg.cookie, None,
            "a cookie file on the command line beats COURIER_COOKIE"
        );
        assert_eq!(cfg.cookie_file, Some("/home/me/cookie".into()));
    }

    #[test]
    fn the_quic_identity_is_one_setting() {
        let file = Config {
            quic: QuicSettings {
                cert: Some("/c.pem".into()),
                key: Some("/k.pem".into()),
                pins: vec!["aa".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let env = Config::from_env_with(env(&[("COURIER_QUIC_DIR", "/keys")])).unwrap();
        let cfg = file.overlay(env);
        assert_eq!(cfg.quic.dir, Some("/keys".into()));
        assert_eq!((cfg.quic.cert, cfg.quic.key), (None, None));
        assert_eq!(cfg.quic.pins, ["aa"], "pins are a setting of their own");
    }

    #[test]
    fn environment_values_are_checked() {
        let e = Config::from_env_with(env(&[("COURIER_HEARTBEAT_MS", "soon")])).unwrap_err();
        assert!(e.to_string().contains("COURIER_HEARTBEAT_MS"), "{e}");
        assert!(e.to_string().contains("\"soon\""), "{e}");
        let empty = Config::from_env_with(env(&[("COURIER_LISTEN", " "), ("COURIER_NAME", "")]));
        assert_eq!(
            empty.unwrap(),
            Config::default(),
            "empty variables are unset"
        );
    }

    #[test]
    fn debug_never_shows_the_cookie() {
        let c = Config {
            cookie: Some("s3cret-cookie-value!".into()),
            ..Default::default()
        };
        let d = format!("{c:?}");
        assert!(!d.contains("s3cret"), "{d}");
        assert!(d.contains("not shown"), "{d}");
    }

    #[test]
    fn heartbeat_fills_in_the_missing_half() {
        let c = |i, t| Config {
            heartbeat_ms: i,
            heartbeat_timeout_ms: t,
            ..Default::default()
        };
        let ms = Duration::from_millis;
        assert_eq!(c(None, None).heartbeat().unwrap(), None);
        assert_eq!(
            c(Some(100), None).heartbeat().unwrap(),
            Some((ms(100), ms(300)))
        );
        assert_eq!(
            c(None, Some(900)).heartbeat().unwrap(),
            Some((ms(300), ms(900)))
        );
        let e = c(Some(500), Some(400)).heartbeat().unwrap_err();
        assert!(e.to_string().contains("heartbeat_timeout_ms"), "{e}");
        assert!(c(Some(0), None).heartbeat().is_err());
    }

    #[test]
    fn limits_keep_their_defaults_unless_set() {
        let l = LimitSettings {
            max_frame: Some(4096),
            connect_timeout_ms: Some(1500),
            ..Default::default()
        }
        .apply(Limits::default())
        .unwrap();
        assert_eq!(l.max_frame, 4096);
        assert_eq!(l.connect_timeout, Duration::from_millis(1500));
        assert_eq!(l.max_refs_per_peer, Limits::default().max_refs_per_peer);
        let e = LimitSettings {
            command_queue: Some(0),
            ..Default::default()
        }
        .apply(Limits::default())
        .unwrap_err();
        assert!(e.to_string().contains("limits.command_queue"), "{e}");
    }

    #[cfg(feature = "toml")]
    #[test]
    fn toml_file_then_env_then_code() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("courier.toml");
        std::fs::write(
            &file,
            "name = \"a\"\nlisten = [\"tcp://127.0.0.1:1\"]\nheartbeat_ms = 100\n\
             [limits]\nmax_pending_calls = 10\n[quic]\npins = [\"x\"]\n",
        )
        .unwrap();
        let path = file.to_str().unwrap().to_owned();
        // The file named by COURIER_CONFIG is read when none is given.
        let vars = env(&[
            ("COURIER_CONFIG", &path),
            ("COURIER_NAME", "b"),
            ("COURIER_MAX_PENDING_CALLS", "20"),
        ]);
        let cfg = Config::load_with(None, &vars, Config::default()).unwrap();
        assert_eq!(cfg.name.as_deref(), Some("b"));
        assert_eq!(cfg.listen, ["tcp://127.0.0.1:1"]);
        assert_eq!(cfg.heartbeat_ms, Some(100));
        assert_eq!(cfg.limits.max_pending_calls, Some(20));
        assert_eq!(cfg.quic.pins, ["x"]);
        let code = Config {
            name: Some("c".into()),
            ..Default::default()
        };
        let cfg = Config::load_with(None, &vars, code).unwrap();
        assert_eq!(cfg.name.as_deref(), Some("c"));
        // A file given in code beats COURIER_CONFIG.
        let other = dir.path().join("other.toml");
        std::fs::write(&other, "listen = [\"tcp://127.0.0.1:2\"]\n").unwrap();
        let cfg = Config::load_with(Some(&other), &vars, Config::default()).unwrap();
        assert_eq!(cfg.listen, ["tcp://127.0.0.1:2"]);
        assert_eq!(
            cfg.heartbeat_ms, None,
            "the COURIER_CONFIG file was not read"
        );
    }

    #[cfg(feature = "toml")]
    #[test]
    fn toml_errors_name_the_file_and_setting() {
        let e = Config::from_toml("listen = \"tcp://x:1\"").unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        let e = Config::from_toml("hearbeat_ms = 5").unwrap_err();
        assert!(e.to_string().contains("hearbeat_ms"), "{e}");
        let e = Config::from_file(Path::new("/nonexistent/courier.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/courier.toml"), "{e}");
    }
}
