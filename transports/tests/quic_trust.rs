//! QUIC peer verification: pinned peers accepted, unpinned refused both
//! ways, CA-verified peers accepted, channel binding shared, identities
//! persisted.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use courier_runtime::transport::{Address, Frame, Transport, TransportError};
use courier_transports::quic::{Fingerprint, Identity, PeerTrust, QuicConfig, QuicTransport};
use courier_transports::{AnyTransport, LinkExt, ListenerExt};

fn quic(identity: &Identity, trust: PeerTrust) -> QuicTransport {
    let mut cfg = QuicConfig::new(identity.clone(), trust);
    cfg.handshake_timeout = Duration::from_secs(10);
    QuicTransport::new(cfg).expect("quic transport")
}

fn any_addr() -> Address {
    "quic://127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_peers_connect_and_share_the_channel_binding() {
    let server_id = Identity::generate("server").unwrap();
    let client_id = Identity::generate("client").unwrap();
    let server = quic(&server_id, PeerTrust::pinned([client_id.fingerprint()]));
    let client = quic(&client_id, PeerTrust::pinned([server_id.fingerprint()]));
    let mut l = server.listen(&any_addr()).await.unwrap();
    let addr = l.local_addr();
    let mut bindings = Vec::new();
    for round in 0..2u32 {
        let (c, s) = within(STEP, "connect", async {
            tokio::join!(client.connect(&addr), l.accept())
        })
        .await;
        let (mut c, mut s) = (
            c.expect("pinned server accepted"),
            s.expect("pinned client accepted"),
        );
        let caps = c.caps();
        assert!(caps.encrypted && caps.multiplexed && !caps.carries_fds);
        let cb = c.channel_binding().expect("client binding");
        assert_eq!(
            Some(cb),
            s.channel_binding(),
            "both ends export the same material"
        );
        bindings.push(cb);
        c.send(Frame::new(payload(round, 1000))).await.unwrap();
        assert_eq!(recv_frame(s.as_mut()).await.payload, payload(round, 1000));
        s.send(Frame::new(payload(round + 10, 10))).await.unwrap();
        assert_eq!(
            recv_frame(c.as_mut()).await.payload,
            payload(round + 10, 10)
        );
    }
    assert_ne!(bindings[0], bindings[1], "each session has its own binding");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_certificate_is_not_pinned_is_refused() {
    let server_id = Identity::generate("server").unwrap();
    let client_id = Identity::generate("client").unwrap();
    let other = Identity::generate("someone else").unwrap();
    let server = quic(&server_id, PeerTrust::pinned([client_id.fingerprint()]));
    let client = quic(&client_id, PeerTrust::pinned([other.fingerprint()]));
    let mut l = server.listen(&any_addr()).await.unwrap();
    let addr = l.local_addr();
    // The server runs its side of handshakes while it accepts.
    let server_side = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(5), l.accept())
            .await
            .is_err()
    });
    let err = within(STEP, "connect", client.connect(&addr))
        .await
        .expect_err("an unpinned server must be refused");
    assert!(matches!(err, TransportError::Tls(_)), "{err}");
    assert!(err.to_string().contains("not pinned"), "{err}");
    assert!(
        server_side.await.unwrap(),
        "the server accepted a refused handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_certificate_is_not_pinned_is_refused() {
    let server_id = Identity::generate("server").unwrap();
    let client_id = Identity::generate("client").unwrap();
    let other = Identity::generate("someone else").unwrap();
    let server = quic(&server_id, PeerTrust::pinned([other.fingerprint()]));
    let client = quic(&client_id, PeerTrust::pinned([server_id.fingerprint()]));
    let mut l = server.listen(&any_addr()).await.unwrap();
    let addr = l.local_addr();
    let server_side = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(3), l.accept())
            .await
            .is_err()
    });
    // A TLS 1.3 client finishes first, so `connect` may succeed; the server's
    // refusal then ends the link with an error.
    match within(STEP, "connect", client.connect(&addr)).await {
        Err(e) => assert!(matches!(e, TransportError::Tls(_)), "{e}"),
        Ok(mut link) => match within(STEP, "recv", link.recv()).await {
            Some(Err(e)) => assert!(matches!(e, TransportError::Tls(_)), "{e}"),
            other => panic!("expected a TLS error, got {other:?}"),
        },
    }
    assert!(
        server_side.await.unwrap(),
        "the server accepted an unpinned client"
    );
}

