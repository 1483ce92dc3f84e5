//! What is said on the wire: every message of the sync protocol, its encoding (postcard) and
//! the limits a receiver enforces before it believes anything a peer sent.
//!
//! Owns: message shapes, sizes and the validation of a decoded message's fields.
//! Must not touch: what a message means for the session (that is [`super::session`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::consent::Access;
use crate::ids::ChartId;

/// The protocol version spoken by this build. Version 2 added flow control of offers
/// (`Credit`), store incarnations, and the custodian side of every chart reference.
pub const PROTOCOL_VERSION: u32 = 2;

/// Offer items per `Offer` message.
pub const OFFER_CHUNK: usize = 1024;

/// Offered items a puller may leave unsettled: the responder sends no more offers until the
/// puller returns credit. This bounds what a puller keeps per pull, whatever the offer's size.
pub const OFFER_WINDOW: usize = 4096;

/// The most offer items one pull may carry (a practice holds 1,000–50,000 charts).
pub const MAX_OFFER_ITEMS: u64 = 1_000_000;

/// Charts per `Want` message.
pub const WANT_CHUNK: usize = 128;

/// Heads per wanted chart (a chart's heads are one per concurrent branch: a handful).
pub const MAX_HEADS: usize = 64;

/// The largest message a responder sends or a puller accepts (encoded, decompressed).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// The largest message a puller sends or a responder accepts: `Pull`, `Want` (at most
/// [`WANT_CHUNK`] items of at most [`MAX_HEADS`] heads), `Credit`, `Done`, and emergency
/// requests. Anything bigger is a protocol violation, refused before it is decoded.
pub const MAX_REQUEST: usize = 512 * 1024;

/// The largest control message (`Nudge`, `Caught`, `Candidates`), on its own
/// unidirectional stream.
pub const MAX_CONTROL: usize = 256;

/// Addresses in one `Candidates` message.
pub const MAX_CANDIDATES: usize = 8;

/// The target size of one `Changes` message (a message may exceed it by one chart).
pub const CHANGES_TARGET: usize = 512 * 1024;

/// The largest chart document (its full save plus incremental changes) this practice
/// stores, merges or sends. A write or merge that would exceed it is refused; a stored chart
/// over it (from an earlier version) is answered as unavailable to a peer, alone, while the
/// other charts sync.
pub const MAX_CHART_BYTES: usize = 8 * 1024 * 1024;

/// Free text in a protocol message (an emergency request's reason, the requester's name).
pub const MAX_TEXT: usize = 1024;

/// A short fingerprint of a document's heads: equal fingerprints mean equal documents.
pub type Digest64 = u64;

