//! One paired peer's whole protocol: the link, our pulls of it, its pulls of us (and its
//! emergency requests), our emergency requests of it, and when to nudge it.
//!
//! Inputs arrive through the `handle_*` methods, each with the time; outputs are taken with
//! [`PeerSession::poll_output`] in order, and the next timer with [`PeerSession::poll_timeout`].
//! Nothing here blocks, reads a clock or touches a socket or the store.

use std::collections::{BTreeMap, VecDeque};

use super::link::{Link, Verdict};
use super::puller::{Ctx, Puller, Step as PullStep};
use super::responder::{Responder, Step as ServeStep};
use super::wire::*;
use super::{
    Answer, CloseCode, Closed, ConnId, EmergencyResult, LinkState, Output, Persist, Query, Rng,
    StreamId, TaskId, Time,
};
use crate::audit::AuditEvent;
use crate::ids::PracticeId;

/// While connected, a pull runs at least this often even without a nudge: a safety net
/// (costing three small messages when nothing changed) should a nudge ever go astray.
pub const PERIODIC_PULL_MS: u64 = 600_000;
/// A pull that failed while the connection lives is tried again after this long.
pub const PULL_RETRY_MS: u64 = 1_000;
/// A stream on which the peer says nothing for this long, while we wait on it, is abandoned.
pub const STALL_MS: u64 = 60_000;
/// Streams the peer may have open to us at once (a pull and an emergency request).
pub const MAX_SERVED_STREAMS: usize = 2;
/// How long an emergency request waits for its answer.
pub const EMERGENCY_TIMEOUT_MS: u64 = 15_000;
/// Protocol violations of one kind are audited once per this interval, with a count.
pub const REFUSAL_AUDIT_INTERVAL_MS: u64 = super::throttle::REFUSAL_INTERVAL_MS;
/// Violations within one interval past which the connection is closed.
pub const MAX_VIOLATIONS: u32 = 20;
/// Hole punching: at most one round of dials to the peer's candidates per this interval,
/// whatever the peer sends (a round asked for sooner waits for it).
pub const PUNCH_MIN_MS: u64 = 2_000;
/// While the connection stays relayed, the practice with the smaller id starts another round
/// (sending its candidates again, which makes the other side dial at the same moment) after
/// this long, doubling up to [`PUNCH_RETRY_MAX_MS`].
pub const PUNCH_RETRY_MS: u64 = 5_000;
pub const PUNCH_RETRY_MAX_MS: u64 = 60_000;

/// What the store remembers of a peer between sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerRecord {
    /// The peer's sequence applied here, and the peer's store incarnation it belongs to.
    pub checkpoint: u64,
    pub checkpoint_incarnation: Incarnation,
    /// Our sequence the peer confirmed holding.
    pub served_upto: u64,
    pub last_pull_ms: Option<i64>,
}

/// What `chartmesh status` shows of the session (the store adds counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStatus {
    pub link: LinkState,
    pub paused: bool,
    /// Our last pull over the live connection completed and none is running or due.
    pub pulled: bool,
    /// Our sequence the peer confirmed holding (it has everything up to it).
    pub served_upto: u64,
    pub checkpoint: u64,
    pub last_pull_ms: Option<i64>,
    pub last_error: Option<String>,
    pub backoff_ms: u64,
}

enum Role {
    Pull,
    Serve,
    Emergency(u64),
}

struct EmergencyCall {
    stream: StreamId,
    deadline: u64,
}

pub struct PeerSession {
    peer: PracticeId,
    peer_key: String,
    link: Link,
    record: PeerRecord,
    incarnation: Incarnation,
    served_mem: u64,
    rng: Rng,
    out: VecDeque<Output>,
    next_task: TaskId,
    next_stream: StreamId,
    streams: BTreeMap<StreamId, Role>,
    pull: Option<Puller>,
    pull_due: bool,
    /// When the due pull was asked for only by nudges during a running pull: what they
    /// announced (up to, incarnation). A running pull that reaches it makes it unneeded.
    due_cover: Option<(u64, Incarnation)>,
    pull_retry_at: Option<u64>,
    pulled: bool,
    /// When the last pull completed (monotonic), for the periodic pull.
    last_pull_done: u64,
    serves: BTreeMap<StreamId, Responder>,
    pending_check: Option<TaskId>,
    recheck: bool,
    emergencies: BTreeMap<u64, EmergencyCall>,
    next_emergency: u64,
    /// Refusals audited once per interval per kind, with a count.
    throttle: super::throttle::RefusalThrottle,
    /// Violations in the current interval (since `violations_since`).
    violations: u32,
    violations_since: u64,
    stopped: bool,
    punch: Punch,
}

