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
    /// Reads the plain form (52 base32 characters, as [`Display`](fmt::Display) writes
    /// them) or the checked form (56 characters: each group of 13 followed by its check
    /// character, as [`PracticeId::checked`] writes them). Dashes, spaces and case are
    /// ignored; in the checked form the digits people write for look-alike letters (0 for O,
    /// 1 for I, 8 for B) are read as those letters, the check characters confirming it. A
    /// checked id with a typo is refused, naming the quarter that is wrong.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let clean = normalize(s);
        let bad = || {
            ValidationError::new(
                "practice id",
                format!(
                    "{s:?} is not a practice id: expected 56 characters (A-Z, 2-7; dashes and spaces are ignored), as `chartmesh id` prints"
                ),
            )
        };
        let plain = match clean.len() {
            52 => clean,
            56 => {
                // Look-alike digits are read as the letters they stand for: the check
                // characters then say whether that was right.
                let clean: String = clean
                    .chars()
                    .map(|c| match c {
                        '0' => 'O',
                        '1' => 'I',
                        '8' => 'B',
                        c => c,
                    })
                    .collect();
                let mut plain = String::with_capacity(52);
                for (g, chunk) in clean.as_bytes().chunks(14).enumerate() {
                    let (data, check) = chunk.split_at(13);
                    let data = std::str::from_utf8(data).map_err(|_| bad())?;
                    match luhn32(data) {
                        Some(c) if c == check[0] as char => plain.push_str(data),
                        Some(_) => {
                            return Err(ValidationError::new(
                                "practice id",
                                format!(
                                    "{s:?} has a typo: its check characters do not match in the {} quarter (characters {}-{}); compare it again with `chartmesh id` at the other practice",
                                    ["first", "second", "third", "fourth"][g],
                                    g * 14 + 1,
                                    g * 14 + 14
                                ),
                            ));
                        }
                        None => return Err(bad()),
                    }
                }
                plain
            }
            _ => return Err(bad()),
        };
        let bytes = unbase32(&plain).ok_or_else(bad)?;
        let arr: [u8; 32] = bytes
            .get(..32)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        Ok(PracticeId(arr))
    }
}

/// An id as typed: dashes and spaces dropped, upper case.
fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '-' | ' ' | '\t'))
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// The Luhn mod 32 check character of base32 text, computed as Syncthing computes the check
/// characters of its device ids (the weights start at 1, then alternate 2, 1, ...).
fn luhn32(data: &str) -> Option<char> {
    let mut factor = 1;
    let mut sum = 0;
    for c in data.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c)?;
        let addend = factor * v;
        factor = if factor == 2 { 1 } else { 2 };
        sum += addend / 32 + addend % 32;
    }
    Some(ALPHABET[(32 - sum % 32) % 32] as char)
}

impl PracticeId {
    /// The form people read and type: the 52 characters in four groups of 13, each followed
    /// by a check character, shown as eight groups of seven (like a Syncthing device id).
    /// A typo in it is caught by [`FromStr`]. The plain [`Display`](fmt::Display) form stays
    /// the id's canonical text (stored, sent, used as a key).
    pub fn checked(&self) -> String {
        let s = base32(&self.0);
        let mut with_checks = String::with_capacity(56);
        for chunk in s.as_bytes().chunks(13) {
            let data = std::str::from_utf8(chunk).expect("base32 is ASCII");
            with_checks.push_str(data);
            with_checks.push(luhn32(data).expect("base32 alphabet"));
        }
        with_checks
            .as_bytes()
            .chunks(7)
            .map(|c| std::str::from_utf8(c).expect("ASCII"))
            .collect::<Vec<_>>()
            .join("-")
    }
}

/// Why a reference to a paired practice did not name exactly one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefError {
    /// A whole id that does not read (wrong length, a typo caught by a check character).
    #[error("{0}")]
    BadId(String),
    #[error(
        "no paired practice has the name or an id starting with {0:?}; `chartmesh peer list` shows them"
    )]
    NoMatch(String),
    #[error("{0:?} fits more than one paired practice ({1}); give more of the id")]
    Ambiguous(String, String),
}

