//! The handshake: version and features, then mutual HMAC-SHA256
//! challenge-response over fresh nonces, bound to both node ids, to the
//! direction and (on TLS links) to the TLS session.
//!
//! ```text
//! initiator                                   acceptor
//!   HELLO  {versions, features, node_i, inc_i, key id, nonce_i, addrs} ->
//!       <- CHALLENGE {version, features, node_a, inc_a, key id, nonce_a, addrs}
//!   RESPONSE {HMAC(K, "courier/1 initiator proof" | T)} ->
//!       <- WELCOME {HMAC(K, "courier/1 acceptor proof" | T)}   or REFUSAL
//! T = SHA-256("courier/1 transcript" | len | hello bytes | len | challenge bytes | binding)
//! ```
//!
//! The acceptor proves itself only after the initiator did, so a client
//! without the key learns nothing it could use. Each state is a type holding
//! only what is valid there; a transition consumes it and returns the next
//! state or a [`HandshakeError`].

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::HandshakeError;
use crate::id::{Incarnation, NodeId};
use crate::wire::{
    features, kind, Envelope, Hello, RefusalCode, MAX_ADDR_LEN, MAX_KEY_ID_LEN, MAX_LISTEN_ADDRS,
    NONCE_LEN, PROTOCOL_VERSION, TAG_LEN,
};

type HmacSha256 = Hmac<Sha256>;

/// A shared secret and the id that names it in the hello.
#[derive(Clone)]
pub struct Key {
    /// The name of the key (also the authenticated identity of the peer).
    pub id: String,
    secret: Vec<u8>,
}

impl Key {
    /// A key named `id` with secret `secret` (at least 16 bytes).
    pub fn new(id: impl Into<String>, secret: impl Into<Vec<u8>>) -> Result<Self, HandshakeError> {
        let id = id.into();
        let secret = secret.into();
        if id.is_empty() || id.len() > MAX_KEY_ID_LEN {
            return Err(HandshakeError::Config("key ids are 1 to 32 bytes"));
        }
        if secret.len() < 16 {
            return Err(HandshakeError::Config(
                "a key (cookie) must be at least 16 bytes",
            ));
        }
        Ok(Self { id, secret })
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The keys a node accepts; the first is the one it proves with.
///
/// Holding an old and a new key lets a deployment rotate its cookie without
/// downtime: nodes accept both while they are restarted one by one.
#[derive(Clone, Debug)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    /// A keyring with one key.
    pub fn single(key: Key) -> Self {
        Self { keys: vec![key] }
    }

    /// A keyring proving with `current` and also accepting `others`.
    pub fn with_others(current: Key, others: impl IntoIterator<Item = Key>) -> Self {
        let mut keys = vec![current];
        keys.extend(others);
        Self { keys }
    }

    fn current(&self) -> &Key {
        &self.keys[0]
    }

    fn find(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }
}

/// What a node brings to a handshake.
#[derive(Clone, Debug)]
pub struct HandshakeConfig {
    /// This node's id.
    pub node: NodeId,
    /// This node's incarnation.
    pub incarnation: Incarnation,
    /// Accepted keys.
    pub keyring: Keyring,
    /// Addresses to announce.
    pub listen: Vec<String>,
    /// Feature bits offered (see [`crate::wire::features`]).
    pub features: u64,
    /// Lowest and highest protocol versions spoken.
    pub versions: (u16, u16),
}

impl HandshakeConfig {
    /// A config speaking this build's protocol version with no features.
    pub fn new(node: NodeId, incarnation: Incarnation, keyring: Keyring) -> Self {
        Self {
            node,
            incarnation,
            keyring,
            listen: Vec::new(),
            features: 0,
            versions: (PROTOCOL_VERSION, PROTOCOL_VERSION),
        }
    }

    fn validate(&self) -> Result<(), HandshakeError> {
        if self.listen.len() > MAX_LISTEN_ADDRS {
            return Err(HandshakeError::Config("at most 4 listen addresses"));
        }
        if self.listen.iter().any(|a| a.len() > MAX_ADDR_LEN) {
            return Err(HandshakeError::Config(
                "listen addresses are at most 160 bytes",
            ));
        }
        if self.versions.0 > self.versions.1 {
            return Err(HandshakeError::Config("version range is empty"));
        }
        Ok(())
    }