/// Hole-punching state: the addresses each side may be reached at directly, and when to
/// dial the peer's.
#[derive(Default)]
struct Punch {
    /// This practice's candidates (the driver's STUN answer and interface addresses).
    local: Vec<std::net::SocketAddr>,
    /// The peer's, from its last `Candidates` (validated on decode).
    peer: Vec<std::net::SocketAddr>,
    /// Whether this side starts the periodic rounds (it has the smaller id).
    leader: bool,
    last: Option<u64>,
    /// A round asked for within [`PUNCH_MIN_MS`] of the last one, due then.
    due: Option<u64>,
    /// The leader's next round while still relayed, and the wait after it.
    next_round: Option<u64>,
    retry_ms: u64,
}

impl PeerSession {
    /// A session with `peer`, as this practice `me` whose store is of `incarnation`. `seed`
    /// seeds the random source (jitter, new incarnations).
    pub fn new(
        me: PracticeId,
        peer: PracticeId,
        record: PeerRecord,
        incarnation: Incarnation,
        seed: u64,
        now: Time,
    ) -> PeerSession {
        PeerSession {
            peer,
            peer_key: peer.to_string(),
            link: Link::new(me < peer, now.mono_ms),
            served_mem: record.served_upto,
            record,
            incarnation,
            rng: Rng::new(seed),
            out: VecDeque::new(),
            next_task: 0,
            next_stream: 0,
            streams: BTreeMap::new(),
            pull: None,
            pull_due: false,
            due_cover: None,
            pull_retry_at: None,
            pulled: false,
            last_pull_done: now.mono_ms,
            serves: BTreeMap::new(),
            pending_check: None,
            recheck: false,
            emergencies: BTreeMap::new(),
            next_emergency: 0,
            throttle: Default::default(),
            violations: 0,
            violations_since: 0,
            stopped: false,
            punch: Punch {
                leader: me < peer,
                retry_ms: PUNCH_RETRY_MS,
                ..Default::default()
            },
        }
    }

    pub fn peer(&self) -> PracticeId {
        self.peer
    }

    /// This store's incarnation as the session knows it (it draws a new one on a rollback).
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// This store took a new incarnation (another session found it rolled back).
    pub fn handle_new_incarnation(&mut self, incarnation: Incarnation) {
        if incarnation != self.incarnation {
            self.incarnation = incarnation;
            self.served_mem = 0;
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    fn ctx(
        &mut self,
        now: Time,
    ) -> (
        Ctx<'_>,
        &mut Option<Puller>,
        &mut BTreeMap<StreamId, Responder>,
    ) {
        (
            Ctx {
                out: &mut self.out,
                next_task: &mut self.next_task,
                peer: &self.peer_key,
                now,
            },
            &mut self.pull,
            &mut self.serves,
        )
    }

    // ---- time ----

    /// The monotonic time (ms) at which [`PeerSession::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t = self.link.next_timeout();
        let mut min = |x: Option<u64>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        if self.link.state() == LinkState::Up {
            min(self.pull_retry_at);
            if self.pull.is_none() {
                min(Some(self.last_pull_done + PERIODIC_PULL_MS));
            }
            if let Some(p) = &self.pull {
                min(Some(p.last_activity + STALL_MS));
            }
            for r in self.serves.values() {
                if !r.waiting_here() {
                    min(Some(r.last_activity + STALL_MS));
                }
            }
            if self.link.relayed() == Some(true) {
                min(self.punch.due);
                min(self.punch.next_round);
            }
        }
        for e in self.emergencies.values() {
            min(Some(e.deadline));
        }
        min(self.throttle.next_flush());
        t
    }

    pub fn handle_timeout(&mut self, now: Time) {
        let t = now.mono_ms;
        if self.link.poll_dial(t) {
            self.out.push_back(Output::Dial);
        }
        if self.pull_retry_at.is_some_and(|r| r <= t) {
            self.pull_retry_at = None;
            self.maybe_pull(now);
        }
        if self.link.state() == LinkState::Up
            && self.pull.is_none()
            && self.last_pull_done + PERIODIC_PULL_MS <= t
        {
            self.last_pull_done = t;
            self.pull_due = true;
            self.due_cover = None;
            self.maybe_pull(now);
        }
        if let Some(p) = &self.pull
            && p.last_activity + STALL_MS <= t
        {
            let s = p.stream;
            self.fail_pull(now, s, &ProtocolError::Stalled(STALL_MS / 1000).to_string());
        }
        let stalled: Vec<StreamId> = self
            .serves
            .iter()
            .filter(|(_, r)| !r.waiting_here() && r.last_activity + STALL_MS <= t)
            .map(|(s, _)| *s)
            .collect();
        for s in stalled {
            self.drop_stream(s, true);
        }
        let late: Vec<u64> = self
            .emergencies
            .iter()
            .filter(|(_, e)| e.deadline <= t)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.end_emergency(
                id,
                Err(format!(
                    "no answer within {} s",
                    EMERGENCY_TIMEOUT_MS / 1000
                )),
                true,
            );
        }
        if self.link.relayed() == Some(true) {
            if self.punch.due.is_some_and(|d| d <= t) {
                self.punch_now(t);
            }
            if self.punch.next_round.is_some_and(|r| r <= t) {
                self.punch.next_round = Some(t + self.punch.retry_ms);
                self.punch.retry_ms = (self.punch.retry_ms * 2).min(PUNCH_RETRY_MAX_MS);
                self.send_candidates();
                self.punch_now(t);
            }
        }
        let reports = self.throttle.flush(t);
        self.audit_reports(now, reports);
    }

