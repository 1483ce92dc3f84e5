//! rustls configuration with certificate pinning. A peer is trusted if and only if the SHA-256
//! of its certificate is in the [`PinSet`] (a paired practice id) and the certificate is within
//! its validity dates (checked against this machine's clock; practice certificates are made
//! valid from two days before their creation, so a peer's clock up to a day or more behind
//! still accepts them, and carry no expiry: docs/RELIABILITY.md). The handshake signature is
//! still verified against that certificate's key, so presenting someone else's certificate
//! without its key fails.

use chartmesh_core::PracticeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

use crate::{ALPN, Credentials, NetError};

/// A handshake refused because of the certificate presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The id the refused certificate would have.
    pub practice: PracticeId,
    /// `client` (someone dialled us) or `server` (we dialled someone).
    pub role: &'static str,
    /// Why, for the audit log: `not-paired`, `expired`, `not-yet-valid` or
    /// `unreadable-certificate` (see [`Refusal::describe`]).
    pub reason: &'static str,
}

impl Refusal {
    /// What was wrong with the certificate, in words.
    pub fn describe(&self) -> &'static str {
        match self.reason {
            "expired" => "the certificate has expired (or this machine's clock is ahead)",
            "not-yet-valid" => {
                "the certificate is not valid yet (or this machine's clock is behind)"
            }
            "unreadable-certificate" => "the certificate cannot be read",
            _ => "certificate is not a paired practice",
        }
    }
}

/// The practice ids this practice is paired with, shared by the endpoint's verifiers, plus a
/// record of refused handshakes for the audit log.
#[derive(Clone, Default)]
pub struct PinSet {
    pins: Arc<RwLock<HashSet<PracticeId>>>,
    refused: Arc<Mutex<Vec<Refusal>>>,
}

impl std::fmt::Debug for PinSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinSet({} pins)", self.pins.read().unwrap().len())
    }
}

impl PinSet {
    pub fn new(ids: impl IntoIterator<Item = PracticeId>) -> PinSet {
        let s = PinSet::default();
        s.pins.write().unwrap().extend(ids);
        s
    }
    pub fn add(&self, id: PracticeId) {
        self.pins.write().unwrap().insert(id);
    }
    pub fn remove(&self, id: &PracticeId) {
        self.pins.write().unwrap().remove(id);
    }
    pub fn contains(&self, id: &PracticeId) -> bool {
        self.pins.read().unwrap().contains(id)
    }
    /// Takes the refusals recorded since the last call.
    pub fn take_refusals(&self) -> Vec<Refusal> {
        std::mem::take(&mut *self.refused.lock().unwrap())
    }

    fn check(
        &self,
        cert: &CertificateDer<'_>,
        role: &'static str,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let id = PracticeId::from_certificate_der(cert.as_ref());
        let (reason, error) = if !self.contains(&id) {
            (
                "not-paired",
                rustls::Error::General(format!("practice {} is not paired", id.short())),
            )
        } else {
            match validity(cert, now) {
                Ok(()) => return Ok(()),
                Err(reason) => (
                    reason,
                    rustls::Error::InvalidCertificate(match reason {
                        "expired" => CertificateError::Expired,
                        "not-yet-valid" => CertificateError::NotValidYet,
                        _ => CertificateError::BadEncoding,
                    }),
                ),
            }
        };
        tracing::warn!(practice = %id.short(), role, reason, "refused a handshake");
        let mut refused = self.refused.lock().unwrap();
        if refused.len() < 1024 {
            refused.push(Refusal {
                practice: id,
                role,
                reason,
            });
        }
        Err(error)
    }
}