    fn hello(
        &self,
        key_id: &str,
        nonce: [u8; NONCE_LEN],
        versions: (u16, u16),
        features: u64,
    ) -> Hello {
        Hello {
            version_min: versions.0,
            version_max: versions.1,
            features,
            node: self.node,
            incarnation: self.incarnation,
            key_id: key_id.to_owned(),
            nonce,
            listen: self.listen.clone(),
        }
    }
}

/// What the peer proved about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its node id.
    pub node: NodeId,
    /// Its incarnation.
    pub incarnation: Incarnation,
    /// The key it proved with: its authenticated identity.
    pub key_id: String,
    /// The addresses it listens on.
    pub listen: Vec<String>,
    /// The protocol version in force.
    pub version: u16,
    /// The feature bits in force.
    pub features: u64,
}

/// Keys derived from the handshake for per-frame MACs, one per direction.
#[derive(Clone)]
pub struct SessionKeys {
    /// MAC key for frames this side sends.
    pub send: [u8; 32],
    /// MAC key for frames this side receives.
    pub recv: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(<redacted>)")
    }
}

/// A completed handshake.
#[derive(Debug)]
pub struct Established {
    /// Who the peer is.
    pub peer: PeerInfo,
    /// Per-direction frame keys.
    pub keys: SessionKeys,
}

const LABEL_TRANSCRIPT: &[u8] = b"courier/1 transcript";
const LABEL_INITIATOR: &[u8] = b"courier/1 initiator proof";
const LABEL_ACCEPTOR: &[u8] = b"courier/1 acceptor proof";
const LABEL_KEY_I2A: &[u8] = b"courier/1 frame key initiator->acceptor";
const LABEL_KEY_A2I: &[u8] = b"courier/1 frame key acceptor->initiator";

fn transcript(hello: &[u8], challenge: &[u8], binding: Option<&[u8; 32]>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(LABEL_TRANSCRIPT);
    h.update((hello.len() as u32).to_be_bytes());
    h.update(hello);
    h.update((challenge.len() as u32).to_be_bytes());
    h.update(challenge);
    match binding {
        Some(b) => {
            h.update([1]);
            h.update(b);
        }
        None => h.update([0]),
    }
    h.finalize().into()
}

fn mac(key: &Key, label: &[u8], t: &[u8; 32]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(&key.secret).expect("hmac takes any key length");
    m.update(label);
    m.update(t);
    m
}

fn proof(key: &Key, label: &[u8], t: &[u8; 32]) -> [u8; TAG_LEN] {
    mac(key, label, t).finalize().into_bytes().into()
}

fn verify(key: &Key, label: &[u8], t: &[u8; 32], tag: &[u8; TAG_LEN]) -> bool {
    // Constant time, full-length tag.
    mac(key, label, t).verify_slice(tag).is_ok()
}

fn session_keys(key: &Key, t: &[u8; 32], initiator: bool) -> SessionKeys {
    let i2a = proof(key, LABEL_KEY_I2A, t);
    let a2i = proof(key, LABEL_KEY_A2I, t);
    if initiator {
        SessionKeys {
            send: i2a,
            recv: a2i,
        }
    } else {
        SessionKeys {
            send: a2i,
            recv: i2a,
        }
    }
}

fn kind_name(env: &Envelope) -> &'static str {
    match env {
        Envelope::Hello(_) => "hello",
        Envelope::Challenge(_) => "challenge",
        Envelope::Response(_) => "response",
        Envelope::Welcome(_) => "welcome",
        Envelope::Refusal(..) => "refusal",
        Envelope::Call(_) => "call",
        Envelope::Cast(_) => "cast",
        Envelope::Reply(_) => "reply",
        Envelope::Release(_) => "release",
        Envelope::Heartbeat { .. } => "heartbeat",
        Envelope::Goodbye(_) => "goodbye",
        Envelope::Acquire { .. } => "acquire",
        Envelope::Acquired { .. } => "acquired",
        Envelope::Unlend { .. } => "unlend",
        Envelope::Down { .. } => "down",
    }
}