    // ---- direct paths (hole punching) ----

    /// This practice's candidate addresses changed (a new STUN answer, an interface
    /// address): while relayed, the peer is told at once, and both sides dial again.
    pub fn set_local_candidates(&mut self, now: Time, mut addrs: Vec<std::net::SocketAddr>) {
        addrs.retain(dialable);
        addrs.dedup();
        addrs.truncate(MAX_CANDIDATES);
        if addrs == self.punch.local {
            return;
        }
        self.punch.local = addrs;
        if self.link.relayed() == Some(true) {
            self.send_candidates();
            self.punch_now(now.mono_ms);
        }
    }

    fn send_candidates(&mut self) {
        if !self.punch.local.is_empty() {
            self.out.push_back(Output::Control {
                msg: Msg::Candidates {
                    addrs: self.punch.local.clone(),
                },
            });
        }
    }

    /// Dials the peer's candidates now, or as soon as the rate limit allows; only while
    /// the live connection is relayed.
    fn punch_now(&mut self, t: u64) {
        if self.link.relayed() != Some(true) || self.punch.peer.is_empty() {
            self.punch.due = None;
            return;
        }
        if let Some(last) = self.punch.last
            && last + PUNCH_MIN_MS > t
        {
            self.punch.due = Some(last + PUNCH_MIN_MS);
            return;
        }
        self.punch.last = Some(t);
        self.punch.due = None;
        self.out.push_back(Output::Punch {
            addrs: self.punch.peer.clone(),
        });
    }

    /// The peer's candidate addresses, as it last sent them.
    pub fn peer_candidates(&self) -> &[std::net::SocketAddr] {
        &self.punch.peer
    }

    /// Whether the live connection runs through the relay (None: not connected).
    pub fn relayed(&self) -> Option<bool> {
        self.link.relayed()
    }

    // ---- the link ----

    /// A dial (asked for with `Output::Dial`) failed.
    pub fn handle_dial_failed(&mut self, now: Time, why: String) {
        self.link.dial_failed(now.mono_ms, &mut self.rng, why);
    }

    /// A direct connection to the peer is up: dialled by us (`dialed`) or accepted.
    pub fn handle_connected(&mut self, now: Time, conn: ConnId, dialed: bool) {
        self.handle_connected_via(now, conn, dialed, false)
    }

