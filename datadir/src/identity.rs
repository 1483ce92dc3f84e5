//! The practice identity: a key pair and self-signed certificate made at `init`. The practice
//! id is the SHA-256 of the certificate, so peers pin it and no CA is involved.
//!
//! Peers check the certificate's validity dates against their own clocks, so the window
//! starts two days before the certificate is made (a peer whose clock is up to 48 h behind
//! still accepts it) and has no end (RFC 5280's 9999-12-31 23:59:59 "no well-defined
//! expiration"): the practice id is the certificate's hash, so it cannot be renewed without
//! pairing again (docs/RELIABILITY.md).

use chartmesh_core::PracticeId;
use std::path::{Path, PathBuf};

pub struct Identity {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
    pub id: PracticeId,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create the practice key: {0}")]
    Generate(String),
    #[error(
        "cannot read the practice identity in {dir}: {source}; restore it from a backup or run `chartmesh init` on a new data directory"
    )]
    Read { dir: String, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// How long before its creation a practice certificate is valid (clock skew tolerance).
pub const VALID_BEFORE_CREATION: time::Duration = time::Duration::days(2);

impl Identity {
    pub fn generate(practice_name: &str) -> Result<Identity, IdentityError> {
        let mut params = rcgen::CertificateParams::new(vec!["chartmesh".to_string()])
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        params.not_before = time::OffsetDateTime::now_utc() - VALID_BEFORE_CREATION;
        params.not_after = time::macros::datetime!(9999-12-31 23:59:59 UTC);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, practice_name);
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Generate(e.to_string()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let cert_der = cert.der().to_vec();
        Ok(Identity {
            id: PracticeId::from_certificate_der(&cert_der),
            cert_der,
            key_der: key.serialize_der(),
        })
    }

    fn paths(dir: &Path) -> (PathBuf, PathBuf) {
        (
            dir.join("identity").join("cert.der"),
            dir.join("identity").join("key.der"),
        )
    }

    /// The certificate's validity window (not before, not after) in Unix seconds, as
    /// peers check it; None if the certificate does not parse.
    pub fn validity(&self) -> Option<(i64, i64)> {
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&self.cert_der).ok()?;
        let v = cert.validity();
        Some((v.not_before.timestamp(), v.not_after.timestamp()))
    }

    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let (c, k) = Self::paths(dir);
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| IdentityError::Read {
                dir: dir.display().to_string(),
                source: e,
            })
        };
        let cert_der = read(&c)?;
        let key_der = read(&k)?;
        Ok(Identity {
            id: PracticeId::from_certificate_der(&cert_der),
            cert_der,
            key_der,
        })
    }

    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        let (c, k) = Self::paths(dir);
        crate::datadir::write_private(&c, &self.cert_der).map_err(|e| IdentityError::Write {
            path: c.display().to_string(),
            source: e,
        })?;
        crate::datadir::write_private(&k, &self.key_der).map_err(|e| IdentityError::Write {
            path: k.display().to_string(),
            source: e,
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new practice certificate is accepted by a peer whose clock is 24 h (or up to 48 h)
    /// behind, and never expires.
    #[test]
    fn the_certificate_tolerates_clock_skew_and_does_not_expire() {
        use x509_parser::prelude::FromDer;
        let id = Identity::generate("Skew Clinic").unwrap();
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&id.cert_der).unwrap();
        let (nb, na) = (
            cert.validity().not_before.timestamp(),
            cert.validity().not_after.timestamp(),
        );
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(nb <= now - 47 * 3600, "not before {nb}, now {now}");
        assert!(nb >= now - 49 * 3600);
        assert_eq!(na, 253_402_300_799, "9999-12-31T23:59:59Z");
    }
}
