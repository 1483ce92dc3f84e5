//! The sync protocol between two practices, without I/O: the messages, their encoding and
//! limits, and the puller's state machine (docs/PROTOCOL.md).
//!
//! Owns: what is said on the wire and in what order; when a pull is complete and its
//! checkpoint may move.
//! Must not touch: sockets, files or the store. The daemon feeds this module the messages it
//! reads and the store answers it needs, and carries out the actions it returns. Consent is
//! decided by [`crate::consent`], which the daemon asks for every item sent and applied.
//!
//! A session is two pulls in opposite directions. A pull:
//! `Pull{since}` → `Offer{items}`… `OfferEnd{upto}` → `Want{charts}`… → `Changes{…}`… →
//! (everything durable) `Done{upto}`. The puller stores `upto` as its checkpoint for the peer
//! only when every offered item has been applied durably, so an interrupted pull is redone
//! from the old checkpoint; re-applying a change is a no-op in automerge, so nothing is lost
//! or duplicated.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;

use crate::consent::Access;

/// The protocol version spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;

/// Offer items per `Offer` message.
pub const OFFER_CHUNK: usize = 1024;

/// Charts per `Want` message.
pub const WANT_CHUNK: usize = 128;

/// The largest encoded message either side sends or accepts.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// The target size of one `Changes` message (a message may exceed it by one chart).
pub const CHANGES_TARGET: usize = 512 * 1024;

/// A short fingerprint of a document's heads: equal fingerprints mean equal documents.
pub type Digest64 = u64;

/// The fingerprint of a set of heads (order does not matter).
pub fn heads_digest(heads: &[[u8; 32]]) -> Digest64 {
    let mut sorted = heads.to_vec();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    for x in &sorted {
        h.update(x);
    }
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("8 bytes"))
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Puller → responder: what changed since my checkpoint of you?
    Pull {
        version: u32,
        since: u64,
    },
    /// Responder → puller: the version is not spoken here; the stream ends.
    Unsupported {
        version: u32,
    },
    /// Responder → puller: part of the offer (at most [`OFFER_CHUNK`] items).
    Offer {
        items: Vec<OfferItem>,
    },
    /// Responder → puller: the offer is complete and covers my changes up to `upto`.
    OfferEnd {
        upto: u64,
    },
    /// Puller → responder: send me what I lack of these charts.
    Want {
        items: Vec<WantItem>,
    },
    /// Responder → puller: answers to a `Want`, in its order.
    Changes {
        items: Vec<Delivery>,
    },
    /// Puller → responder: everything offered up to `upto` is durable here.
    Done {
        upto: u64,
    },
    /// Either side, on its own stream: I have changes, pull from me.
    Nudge,
    /// Either side, on its own stream, instead of a nudge when its new changes hold nothing
    /// the other side may need (e.g. only changes that side just sent): nothing for you up to
    /// `upto`; you may move your checkpoint of me there without pulling.
    Caught {
        upto: u64,
    },
    /// Requester → custodian, first on a new stream: emergency access to a patient's chart
    /// (crate::emergency). Answered with one `EmergencyAnswer`; the stream then ends.
    EmergencyRequest {
        version: u32,
        request: crate::emergency::Request,
    },
    EmergencyAnswer {
        answer: crate::emergency::Answer,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferItem {
    pub chart: String,
    pub kind: Offered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Offered {
    /// One of the responder's own charts, shared with the puller under this grant.
    Shared {
        digest: Digest64,
        access: Access,
        expires_ms: Option<i64>,
    },
    /// A chart of the puller's that the responder holds read-write and has changed.
    Returned { digest: Digest64 },
    /// The puller's copy of one of the responder's charts is no longer shared.
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WantItem {
    pub chart: String,
    /// The puller's heads; empty when it has no copy.
    pub have: Vec<[u8; 32]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub chart: String,
    /// The changes the puller lacks (automerge chunks), or None: not available (unknown, or
    /// no longer shared; the two look the same).
    #[serde(with = "opt_bytes")]
    pub data: Option<Vec<u8>>,
}

mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_deref().map(serde_bytes::Bytes::new).serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<serde_bytes::ByteBuf>::deserialize(d)?.map(|b| b.into_vec()))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message of {0} bytes is over the limit of {MAX_MESSAGE} bytes")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("the peer speaks protocol version {0}; this build speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("unexpected {got} while {state}")]
    Unexpected {
        got: &'static str,
        state: &'static str,
    },
}

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("messages serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<Msg, ProtocolError> {
        if bytes.len() > MAX_MESSAGE {
            return Err(ProtocolError::TooLarge(bytes.len()));
        }
        postcard::from_bytes(bytes).map_err(|e| ProtocolError::Malformed(e.to_string()))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Msg::Pull { .. } => "Pull",
            Msg::Unsupported { .. } => "Unsupported",
            Msg::Offer { .. } => "Offer",
            Msg::OfferEnd { .. } => "OfferEnd",
            Msg::Want { .. } => "Want",
            Msg::Changes { .. } => "Changes",
            Msg::Done { .. } => "Done",
            Msg::Nudge => "Nudge",
            Msg::Caught { .. } => "Caught",
            Msg::EmergencyRequest { .. } => "EmergencyRequest",
            Msg::EmergencyAnswer { .. } => "EmergencyAnswer",
        }
    }
}

