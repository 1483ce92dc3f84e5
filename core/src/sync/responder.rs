//! The responder: answers one pull (or one emergency request) on a stream the peer opened.
//!
//! Every item offered is decided by [`crate::consent`] from what the store pre-selected; every
//! chart sent is decided again from the chart's row and the peer's grants read together with
//! the chart's bytes. A `Want` may name only what this stream offered and has not sent yet:
//! anything else is a protocol violation that ends the stream (so a flood of wants for unknown
//! or repeated charts costs one refusal, not one per item).
//!
//! Memory per stream is bounded whatever the peer sends: the planned offer (this practice's
//! own data), at most two `Want` messages' items waiting, and one fetch of about
//! [`CHANGES_TARGET`] bytes (plus one chart) in flight; reading stops while wants wait.

use std::collections::{HashMap, VecDeque};

use super::puller::Ctx;
use super::wire::*;
use super::{Answer, Candidates, FetchItem, Fetched, Output, Persist, Query, StreamId, TaskId};
use crate::audit::AuditEvent;
use crate::consent::{self, Grant};

/// Sends queued on a stream and not yet written, past which the responder produces no more.
const MAX_WRITES: usize = 2;

#[derive(Debug)]
enum State {
    /// Waiting for `Pull` or `EmergencyRequest`.
    First,
    /// The store is reading the candidates (`checked`: the puller's checkpoint is of our
    /// current incarnation, so a checkpoint past our sequence means we were rolled back).
    Planning {
        task: TaskId,
        since: u64,
        checked: bool,
    },
    Serving,
    Emergency,
    Finished,
}

/// What a responder step came to, for the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Continue,
    /// The pull is over (Done received, or the version was not ours).
    Finished,
    /// The puller confirmed everything up to this sequence of ours.
    Served(u64),
    /// The puller's checkpoint of this store is past its sequence under the same incarnation:
    /// this store was rolled back. The session draws a new incarnation.
    RolledBack,
}

pub(crate) struct Responder {
    pub stream: StreamId,
    state: State,
    upto: u64,
    incarnation: Incarnation,
    pending: VecDeque<OfferItem>,
    /// Offered on this stream and not wanted yet: (chart, returned) → local key.
    offered: HashMap<(String, bool), String>,
    sent_items: u64,
    credited: u64,
    end_sent: bool,
    wants: VecDeque<FetchItem>,
    fetching: Option<TaskId>,
    writes: usize,
    pub last_activity: u64,
}

impl Responder {
    pub fn new(stream: StreamId, incarnation: Incarnation, now: u64) -> Responder {
        Responder {
            stream,
            state: State::First,
            upto: 0,
            incarnation,
            pending: VecDeque::new(),
            offered: HashMap::new(),
            sent_items: 0,
            credited: 0,
            end_sent: false,
            wants: VecDeque::new(),
            fetching: None,
            writes: 0,
            last_activity: now,
        }
    }

    pub fn wants_read(&self) -> bool {
        match self.state {
            State::First => true,
            State::Serving => self.wants.len() < WANT_CHUNK,
            _ => false,
        }
    }

    /// Whether the responder waits on this practice (its store or its policy) rather than on
    /// the peer: such a wait is not the peer stalling.
    pub fn waiting_here(&self) -> bool {
        matches!(self.state, State::Planning { .. } | State::Emergency) || self.fetching.is_some()
    }

    pub fn owns_task(&self, task: TaskId) -> bool {
        self.fetching == Some(task)
            || matches!(self.state, State::Planning { task: t, .. } if t == task)
    }