    /// A connection to the peer is up: dialled by us (`dialed`) or accepted, through the
    /// relay (`relayed`) or direct (a direct one is preferred: `link`).
    pub fn handle_connected_via(&mut self, now: Time, conn: ConnId, dialed: bool, relayed: bool) {
        if self.stopped {
            self.out.push_back(Output::Close {
                conn,
                code: CloseCode::Unpaired,
            });
            return;
        }
        match self.link.connected(now.mono_ms, conn, dialed, relayed) {
            Verdict::Reject(code) => self.out.push_back(Output::Close { conn, code }),
            verdict => {
                if let Verdict::Replace(old) = verdict {
                    self.out.push_back(Output::Close {
                        conn: old,
                        code: CloseCode::Duplicate,
                    });
                    self.connection_gone(now, "replaced by a new connection");
                }
                self.pulled = false;
                self.pull_due = true;
                self.due_cover = None;
                self.pull_retry_at = None;
                self.maybe_pull(now);
                // Tell it at once whether we hold anything it needs.
                self.handle_local_commit(now);
                self.punch.due = None;
                if relayed {
                    // Through the relay: tell the peer where we may be reached directly;
                    // it does the same, and each side dials the other's as they arrive.
                    self.punch.peer.clear();
                    self.punch.retry_ms = PUNCH_RETRY_MS;
                    self.punch.next_round =
                        self.punch.leader.then_some(now.mono_ms + PUNCH_RETRY_MS);
                    self.send_candidates();
                } else {
                    self.punch.next_round = None;
                }
            }
        }
    }

    /// A connection ended (`why` as the driver learnt it).
    pub fn handle_connection_lost(&mut self, now: Time, conn: ConnId, why: Closed) {
        if self.link.lost(now.mono_ms, &mut self.rng, conn, &why) {
            self.connection_gone(now, "connection lost");
        }
    }

    fn connection_gone(&mut self, _now: Time, why: &str) {
        self.pull = None;
        self.pulled = false;
        self.pull_retry_at = None;
        self.serves.clear();
        self.streams.clear();
        self.pending_check = None;
        self.recheck = false;
        let ids: Vec<u64> = self.emergencies.keys().copied().collect();
        for id in ids {
            self.end_emergency(id, Err(why.to_string()), false);
        }
    }

    /// Pauses sync with the peer (the connection is closed, no dialling, its connections
    /// refused) or resumes it.
    pub fn set_paused(&mut self, now: Time, paused: bool) {
        if let Some(conn) = self.link.set_paused(now.mono_ms, paused) {
            self.out.push_back(Output::Close {
                conn,
                code: CloseCode::Paused,
            });
            self.connection_gone(now, "sync paused");
        }
    }

    /// The peer may be reachable now (its address changed, it was paired again): dial at once.
    pub fn dial_soon(&mut self, now: Time) {
        self.link.dial_soon(now.mono_ms);
    }

    /// Ends the session for good (unpaired, or shutting down with `code`).
    pub fn stop(&mut self, now: Time, code: CloseCode) {
        self.stopped = true;
        if let Some(conn) = self.link.stop() {
            self.out.push_back(Output::Close { conn, code });
        }
        self.connection_gone(now, "stopped");
    }

    // ---- streams ----

    /// The peer opened a stream to us on the live connection. None: refuse it (too many open).
    pub fn handle_stream_accepted(&mut self, now: Time) -> Option<StreamId> {
        if self.link.state() != LinkState::Up || self.serves.len() >= MAX_SERVED_STREAMS {
            return None;
        }
        self.next_stream += 1;
        let s = self.next_stream;
        self.streams.insert(s, Role::Serve);
        self.serves
            .insert(s, Responder::new(s, self.incarnation, now.mono_ms));
        Some(s)
    }

    /// Whether the session still uses a stream (the driver drops the ones it no longer does).
    pub fn has_stream(&self, stream: StreamId) -> bool {
        self.streams.contains_key(&stream)
    }

    /// The largest frame to accept on a stream.
    pub fn read_limit(&self, stream: StreamId) -> usize {
        match self.streams.get(&stream) {
            Some(Role::Serve) => MAX_REQUEST,
            _ => MAX_MESSAGE,
        }
    }

    /// Whether the session wants the next message of this stream now.
    pub fn wants_read(&self, stream: StreamId) -> bool {
        match self.streams.get(&stream) {
            Some(Role::Pull) => self
                .pull
                .as_ref()
                .is_some_and(|p| p.stream == stream && p.wants_read()),
            Some(Role::Serve) => self.serves.get(&stream).is_some_and(|r| r.wants_read()),
            Some(Role::Emergency(_)) => true,
            None => false,
        }
    }

