//! The sync protocol between two practices, without I/O (docs/PROTOCOL.md).
//!
//! Owns: every protocol decision per peer — the messages and their limits ([`wire`]), the
//! puller and the responder of a pull, the link (dialling, backoff, which of two duplicate
//! connections to keep, when a connection has proven itself), when to nudge a peer or tell it
//! it is caught up, and the consent check of every item offered, sent and applied (asked of
//! [`crate::consent`]). One [`PeerSession`] per paired practice holds all of it.
//! Must not touch: sockets, files, the store, clocks or randomness. The driver (the daemon's
//! `sync` module, or the simulated mesh in the tests) feeds a session what happened — messages
//! read, store answers, applies made durable, connections made and lost, the time — through
//! its `handle_*` methods, and carries out what [`PeerSession::poll_output`] returns: send a
//! message, query or write the store, audit, dial, close. Time comes in as [`Time`]; the
//! random source is seeded by the driver, so a session replays exactly.
//!
//! A session runs two pulls in opposite directions over one connection. A pull:
//! `Pull{since}` → `Offer{items}`… (paced by `Credit`) `OfferEnd{upto}`, interleaved with
//! `Want{charts}`… → `Changes{…}`…; when everything offered is durable, `Done{upto}`. The puller
//! stores `upto` as its checkpoint only when every offered item has been applied durably, so
//! an interrupted pull is redone from the old checkpoint; re-applying a change is a no-op in
//! automerge, so nothing is lost or duplicated.

mod link;
pub mod portmap;
mod puller;
mod responder;
mod rng;
mod session;
pub mod throttle;
pub mod wire;

#[cfg(test)]
mod tests;

pub use link::{
    Backoff, CloseCode, Closed, LinkState, RelayState, Route, routes, unreachable_reason,
};
pub use puller::PullStats;
pub use rng::Rng;
pub use session::{
    PUNCH_MIN_MS, PUNCH_RETRY_MAX_MS, PUNCH_RETRY_MS, PeerRecord, PeerSession, SessionStatus,
};
pub use wire::*;

use crate::audit::AuditEvent;
use crate::consent::{Access, Grant};

/// The time as the driver sees it: a monotonic clock for timers and back-off, and the wall
/// clock for consent (grant expiry). Both in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time {
    pub mono_ms: u64,
    pub wall_ms: i64,
}

/// A stream of the live connection, numbered by the session.
pub type StreamId = u64;
/// A connection, numbered by the driver.
pub type ConnId = u64;
/// A store query or write, numbered by the session.
pub type TaskId = u64;

/// What the puller knows of one of its charts (by local key), for comparing with an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalChart {
    pub heads: Vec<[u8; 32]>,
    /// Already marked revoked here.
    pub revoked: bool,
    pub access: Option<Access>,
    pub expires_ms: Option<i64>,
}

/// A chart as the responder's store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartRow {
    /// The local key: the chart id for this practice's own charts, `id@custodian` for a copy.
    pub key: String,
    /// The chart id (the same at every practice).
    pub chart: String,
    pub seq: u64,
    pub heads: Vec<[u8; 32]>,
    /// None: this practice's own chart; Some(peer): received from that peer.
    pub origin: Option<String>,
    /// For a received chart: the grant it is held under.
    pub access: Option<Access>,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
}

impl ChartRow {
    /// How this practice holds the chart, if it is a copy of another practice's.
    pub fn held(&self) -> Option<crate::consent::Held<'_>> {
        self.origin
            .as_deref()
            .map(|custodian| crate::consent::Held {
                custodian,
                access: self.access,
                expires_ms: self.expires_ms,
                revoked_ms: self.revoked_ms,
            })
    }
}

/// What a responder may offer a peer after its checkpoint, as the store pre-selects it.
/// Consent is decided here, in the session, for every row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidates {
    /// The store's sequence when the candidates were read (the offer covers up to it).
    pub upto: u64,
    /// The peer's grants as stored now (revoked and expired ones included).
    pub grants: Vec<Grant>,
    /// Chart ids (or `*`) of the peer's grants recorded, changed, revoked or expired after
    /// the checkpoint.
    pub changed_grants: Vec<String>,
    /// This practice's own charts changed after the checkpoint, or whose grant changed.
    pub own: Vec<ChartRow>,
    /// Copies of the peer's own charts held here that changed here after the checkpoint.
    pub returned: Vec<ChartRow>,
}

/// One wanted chart for the store to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchItem {
    pub key: String,
    pub chart: String,
    pub returned: bool,
    pub have: Vec<[u8; 32]>,
}

/// One chart read by the store for a fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub item: FetchItem,
    /// The chart's row as stored now (None: not here).
    pub row: Option<ChartRow>,
    /// The stored document, or the changes after `have`; an error if it could not be read.
    pub data: Result<Option<Vec<u8>>, String>,
}