    pub fn handle_message(&mut self, ctx: &mut Ctx<'_>, msg: Msg) -> Result<Step, ProtocolError> {
        self.last_activity = ctx.now.mono_ms;
        match (&self.state, msg) {
            (
                State::First,
                Msg::Pull {
                    version,
                    since,
                    incarnation,
                    ..
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    return Ok(self.unsupported(ctx));
                }
                let checked = incarnation == self.incarnation;
                // A checkpoint of another incarnation of this store (taken before it was
                // restored) means nothing here: offer everything.
                let since = if checked { since } else { 0 };
                let task = ctx.task();
                ctx.push(Output::Query {
                    task,
                    query: Query::Candidates { since },
                });
                self.state = State::Planning {
                    task,
                    since,
                    checked,
                };
                Ok(Step::Continue)
            }
            (State::First, Msg::EmergencyRequest { version, request }) => {
                if version != PROTOCOL_VERSION {
                    return Ok(self.unsupported(ctx));
                }
                self.state = State::Emergency;
                ctx.push(Output::DecideEmergency {
                    stream: self.stream,
                    request,
                });
                Ok(Step::Continue)
            }
            (State::Serving, Msg::Want { items }) => {
                for w in items {
                    let Some(key) = self.offered.remove(&(w.chart.clone(), w.returned)) else {
                        return Err(ProtocolError::Malformed(
                            "a want for a chart not offered on this stream (or wanted twice)"
                                .into(),
                        ));
                    };
                    self.wants.push_back(FetchItem {
                        key,
                        chart: w.chart,
                        returned: w.returned,
                        have: w.have,
                    });
                }
                self.pump(ctx);
                Ok(Step::Continue)
            }
            (State::Serving, Msg::Credit { items }) => {
                self.credited += items as u64;
                if self.credited > self.sent_items {
                    return Err(ProtocolError::Malformed(
                        "credit for more items than were offered".into(),
                    ));
                }
                self.pump(ctx);
                Ok(Step::Continue)
            }
            (State::Serving, Msg::Done { upto }) if self.end_sent => {
                let upto = upto.min(self.upto);
                ctx.push(Output::Persist(Persist::Served { upto }));
                ctx.push(Output::Finish {
                    stream: self.stream,
                });
                self.state = State::Finished;
                Ok(Step::Served(upto))
            }
            (state, m) => Err(ProtocolError::Unexpected {
                got: m.name(),
                state: match state {
                    State::First => "waiting for Pull",
                    State::Planning { .. } => "planning the offer",
                    State::Serving => "answering a pull",
                    State::Emergency => "answering an emergency request",
                    State::Finished => "finished",
                },
            }),
        }
    }

    fn unsupported(&mut self, ctx: &mut Ctx<'_>) -> Step {
        ctx.push(Output::Send {
            stream: self.stream,
            msg: Msg::Unsupported {
                version: PROTOCOL_VERSION,
            },
        });
        ctx.push(Output::Finish {
            stream: self.stream,
        });
        self.state = State::Finished;
        Step::Finished
    }

    /// This practice's policy decided the emergency request.
    pub fn handle_emergency_decision(
        &mut self,
        ctx: &mut Ctx<'_>,
        answer: crate::emergency::Answer,
    ) -> Step {
        if !matches!(self.state, State::Emergency) {
            return Step::Continue;
        }
        ctx.push(Output::Send {
            stream: self.stream,
            msg: Msg::EmergencyAnswer { answer },
        });
        ctx.push(Output::Finish {
            stream: self.stream,
        });
        self.state = State::Finished;
        Step::Finished
    }

    /// The new incarnation after a rollback was detected: plan again from zero under it.
    pub fn replan(&mut self, ctx: &mut Ctx<'_>, incarnation: Incarnation) {
        self.incarnation = incarnation;
        let task = ctx.task();
        ctx.push(Output::Query {
            task,
            query: Query::Candidates { since: 0 },
        });
        self.state = State::Planning {
            task,
            since: 0,
            checked: false,
        };
    }