    /// A message read from a stream.
    pub fn handle_message(&mut self, now: Time, stream: StreamId, msg: Msg) {
        self.link.proven();
        match self.streams.get(&stream) {
            Some(Role::Pull) => {
                let (mut ctx, pull, _) = self.ctx(now);
                let Some(p) = pull.as_mut().filter(|p| p.stream == stream) else {
                    return;
                };
                let step = p.handle_message(&mut ctx, msg);
                self.after_pull_step(now, stream, step);
            }
            Some(Role::Serve) => {
                let (mut ctx, _, serves) = self.ctx(now);
                let Some(r) = serves.get_mut(&stream) else {
                    return;
                };
                let step = r.handle_message(&mut ctx, msg);
                self.after_serve_step(now, stream, step);
            }
            Some(Role::Emergency(id)) => {
                let id = *id;
                let result = match msg {
                    Msg::EmergencyAnswer { answer } => Ok(answer),
                    Msg::Unsupported { version } => Err(format!(
                        "the practice speaks protocol {version} and cannot answer emergency requests"
                    )),
                    other => Err(format!("unexpected {} in answer", other.name())),
                };
                self.end_emergency(id, result, false);
            }
            None => {}
        }
    }

    /// A frame could not be read or decoded (oversized, truncated, malformed).
    pub fn handle_stream_error(&mut self, now: Time, stream: StreamId, err: ProtocolError) {
        match self.streams.get(&stream) {
            Some(Role::Pull) => {
                self.violation(now, "pull", &err);
                self.fail_pull(now, stream, &err.to_string());
            }
            Some(Role::Serve) => {
                self.violation(now, "serve", &err);
                self.drop_stream(stream, true);
            }
            Some(Role::Emergency(id)) => {
                let id = *id;
                self.end_emergency(id, Err(err.to_string()), true);
            }
            None => {}
        }
    }

    /// The peer ended a stream (or it failed to open, or it was reset).
    pub fn handle_stream_end(&mut self, now: Time, stream: StreamId, why: Option<String>) {
        match self.streams.get(&stream) {
            Some(Role::Pull) => self.fail_pull(
                now,
                stream,
                why.as_deref()
                    .unwrap_or("the peer ended the pull before it was complete"),
            ),
            Some(Role::Serve) => self.drop_stream(stream, false),
            Some(Role::Emergency(id)) => {
                let id = *id;
                self.end_emergency(
                    id,
                    Err(why.unwrap_or_else(|| {
                        "the practice closed the request without an answer".into()
                    })),
                    false,
                );
            }
            None => {}
        }
    }

    /// A message queued with `Send`/`SendAudited` on this stream was written.
    pub fn handle_sent(&mut self, now: Time, stream: StreamId) {
        let (mut ctx, _, serves) = self.ctx(now);
        if let Some(r) = serves.get_mut(&stream) {
            r.handle_sent(&mut ctx);
        }
    }

    /// A control message on its own unidirectional stream.
    pub fn handle_control(&mut self, now: Time, msg: Msg) {
        self.link.proven();
        match msg {
            Msg::Nudge { upto } => {
                // During a pull, a nudge whose changes that pull turns out to cover needs
                // no second pull (the nudge is sent at connect too, as the pull starts).
                self.due_cover = match (self.pull.is_some(), self.pull_due, upto) {
                    (true, false, Some(u)) => Some(u),
                    (true, true, Some((u, inc))) => self
                        .due_cover
                        .filter(|c| c.1 == inc)
                        .map(|c| (c.0.max(u), inc)),
                    _ => None,
                };
                self.pull_due = true;
                self.maybe_pull(now);
            }
            // Nothing of the peer's up to `upto` is for us: move the checkpoint there, unless
            // a pull is running or due (which moves it anyway).
            Msg::Caught { upto, incarnation }
                if self.pull.is_none()
                    && !self.pull_due
                    && self.pulled
                    && incarnation == self.record.checkpoint_incarnation
                    && upto > self.record.checkpoint =>
            {
                self.record.checkpoint = upto;
                self.out
                    .push_back(Output::Persist(Persist::Checkpoint { upto, incarnation }));
            }
            // Checked on decode: at most MAX_CANDIDATES dialable addresses. Only these are
            // ever dialled, and only while the connection is relayed (a direct one needs
            // nothing better); the pinned handshake refuses whoever else answers.
            Msg::Candidates { mut addrs } if self.link.relayed() == Some(true) => {
                addrs.retain(dialable);
                addrs.truncate(MAX_CANDIDATES);
                self.punch.peer = addrs;
                self.punch_now(now.mono_ms);
            }
            _ => {}
        }
    }

