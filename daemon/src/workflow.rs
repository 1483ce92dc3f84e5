//! Workflows across practices, on the node: referrals (made here, answered there, each step
//! written into the chart so it flows back at the next sync), the clinical conflict inbox,
//! and corrections of entries (removing an allergy, stopping a medication).
//!
//! Owns: the order of the writes each workflow makes (chart edit, consent grant, audit).
//! Must not touch: SQL (the store) or the rules of a referral's status and of a risky merge
//! (`chartmesh_core::referral`, `chartmesh_core::conflicts`).

use chartmesh_core::audit::AuditEvent;
use chartmesh_core::chart::{Entry, Note, Section};
use chartmesh_core::referral::{self, Event, Referral, Side, Step};
use chartmesh_core::{ChartDoc, CoreError};
use chartmesh_store::{ConflictRecord, StoreError};
use serde_json::{Value, json};

use crate::node::{Node, NodeError, ShareRequest};
use crate::now_ms;

/// An RFC 3339 time with milliseconds: referral events are ordered by it.
fn rfc3339_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{}.{:03}Z",
        crate::rfc3339(ms).trim_end_matches('Z'),
        t.millisecond()
    )
}

fn not_allowed(e: String) -> CoreError {
    CoreError::NotAllowed(e)
}

impl Node {
    /// Refers one of this practice's charts to a paired practice: the referral is written
    /// into the chart and the chart is shared with that practice read-write (purpose
    /// referral), so it can answer in the chart itself.
    pub async fn refer(
        &self,
        chart: &str,
        to: &str,
        reason: &str,
        specialty: Option<&str>,
        author: &str,
    ) -> Result<Referral, NodeError> {
        let peer = self.peer_ref(to)?;
        if self.store.peer(&peer)?.is_none() {
            return Err(NodeError::Invalid(format!(
                "practice {} is not paired: pair first with `chartmesh peer add {peer} --addr HOST:PORT`",
                peer.short()
            )));
        }
        if peer == self.identity.id {
            return Err(NodeError::Invalid(
                "a chart cannot be referred to this practice itself".into(),
            ));
        }
        if reason.trim().is_empty() {
            return Err(NodeError::Invalid(
                "give the reason for the referral (--reason)".into(),
            ));
        }
        let key = chart.to_string();
        match self.read(move |s| Ok(s.chart_origin(&key)?)).await? {
            None => return Err(NodeError::NotFound(chart.to_string())),
            // A referral is a grant: only of a chart this practice holds as its own.
            Some(origin) => {
                if chartmesh_core::consent::may_grant(origin.as_deref()).is_err() {
                    return Err(NodeError::Refused(format!(
                        "chart {chart} is held from practice {}; only its custodian can refer it",
                        origin.unwrap_or_default()
                    )));
                }
            }
        }
        let now = now_ms();
        let me = self.practice_id();
        let r = Referral {
            id: format!("ref-{}", hex::encode(rand::random::<[u8; 6]>())),
            from: me.clone(),
            to: peer.to_string(),
            reason: reason.trim().to_string(),
            specialty: specialty
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            requested: rfc3339_ms(now),
            requested_by: author.to_string(),
            events: vec![Event {
                step: Step::Request,
                at: rfc3339_ms(now),
                by: author.to_string(),
                practice: me,
                note_id: None,
            }],
        };
        let meta = self.meta(author, "refer");
        let rec = r.clone();
        self.store
            .edit(
                chart.to_string(),
                Box::new(move |doc| doc.add_referral(&rec, &meta)),
                vec![
                    AuditEvent::new(now, author, "refer")
                        .chart(chart)
                        .peer(peer.to_string())
                        .detail(format!("referral={}", r.id)),
                ],
            )?
            .await
            .map_err(|_| StoreError::Closed)??;
        self.share(
            ShareRequest {
                charts: vec![chart.to_string()],
                all: false,
                peer: peer.to_string(),
                access: Some("read-write".into()),
                purpose: Some("referral".into()),
                expires: None,
            },
            author,
        )
        .await?;
        Ok(r)
    }

