//! Identifiers: chart ids (chosen by the practice that creates the chart) and practice ids
//! (derived from the practice's certificate, so an id can't be claimed without the key).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

use crate::error::ValidationError;

/// A chart's id, e.g. `chart-000001`. 1–128 characters of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChartId(String);

impl ChartId {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if ok {
            Ok(ChartId(s.to_string()))
        } else {
            Err(ValidationError::new(
                "id",
                format!(
                    "{s:?} is not a valid chart id (1-128 characters of letters, digits, '.', '_' or '-')"
                ),
            ))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChartId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The local key of a copy of another practice's chart: `CHART@CUSTODIAN`. Copies are keyed by
/// (custodian, chart id), so two practices' charts with the same id never collide here, and
/// no peer can take an id before its real custodian shares it. A chart id never contains
/// `@`, so the key splits back unambiguously.
pub fn copy_key(chart_id: &str, custodian: &str) -> String {
    format!("{chart_id}@{custodian}")
}

/// Splits a local key into the chart id and, for a copy, its custodian.
pub fn split_key(key: &str) -> (&str, Option<&str>) {
    match key.split_once('@') {
        Some((chart, custodian)) => (chart, Some(custodian)),
        None => (key, None),
    }
}

/// A practice's id: the SHA-256 of its certificate (DER). Shown as base32 in groups of four
/// characters so that two people can read it to each other and compare.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PracticeId([u8; 32]);

impl PracticeId {
    pub fn from_certificate_der(der: &[u8]) -> Self {
        PracticeId(Sha256::digest(der).into())
    }
    pub fn from_bytes(b: [u8; 32]) -> Self {
        PracticeId(b)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// The automerge actor id under which this practice writes: the first 16 bytes of its id.
    /// Binding actors to practices lets a receiver check that a change claiming to be from a
    /// practice really comes from it.
    pub fn actor_bytes(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.0[..16]);
        a
    }
    /// A short form for logs and tables (first 8 characters).
    pub fn short(&self) -> String {
        self.to_string()[..9].to_string()
    }
}

const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

fn base32(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut buf: u32 = 0;
    let mut bits = 0;
    for &b in bytes {
        buf = (buf << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn unbase32(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c.to_ascii_uppercase())? as u32;
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    Some(out)
}

impl fmt::Display for PracticeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = base32(&self.0);
        let groups: Vec<&str> = s
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        f.write_str(&groups.join("-"))
    }
}

impl fmt::Debug for PracticeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PracticeId({})", self.short())
    }
}

impl FromStr for PracticeId {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let clean: String = s.chars().filter(|c| !matches!(c, '-' | ' ')).collect();
        let bad = || {
            ValidationError::new(
                "practice id",
                format!(
                    "{s:?} is not a practice id: expected 52 base32 characters (A-Z, 2-7), as `chartmesh id` prints"
                ),
            )
        };
        if clean.len() != 52 {
            return Err(bad());
        }
        let bytes = unbase32(&clean).ok_or_else(bad)?;
        let arr: [u8; 32] = bytes
            .get(..32)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        Ok(PracticeId(arr))
    }
}

impl Serialize for PracticeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PracticeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn practice_id_round_trips_through_its_display_form() {
        let id = PracticeId::from_certificate_der(b"some certificate");
        let shown = id.to_string();
        assert_eq!(shown.replace('-', "").len(), 52);
        assert_eq!(shown.parse::<PracticeId>().unwrap(), id);
        assert_eq!(shown.to_lowercase().parse::<PracticeId>().unwrap(), id);
        assert!("ABCD".parse::<PracticeId>().is_err());
        assert!(shown.replace('A', "1").parse::<PracticeId>().is_err() || !shown.contains('A'));
    }

    #[test]
    fn chart_ids_are_checked() {
        assert!(ChartId::parse("chart-000001").is_ok());
        assert!(ChartId::parse("").is_err());
        assert!(ChartId::parse("a/b").is_err());
        assert!(ChartId::parse(&"x".repeat(129)).is_err());
    }
}
