//! The tamper-evident audit chain: each entry carries the hash of the one before it, so an
//! edited, deleted, reordered or truncated log is detected by recomputing the chain.
//!
//! This module only defines the entry, its hash and the verification; the store appends
//! entries in the same transaction as the change they record.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The hash that precedes the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, by whom, to which chart, involving which peer. Never chart content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub time_ms: i64,
    /// The user (author) or `practice:<id>` / `peer:<id>` that acted.
    pub actor: String,
    /// read, create, update, share, revoke, sync-send, sync-receive, refuse, emergency, export, ...
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// A short, content-free detail (e.g. "section=notes" or a refusal reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The charts one entry discloses together (the patients a list showed), sorted and
    /// without repeats: each is found by an audit search for its chart, as `chart_id` is,
    /// and the entry's hash covers them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub charts: Vec<String>,
}

impl AuditEvent {
    pub fn new(time_ms: i64, actor: impl Into<String>, action: impl Into<String>) -> Self {
        AuditEvent {
            time_ms,
            actor: actor.into(),
            action: action.into(),
            chart_id: None,
            peer: None,
            detail: None,
            charts: Vec::new(),
        }
    }
    pub fn chart(mut self, id: impl Into<String>) -> Self {
        self.chart_id = Some(id.into());
        self
    }
    pub fn peer(mut self, p: impl Into<String>) -> Self {
        self.peer = Some(p.into());
        self
    }
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }
    /// The charts this entry discloses together (sorted, repeats dropped).
    pub fn charts<S: Into<String>>(mut self, ids: impl IntoIterator<Item = S>) -> Self {
        self.charts.extend(ids.into_iter().map(Into::into));
        self.normalize_charts();
        self
    }
    /// Sorts `charts` and drops repeats: the order the hash and the store keep.
    pub fn normalize_charts(&mut self) {
        if !self.charts.is_sorted_by(|a, b| a < b) {
            self.charts.sort_unstable();
            self.charts.dedup();
        }
    }
}

/// A stored entry: the event, its position and the chain hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    #[serde(flatten)]
    pub event: AuditEvent,
    pub prev_hash: String,
    pub hash: String,
    /// Set when the entry was listed with its `charts` cut down (a listing for one chart
    /// keeps only that chart, a listing of everything none): how many charts the entry
    /// names. Its hash covers them all; `audit verify` reads them whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charts_named: Option<usize>,
}

impl AuditEntry {
    /// Cuts `charts` down to `keep` (if the entry names it) and records how many it named:
    /// a trail of one patient does not carry every other patient of each list it is on.
    pub fn trim_charts(&mut self, keep: Option<&str>) {
        if self.event.charts.is_empty() {
            return;
        }
        self.charts_named = Some(self.event.charts.len());
        let kept = keep.filter(|k| {
            self.event
                .charts
                .binary_search_by(|c| c.as_str().cmp(k))
                .is_ok()
        });
        self.event.charts = kept.map(|k| vec![k.to_string()]).unwrap_or_default();
    }
}

/// hash = SHA-256(prev_hash \n seq \n time \n actor \n action \n chart \n peer \n detail
/// [\n "charts" \n count \n chart...]), each field length-prefixed so that no two different
/// entries hash alike; the charts part only when the entry names any (entries written
/// before it existed hash as they did).
pub fn entry_hash(prev_hash: &str, seq: i64, e: &AuditEvent) -> String {
    let mut h = Sha256::new();
    let mut field = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    field(prev_hash);
    field(&seq.to_string());
    field(&e.time_ms.to_string());
    field(&e.actor);
    field(&e.action);
    field(e.chart_id.as_deref().unwrap_or("\u{0}"));
    field(e.peer.as_deref().unwrap_or("\u{0}"));
    field(e.detail.as_deref().unwrap_or("\u{0}"));
    if !e.charts.is_empty() {
        field("charts");
        field(&e.charts.len().to_string());
        for c in &e.charts {
            field(c);
        }
    }
    hex::encode(h.finalize())
}

/// Where verification found the chain broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainBreak {
    /// The sequence number of the first entry that does not verify (or that is missing).
    pub seq: i64,
    pub reason: String,
}