    /// Referrals made here (`outgoing`), made to this practice (`incoming`), or both, with
    /// their status. Audited as one read.
    pub async fn referrals(
        &self,
        direction: Option<&str>,
        actor: &str,
    ) -> Result<Vec<Value>, NodeError> {
        let want_in = matches!(direction, None | Some("incoming") | Some("all"));
        let want_out = matches!(direction, None | Some("outgoing") | Some("all"));
        if !want_in && !want_out {
            return Err(NodeError::Invalid(format!(
                "direction {direction:?}: use incoming, outgoing or all"
            )));
        }
        let me = self.practice_id();
        let list = self
            .read(move |store| {
                let index = store.referral_index()?;
                let mut out = Vec::new();
                let mut charts: Vec<&str> = index.iter().map(|r| r.chart.as_str()).collect();
                charts.dedup();
                for id in charts {
                    let Some(rec) = store.get(id)? else { continue };
                    let header = rec.doc.header()?;
                    let held = store.sync_charts(&[id])?;
                    let access = held.get(id).map(|c| match (&c.origin, c.revoked_ms) {
                        (None, _) => "own",
                        (Some(_), Some(_)) => "revoked",
                        (Some(_), None) => "shared-with-us",
                    });
                    for r in rec.doc.referrals()?.into_values() {
                        let direction = match r.side(&me) {
                            Some(Side::Referrer) if want_out => "outgoing",
                            Some(Side::Receiver) if want_in => "incoming",
                            _ => continue,
                        };
                        let notes: Vec<Value> = {
                            let ids = r.consult_notes();
                            let all: Vec<Note> = rec.doc.section("notes")?;
                            all.into_iter()
                                .filter(|n| ids.contains(&n.id.as_str()))
                                .map(|n| json!({"id": n.id, "author": n.author, "date": n.date, "text": n.text}))
                                .collect()
                        };
                        out.push(json!({
                            "referral": r.id,
                            "chart": id,
                            "patient": format!("{}, {}", header.family, header.given),
                            "direction": direction,
                            "status": r.status().as_str(),
                            "chartAccess": access,
                            "from": r.from,
                            "to": r.to,
                            "reason": r.reason,
                            "specialty": r.specialty,
                            "requested": r.requested,
                            "requestedBy": r.requested_by,
                            "events": r.ordered_events(),
                            "consultNotes": notes,
                        }));
                    }
                }
                Ok(out)
            })
            .await?;
        self.audit(vec![
            AuditEvent::new(now_ms(), actor, "read").detail(format!("referrals={}", list.len())),
        ])
        .await?;
        Ok(list)
    }