fn unexpected(expected: &'static str, got: &Envelope) -> HandshakeError {
    if let Envelope::Refusal(code, reason) = got {
        return HandshakeError::Refused {
            code: *code,
            reason: reason.clone(),
        };
    }
    HandshakeError::Unexpected {
        expected,
        got: kind_name(got),
    }
}

/// Agreed features: the common ones, plus frame MACs if either side asks
/// (integrity is never silently turned off by the other side's wish).
fn agree_features(ours: u64, theirs: u64) -> u64 {
    ((ours & theirs) | ((ours | theirs) & features::FRAME_MAC)) & features::KNOWN
}

/// Initiator, having sent its hello, waits for the challenge.
#[derive(Debug)]
pub struct AwaitChallenge {
    config: HandshakeConfig,
    hello_bytes: Bytes,
    binding: Option<[u8; 32]>,
}

impl AwaitChallenge {
    /// Starts a handshake as initiator with a fresh random `nonce`; returns
    /// the state and the hello frame to send.
    pub fn start(
        config: HandshakeConfig,
        nonce: [u8; NONCE_LEN],
        binding: Option<[u8; 32]>,
    ) -> Result<(Self, Bytes), HandshakeError> {
        config.validate()?;
        let hello = config.hello(
            &config.keyring.current().id,
            nonce,
            config.versions,
            config.features,
        );
        let mut out = BytesMut::new();
        hello.encode(kind::HELLO, &mut out);
        let hello_bytes = out.freeze();
        Ok((
            Self {
                config,
                hello_bytes: hello_bytes.clone(),
                binding,
            },
            hello_bytes,
        ))
    }

    /// Takes the acceptor's challenge; returns the next state and the
    /// response frame to send.
    pub fn handle(self, frame: &Bytes) -> Result<(AwaitWelcome, Bytes), HandshakeError> {
        let env = Envelope::decode(frame)?;
        let Envelope::Challenge(ch) = &env else {
            return Err(unexpected("challenge", &env));
        };
        let (lo, hi) = self.config.versions;
        if ch.version_min < lo || ch.version_min > hi {
            return Err(HandshakeError::Version {
                ours: (lo, hi),
                theirs: (ch.version_min, ch.version_max),
            });
        }
        let acceptable = (self.config.features | features::FRAME_MAC) & features::KNOWN;
        if ch.features & !acceptable != 0 {
            return Err(HandshakeError::Unexpected {
                expected: "features we offered",
                got: "other features",
            });
        }
        if ch.node == self.config.node {
            return Err(HandshakeError::SelfConnect);
        }
        let key = self.config.keyring.current();
        if ch.key_id != key.id {
            return Err(HandshakeError::Authentication(
                "the acceptor answered for another key",
            ));
        }
        let t = transcript(&self.hello_bytes, frame, self.binding.as_ref());
        let tag = proof(key, LABEL_INITIATOR, &t);
        let peer = PeerInfo {
            node: ch.node,
            incarnation: ch.incarnation,
            key_id: ch.key_id.clone(),
            listen: ch.listen.clone(),
            version: ch.version_min,
            features: ch.features,
        };
        let keys = session_keys(key, &t, true);
        Ok((
            AwaitWelcome {
                key: key.clone(),
                transcript: t,
                peer,
                keys,
            },
            crate::wire::encode(&Envelope::Response(tag)),
        ))
    }
}

/// Initiator, having proved itself, waits for the acceptor's proof.
#[derive(Debug)]
pub struct AwaitWelcome {
    key: Key,
    transcript: [u8; 32],
    peer: PeerInfo,
    keys: SessionKeys,
}

impl AwaitWelcome {
    /// Takes the welcome (or refusal).
    pub fn handle(self, frame: &Bytes) -> Result<Established, HandshakeError> {
        let env = Envelope::decode(frame)?;
        let Envelope::Welcome(tag) = &env else {
            return Err(unexpected("welcome", &env));
        };
        if !verify(&self.key, LABEL_ACCEPTOR, &self.transcript, tag) {
            return Err(HandshakeError::Authentication(
                "the acceptor's proof does not verify: it does not hold our key",
            ));
        }
        Ok(Established {
            peer: self.peer,
            keys: self.keys,
        })
    }
}

