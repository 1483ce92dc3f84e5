//! The puller: one pull of the peer's changes, on one stream.
//!
//! It compares each offered chart with what is held here (a store query per `Offer`), wants
//! what differs, hands what arrives to the store to apply, returns credit for every settled
//! item so the responder may offer more, and completes — the checkpoint may move — only when
//! the offer ended and every wanted chart was delivered (or answered unavailable) and applied.
//!
//! Memory per pull is bounded whatever the responder sends: at most [`OFFER_WINDOW`] offered
//! items are unsettled at a time (each wanted item holds a chart id of ≤ 128 bytes), one
//! `Offer` waits for its lookup, and reading stops while more than [`APPLY_BYTES`] are being
//! applied.

use std::collections::{HashMap, VecDeque};

use super::wire::*;
use super::{ApplyPlan, Incoming, LocalChart, Output, Query, StreamId, TaskId, Time};
use crate::ids::copy_key;

/// Bytes handed to the store and not yet durable, past which the puller stops reading.
pub const APPLY_BYTES: usize = 2 * 1024 * 1024;

/// Counters of one pull, for status and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullStats {
    pub offered: u64,
    pub wanted: u64,
    pub delivered: u64,
    pub unavailable: u64,
}

pub(crate) struct Ctx<'a> {
    pub out: &'a mut VecDeque<Output>,
    pub next_task: &'a mut TaskId,
    pub peer: &'a str,
    pub now: Time,
}

impl Ctx<'_> {
    pub fn task(&mut self) -> TaskId {
        *self.next_task += 1;
        *self.next_task
    }
    pub fn push(&mut self, o: Output) {
        self.out.push_back(o);
    }
}

/// What a pull step came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Continue,
    Complete {
        upto: u64,
        incarnation: Incarnation,
        stats: PullStats,
    },
    /// The responder's offer ends before our checkpoint under the same incarnation: it was
    /// rolled back without knowing it. The checkpoint is reset and the pull redone.
    RolledBack,
}

pub(crate) struct Puller {
    pub stream: StreamId,
    since: u64,
    incarnation: Incarnation,
    upto: Option<(u64, Incarnation)>,
    /// Offered charts wanted and not yet delivered: (chart, returned) → what the offer said,
    /// and whether the want named heads of a copy held here.
    wanted: HashMap<(String, bool), (Offered, bool)>,
    /// An `Offer` waiting for the store's answer about its charts.
    lookup: Option<(TaskId, Vec<OfferItem>)>,
    /// Applies handed to the store: task → (items, bytes).
    applying: std::collections::BTreeMap<TaskId, (u64, usize)>,
    apply_bytes: usize,
    unsettled: u64,
    settled_uncredited: u64,
    offered_total: u64,
    pub last_activity: u64,
    pub stats: PullStats,
}

impl Puller {
    /// Starts a pull on `stream` (just opened) from the checkpoint `since` of the responder's
    /// store `incarnation`.
    pub fn start(
        ctx: &mut Ctx<'_>,
        stream: StreamId,
        since: u64,
        incarnation: Incarnation,
    ) -> Puller {
        ctx.push(Output::Open { stream });
        ctx.push(Output::Send {
            stream,
            msg: Msg::Pull {
                version: PROTOCOL_VERSION,
                since,
                incarnation,
                wall_ms: Some(ctx.now.wall_ms),
            },
        });
        Puller {
            stream,
            since,
            incarnation,
            upto: None,
            wanted: HashMap::new(),
            lookup: None,
            applying: Default::default(),
            apply_bytes: 0,
            unsettled: 0,
            settled_uncredited: 0,
            offered_total: 0,
            last_activity: ctx.now.mono_ms,
            stats: PullStats::default(),
        }
    }

    /// Whether the next message may be read (a lookup in progress or too much being applied
    /// holds the responder back through QUIC flow control).
    pub fn wants_read(&self) -> bool {
        self.lookup.is_none() && self.apply_bytes < APPLY_BYTES
    }

    pub fn owns_task(&self, task: TaskId) -> bool {
        self.lookup.as_ref().is_some_and(|(t, _)| *t == task) || self.applying.contains_key(&task)
    }

