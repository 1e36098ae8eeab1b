//! Certificates, fingerprints and peer verification for QUIC.
//!
//! Both ends present a certificate and verify the other's (mutual TLS).
//! A peer is accepted when the SHA-256 fingerprint of its certificate is
//! pinned, or when its chain verifies against a configured CA. There is no
//! "accept anything" mode: a [`PeerTrust`] with neither pins nor a CA is
//! refused when the transport is built.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use courier_runtime::transport::TransportError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

/// The SHA-256 digest of a certificate's DER encoding: what peers pin.
///
/// Written as 64 lowercase hex digits; parsing also accepts upper case,
/// colons between bytes and a `sha256:` prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(cert_der: &[u8]) -> Self {
        Self(Sha256::digest(cert_der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Text that is not a SHA-256 fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FingerprintError(String);

impl fmt::Display for FingerprintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad certificate fingerprint {:?}: expected 64 hex digits (SHA-256)",
            self.0
        )
    }
}

impl std::error::Error for FingerprintError {}

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Self, FingerprintError> {
        let bad = || FingerprintError(s.to_owned());
        let t = s.trim();
        let t = t.strip_prefix("sha256:").unwrap_or(t);
        let digits: Vec<u8> = t.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let hex = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

/// A node's TLS identity: its certificate chain and private key.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh self-signed certificate for `name` (a DNS name or IP
    /// literal), kept only in memory: peers must pin it anew each run.
    pub fn generate(name: &str) -> Result<Self, TransportError> {
        let (cert_pem, key_pem) = generate_pem(name)?;
        Self::from_pem(cert_pem.as_bytes(), key_pem.as_bytes())
    }

    /// Loads `cert.pem` and `key.pem` from `dir`, or, when there are none,
    /// generates a self-signed certificate for `name` and saves it there so
    /// the node keeps its identity (and its fingerprint) across restarts.
    /// The directory is created mode 0700 and the key file mode 0600.
    pub fn load_or_generate(dir: &Path, name: &str) -> Result<Self, TransportError> {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let op = |what: &str, p: &Path| format!("{what} {}", p.display());
        match (cert.exists(), key.exists()) {
            (true, true) => {
                if let Ok(m) = fs::metadata(&key) {
                    if m.permissions().mode() & 0o077 != 0 {
                        tracing::warn!(path = %key.display(), "the QUIC private key is readable by other users; chmod 600 it");
                    }
                }
                return Self::from_pem_files(&cert, &key);
            }
            (true, false) => {
                return Err(TransportError::io(
                    op("load the QUIC identity from", dir),
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        "cert.pem is there but key.pem is missing; restore it or remove cert.pem",
                    ),
                ))
            }
            // No identity yet, or a key whose certificate was never written.
            _ => {}
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| TransportError::io(op("create", dir), e))?;
        let (cert_pem, key_pem) = generate_pem(name)?;
        write_atomically(&key, key_pem.as_bytes(), 0o600)
            .map_err(|e| TransportError::io(op("write", &key), e))?;
        write_atomically(&cert, cert_pem.as_bytes(), 0o644)
            .map_err(|e| TransportError::io(op("write", &cert), e))?;
        Self::from_pem(cert_pem.as_bytes(), key_pem.as_bytes())
    }

    /// Loads a certificate chain (end entity first) and a private key from
    /// PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TransportError> {
        let cert_pem = fs::read(cert)
            .map_err(|e| TransportError::io(format!("read {}", cert.display()), e))?;
        let key_pem =
            fs::read(key).map_err(|e| TransportError::io(format!("read {}", key.display()), e))?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// Parses a certificate chain (end entity first) and a private key from
    /// PEM text.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TransportError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::Tls(format!("bad certificate PEM: {e}")))?;
        if chain.is_empty() {
            return Err(TransportError::Tls("no certificate in the PEM text".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TransportError::Tls(format!("bad private key PEM: {e}")))?;
        Ok(Self { chain, key })
    }

    /// The fingerprint peers pin to accept this identity.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.chain[0])
    }

    /// The end-entity certificate, DER-encoded.
    pub fn certificate_der(&self) -> &[u8] {
        &self.chain[0]
    }

    pub(crate) fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.chain.clone()
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// Which peers to accept: pinned certificate fingerprints, a CA, or both (a
/// peer passing either check is accepted).
#[derive(Clone, Debug, Default)]
pub struct PeerTrust {
    pins: Vec<Fingerprint>,
    roots: Vec<CertificateDer<'static>>,
}