    fn drop_stream(&mut self, stream: StreamId, reset: bool) {
        self.streams.remove(&stream);
        self.serves.remove(&stream);
        if reset {
            self.out.push_back(Output::Reset { stream });
        }
    }

    // ---- our pull of the peer ----

    fn maybe_pull(&mut self, now: Time) {
        if self.link.state() != LinkState::Up
            || !self.pull_due
            || self.pull.is_some()
            || self.pull_retry_at.is_some()
        {
            return;
        }
        self.pull_due = false;
        self.due_cover = None;
        self.next_stream += 1;
        let stream = self.next_stream;
        self.streams.insert(stream, Role::Pull);
        let (since, inc) = (self.record.checkpoint, self.record.checkpoint_incarnation);
        let (mut ctx, pull, _) = self.ctx(now);
        *pull = Some(Puller::start(&mut ctx, stream, since, inc));
    }

    fn fail_pull(&mut self, now: Time, stream: StreamId, why: &str) {
        if self.pull.as_ref().is_some_and(|p| p.stream == stream) {
            self.pull = None;
            self.streams.remove(&stream);
            self.out.push_back(Output::Reset { stream });
            self.link.last_error = Some(format!("pull failed: {why}"));
            self.pull_due = true;
            self.due_cover = None;
            self.pulled = false;
            if self.link.state() == LinkState::Up {
                self.pull_retry_at = Some(now.mono_ms + PULL_RETRY_MS);
            }
        }
    }

    fn after_pull_step(
        &mut self,
        now: Time,
        stream: StreamId,
        step: Result<PullStep, ProtocolError>,
    ) {
        match step {
            Ok(PullStep::Continue) => {}
            Ok(PullStep::Complete {
                upto,
                incarnation,
                stats,
            }) => {
                self.pull = None;
                self.streams.remove(&stream);
                self.pulled = true;
                self.last_pull_done = now.mono_ms;
                self.link.proven();
                self.record.last_pull_ms = Some(now.wall_ms);
                if upto != self.record.checkpoint
                    || incarnation != self.record.checkpoint_incarnation
                {
                    self.record.checkpoint = upto;
                    self.record.checkpoint_incarnation = incarnation;
                    self.out
                        .push_back(Output::Persist(Persist::Checkpoint { upto, incarnation }));
                }
                self.out.push_back(Output::Pulled { stats });
                if let Some((u, inc)) = self.due_cover.take()
                    && inc == incarnation
                    && u <= upto
                {
                    self.pull_due = false;
                }
                // A nudge that arrived during the pull asks for another.
                self.maybe_pull(now);
            }
            Ok(PullStep::RolledBack) => {
                // Our checkpoint is ahead of the peer's store: start again from nothing.
                self.record.checkpoint = 0;
                self.out.push_back(Output::Persist(Persist::Checkpoint {
                    upto: 0,
                    incarnation: self.record.checkpoint_incarnation,
                }));
                self.fail_pull(
                    now,
                    stream,
                    "the peer's store was rolled back; pulling everything again",
                );
            }
            Err(e) => {
                self.violation(now, "pull", &e);
                self.fail_pull(now, stream, &e.to_string());
            }
        }
    }

    // ---- the peer's pulls of us ----

    fn after_serve_step(
        &mut self,
        now: Time,
        stream: StreamId,
        step: Result<ServeStep, ProtocolError>,
    ) {
        match step {
            Ok(ServeStep::Continue) => {}
            Ok(ServeStep::Finished) => {
                self.streams.remove(&stream);
                self.serves.remove(&stream);
            }
            Ok(ServeStep::Served(upto)) => {
                self.served_mem = self.served_mem.max(upto);
                self.streams.remove(&stream);
                self.serves.remove(&stream);
            }
            Ok(ServeStep::RolledBack) => {
                let incarnation = self.rng.next_u64();
                self.incarnation = incarnation;
                self.served_mem = 0;
                self.out
                    .push_back(Output::Persist(Persist::NewIncarnation { incarnation }));
                self.out.push_back(Output::Audit(vec![
                    AuditEvent::new(now.wall_ms, "sync", "rollback")
                        .peer(self.peer_key.clone())
                        .detail("the peer's checkpoint is past this store's sequence: the store was rolled back; a new incarnation was drawn and peers pull everything again"),
                ]));
                let (mut ctx, _, serves) = self.ctx(now);
                if let Some(r) = serves.get_mut(&stream) {
                    r.replan(&mut ctx, incarnation);
                }
            }
            Err(e) => {
                self.violation(now, "serve", &e);
                self.drop_stream(stream, true);
            }
        }
    }