    /// Takes a step on a referral: accept, decline, a consult note, complete (the receiving
    /// practice) or cancel (the referring practice, which also revokes the referral's grant).
    /// `text` is the consult note (required for `note`, optional for `complete`).
    pub async fn referral_step(
        &self,
        referral_id: &str,
        step: &str,
        text: Option<&str>,
        author: &str,
    ) -> Result<Value, NodeError> {
        let step: Step = step.parse().map_err(NodeError::Invalid)?;
        let rid = referral_id.to_string();
        let chart = self
            .read(move |s| Ok(s.referral_chart(&rid)?))
            .await?
            .ok_or_else(|| NodeError::NotFound(format!("referral {referral_id}")))?;
        let text = text.map(str::trim).filter(|t| !t.is_empty());
        if step == Step::ConsultNote && text.is_none() {
            return Err(NodeError::Invalid(
                "a consult note needs its text (--text)".into(),
            ));
        }
        let me = self.practice_id();
        // Checked here for a clear answer, and again inside the edit (the status may have
        // moved in between).
        let (key, rid) = (chart.clone(), referral_id.to_string());
        let current = self
            .read(move |s| {
                let rec = s.get(&key)?.ok_or(NodeError::NotFound(key.clone()))?;
                rec.doc
                    .referrals()?
                    .remove(&rid)
                    .ok_or(NodeError::NotFound(format!("referral {rid}")))
            })
            .await?;
        let side = current.side(&me);
        if let Err(why) = referral::transition(current.status(), step, side) {
            self.audit(vec![
                AuditEvent::new(now_ms(), author, "refuse")
                    .chart(&chart)
                    .detail(format!("referral={referral_id} step={step:?}")),
            ])
            .await?;
            return Err(NodeError::Refused(format!(
                "cannot {} referral {referral_id}: {why}",
                step_word(step)
            )));
        }
        if side == Some(Side::Receiver) {
            self.check_writable(&chart, author).await?;
        }
        let now = now_ms();
        let note = text.map(|t| Note {
            id: format!("{chart}-consult-{}", hex::encode(rand::random::<[u8; 4]>())),
            author: author.to_string(),
            date: crate::rfc3339(now),
            text: t.to_string(),
            ..Default::default()
        });
        let event = Event {
            step,
            at: rfc3339_ms(now),
            by: author.to_string(),
            practice: me.clone(),
            note_id: note.as_ref().map(|n| n.id.clone()),
        };
        let meta = self.meta(author, &format!("referral {}", step_word(step)));
        let rid = referral_id.to_string();
        let me2 = me.clone();
        self.store
            .edit(
                chart.clone(),
                Box::new(move |doc: &mut ChartDoc| {
                    let r = doc
                        .referrals()?
                        .remove(&rid)
                        .ok_or_else(|| not_allowed(format!("the chart has no referral {rid}")))?;
                    referral::transition(r.status(), event.step, r.side(&me2))
                        .map_err(not_allowed)?;
                    let entry = note.map(Entry::Note);
                    doc.add_referral_event(&rid, &event, entry.as_ref(), &meta)
                }),
                vec![
                    AuditEvent::new(now, author, "referral")
                        .chart(&chart)
                        .detail(format!("referral={referral_id} step={}", step_word(step))),
                ],
            )?
            .await
            .map_err(|_| StoreError::Closed)??;
        if step == Step::Cancel {
            self.revoke(
                ShareRequest {
                    charts: vec![chart.clone()],
                    all: false,
                    peer: current.to.clone(),
                    access: None,
                    purpose: None,
                    expires: None,
                },
                author,
            )
            .await?;
        }
        let (key, rid) = (chart.clone(), referral_id.to_string());
        let after = self
            .read(move |s| {
                let rec = s.get(&key)?.ok_or(NodeError::NotFound(key.clone()))?;
                Ok(rec.doc.referrals()?.remove(&rid))
            })
            .await?;
        Ok(json!({
            "referral": referral_id,
            "chart": chart,
            "status": after.map(|r| r.status().as_str()),
        }))
    }

    /// The conflict inbox (open entries, or all). Audited as a read.
    pub async fn conflicts(
        &self,
        all: bool,
        actor: &str,
    ) -> Result<Vec<ConflictRecord>, NodeError> {
        let list = self.read(move |s| Ok(s.conflicts(all)?)).await?;
        self.audit(vec![
            AuditEvent::new(now_ms(), actor, "read").detail(format!("conflicts={}", list.len())),
        ])
        .await?;
        Ok(list)
    }

    /// Marks a conflict reviewed, saying what was done about it.
    pub async fn resolve_conflict(
        &self,
        id: i64,
        resolution: &str,
        by: &str,
    ) -> Result<ConflictRecord, NodeError> {
        if resolution.trim().is_empty() {
            return Err(NodeError::Invalid(
                "say what was done about the conflict (--note)".into(),
            ));
        }
        let c = self
            .read(move |s| Ok(s.conflict(id)?))
            .await?
            .ok_or_else(|| NodeError::NotFound(format!("conflict {id}")))?;
        if c.resolved_ms.is_some() {
            return Err(NodeError::Conflict(format!(
                "conflict {id} was already resolved by {}",
                c.resolved_by.unwrap_or_default()
            )));
        }
        self.store
            .resolve_conflict(id, &c.chart, by, resolution.trim(), now_ms())?
            .await
            .map_err(|_| StoreError::Closed)??;
        self.read(move |s| Ok(s.conflict(id)?))
            .await?
            .ok_or_else(|| NodeError::NotFound(format!("conflict {id}")))
    }