impl PeerTrust {
    /// Accepts exactly the peers whose certificates have these fingerprints.
    pub fn pinned(pins: impl IntoIterator<Item = Fingerprint>) -> Self {
        Self {
            pins: pins.into_iter().collect(),
            roots: Vec::new(),
        }
    }

    /// Accepts peers whose chains verify against these CA certificates.
    /// When connecting, the server's certificate must also name the host
    /// (see [`super::QuicConfig::server_name`]).
    pub fn ca(roots: impl IntoIterator<Item = CertificateDer<'static>>) -> Self {
        Self {
            pins: Vec::new(),
            roots: roots.into_iter().collect(),
        }
    }

    /// Accepts peers whose chains verify against the CA certificates in a
    /// PEM file.
    pub fn ca_pem_file(path: &Path) -> Result<Self, TransportError> {
        let pem = fs::read(path)
            .map_err(|e| TransportError::io(format!("read {}", path.display()), e))?;
        let roots = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::Tls(format!("bad CA PEM in {}: {e}", path.display())))?;
        if roots.is_empty() {
            return Err(TransportError::Tls(format!(
                "no CA certificate in {}",
                path.display()
            )));
        }
        Ok(Self::ca(roots))
    }

    /// Also accepts the peer with this fingerprint.
    pub fn and_pin(mut self, pin: Fingerprint) -> Self {
        self.pins.push(pin);
        self
    }

    /// Whether nothing would be accepted.
    pub fn is_empty(&self) -> bool {
        self.pins.is_empty() && self.roots.is_empty()
    }
}

/// Verifies peers (servers and clients alike) by pin or CA.
#[derive(Debug)]
pub(crate) struct PeerVerifier {
    pins: Vec<Fingerprint>,
    server_ca: Option<Arc<WebPkiServerVerifier>>,
    client_ca: Option<Arc<dyn ClientCertVerifier>>,
    algs: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    pub(crate) fn new(
        trust: &PeerTrust,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, TransportError> {
        if trust.is_empty() {
            return Err(TransportError::Tls(
                "no way to verify peers: pin their certificate fingerprints or give a CA".into(),
            ));
        }
        let (server_ca, client_ca) = if trust.roots.is_empty() {
            (None, None)
        } else {
            let mut store = rustls::RootCertStore::empty();
            for r in &trust.roots {
                store
                    .add(r.clone())
                    .map_err(|e| TransportError::Tls(format!("unusable CA certificate: {e}")))?;
            }
            let store = Arc::new(store);
            let s = WebPkiServerVerifier::builder_with_provider(store.clone(), provider.clone())
                .build()
                .map_err(|e| TransportError::Tls(format!("CA verifier: {e}")))?;
            let c = rustls::server::WebPkiClientVerifier::builder_with_provider(
                store,
                provider.clone(),
            )
            .build()
            .map_err(|e| TransportError::Tls(format!("CA verifier: {e}")))?;
            (Some(s), Some(c))
        };
        Ok(Self {
            pins: trust.pins.clone(),
            server_ca,
            client_ca,
            algs: provider.signature_verification_algorithms,
        })
    }

    fn pinned(&self, cert: &CertificateDer<'_>) -> Result<bool, Fingerprint> {
        let fp = Fingerprint::of(cert);
        if self.pins.contains(&fp) {
            Ok(true)
        } else {
            Err(fp)
        }
    }
}

/// The error a peer whose certificate nothing vouches for gets. rustls
/// shows it with `Debug`, so that reads as the message too.
struct NotTrusted(Fingerprint);

impl fmt::Debug for NotTrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for NotTrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the peer's certificate (sha256 {}) is not pinned",
            self.0
        )
    }
}

impl std::error::Error for NotTrusted {}

fn not_trusted(fp: Fingerprint) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        NotTrusted(fp),
    ))))
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.pinned(end_entity) {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(fp) => match &self.server_ca {
                Some(ca) => ca.verify_server_cert(
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp_response,
                    now,
                ),
                None => Err(not_trusted(fp)),
            },
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.pinned(end_entity) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(fp) => match &self.client_ca {
                Some(ca) => ca.verify_client_cert(end_entity, intermediates, now),
                None => Err(not_trusted(fp)),
            },
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A self-signed certificate and its key, as PEM.
fn generate_pem(name: &str) -> Result<(String, String), TransportError> {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()])
        .map_err(|e| TransportError::Tls(format!("generate a certificate for {name:?}: {e}")))?;
    Ok((ck.cert.pem(), ck.signing_key.serialize_pem()))
}

/// Writes `data` to a temporary file created with `mode`, then renames it
/// over `path`, so a crash never leaves a half-written file.
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)
}
