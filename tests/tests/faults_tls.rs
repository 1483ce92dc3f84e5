//! The TLS matrix against a real daemon: a QUIC client built here (quinn + rustls, no
//! chartmesh code on its side) tries each way in that must be refused: an unknown
//! certificate, a paired practice's certificate without its key, no client certificate, a
//! wrong ALPN, expired and not-yet-valid certificates (of a paired practice), and a client
//! pinning the wrong server. Every one fails in the handshake, so no stream is opened and no
//! application byte is exchanged; refusals of a presented certificate are audited. A
//! correctly paired client, built the same way, connects (the control).
//! TLS 1.2 cannot be offered over QUIC at all (RFC 9001; rustls refuses to build such a QUIC
//! client); the server's refusal of a TLS-1.2-only hello is tested in net/src/tls.rs.

use chartmesh_core::PracticeId;
use chartmesh_net::quinn;
use chartmesh_net::quinn::rustls;
use chartmesh_tests::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

struct Cert {
    der: Vec<u8>,
    key: Vec<u8>,
    id: PracticeId,
}

fn cert(window: Option<(i32, i32)>) -> Cert {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["chartmesh".to_string()]).unwrap();
    if let Some((from, to)) = window {
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(to, 1, 1);
    }
    let der = p.self_signed(&key).unwrap().der().to_vec();
    Cert {
        id: PracticeId::from_certificate_der(&der),
        der,
        key: key.serialize_der(),
    }
}

/// Checks the server's certificate against one pin (or accepts any), signatures verified.
#[derive(Debug)]
struct Pin(Option<PracticeId>, Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Pin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0 {
            Some(p) if PracticeId::from_certificate_der(end_entity) != p => {
                Err(rustls::Error::General("wrong pin".into()))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.1.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.1.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.1.signature_verification_algorithms.supported_schemes()
    }
}

/// Presents a certificate with whatever key it is given (rustls's own builder refuses a
/// mismatched pair; an attacker's client would not).
#[derive(Debug)]
struct AnyPair(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for AnyPair {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A QUIC client config: `identity` = (certificate, key) presented, or none.
fn client(
    identity: Option<(&[u8], &[u8])>,
    alpn: &[u8],
    pin: Option<PracticeId>,
) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pin(pin, provider)));
    let mut c = match identity {
        Some((der, key)) => {
            let signer = rustls::crypto::ring::default_provider()
                .key_provider
                .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())))
                .unwrap();
            let ck =
                rustls::sign::CertifiedKey::new(vec![CertificateDer::from(der.to_vec())], signer);
            b.with_client_cert_resolver(Arc::new(AnyPair(Arc::new(ck))))
        }
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![alpn.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(c).unwrap(),
    ))
}

/// Dials, opens a stream and sends a byte, then watches the connection for 2 s. In TLS 1.3
/// the client finishes its side of the handshake before the server has checked the client's
/// certificate, so a refusal arrives as the connection's close (a TLS alert), and what the
/// client queued never reaches the server's application. Ok: still open after 2 s.
async fn attempt(cfg: quinn::ClientConfig, addr: SocketAddr) -> Result<(), String> {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let r = async {
        let conn = ep
            .connect_with(cfg, addr, "chartmesh")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        if let Ok((mut s, _r)) = conn.open_bi().await {
            let _ = s.write_all(b"x").await;
        }
        tokio::select! {
            e = conn.closed() => Err(format!("closed: {e}")),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                conn.close(0u32.into(), b"");
                Ok(())
            }
        }
    };
    let out = tokio::time::timeout(Duration::from_secs(15), r)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    ep.wait_idle().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_handshake_is_refused_before_any_application_byte_and_audited() {
    let (a, a_id, addr) = tokio::task::block_in_place(|| {
        let a = Practice::new("TLS Clinic");
        let id: PracticeId = a.id().parse().unwrap();
        let addr: SocketAddr = a.sync_addr().parse().unwrap();
        (a, id, addr)
    });
    let good = cert(None);
    let expired = cert(Some((2000, 2001)));
    let future = cert(Some((2999, 3000)));
    let stranger = cert(None);
    let dead = format!("127.0.0.1:{}", free_udp_port());
    tokio::task::block_in_place(|| {
        for (c, name) in [(&good, "Good"), (&expired, "Expired"), (&future, "Future")] {
            a.cli_ok(&[
                "peer",
                "add",
                &c.id.to_string(),
                "--addr",
                &dead,
                "--name",
                name,
            ]);
        }
    });
    let alpn = b"chartmesh/1";
    let other_key = rcgen::KeyPair::generate().unwrap().serialize_der();

    // The control: a paired client built the same way gets through.
    attempt(client(Some((&good.der, &good.key)), alpn, Some(a_id)), addr)
        .await
        .expect("a correctly paired client connects");

    let cases: Vec<(&str, quinn::ClientConfig, Option<PracticeId>)> = vec![
        (
            "unknown certificate",
            client(Some((&stranger.der, &stranger.key)), alpn, Some(a_id)),
            Some(stranger.id),
        ),
        (
            "a paired certificate without its key",
            client(Some((&good.der, &other_key)), alpn, Some(a_id)),
            None,
        ),
        (
            "no client certificate",
            client(None, alpn, Some(a_id)),
            None,
        ),
        (
            "wrong ALPN",
            client(Some((&good.der, &good.key)), b"h3", Some(a_id)),
            None,
        ),
        (
            "expired certificate",
            client(Some((&expired.der, &expired.key)), alpn, Some(a_id)),
            Some(expired.id),
        ),
        (
            "not-yet-valid certificate",
            client(Some((&future.der, &future.key)), alpn, Some(a_id)),
            Some(future.id),
        ),
        (
            "the client pins another server",
            client(Some((&good.der, &good.key)), alpn, Some(stranger.id)),
            None,
        ),
    ];
    let n = cases.len();
    for (case, cfg, audited_as) in cases {
        let r = attempt(cfg, addr).await;
        let e = r.expect_err(case);
        // Refused by TLS itself (an alert / crypto error), not by the application.
        assert!(
            e.contains("handshake")
                || e.contains("crypto")
                || e.contains("TLS")
                || e.contains("alert"),
            "{case}: not refused in the TLS handshake: {e}"
        );
        println!("{case}: refused ({e})");
        if let Some(id) = audited_as {
            let peer = id.to_string();
            tokio::task::block_in_place(|| {
                wait_until(
                    &format!("{case} to be audited"),
                    Duration::from_secs(10),
                    || {
                        a.get("/audit?limit=200")["entries"]
                            .as_array()
                            .is_some_and(|es| {
                                es.iter()
                                    .any(|e| e["action"] == "refuse" && e["peer"] == peer.as_str())
                            })
                    },
                );
            });
        }
    }
    // Nothing was sent or received: the only sync entries are the control's connection.
    tokio::task::block_in_place(|| {
        let entries = a.get("/audit?limit=500")["entries"]
            .as_array()
            .unwrap()
            .clone();
        assert!(
            !entries
                .iter()
                .any(|e| e["action"] == "sync-send" || e["action"] == "sync-receive"),
            "{entries:?}"
        );
    });
    println!(
        "fault figures: TLS matrix = {n} refused cases + 1 control, application bytes after a refused handshake = 0"
    );
}