    pub fn handle_answer(
        &mut self,
        ctx: &mut Ctx<'_>,
        task: TaskId,
        answer: Answer,
    ) -> Result<Step, String> {
        match (&self.state, answer) {
            (
                State::Planning {
                    task: t,
                    since,
                    checked,
                },
                Answer::Candidates(c),
            ) if *t == task => {
                if *checked && c.upto < *since {
                    return Ok(Step::RolledBack);
                }
                self.upto = c.upto;
                self.pending = plan_offer(&c, ctx.peer, ctx.now.wall_ms).into();
                self.state = State::Serving;
                self.pump(ctx);
                Ok(Step::Continue)
            }
            (
                State::Serving,
                Answer::Fetched {
                    grants,
                    items,
                    rest,
                },
            ) if self.fetching == Some(task) => {
                self.fetching = None;
                self.deliver(ctx, &grants, items);
                for r in rest.into_iter().rev() {
                    self.wants.push_front(r);
                }
                self.pump(ctx);
                Ok(Step::Continue)
            }
            (_, Answer::Failed(e)) => Err(e),
            _ => Ok(Step::Continue),
        }
    }

    /// A message queued earlier was written.
    pub fn handle_sent(&mut self, ctx: &mut Ctx<'_>) {
        self.writes = self.writes.saturating_sub(1);
        self.last_activity = ctx.now.mono_ms;
        self.pump(ctx);
    }

    fn send(&mut self, ctx: &mut Ctx<'_>, msg: Msg, audit: Vec<AuditEvent>) {
        self.writes += 1;
        ctx.push(if audit.is_empty() {
            Output::Send {
                stream: self.stream,
                msg,
            }
        } else {
            Output::SendAudited {
                stream: self.stream,
                msg,
                audit,
            }
        });
    }

    /// Produces what may be produced now: a fetch for waiting wants, more of the offer within
    /// the credit window, the end of the offer.
    fn pump(&mut self, ctx: &mut Ctx<'_>) {
        if !matches!(self.state, State::Serving) {
            return;
        }
        if self.fetching.is_none() && !self.wants.is_empty() && self.writes < MAX_WRITES {
            let n = self.wants.len().min(WANT_CHUNK);
            let items: Vec<FetchItem> = self.wants.drain(..n).collect();
            let task = ctx.task();
            ctx.push(Output::Query {
                task,
                query: Query::Fetch {
                    items,
                    budget: CHANGES_TARGET,
                },
            });
            self.fetching = Some(task);
        }
        while self.writes < MAX_WRITES && !self.pending.is_empty() {
            let room =
                OFFER_WINDOW as u64 - (self.sent_items - self.credited).min(OFFER_WINDOW as u64);
            if room == 0 {
                break;
            }
            let n = (room as usize).min(OFFER_CHUNK).min(self.pending.len());
            let items: Vec<OfferItem> = self.pending.drain(..n).collect();
            for i in &items {
                let key = if i.kind.returned() {
                    crate::ids::copy_key(&i.chart, ctx.peer)
                } else {
                    i.chart.clone()
                };
                if !matches!(i.kind, Offered::Revoked) {
                    self.offered
                        .insert((i.chart.clone(), i.kind.returned()), key);
                }
            }
            self.sent_items += n as u64;
            self.send(ctx, Msg::Offer { items }, Vec::new());
        }
        if self.pending.is_empty() && !self.end_sent && self.writes < MAX_WRITES {
            self.end_sent = true;
            let msg = Msg::OfferEnd {
                upto: self.upto,
                incarnation: self.incarnation,
            };
            self.send(ctx, msg, Vec::new());
        }
    }