/// Acceptor, waiting for the initiator's hello.
#[derive(Debug)]
pub struct AwaitHello {
    config: HandshakeConfig,
    nonce: [u8; NONCE_LEN],
    binding: Option<[u8; 32]>,
}

impl AwaitHello {
    /// Prepares to accept, with a fresh random `nonce`.
    pub fn new(
        config: HandshakeConfig,
        nonce: [u8; NONCE_LEN],
        binding: Option<[u8; 32]>,
    ) -> Result<Self, HandshakeError> {
        config.validate()?;
        Ok(Self {
            config,
            nonce,
            binding,
        })
    }

    /// Takes the hello; returns the next state and the challenge to send.
    pub fn handle(self, frame: &Bytes) -> Result<(AwaitResponse, Bytes), HandshakeError> {
        let env = Envelope::decode(frame)?;
        let Envelope::Hello(h) = &env else {
            return Err(unexpected("hello", &env));
        };
        let (lo, hi) = self.config.versions;
        let version = hi.min(h.version_max);
        if version < lo.max(h.version_min) {
            return Err(HandshakeError::Version {
                ours: (lo, hi),
                theirs: (h.version_min, h.version_max),
            });
        }
        if h.node == self.config.node {
            return Err(HandshakeError::SelfConnect);
        }
        let Some(key) = self.config.keyring.find(&h.key_id) else {
            return Err(HandshakeError::Authentication(
                "the initiator named a key id this node does not hold",
            ));
        };
        let agreed = agree_features(self.config.features, h.features);
        let challenge = self
            .config
            .hello(&key.id, self.nonce, (version, version), agreed);
        let mut out = BytesMut::new();
        challenge.encode(kind::CHALLENGE, &mut out);
        let challenge_bytes = out.freeze();
        let t = transcript(frame, &challenge_bytes, self.binding.as_ref());
        let peer = PeerInfo {
            node: h.node,
            incarnation: h.incarnation,
            key_id: key.id.clone(),
            listen: h.listen.clone(),
            version,
            features: agreed,
        };
        Ok((
            AwaitResponse {
                key: key.clone(),
                transcript: t,
                peer,
            },
            challenge_bytes,
        ))
    }
}

/// Acceptor, having sent its challenge, waits for the initiator's proof.
#[derive(Debug)]
pub struct AwaitResponse {
    key: Key,
    transcript: [u8; 32],
    peer: PeerInfo,
}

impl AwaitResponse {
    /// Takes the response; returns the established session and the welcome
    /// to send.
    pub fn handle(self, frame: &Bytes) -> Result<(Established, Bytes), HandshakeError> {
        let env = Envelope::decode(frame)?;
        let Envelope::Response(tag) = &env else {
            return Err(unexpected("response", &env));
        };
        if !verify(&self.key, LABEL_INITIATOR, &self.transcript, tag) {
            return Err(HandshakeError::Authentication(
                "the initiator's proof does not verify: wrong key, or a replayed or misdirected response",
            ));
        }
        let welcome = crate::wire::encode(&Envelope::Welcome(proof(
            &self.key,
            LABEL_ACCEPTOR,
            &self.transcript,
        )));
        Ok((
            Established {
                keys: session_keys(&self.key, &self.transcript, false),
                peer: self.peer,
            },
            welcome,
        ))
    }
}

/// The refusal frame telling the peer why, for errors that are theirs.
pub fn refusal_for(err: &HandshakeError) -> Option<Bytes> {
    let code: RefusalCode = err.refusal_code()?;
    // Say little to an unauthenticated peer: the code, and a short text.
    let text = match code {
        RefusalCode::Version => err.to_string(),
        RefusalCode::Authentication => "authentication failed".to_owned(),
        RefusalCode::Protocol => "handshake protocol error".to_owned(),
        RefusalCode::Busy => "busy".to_owned(),
        RefusalCode::SelfConnect => "connected to itself".to_owned(),
    };
    Some(crate::wire::encode(&Envelope::Refusal(code, text)))
}