/// A CA and two leaf certificates for 127.0.0.1 it signed.
fn ca_and_leaves() -> (
    rustls::pki_types::CertificateDer<'static>,
    Identity,
    Identity,
) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "courier test ca");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = || {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer).unwrap();
        Identity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap()
    };
    (ca_cert.der().clone(), leaf(), leaf())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_signed_by_a_trusted_ca_connect() {
    let (ca, server_id, client_id) = ca_and_leaves();
    let server = quic(&server_id, PeerTrust::ca([ca.clone()]));
    let client = quic(&client_id, PeerTrust::ca([ca]));
    let mut l = server.listen(&any_addr()).await.unwrap();
    let addr = l.local_addr();
    let (c, s) = within(STEP, "connect", async {
        tokio::join!(client.connect(&addr), l.accept())
    })
    .await;
    let (mut c, mut s) = (c.expect("CA-signed server"), s.expect("CA-signed client"));
    c.send(Frame::new(&b"via ca"[..])).await.unwrap();
    assert_eq!(&recv_frame(s.as_mut()).await.payload[..], b"via ca");
    // A self-signed stranger is not vouched for by the CA.
    let server_side = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(5), l.accept())
            .await
            .is_err()
    });
    let stranger = quic(
        &Identity::generate("stranger").unwrap(),
        PeerTrust::pinned([server_id.fingerprint()]),
    );
    match within(STEP, "stranger", stranger.connect(&addr)).await {
        Err(e) => assert!(matches!(e, TransportError::Tls(_)), "{e}"),
        Ok(mut link) => assert!(matches!(
            within(STEP, "recv", link.recv()).await,
            Some(Err(TransportError::Tls(_)))
        )),
    }
    assert!(server_side.await.unwrap(), "the server accepted a stranger");
}

#[test]
fn trusting_nobody_is_refused() {
    let id = Identity::generate("x").unwrap();
    let err = QuicTransport::new(QuicConfig::new(id, PeerTrust::default())).unwrap_err();
    assert!(err.to_string().contains("pin"), "{err}");
}

#[test]
fn an_identity_persists_in_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("node/tls");
    let a = Identity::load_or_generate(&tls, "node-a").unwrap();
    let b = Identity::load_or_generate(&tls, "node-a").unwrap();
    assert_eq!(
        a.fingerprint(),
        b.fingerprint(),
        "the same identity after a restart"
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&tls.join("key.pem")), 0o600);
    assert_eq!(mode(&tls), 0o700);
    let c = Identity::from_pem_files(&tls.join("cert.pem"), &tls.join("key.pem")).unwrap();
    assert_eq!(c.fingerprint(), a.fingerprint());
    assert_eq!(Fingerprint::of(c.certificate_der()), a.fingerprint());
    // A lost key is an error, not a silent new identity.
    std::fs::remove_file(tls.join("key.pem")).unwrap();
    assert!(Identity::load_or_generate(&tls, "node-a").is_err());
}

#[test]
fn fingerprints_print_and_parse() {
    let fp = Identity::generate("x").unwrap().fingerprint();
    let text = fp.to_string();
    assert_eq!(text.len(), 64);
    assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
    let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
    let colons = format!("sha256:{}", colons.join(":"));
    assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
    assert!("abc".parse::<Fingerprint>().is_err());
    assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
}

#[tokio::test]
async fn quic_needs_a_configuration() {
    let err = AnyTransport::new()
        .connect(&"quic://127.0.0.1:1".parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Address(_)), "{err}");
    assert!(err.to_string().contains("builder"), "{err}");
}

/// Small frames keep their order on QUIC, even though each travels on its
/// own stream.
#[tokio::test]
async fn small_frames_arrive_in_order() {
    use courier_runtime::transport::{Frame, Transport};
    use courier_transports::quic::{Identity, PeerTrust, QuicConfig, QuicTransport};
    use courier_transports::{LinkExt, ListenerExt};
    let id = Identity::generate("order").unwrap();
    let t = QuicTransport::new(QuicConfig::new(
        id.clone(),
        PeerTrust::pinned([id.fingerprint()]),
    ))
    .unwrap();
    let mut l = t
        .listen(&"quic://127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = l.local_addr();
    let (c, s) = tokio::join!(t.connect(&addr), l.accept());
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    let n = 2_000u32;
    let sender = async {
        for i in 0..n {
            // A large frame now and then: it may be overtaken, the small
            // ones may not overtake each other.
            let body = if i % 500 == 250 {
                vec![0u8; 300_000]
            } else {
                i.to_be_bytes().to_vec()
            };
            c.send(Frame::new(body)).await.unwrap();
        }
        c.flush().await.unwrap();
        c
    };
    let receiver = async {
        let mut last = None;
        let mut small = 0;
        for _ in 0..n {
            let f = tokio::time::timeout(std::time::Duration::from_secs(30), s.recv())
                .await
                .expect("frame within 30 s")
                .expect("not closed")
                .unwrap();
            if f.payload.len() == 4 {
                let v = u32::from_be_bytes(f.payload[..].try_into().unwrap());
                if let Some(p) = last {
                    assert!(v > p, "small frame {v} after {p}");
                }
                last = Some(v);
                small += 1;
            }
        }
        small
    };
    let (_c, small) = tokio::join!(sender, receiver);
    assert_eq!(small, n - 4);
}