/// Finds the paired practice `reference` names: its whole id (plain or checked form), its
/// name (ignoring case), or a prefix of its id of at least 4 characters that fits only it.
/// A whole id is returned even if it is not among `peers` (the caller says whether it must
/// be paired).
pub fn match_peer<'a>(
    reference: &str,
    peers: impl IntoIterator<Item = (PracticeId, &'a str)>,
) -> Result<PracticeId, PeerRefError> {
    let clean = normalize(reference);
    match reference.parse::<PracticeId>() {
        Ok(id) => return Ok(id),
        Err(e) if clean.len() >= 52 => return Err(PeerRefError::BadId(e.message)),
        Err(_) => {}
    }
    let peers: Vec<(PracticeId, &str)> = peers.into_iter().collect();
    let wanted = reference.trim();
    let by_name: Vec<PracticeId> = peers
        .iter()
        .filter(|(_, n)| !wanted.is_empty() && n.trim().eq_ignore_ascii_case(wanted))
        .map(|(id, _)| *id)
        .collect();
    let found: Vec<PracticeId> = if !by_name.is_empty() {
        by_name
    } else if clean.len() >= 4 {
        // A prefix of the plain form; within the first group the checked form is the same.
        peers
            .iter()
            .filter(|(id, _)| {
                base32(&id.0).starts_with(&clean)
                    || id.checked().replace('-', "").starts_with(&clean)
            })
            .map(|(id, _)| *id)
            .collect()
    } else {
        Vec::new()
    };
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(PeerRefError::NoMatch(wanted.to_string())),
        many => Err(PeerRefError::Ambiguous(
            wanted.to_string(),
            many.iter()
                .map(|i| i.short())
                .collect::<Vec<_>>()
                .join(", "),
        )),
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
    fn checked_ids_read_back_and_catch_typos() {
        let id = PracticeId::from_certificate_der(b"another certificate");
        let checked = id.checked();
        assert_eq!(checked.len(), 56 + 7, "{checked}");
        assert_eq!(checked.split('-').count(), 8);
        // The checked form, without dashes, in lower case, with spaces: all the same id.
        assert_eq!(checked.parse::<PracticeId>().unwrap(), id);
        assert_eq!(checked.to_lowercase().parse::<PracticeId>().unwrap(), id);
        assert_eq!(checked.replace('-', " ").parse::<PracticeId>().unwrap(), id);
        assert_eq!(checked.replace('-', "").parse::<PracticeId>().unwrap(), id);
        // Look-alike digits in the checked form are read as letters (and checked).
        if checked.contains('O') {
            assert_eq!(checked.replace('O', "0").parse::<PracticeId>().unwrap(), id);
        }
        // The plain form still reads (ids stored and sent before stay valid).
        assert_eq!(id.to_string().parse::<PracticeId>().unwrap(), id);
        // Every single-character substitution in the checked form is caught.
        let clean: Vec<char> = checked.replace('-', "").chars().collect();
        for i in 0..clean.len() {
            for &c in ALPHABET {
                let c = c as char;
                if c == clean[i] {
                    continue;
                }
                let mut typo = clean.clone();
                typo[i] = c;
                let typo: String = typo.into_iter().collect();
                let e = typo.parse::<PracticeId>().unwrap_err();
                assert!(e.message.contains("typo"), "{typo}: {}", e.message);
            }
        }
    }

    #[test]
    fn the_check_characters_are_syncthings() {
        // Syncthing's device id test vector (lib/protocol/deviceid_test.go): the same
        // Luhn mod 32 check characters on the same base32 text.
        let plain = "P56IOI7MZJNU2IQGDREYDM2MGTMGL3BXNPQ6W5BTBBZ4TJXZWICQ";
        let checked = "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2";
        let id: PracticeId = plain.parse().unwrap();
        assert_eq!(id.checked(), checked);
        assert_eq!(checked.parse::<PracticeId>().unwrap(), id);
    }

    #[test]
    fn peers_are_found_by_name_or_unique_prefix() {
        let a = PracticeId::from_certificate_der(b"a");
        let b = PracticeId::from_certificate_der(b"b");
        let peers = [(a, "Ridge Cardiology"), (b, "Valley Clinic")];
        assert_eq!(match_peer("ridge cardiology", peers).unwrap(), a);
        assert_eq!(match_peer(&a.to_string()[..6], peers).unwrap(), a);
        assert_eq!(
            match_peer(&b.checked()[..9].to_lowercase(), peers).unwrap(),
            b
        );
        assert_eq!(match_peer(&a.checked(), peers).unwrap(), a);
        assert!(matches!(
            match_peer("Nobody", peers),
            Err(PeerRefError::NoMatch(_))
        ));
        assert!(matches!(
            match_peer("AB", peers),
            Err(PeerRefError::NoMatch(_))
        ));
        let mut typo: Vec<char> = a.checked().chars().collect();
        typo[3] = if typo[3] == 'A' { 'B' } else { 'A' };
        let typo: String = typo.into_iter().collect();
        assert!(matches!(
            match_peer(&typo, peers),
            Err(PeerRefError::BadId(_))
        ));
        let same_start = [(a, "x"), (a, "y")];
        assert!(matches!(
            match_peer(&a.to_string()[..5], same_start),
            Err(PeerRefError::Ambiguous(..))
        ));
    }

    #[test]
    fn chart_ids_are_checked() {
        assert!(ChartId::parse("chart-000001").is_ok());
        assert!(ChartId::parse("").is_err());
        assert!(ChartId::parse("a/b").is_err());
        assert!(ChartId::parse(&"x".repeat(129)).is_err());
    }
}