/// A store's incarnation: a random number drawn when the store is created and drawn again
/// when it is restored from a backup (or found rolled back). A checkpoint is only valid for
/// the incarnation it was taken from.
pub type Incarnation = u64;

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
    /// Puller → responder, first on a new stream: what changed since my checkpoint of you?
    /// `incarnation` is the responder incarnation the checkpoint was taken from.
    Pull {
        version: u32,
        since: u64,
        incarnation: Incarnation,
        /// The puller's wall clock when it sent this (ms since the epoch), for the responder
        /// to measure the clock skew between the two practices. Absent from builds before it
        /// was added: it is the last field, and a `Pull` that ends before it decodes as None
        /// (an older build ignores the bytes after the fields it knows).
        #[serde(default, deserialize_with = "trailing_opt")]
        wall_ms: Option<i64>,
    },
    /// Responder → puller: the version is not spoken here; the stream ends.
    Unsupported {
        version: u32,
    },
    /// Responder → puller: part of the offer (at most [`OFFER_CHUNK`] items).
    Offer {
        items: Vec<OfferItem>,
    },
    /// Responder → puller: the offer is complete and covers my changes up to `upto` of
    /// my store's `incarnation`.
    OfferEnd {
        upto: u64,
        incarnation: Incarnation,
    },
    /// Puller → responder: this many more offered items are settled here; offer more.
    Credit {
        items: u32,
    },
    /// Puller → responder: send me what I lack of these offered charts.
    Want {
        items: Vec<WantItem>,
    },
    /// Responder → puller: answers to wants.
    Changes {
        items: Vec<Delivery>,
    },
    /// Puller → responder: everything offered up to `upto` is durable here.
    Done {
        upto: u64,
    },
    /// Either side, on its own stream: I have changes, pull from me; they are all within
    /// `upto` of my store's incarnation (absent from builds before it was added: then the
    /// receiver pulls again whatever its running pull covers).
    Nudge {
        #[serde(default, deserialize_with = "trailing_opt")]
        upto: Option<(u64, Incarnation)>,
    },
    /// Either side, on its own stream, instead of a nudge when its new changes hold nothing
    /// the other side may need: nothing for you up to `upto` of my `incarnation`; you may
    /// move your checkpoint of me there without pulling.
    Caught {
        upto: u64,
        incarnation: Incarnation,
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
    /// Either side, on its own stream, while the two are connected through the relay: the
    /// addresses this practice may be reached at directly (its public address as a STUN
    /// server saw it, its own interface addresses), at most [`MAX_CANDIDATES`]. The other
    /// side dials them (hole punching) and dials nothing else.
    Candidates {
        addrs: Vec<std::net::SocketAddr>,
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
    /// One of the puller's own charts that the responder holds read-write and has changed.
    Returned { digest: Digest64 },
    /// The puller's copy of one of the responder's charts is no longer shared.
    Revoked,
}

impl Offered {
    /// Whether the chart is the puller's own (as opposed to the responder's).
    pub fn returned(&self) -> bool {
        matches!(self, Offered::Returned { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WantItem {
    pub chart: String,
    /// The puller's own chart, offered as `Returned` (else the responder's, offered `Shared`).
    pub returned: bool,
    /// The puller's heads; empty when it has no copy.
    pub have: Vec<[u8; 32]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub chart: String,
    pub returned: bool,
    /// The changes the puller lacks (automerge chunks), or None: not available (unknown, no
    /// longer shared, unreadable or too large; they look the same).
    #[serde(with = "opt_bytes")]
    pub data: Option<Vec<u8>>,
}

/// An optional last field of a message, absent when an older build sent it: postcard is not
/// self-describing, so the end of the input where the field would start reads as None.
fn trailing_opt<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Ok(Option::<T>::deserialize(d).unwrap_or(None))
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

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message of {0} bytes is over the limit of {1} bytes")]
    TooLarge(usize, usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("the peer speaks protocol version {0}; this build speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("unexpected {got} while {state}")]
    Unexpected {
        got: &'static str,
        state: &'static str,
    },
    #[error("no message for {0} s")]
    Stalled(u64),
}

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("messages serialize")
    }

    /// Decodes a message of at most `limit` bytes and checks every field a receiver must
    /// not trust: chart ids, list lengths, head counts, text lengths.
    pub fn decode(bytes: &[u8], limit: usize) -> Result<Msg, ProtocolError> {
        if bytes.len() > limit {
            return Err(ProtocolError::TooLarge(bytes.len(), limit));
        }
        let msg: Msg =
            postcard::from_bytes(bytes).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        msg.validate()?;
        Ok(msg)
    }

    fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |s: String| Err(ProtocolError::Malformed(s));
        match self {
            Msg::Offer { items } => {
                if items.len() > OFFER_CHUNK {
                    return bad(format!(
                        "an offer of {} items (the limit is {OFFER_CHUNK})",
                        items.len()
                    ));
                }
                items.iter().try_for_each(|i| valid_chart(&i.chart))
            }
            Msg::Want { items } => {
                if items.len() > WANT_CHUNK {
                    return bad(format!(
                        "a want of {} items (the limit is {WANT_CHUNK})",
                        items.len()
                    ));
                }
                for w in items {
                    valid_chart(&w.chart)?;
                    if w.have.len() > MAX_HEADS {
                        return bad(format!(
                            "a want with {} heads (the limit is {MAX_HEADS})",
                            w.have.len()
                        ));
                    }
                }
                Ok(())
            }
            Msg::Changes { items } => {
                for d in items {
                    valid_chart(&d.chart)?;
                    if let Some(data) = &d.data
                        && data.len() > MAX_CHART_BYTES
                    {
                        return bad(format!(
                            "a chart of {} bytes (the limit is {MAX_CHART_BYTES})",
                            data.len()
                        ));
                    }
                }
                Ok(())
            }
            Msg::EmergencyRequest { request, .. } => {
                let q = &request.query;
                let long = |s: &Option<String>| s.as_ref().is_some_and(|s| s.len() > MAX_TEXT);
                if request.reason.len() > MAX_TEXT
                    || request.requester.len() > MAX_TEXT
                    || long(&q.mrn)
                    || long(&q.family)
                    || long(&q.birth_date)
                {
                    return bad("an emergency request with over-long text".into());
                }
                Ok(())
            }
            Msg::EmergencyAnswer { answer } => match answer {
                crate::emergency::Answer::Granted { charts, .. } => {
                    if charts.len() > crate::emergency::MAX_MATCHES {
                        return bad("an emergency answer naming too many charts".into());
                    }
                    charts.iter().try_for_each(|c| valid_chart(c))
                }
                crate::emergency::Answer::Denied { why } if why.len() > MAX_TEXT => {
                    bad("an emergency answer with over-long text".into())
                }
                _ => Ok(()),
            },
            Msg::Candidates { addrs } => {
                if addrs.len() > MAX_CANDIDATES {
                    return bad(format!(
                        "{} candidate addresses (the limit is {MAX_CANDIDATES})",
                        addrs.len()
                    ));
                }
                match addrs.iter().find(|a| !dialable(a)) {
                    Some(a) => bad(format!("a candidate address that is not dialable: {a}")),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Msg::Pull { .. } => "Pull",
            Msg::Unsupported { .. } => "Unsupported",
            Msg::Offer { .. } => "Offer",
            Msg::OfferEnd { .. } => "OfferEnd",
            Msg::Credit { .. } => "Credit",
            Msg::Want { .. } => "Want",
            Msg::Changes { .. } => "Changes",
            Msg::Done { .. } => "Done",
            Msg::Nudge { .. } => "Nudge",
            Msg::Caught { .. } => "Caught",
            Msg::EmergencyRequest { .. } => "EmergencyRequest",
            Msg::EmergencyAnswer { .. } => "EmergencyAnswer",
            Msg::Candidates { .. } => "Candidates",
        }
    }
}

/// A chart id from a peer must be a valid chart id: it becomes part of a local key, a file
/// name in exports and a line in the audit log.
fn valid_chart(id: &str) -> Result<(), ProtocolError> {
    ChartId::parse(id)
        .map(|_| ())
        .map_err(|_| ProtocolError::Malformed("an invalid chart id".into()))
}

/// Whether a candidate address from a peer may be dialled: a unicast address of another
/// machine with a port. Loopback, unspecified, multicast, broadcast and reserved addresses
/// (240.0.0.0/4, which also holds relayed paths' virtual addresses) are refused, so a peer
/// cannot make this practice send packets to itself or to a group.
pub fn dialable(a: &std::net::SocketAddr) -> bool {
    use std::net::IpAddr;
    if a.port() == 0 {
        return false;
    }
    match a.ip() {
        IpAddr::V4(ip) => {
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || ip.is_broadcast()
                || ip.octets()[0] >= 240
                || ip.octets()[0] == 0)
        }
        IpAddr::V6(ip) => {
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || ip.to_ipv4_mapped().is_some())
        }
    }
}