/// What the puller knows of one of its charts, for comparing with an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalChart {
    pub heads: Vec<[u8; 32]>,
    /// Already marked revoked here.
    pub revoked: bool,
    pub access: Option<Access>,
    pub expires_ms: Option<i64>,
}

/// One thing for the daemon to apply durably, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub chart: String,
    pub kind: Offered,
    /// Changes to merge; None for an update of access or a revocation only.
    pub data: Option<Vec<u8>>,
}

/// What the puller asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(Msg),
    /// Apply these durably, then call [`Puller::applied`] with their number.
    Apply(Vec<Incoming>),
    /// The pull is complete: store `upto` as the checkpoint, then send `Done`.
    Complete {
        upto: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Offering,
    Fetching,
    Complete,
}

/// One pull, as a state machine. Feed it every message read from the responder
/// ([`Puller::on_message`]) and every completed apply ([`Puller::applied`]).
#[derive(Debug)]
pub struct Puller {
    since: u64,
    upto: Option<u64>,
    phase: Phase,
    /// Offered charts wanted and not yet delivered, with what the offer said of them.
    wanted: std::collections::HashMap<String, Offered>,
    /// Wants not yet sent (sent in chunks as the offer arrives).
    want_queue: Vec<WantItem>,
    /// Items handed to the driver and not yet reported applied.
    applying: usize,
    /// Charts already handed over in this pull (a duplicate delivery is ignored).
    seen: HashSet<String>,
    stats: PullStats,
}

/// Counters of one pull, for status and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullStats {
    pub offered: usize,
    pub wanted: usize,
    pub delivered: usize,
    pub unavailable: usize,
}

impl Puller {
    /// Starts a pull from the checkpoint `since`; send the returned message first.
    pub fn start(since: u64) -> (Puller, Msg) {
        (
            Puller {
                since,
                upto: None,
                phase: Phase::Offering,
                wanted: Default::default(),
                want_queue: Vec::new(),
                applying: 0,
                seen: HashSet::new(),
                stats: PullStats::default(),
            },
            Msg::Pull {
                version: PROTOCOL_VERSION,
                since,
            },
        )
    }

    pub fn since(&self) -> u64 {
        self.since
    }

    pub fn stats(&self) -> &PullStats {
        &self.stats
    }

    pub fn is_complete(&self) -> bool {
        self.phase == Phase::Complete
    }