/// Checks the certificate's validity dates against `now` (this machine's clock).
fn validity(cert: &CertificateDer<'_>, now: UnixTime) -> Result<(), &'static str> {
    use x509_parser::prelude::FromDer;
    let (_, x509) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref())
        .map_err(|_| "unreadable-certificate")?;
    let now = now.as_secs() as i64;
    let v = x509.validity();
    if now < v.not_before.timestamp() {
        Err("not-yet-valid")
    } else if now > v.not_after.timestamp() {
        Err("expired")
    } else {
        Ok(())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct Pinned {
    pins: Trust,
    provider: Arc<CryptoProvider>,
}

/// Whose certificate a [`Pinned`] verifier accepts.
#[derive(Debug)]
enum Trust {
    /// A paired practice's (the pin set).
    Practices(PinSet),
    /// The relay server's: one whose SHA-256 is the pin, or any when no pin is configured
    /// (the relay only ever carries QUIC packets that are end-to-end encrypted between the
    /// practices; a pin keeps a stranger from posing as the relay and learning which
    /// practices talk). The handshake signature is verified either way.
    Relay(Option<[u8; 32]>),
}

impl Trust {
    fn check(
        &self,
        cert: &CertificateDer<'_>,
        role: &'static str,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        match self {
            Trust::Practices(pins) => pins.check(cert, role, now),
            Trust::Relay(Some(pin))
                if PracticeId::from_certificate_der(cert.as_ref()).as_bytes() != pin =>
            {
                Err(rustls::Error::General(
                    "the relay's certificate is not the pinned one (sync.relay_id)".into(),
                ))
            }
            Trust::Relay(_) if role == "client" => Err(rustls::Error::General(
                "a relay verifier does not accept clients".into(),
            )),
            Trust::Relay(_) => Ok(()),
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.pins
            .check(end_entity, "server", now)
            .map(|_| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.pins
            .check(end_entity, "client", now)
            .map(|_| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl Pinned {
    fn tls12(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn tls13(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn key(creds: &Credentials) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(creds.key_der.clone()))
}

fn bad(e: rustls::Error) -> NetError {
    NetError::Identity(e.to_string())
}

pub(crate) fn server_config(
    creds: &Credentials,
    pins: PinSet,
) -> Result<rustls::ServerConfig, NetError> {
    let provider = provider();
    let verifier = Arc::new(Pinned {
        pins: Trust::Practices(pins),
        provider: provider.clone(),
    });
    let mut c = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(bad)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(creds.cert_der.clone())],
            key(creds),
        )
        .map_err(bad)?;
    c.alpn_protocols = vec![ALPN.to_vec()];
    c.max_early_data_size = 0; // no 0-RTT: early data is replayable
    Ok(c)
}

pub(crate) fn client_config(
    creds: &Credentials,
    pins: PinSet,
) -> Result<rustls::ClientConfig, NetError> {
    let provider = provider();
    let verifier = Arc::new(Pinned {
        pins: Trust::Practices(pins),
        provider: provider.clone(),
    });
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(bad)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(
            vec![CertificateDer::from(creds.cert_der.clone())],
            key(creds),
        )
        .map_err(bad)?;
    c.alpn_protocols = vec![ALPN.to_vec()];
    c.enable_early_data = false;
    Ok(c)
}

/// TLS to a relay server: ALPN `bep-relay`, this practice's certificate as the client
/// certificate (the relay routes by its SHA-256, which is the practice id).
pub(crate) fn relay_client_config(
    creds: &Credentials,
    pin: Option<[u8; 32]>,
) -> Result<rustls::ClientConfig, NetError> {
    let provider = provider();
    let verifier = Arc::new(Pinned {
        pins: Trust::Relay(pin),
        provider: provider.clone(),
    });
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(bad)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(
            vec![CertificateDer::from(creds.cert_der.clone())],
            key(creds),
        )
        .map_err(bad)?;
    c.alpn_protocols = vec![crate::relay::ALPN.to_vec()];
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(window: Option<(i32, i32)>) -> (Credentials, PracticeId) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["chartmesh".to_string()]).unwrap();
        if let Some((from, to)) = window {
            p.not_before = rcgen::date_time_ymd(from, 1, 1);
            p.not_after = rcgen::date_time_ymd(to, 1, 1);
        }
        let der = p.self_signed(&key).unwrap().der().to_vec();
        let id = PracticeId::from_certificate_der(&der);
        (
            Credentials {
                cert_der: der,
                key_der: key.serialize_der(),
            },
            id,
        )
    }

    /// A pinned certificate outside its validity dates is refused, with the reason kept
    /// for the audit log; inside them it is accepted.
    #[test]
    fn validity_dates_are_checked_for_pinned_certificates() {
        let now = UnixTime::now();
        let cases = [
            (None, None),
            (Some((2000, 2001)), Some("expired")),
            (Some((2999, 3000)), Some("not-yet-valid")),
        ];
        for (window, refused) in cases {
            let (c, id) = creds(window);
            let pins = PinSet::new([id]);
            let r = pins.check(&CertificateDer::from(c.cert_der), "client", now);
            assert_eq!(r.is_err(), refused.is_some(), "{window:?}");
            let got = pins.take_refusals();
            assert_eq!(got.first().map(|r| r.reason), refused);
            if let Some(r) = got.first() {
                assert!(r.describe().contains("clock"), "{}", r.describe());
            }
        }
        // Unpaired: refused as such whatever its dates.
        let (c, _) = creds(None);
        let pins = PinSet::default();
        assert!(
            pins.check(&CertificateDer::from(c.cert_der), "server", now)
                .is_err()
        );
        assert_eq!(pins.take_refusals()[0].reason, "not-paired");
    }

    /// A client offering only TLS 1.2 is refused in its first flight: the server never
    /// reads application data from it. (Over QUIC such a client cannot even be built.)
    #[test]
    fn a_relay_is_accepted_only_with_the_pinned_certificate_when_one_is_pinned() {
        let (relay, relay_id) = creds(None);
        let cert = CertificateDer::from(relay.cert_der.clone());
        let now = UnixTime::now();
        assert!(Trust::Relay(None).check(&cert, "server", now).is_ok());
        assert!(
            Trust::Relay(Some(*relay_id.as_bytes()))
                .check(&cert, "server", now)
                .is_ok()
        );
        let e = Trust::Relay(Some([7; 32]))
            .check(&cert, "server", now)
            .unwrap_err();
        assert!(e.to_string().contains("sync.relay_id"), "{e}");
        assert!(Trust::Relay(None).check(&cert, "client", now).is_err());
    }

    #[test]
    fn a_tls12_only_client_is_refused_before_any_application_byte() {
        let (server_creds, server_id) = creds(None);
        let (client_creds, client_id) = creds(None);
        let server = server_config(&server_creds, PinSet::new([client_id])).unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        let provider = provider();
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                pins: Trust::Practices(PinSet::new([server_id])),
                provider,
            }))
            .with_client_auth_cert(
                vec![CertificateDer::from(client_creds.cert_der.clone())],
                key(&client_creds),
            )
            .unwrap();
        client.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = rustls::ClientConnection::new(
            Arc::new(client),
            ServerName::try_from("chartmesh").unwrap(),
        )
        .unwrap();
        std::io::Write::write_all(&mut client.writer(), b"application bytes").unwrap();
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();
        server.read_tls(&mut &wire[..]).unwrap();
        let e = server.process_new_packets().unwrap_err();
        assert!(matches!(e, rustls::Error::PeerIncompatible(_)), "{e:?}");
        let mut buf = [0u8; 64];
        let read = std::io::Read::read(&mut server.reader(), &mut buf);
        assert!(
            !matches!(read, Ok(n) if n > 0),
            "application bytes were read"
        );
        assert!(server.is_handshaking());
    }
}