    pub fn handle_message(&mut self, ctx: &mut Ctx<'_>, msg: Msg) -> Result<Step, ProtocolError> {
        self.last_activity = ctx.now.mono_ms;
        let state = if self.upto.is_some() {
            "fetching changes"
        } else {
            "receiving the offer"
        };
        match msg {
            Msg::Unsupported { version } => Err(ProtocolError::Version(version)),
            Msg::Offer { items } if self.upto.is_none() => {
                if self.lookup.is_some() {
                    return Err(ProtocolError::Unexpected {
                        got: "Offer",
                        state: "comparing the previous offer",
                    });
                }
                self.offered_total += items.len() as u64;
                if self.offered_total > MAX_OFFER_ITEMS {
                    return Err(ProtocolError::Malformed(format!(
                        "an offer of over {MAX_OFFER_ITEMS} items"
                    )));
                }
                let window = self.unsettled + items.len() as u64;
                if window > OFFER_WINDOW as u64 {
                    return Err(ProtocolError::Malformed(format!(
                        "{window} offered items unsettled (the window is {OFFER_WINDOW})"
                    )));
                }
                self.unsettled = window;
                self.stats.offered += items.len() as u64;
                if items.is_empty() {
                    return Ok(Step::Continue);
                }
                let keys = items.iter().map(|i| self.key_of(ctx, i)).collect();
                let task = ctx.task();
                ctx.push(Output::Query {
                    task,
                    query: Query::Local { keys },
                });
                self.lookup = Some((task, items));
                Ok(Step::Continue)
            }
            Msg::OfferEnd { upto, incarnation } if self.upto.is_none() => {
                if incarnation == self.incarnation && upto < self.since {
                    return Ok(Step::RolledBack);
                }
                self.upto = Some((upto, incarnation));
                Ok(self.check_complete(ctx))
            }
            Msg::Changes { items } => {
                let mut apply = Vec::new();
                for d in items {
                    let key = (d.chart, d.returned);
                    // Not asked for (or already delivered): a duplicate or replay, ignored.
                    let Some((kind, held)) = self.wanted.remove(&key) else {
                        continue;
                    };
                    match d.data {
                        Some(data) => {
                            self.stats.delivered += 1;
                            let local = if key.1 {
                                key.0.clone()
                            } else {
                                copy_key(&key.0, ctx.peer)
                            };
                            apply.push(Incoming {
                                key: local,
                                chart: key.0,
                                kind,
                                data: Some(data),
                                held,
                            });
                        }
                        None => {
                            self.stats.unavailable += 1;
                            self.settle(ctx, 1);
                        }
                    }
                }
                self.apply(ctx, apply);
                Ok(self.check_complete(ctx))
            }
            m => Err(ProtocolError::Unexpected {
                got: m.name(),
                state,
            }),
        }
    }

    fn key_of(&self, ctx: &Ctx<'_>, item: &OfferItem) -> String {
        if item.kind.returned() {
            item.chart.clone()
        } else {
            copy_key(&item.chart, ctx.peer)
        }
    }