    /// Handles a message from the responder. `local` answers what this practice holds of a
    /// chart. A protocol violation ends the pull (the checkpoint does not move).
    pub fn on_message(
        &mut self,
        msg: Msg,
        local: &mut dyn FnMut(&str) -> Option<LocalChart>,
    ) -> Result<Vec<Action>, ProtocolError> {
        let state = match self.phase {
            Phase::Offering => "receiving the offer",
            Phase::Fetching => "fetching changes",
            Phase::Complete => "complete",
        };
        let unexpected = |got: &Msg| ProtocolError::Unexpected {
            got: got.name(),
            state,
        };
        match (self.phase, msg) {
            (_, Msg::Unsupported { version }) => Err(ProtocolError::Version(version)),
            (Phase::Offering, Msg::Offer { items }) => {
                if items.len() > OFFER_CHUNK {
                    return Err(ProtocolError::Malformed(format!(
                        "an offer of {} items (the limit is {OFFER_CHUNK})",
                        items.len()
                    )));
                }
                Ok(self.on_offer(items, local))
            }
            (Phase::Offering, Msg::OfferEnd { upto }) => {
                if upto < self.since {
                    return Err(ProtocolError::Malformed(format!(
                        "offer ends at {upto}, before the checkpoint {}",
                        self.since
                    )));
                }
                self.upto = Some(upto);
                self.phase = Phase::Fetching;
                let mut out = self.flush_wants(true);
                out.extend(self.check_complete());
                Ok(out)
            }
            (_, Msg::Changes { items }) => {
                // Deliveries nobody asked for (duplicates, replays) are ignored below.

                let mut apply = Vec::new();
                for d in items {
                    let Some(kind) = self.wanted.remove(&d.chart) else {
                        // Not asked for (or already delivered): ignore it.
                        continue;
                    };
                    match d.data {
                        Some(data) => {
                            self.stats.delivered += 1;
                            self.seen.insert(d.chart.clone());
                            apply.push(Incoming {
                                chart: d.chart,
                                kind,
                                data: Some(data),
                            });
                        }
                        None => self.stats.unavailable += 1,
                    }
                }
                let mut out = Vec::new();
                if !apply.is_empty() {
                    self.applying += apply.len();
                    out.push(Action::Apply(apply));
                }
                out.extend(self.check_complete());
                Ok(out)
            }
            (_, m) => Err(unexpected(&m)),
        }
    }

    fn on_offer(
        &mut self,
        items: Vec<OfferItem>,
        local: &mut dyn FnMut(&str) -> Option<LocalChart>,
    ) -> Vec<Action> {
        let mut immediate = Vec::new();
        for item in items {
            self.stats.offered += 1;
            if self.seen.contains(&item.chart) || self.wanted.contains_key(&item.chart) {
                continue;
            }
            let here = local(&item.chart);
            match item.kind {
                Offered::Revoked => {
                    if here.as_ref().is_some_and(|h| !h.revoked) {
                        self.seen.insert(item.chart.clone());
                        immediate.push(Incoming {
                            chart: item.chart,
                            kind: item.kind,
                            data: None,
                        });
                    }
                }
                Offered::Shared { digest, .. } | Offered::Returned { digest } => {
                    let have = here.as_ref().map(|h| h.heads.clone()).unwrap_or_default();
                    if here.is_some() && heads_digest(&have) == digest {
                        // Same document. Record a changed grant (access, expiry, un-revoke).
                        if let (
                            Some(h),
                            Offered::Shared {
                                access, expires_ms, ..
                            },
                        ) = (&here, item.kind)
                            && (h.revoked || h.access != Some(access) || h.expires_ms != expires_ms)
                        {
                            self.seen.insert(item.chart.clone());
                            immediate.push(Incoming {
                                chart: item.chart,
                                kind: item.kind,
                                data: None,
                            });
                        }
                        continue;
                    }
                    if matches!(item.kind, Offered::Returned { .. }) && here.is_none() {
                        // "Your chart" that is not here: nothing to merge into.
                        continue;
                    }
                    self.stats.wanted += 1;
                    self.wanted.insert(item.chart.clone(), item.kind);
                    self.want_queue.push(WantItem {
                        chart: item.chart,
                        have,
                    });
                }
            }
        }
        let mut out = Vec::new();
        if !immediate.is_empty() {
            self.applying += immediate.len();
            out.push(Action::Apply(immediate));
        }
        out.extend(self.flush_wants(false));
        out
    }

    fn flush_wants(&mut self, all: bool) -> Vec<Action> {
        let mut out = Vec::new();
        while self.want_queue.len() >= WANT_CHUNK || (all && !self.want_queue.is_empty()) {
            let n = self.want_queue.len().min(WANT_CHUNK);
            let items: Vec<WantItem> = self.want_queue.drain(..n).collect();
            out.push(Action::Send(Msg::Want { items }));
        }
        out
    }

    /// Reports that `n` items handed over in `Apply` actions are durable (applied or
    /// refused, either way settled).
    pub fn applied(&mut self, n: usize) -> Vec<Action> {
        self.applying = self.applying.saturating_sub(n);
        self.check_complete()
    }

    fn check_complete(&mut self) -> Vec<Action> {
        match (self.phase, self.upto) {
            (Phase::Fetching, Some(upto)) if self.wanted.is_empty() && self.applying == 0 => {
                self.phase = Phase::Complete;
                vec![Action::Complete { upto }]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