    /// Decides every fetched chart again and sends what may leave, audited before it leaves.
    fn deliver(&mut self, ctx: &mut Ctx<'_>, grants: &[Grant], items: Vec<Fetched>) {
        let now = ctx.now.wall_ms;
        let grants = consent::GrantIndex::new(grants);
        let mut batch: Vec<Delivery> = Vec::new();
        let mut audit = Vec::new();
        let mut size = 0;
        for f in items {
            let ev = |action: &str| {
                AuditEvent::new(now, "sync", action)
                    .chart(f.item.key.clone())
                    .peer(ctx.peer)
            };
            let decision = match &f.row {
                None => Err("requested a chart that is not shared with it"),
                Some(row) => may_leave(row, f.item.returned, &grants, ctx.peer, now)
                    .map_err(|_| "requested a chart that is not shared with it"),
            };
            let data = match (decision, f.data) {
                (Err(why), _) => {
                    audit.push(ev("refuse").detail(why));
                    None
                }
                (Ok(()), Err(e)) => {
                    // The store could not read it (e.g. a damaged page): never send what may be
                    // corrupt. The error is the store's, free of chart content.
                    audit.push(ev("refuse").detail(format!("the chart could not be read: {e}")));
                    None
                }
                (Ok(()), Ok(None)) => {
                    audit.push(ev("refuse").detail("requested a chart that is not shared with it"));
                    None
                }
                (Ok(()), Ok(Some(d))) if d.len() > MAX_CHART_BYTES => {
                    audit.push(ev("refuse").detail(format!(
                        "the chart is {} bytes, over the {MAX_CHART_BYTES}-byte limit; answered as unavailable",
                        d.len()
                    )));
                    None
                }
                (Ok(()), Ok(Some(d))) => {
                    audit.push(ev("sync-send").detail(format!("{} bytes", d.len())));
                    Some(d)
                }
            };
            size += data.as_ref().map_or(0, |d| d.len()) + f.item.chart.len() + 8;
            batch.push(Delivery {
                chart: f.item.chart,
                returned: f.item.returned,
                data,
            });
            if size >= CHANGES_TARGET {
                let items = std::mem::take(&mut batch);
                self.send(ctx, Msg::Changes { items }, std::mem::take(&mut audit));
                size = 0;
            }
        }
        if !batch.is_empty() {
            self.send(ctx, Msg::Changes { items: batch }, audit);
        }
    }
}

/// May this chart, as stored now, leave for the peer? One of our own charts under an active
/// grant to it; a copy of the peer's own chart only while held here read-write.
fn may_leave(
    row: &super::ChartRow,
    returned: bool,
    grants: &consent::GrantIndex<'_>,
    peer: &str,
    now: i64,
) -> Result<(), consent::Refusal> {
    match (row.held(), returned) {
        (None, false) => {
            consent::may_send(grants.applicable(&row.chart), row.origin.as_deref(), now)
        }
        (Some(held), true) => consent::may_return(&held, peer, now),
        _ => Err(consent::Refusal::NoGrant),
    }
}

/// The offer: every candidate consent allows, as the store pre-selected them. One of our
/// charts under an active grant is `Shared`; one whose applicable grant changed since the
/// checkpoint and no longer allows it is `Revoked` (the peer marks its copy); a copy of the
/// peer's chart changed here is `Returned` while it may be returned.
pub(crate) fn plan_offer(c: &Candidates, peer: &str, now: i64) -> Vec<OfferItem> {
    let changed_grants: std::collections::HashSet<&str> =
        c.changed_grants.iter().map(String::as_str).collect();
    let changed = |g: &Grant| changed_grants.contains(g.chart_id.as_str());
    let mut items = Vec::with_capacity(c.own.len() + c.returned.len());
    let grants = consent::GrantIndex::new(&c.grants);
    for row in &c.own {
        let grant = grants.applicable(&row.chart);
        match consent::may_send(grant, row.origin.as_deref(), now) {
            Ok(()) => {
                let g = grant.expect("an active grant");
                items.push(OfferItem {
                    chart: row.chart.clone(),
                    kind: Offered::Shared {
                        digest: heads_digest(&row.heads),
                        access: g.access,
                        expires_ms: g.expires_ms,
                    },
                })
            }
            // A copy received from another practice is never named to this peer, not
            // even as revoked (the store does not pre-select one; this is the re-check).
            Err(consent::Refusal::NotOurs) => {}
            Err(_) if grant.is_some_and(changed) => items.push(OfferItem {
                chart: row.chart.clone(),
                kind: Offered::Revoked,
            }),
            Err(_) => {}
        }
    }
    for row in &c.returned {
        if let Some(held) = row.held()
            && consent::may_return(&held, peer, now).is_ok()
        {
            items.push(OfferItem {
                chart: row.chart.clone(),
                kind: Offered::Returned {
                    digest: heads_digest(&row.heads),
                },
            });
        }
    }
    items
}