/// Verifies entries (in stored order). `expected_count`/`expected_head` come from the
/// separately kept chain head, so a truncated tail is detected too.
pub fn verify_chain<'a>(
    entries: impl IntoIterator<Item = &'a AuditEntry>,
    expected_head: Option<(i64, &str)>,
) -> Result<usize, ChainBreak> {
    let mut prev = GENESIS.to_string();
    let mut next_seq = 1i64;
    let mut n = 0usize;
    for e in entries {
        if e.seq != next_seq {
            return Err(ChainBreak {
                seq: next_seq,
                reason: if e.seq > next_seq {
                    format!(
                        "entry {next_seq} is missing (the next stored entry is {})",
                        e.seq
                    )
                } else {
                    format!("entry {} is out of order (expected {next_seq})", e.seq)
                },
            });
        }
        if e.prev_hash != prev {
            return Err(ChainBreak {
                seq: e.seq,
                reason: "does not link to the entry before it (deleted, reordered or edited)"
                    .into(),
            });
        }
        let h = entry_hash(&prev, e.seq, &e.event);
        if h != e.hash {
            return Err(ChainBreak {
                seq: e.seq,
                reason: "content does not match its hash (edited)".into(),
            });
        }
        prev = h;
        next_seq += 1;
        n += 1;
    }
    if let Some((head_seq, head_hash)) = expected_head {
        if head_seq >= next_seq {
            return Err(ChainBreak {
                seq: next_seq,
                reason: format!(
                    "log ends at entry {} but the recorded head is entry {head_seq} (truncated)",
                    next_seq - 1
                ),
            });
        }
        if head_seq == next_seq - 1 && head_seq > 0 && head_hash != prev {
            return Err(ChainBreak {
                seq: head_seq,
                reason: "last entry does not match the recorded head".into(),
            });
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditEntry> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let event = AuditEvent::new(seq * 10, "nurse", "read").chart(format!("c{seq}"));
                let hash = entry_hash(&prev, seq, &event);
                let e = AuditEntry {
                    seq,
                    event,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                    charts_named: None,
                };
                prev = hash;
                e
            })
            .collect()
    }

    /// An entry naming several charts: its hash covers each of them (one dropped, added or
    /// changed breaks it), and an entry naming none hashes as entries always did.
    #[test]
    fn the_charts_an_entry_discloses_are_covered_by_its_hash() {
        let plain = AuditEvent::new(1, "nurse", "read").detail("listed");
        // The eight fields alone, as every entry was hashed before entries named charts.
        let mut h8 = Sha256::new();
        for f in [
            GENESIS, "1", "1", "nurse", "read", "\u{0}", "\u{0}", "listed",
        ] {
            h8.update((f.len() as u64).to_le_bytes());
            h8.update(f.as_bytes());
        }
        assert_eq!(entry_hash(GENESIS, 1, &plain), hex::encode(h8.finalize()));
        let listed = plain.clone().charts(["c2", "c1", "c2"]);
        assert_eq!(listed.charts, ["c1", "c2"], "sorted, repeats dropped");
        let h = entry_hash(GENESIS, 1, &listed);
        assert_ne!(h, entry_hash(GENESIS, 1, &plain));
        for other in [
            plain.clone().charts(["c1"]),
            plain.clone().charts(["c1", "c2", "c3"]),
            plain.clone().charts(["c1", "c3"]),
            plain.clone().charts(["c1c2"]),
        ] {
            assert_ne!(entry_hash(GENESIS, 1, &other), h, "{:?}", other.charts);
        }
        let mut c = chain(3);
        c[1].event = c[1].event.clone().charts(["x", "y"]);
        c[1].hash = entry_hash(&c[0].hash, 2, &c[1].event);
        c[2].prev_hash = c[1].hash.clone();
        c[2].hash = entry_hash(&c[1].hash, 3, &c[2].event);
        assert_eq!(verify_chain(&c, None), Ok(3));
        let mut dropped = c.clone();
        dropped[1].event.charts.pop();
        assert_eq!(verify_chain(&dropped, None).unwrap_err().seq, 2);
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let c = chain(5);
        assert_eq!(verify_chain(&c, Some((5, &c[4].hash))), Ok(5));
    }

    #[test]
    fn each_kind_of_tampering_is_pinpointed() {
        let c = chain(5);
        let mut edited = c.clone();
        edited[2].event.action = "update".into();
        assert_eq!(verify_chain(&edited, None).unwrap_err().seq, 3);
        let mut deleted = c.clone();
        deleted.remove(1);
        assert_eq!(verify_chain(&deleted, None).unwrap_err().seq, 2);
        let mut swapped = c.clone();
        swapped.swap(1, 2);
        assert_eq!(verify_chain(&swapped, None).unwrap_err().seq, 2);
        let truncated = &c[..3];
        assert_eq!(
            verify_chain(truncated, Some((5, &c[4].hash)))
                .unwrap_err()
                .seq,
            4
        );
    }
}
