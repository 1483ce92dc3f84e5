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
}

/// A stored entry: the event, its position and the chain hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    #[serde(flatten)]
    pub event: AuditEvent,
    pub prev_hash: String,
    pub hash: String,
}

/// hash = SHA-256(prev_hash \n seq \n time \n actor \n action \n chart \n peer \n detail), each field
/// length-prefixed so that no two different entries hash alike.
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
                };
                prev = hash;
                e
            })
            .collect()
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
