//! The practice identity: a key pair and self-signed certificate made at `init`. The practice
//! id is the SHA-256 of the certificate, so peers pin it and no CA is involved.

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

impl Identity {
    pub fn generate(practice_name: &str) -> Result<Identity, IdentityError> {
        let mut params = rcgen::CertificateParams::new(vec!["chartmesh".to_string()])
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
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