    /// The store's answer about the charts of the pending `Offer`.
    pub fn handle_local(
        &mut self,
        ctx: &mut Ctx<'_>,
        here: Vec<Option<LocalChart>>,
    ) -> Result<Step, ProtocolError> {
        let Some((_, items)) = self.lookup.take() else {
            return Ok(Step::Continue);
        };
        if here.len() != items.len() {
            return Err(ProtocolError::Malformed(
                "the store answered a different number of charts".into(),
            ));
        }
        let mut immediate = Vec::new();
        let mut wants = Vec::new();
        let mut settled = 0;
        for (item, here) in items.into_iter().zip(here) {
            let key = (item.chart.clone(), item.kind.returned());
            if self.wanted.contains_key(&key) {
                // Offered twice in one pull: the first is still on its way.
                settled += 1;
                continue;
            }
            let local = self.key_of(ctx, &item);
            match item.kind {
                Offered::Revoked => {
                    if here.as_ref().is_some_and(|h| !h.revoked) {
                        immediate.push(Incoming {
                            key: local,
                            chart: item.chart,
                            kind: item.kind,
                            data: None,
                            held: true,
                        });
                    } else {
                        settled += 1;
                    }
                }
                Offered::Shared { digest, .. } | Offered::Returned { digest } => {
                    let have = here.as_ref().map(|h| h.heads.clone()).unwrap_or_default();
                    if here.is_some() && heads_digest(&have) == digest {
                        // Same document. Record a changed grant (access, expiry, un-revoke).
                        match (&here, item.kind) {
                            (
                                Some(h),
                                Offered::Shared {
                                    access, expires_ms, ..
                                },
                            ) if h.revoked
                                || h.access != Some(access)
                                || h.expires_ms != expires_ms =>
                            {
                                immediate.push(Incoming {
                                    key: local,
                                    chart: item.chart,
                                    kind: item.kind,
                                    data: None,
                                    held: true,
                                });
                            }
                            _ => settled += 1,
                        }
                        continue;
                    }
                    if item.kind.returned() && here.is_none() {
                        // "Your chart" that is not here: nothing to merge into.
                        settled += 1;
                        continue;
                    }
                    if have.len() > MAX_HEADS {
                        // Our own document has more branches than a want may name: ask
                        // for the whole document instead (merging it is a no-op for what
                        // we hold).
                        wants.push(WantItem {
                            chart: item.chart.clone(),
                            returned: key.1,
                            have: Vec::new(),
                        });
                    } else {
                        wants.push(WantItem {
                            chart: item.chart.clone(),
                            returned: key.1,
                            have,
                        });
                    }
                    self.stats.wanted += 1;
                    self.wanted.insert(key, (item.kind, here.is_some()));
                }
            }
        }
        for chunk in wants.chunks(WANT_CHUNK) {
            ctx.push(Output::Send {
                stream: self.stream,
                msg: Msg::Want {
                    items: chunk.to_vec(),
                },
            });
        }
        self.settle(ctx, settled);
        self.apply(ctx, immediate);
        Ok(self.check_complete(ctx))
    }

    fn apply(&mut self, ctx: &mut Ctx<'_>, items: Vec<Incoming>) {
        if items.is_empty() {
            return;
        }
        let plan = ApplyPlan { items };
        let bytes = plan.bytes();
        let task = ctx.task();
        self.applying.insert(task, (plan.items.len() as u64, bytes));
        self.apply_bytes += bytes;
        ctx.push(Output::Apply { task, plan });
    }

    /// An apply handed over earlier is durable (applied or refused: settled either way).
    pub fn handle_applied(&mut self, ctx: &mut Ctx<'_>, task: TaskId) -> Step {
        if let Some((n, bytes)) = self.applying.remove(&task) {
            self.apply_bytes -= bytes;
            self.settle(ctx, n);
        }
        self.check_complete(ctx)
    }

    fn settle(&mut self, ctx: &mut Ctx<'_>, n: u64) {
        if n == 0 {
            return;
        }
        self.unsettled = self.unsettled.saturating_sub(n);
        self.settled_uncredited += n;
        // Credit matters only while the offer is still coming.
        if self.upto.is_none()
            && (self.settled_uncredited >= OFFER_CHUNK as u64 || self.unsettled == 0)
        {
            ctx.push(Output::Send {
                stream: self.stream,
                msg: Msg::Credit {
                    items: self.settled_uncredited as u32,
                },
            });
            self.settled_uncredited = 0;
        }
    }

    fn check_complete(&mut self, ctx: &mut Ctx<'_>) -> Step {
        match self.upto {
            Some((upto, incarnation))
                if self.wanted.is_empty() && self.applying.is_empty() && self.lookup.is_none() =>
            {
                // Everything applied is durable by now (each apply was reported durable), so
                // the peer may hear it at once; the checkpoint is written behind it.
                ctx.push(Output::Send {
                    stream: self.stream,
                    msg: Msg::Done { upto },
                });
                ctx.push(Output::Finish {
                    stream: self.stream,
                });
                Step::Complete {
                    upto,
                    incarnation,
                    stats: self.stats.clone(),
                }
            }
            _ => Step::Continue,
        }
    }
}