    /// Corrects a chart: removes the allergies to `target` (`allergies`), or stops the active
    /// medications named `target` (`medications`, status `stopped`). The reason goes into the
    /// change's record (chart history). Returns how many entries changed.
    pub async fn correct(
        &self,
        chart: &str,
        section: &str,
        target: &str,
        reason: &str,
        author: &str,
    ) -> Result<usize, NodeError> {
        let section = match section {
            "allergies" => Section::Allergies,
            "medications" => Section::Medications,
            other => {
                return Err(NodeError::Invalid(format!(
                    "{other:?} cannot be corrected this way: remove an allergy or stop a medication"
                )));
            }
        };
        if reason.trim().is_empty() {
            return Err(NodeError::Invalid("give the reason (--reason)".into()));
        }
        self.check_writable(chart, author).await?;
        let target_l = target.trim().to_lowercase();
        let (what, word) = match section {
            Section::Allergies => ("remove allergy", "removed"),
            _ => ("stop medication", "stopped"),
        };
        let meta = self.meta(author, &format!("{what} ({})", reason.trim()));
        let now = meta.time_ms;
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = count.clone();
        // Set when no entry matched, so that error is told apart from a damaged document.
        let no_match = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let no_match_set = no_match.clone();
        let out = self
            .store
            .edit(
                chart.to_string(),
                Box::new(move |doc: &mut ChartDoc| {
                    let key = section.key();
                    // From the end, so indexes stay valid as entries go.
                    match section {
                        Section::Allergies => {
                            let list: Vec<chartmesh_core::chart::Allergy> = doc.section(key)?;
                            for (i, a) in list.iter().enumerate().rev() {
                                if a.substance.to_lowercase() == target_l {
                                    doc.replace_entry(section, i, None, &meta)?;
                                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                            }
                        }
                        _ => {
                            let list: Vec<chartmesh_core::chart::Medication> = doc.section(key)?;
                            for (i, m) in list.iter().enumerate().rev() {
                                let active = matches!(m.status.as_deref(), None | Some("active"));
                                if active && m.name.to_lowercase() == target_l {
                                    let mut stopped = m.clone();
                                    stopped.status = Some("stopped".into());
                                    doc.replace_entry(
                                        section,
                                        i,
                                        Some(&Entry::Medication(stopped)),
                                        &meta,
                                    )?;
                                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    if counted.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                        no_match_set.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Err(CoreError::Shape(format!(
                            "nothing to change: no {} entry matches {target_l:?}",
                            key
                        )));
                    }
                    Ok(())
                }),
                vec![
                    AuditEvent::new(now, author, "update")
                        .chart(chart)
                        .detail(format!("section={} {word}", section.key())),
                ],
            )?
            .await
            .map_err(|_| StoreError::Closed)?;
        match out {
            Ok(_) => Ok(count.load(std::sync::atomic::Ordering::Relaxed)),
            Err(StoreError::NotFound(id)) => Err(NodeError::NotFound(id)),
            Err(_) if no_match.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(NodeError::Missing(match section {
                    Section::Allergies => format!(
                        "chart {chart} has no allergy to {:?}: nothing was changed (`chartmesh chart show {chart}` lists its allergies)",
                        target.trim()
                    ),
                    _ => format!(
                        "chart {chart} has no active medication named {:?}: nothing was changed (`chartmesh chart show {chart}` lists its medications)",
                        target.trim()
                    ),
                }))
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn step_word(s: Step) -> &'static str {
    match s {
        Step::Request => "request",
        Step::Accept => "accept",
        Step::Decline => "decline",
        Step::ConsultNote => "add a consult note to",
        Step::Complete => "complete",
        Step::Cancel => "cancel",
    }
}