/// A question for the store, answered with [`PeerSession::handle_answer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Puller: what this practice holds of these charts (local keys), in order.
    Local { keys: Vec<String> },
    /// Responder: what may be offered after `since` (see [`Candidates`]).
    Candidates { since: u64 },
    /// Responder: read these charts, in order, until `budget` bytes are read; the rest is
    /// answered as not read.
    Fetch {
        items: Vec<FetchItem>,
        budget: usize,
    },
    /// Whether anything changed after `since` that the peer may need (a pre-selection:
    /// a wrong "yes" costs a pull, never a disclosure).
    Pending { since: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Local(Vec<Option<LocalChart>>),
    Candidates(Candidates),
    /// The charts read, the peer's grants as stored at that read, and the items not read.
    Fetched {
        grants: Vec<Grant>,
        items: Vec<Fetched>,
        rest: Vec<FetchItem>,
    },
    Pending {
        pending: bool,
        upto: u64,
    },
    /// The store could not answer.
    Failed(String),
}

/// One thing received to apply durably.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The local key it is filed under.
    pub key: String,
    pub chart: String,
    pub kind: Offered,
    /// Changes (or the whole document); None for a change of grant or a revocation only.
    pub data: Option<Vec<u8>>,
    /// The pull acted on the chart as held here when it was looked up (a want named its
    /// heads, or only its grant is updated). If it is gone by the time it is applied (an
    /// emergency access ended meanwhile), the store fails the apply and the pull is redone
    /// from the old checkpoint, rather than refusing the item and moving past it.
    pub held: bool,
}

/// What to write to the store in one transaction: items received from `peer`. The store
/// checks consent again inside that transaction, with the grants as stored at that moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyPlan {
    pub items: Vec<Incoming>,
}

impl ApplyPlan {
    pub fn bytes(&self) -> usize {
        self.items
            .iter()
            .map(|i| i.data.as_ref().map_or(0, |d| d.len()))
            .sum()
    }
}

/// Bookkeeping the session asks the store to keep (not awaited: losing one in a crash only
/// makes the next pull start earlier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// Everything the peer offered up to `upto` of its store `incarnation` is durable here.
    Checkpoint { upto: u64, incarnation: Incarnation },
    /// The peer confirmed holding everything of ours up to `upto`.
    Served { upto: u64 },
    /// This store was found rolled back: draw a new incarnation, so that every peer's
    /// checkpoint of it is reset. The session continues under `incarnation`.
    NewIncarnation { incarnation: Incarnation },
}

/// Why an emergency request failed at the requester.
pub type EmergencyResult = Result<crate::emergency::Answer, String>;

/// What the session asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Dial the peer; report with `handle_connected` or `handle_dial_failed`.
    Dial,
    /// Close a connection with this code.
    Close {
        conn: ConnId,
        code: CloseCode,
    },
    /// Open a bidirectional stream on the live connection, known as `stream`; report failure
    /// with `handle_stream_end`.
    Open {
        stream: StreamId,
    },
    /// Write one message on a stream; report with `handle_sent` once written.
    Send {
        stream: StreamId,
        msg: Msg,
    },
    /// Append `audit` durably, then write the message (a chart never leaves unaudited).
    SendAudited {
        stream: StreamId,
        msg: Msg,
        audit: Vec<AuditEvent>,
    },
    /// End our side of a stream after what was sent.
    Finish {
        stream: StreamId,
    },
    /// Abandon a stream at once, both directions.
    Reset {
        stream: StreamId,
    },
    /// Send one control message on a new unidirectional stream.
    Control {
        msg: Msg,
    },
    /// Ask the store; answer with `handle_answer(task, …)`.
    Query {
        task: TaskId,
        query: Query,
    },
    /// Apply durably; report with `handle_applied(task, …)`.
    Apply {
        task: TaskId,
        plan: ApplyPlan,
    },
    Persist(Persist),
    /// Append these audit entries.
    Audit(Vec<AuditEvent>),
    /// Decide an emergency request with this practice's policy; answer with
    /// `handle_emergency_decision(stream, …)`.
    DecideEmergency {
        stream: StreamId,
        request: crate::emergency::Request,
    },
    /// The answer (or failure) of an emergency request made with `request_emergency`.
    EmergencyDone {
        id: u64,
        result: EmergencyResult,
    },
    /// A pull from the peer completed (for logs and status).
    Pulled {
        stats: PullStats,
    },
    /// Hole punching: dial these addresses of the peer (it dials ours at about the same
    /// moment, so both NATs open), each for a few seconds; report a connection with
    /// `handle_connected_via(…, dialed: true, relayed: false)`, nothing on failure.
    Punch {
        addrs: Vec<std::net::SocketAddr>,
    },
}