    /// A protocol violation by the peer: each kind audited once per interval, repeats with a
    /// count; too many in one interval close the connection.
    fn violation(&mut self, now: Time, role: &'static str, err: &ProtocolError) {
        let t = now.mono_ms;
        // The kind is the message without its numbers, so "5120 unsettled" and "4097
        // unsettled" count as one kind.
        let kind: String = format!("{role}: {err}")
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(120)
            .collect();
        let reports = self.throttle.note(&kind, t);
        let reports = reports
            .into_iter()
            .map(|mut r| {
                if r.first {
                    r.key = format!("protocol: {err}");
                }
                r
            })
            .collect();
        self.audit_reports(now, reports);
        if self.violations_since + REFUSAL_AUDIT_INTERVAL_MS <= t {
            self.violations = 0;
            self.violations_since = t;
        }
        self.violations += 1;
        if self.violations >= MAX_VIOLATIONS
            && let Some(conn) = self.link.conn()
        {
            self.out.push_back(Output::Close {
                conn,
                code: CloseCode::Protocol,
            });
            self.link
                .lost(now.mono_ms, &mut self.rng, conn, &Closed::Refused);
            self.connection_gone(now, "protocol violations");
        }
    }

    fn audit_reports(&mut self, now: Time, reports: Vec<super::throttle::Report>) {
        if reports.is_empty() {
            return;
        }
        let events = reports
            .into_iter()
            .map(|r| {
                let detail = if r.first {
                    r.key
                } else {
                    format!(
                        "protocol ({}): {} more in the last {} min",
                        r.key,
                        r.count,
                        REFUSAL_AUDIT_INTERVAL_MS / 60_000
                    )
                };
                AuditEvent::new(now.wall_ms, "sync", "refuse")
                    .peer(self.peer_key.clone())
                    .detail(detail)
            })
            .collect();
        self.out.push_back(Output::Audit(events));
    }

    // ---- the store ----

    /// The store answered a query.
    pub fn handle_answer(&mut self, now: Time, task: TaskId, answer: Answer) {
        if self.pending_check == Some(task) {
            self.pending_check = None;
            self.nudge_decision(now, answer);
            return;
        }
        if self.pull.as_ref().is_some_and(|p| p.owns_task(task)) {
            let (mut ctx, pull, _) = self.ctx(now);
            let p = pull.as_mut().expect("owner");
            let stream = p.stream;
            let step = match answer {
                Answer::Local(here) => p.handle_local(&mut ctx, here),
                Answer::Failed(e) => Err(ProtocolError::Malformed(format!("store: {e}"))),
                _ => Ok(PullStep::Continue),
            };
            match step {
                // A store failure is ours, not the peer's: fail the pull without a refusal.
                Err(ProtocolError::Malformed(e)) if e.starts_with("store: ") => {
                    self.fail_pull(now, stream, &e)
                }
                step => self.after_pull_step(now, stream, step),
            }
            return;
        }
        let owner = self
            .serves
            .iter()
            .find(|(_, r)| r.owns_task(task))
            .map(|(s, _)| *s);
        if let Some(stream) = owner {
            let (mut ctx, _, serves) = self.ctx(now);
            let r = serves.get_mut(&stream).expect("owner");
            match r.handle_answer(&mut ctx, task, answer) {
                Ok(step) => self.after_serve_step(now, stream, Ok(step)),
                Err(_) => self.drop_stream(stream, true),
            }
        }
    }

    /// An apply is durable (`Ok`) or failed as a whole (`Err`: nothing of it was written).
    pub fn handle_applied(&mut self, now: Time, task: TaskId, result: Result<(), String>) {
        if !self.pull.as_ref().is_some_and(|p| p.owns_task(task)) {
            return;
        }
        let stream = self.pull.as_ref().expect("pull").stream;
        match result {
            Ok(()) => {
                let (mut ctx, pull, _) = self.ctx(now);
                let step = pull.as_mut().expect("pull").handle_applied(&mut ctx, task);
                self.after_pull_step(now, stream, Ok(step));
            }
            Err(e) => self.fail_pull(now, stream, &format!("applying failed: {e}")),
        }
    }

    /// Something was committed here: tell the peer to pull, or that nothing of it is for it.
    pub fn handle_local_commit(&mut self, _now: Time) {
        if self.link.state() != LinkState::Up {
            return;
        }
        if self.pending_check.is_some() {
            self.recheck = true;
            return;
        }
        self.next_task += 1;
        let task = self.next_task;
        self.pending_check = Some(task);
        self.out.push_back(Output::Query {
            task,
            query: Query::Pending {
                since: self.served_mem,
            },
        });
    }

    fn nudge_decision(&mut self, now: Time, answer: Answer) {
        if self.link.state() == LinkState::Up {
            match answer {
                Answer::Pending {
                    pending: false,
                    upto,
                } => {
                    // Nothing it may need since it last confirmed (e.g. only the changes it
                    // just sent us): it moves its checkpoint without a pull.
                    self.served_mem = self.served_mem.max(upto);
                    self.out.push_back(Output::Control {
                        msg: Msg::Caught {
                            upto,
                            incarnation: self.incarnation,
                        },
                    });
                }
                Answer::Pending { upto, .. } => self.out.push_back(Output::Control {
                    msg: Msg::Nudge {
                        upto: Some((upto, self.incarnation)),
                    },
                }),
                _ => self.out.push_back(Output::Control {
                    msg: Msg::Nudge { upto: None },
                }),
            }
        }
        if std::mem::take(&mut self.recheck) {
            self.handle_local_commit(now);
        }
    }

    // ---- emergency requests ----

    /// Sends an emergency request to the peer; the answer comes as `Output::EmergencyDone`.
    pub fn request_emergency(
        &mut self,
        now: Time,
        request: crate::emergency::Request,
    ) -> Result<u64, String> {
        if self.link.state() != LinkState::Up {
            return Err("not connected".into());
        }
        self.next_emergency += 1;
        let id = self.next_emergency;
        self.next_stream += 1;
        let stream = self.next_stream;
        self.streams.insert(stream, Role::Emergency(id));
        self.emergencies.insert(
            id,
            EmergencyCall {
                stream,
                deadline: now.mono_ms + EMERGENCY_TIMEOUT_MS,
            },
        );
        self.out.push_back(Output::Open { stream });
        self.out.push_back(Output::Send {
            stream,
            msg: Msg::EmergencyRequest {
                version: PROTOCOL_VERSION,
                request,
            },
        });
        self.out.push_back(Output::Finish { stream });
        Ok(id)
    }

    fn end_emergency(&mut self, id: u64, result: EmergencyResult, reset: bool) {
        if let Some(call) = self.emergencies.remove(&id) {
            self.streams.remove(&call.stream);
            if reset {
                self.out.push_back(Output::Reset {
                    stream: call.stream,
                });
            }
            self.out.push_back(Output::EmergencyDone { id, result });
        }
    }

    /// This practice's policy decided the peer's emergency request on `stream`.
    pub fn handle_emergency_decision(
        &mut self,
        now: Time,
        stream: StreamId,
        answer: crate::emergency::Answer,
    ) {
        let (mut ctx, _, serves) = self.ctx(now);
        if let Some(r) = serves.get_mut(&stream) {
            let step = r.handle_emergency_decision(&mut ctx, answer);
            self.after_serve_step(now, stream, Ok(step));
        }
    }

    // ---- status ----

    pub fn status(&self) -> SessionStatus {
        SessionStatus {
            link: self.link.state(),
            paused: self.link.paused,
            pulled: self.pulled && self.pull.is_none() && !self.pull_due,
            served_upto: self.served_mem,
            checkpoint: self.record.checkpoint,
            last_pull_ms: self.record.last_pull_ms,
            last_error: self.link.last_error.clone(),
            backoff_ms: self.link.backoff_ms(),
        }
    }

    /// The live connection, if any.
    pub fn conn(&self) -> Option<ConnId> {
        self.link.conn()
    }
}
