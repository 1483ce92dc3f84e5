//! Emergency ("break-glass") access on the node: asking connected custodians for a patient's
//! chart, answering such requests by this practice's policy, the review log, and ending
//! access when it expires.
//!
//! Owns: the order of writes (grant and audit at the custodian; the access record and audit
//! at the requester) and the removal of expired emergency copies.
//! Must not touch: the decision itself (`chartmesh_core::emergency`), SQL, or the wire.

use chartmesh_core::PracticeId;
use chartmesh_core::audit::{AuditEntry, AuditEvent};
use chartmesh_core::consent::{self, Access, Grant, Purpose};
use chartmesh_core::emergency::{self, Answer, Query, Request};
use chartmesh_store::StoreError;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::node::{Node, NodeError};
use crate::{now_ms, rfc3339};

/// How long the requester waits for granted charts to arrive before answering.
const ARRIVAL_WAIT: Duration = Duration::from_secs(20);

/// Emergency requests one user may make here in [`ACTOR_WINDOW`].
pub const ACTOR_REQUESTS: usize = 6;
pub const ACTOR_WINDOW: Duration = Duration::from_secs(600);
/// Emergency requests a paired practice may have answered here in [`PEER_WINDOW`].
pub const PEER_REQUESTS: usize = 20;
pub const PEER_WINDOW: Duration = Duration::from_secs(3600);
/// Refusals of one practice over its limit are audited at most once in this interval,
/// with how many were refused since.
const REFUSAL_AUDIT_EVERY: Duration = Duration::from_secs(60);

/// The rate limits of emergency requests: per user asking here, per practice asking us.
pub struct Limits {
    by_actor: crate::guard::RateLimit,
    by_peer: crate::guard::RateLimit,
    /// Per practice over its limit: when its refusals were last audited, and how many
    /// were refused since.
    refused: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            by_actor: crate::guard::RateLimit::new(ACTOR_REQUESTS, ACTOR_WINDOW),
            by_peer: crate::guard::RateLimit::new(PEER_REQUESTS, PEER_WINDOW),
            refused: Default::default(),
        }
    }
}

impl Limits {
    /// A refusal over the per-practice limit: Some(count refused since the last audit
    /// entry) when one is due now, None while within the interval.
    fn refusal_to_audit(&self, peer: &str) -> Option<u64> {
        let mut m = self.refused.lock().unwrap();
        let now = std::time::Instant::now();
        if m.len() > 1024 {
            m.retain(|_, (t, _)| now.duration_since(*t) < REFUSAL_AUDIT_EVERY);
        }
        let e = m
            .entry(peer.to_string())
            .or_insert((now - REFUSAL_AUDIT_EVERY, 0));
        e.1 += 1;
        if now.duration_since(e.0) >= REFUSAL_AUDIT_EVERY {
            let n = e.1;
            *e = (now, 0);
            Some(n)
        } else {
            None
        }
    }
}

/// The requester's name and reason as a paired practice sent them, checked like local input:
/// plain text, bounded.
fn check_request(request: &Request) -> Result<(), String> {
    crate::guard::check_name("the requester's name", &request.requester)?;
    crate::guard::check_text("the reason", &request.reason, emergency::MAX_REASON)?;
    if request.reason.len() > emergency::MAX_REASON {
        return Err(format!(
            "the reason is longer than {} bytes",
            emergency::MAX_REASON
        ));
    }
    Ok(())
}

/// The longest emergency access a requester keeps a copy, whatever a custodian answers.
const MAX_EMERGENCY_MS: i64 = 7 * 24 * 3600 * 1000;

impl Node {
    /// Custodian side: answers a paired practice's request by this practice's policy. An
    /// allowed request becomes read-only grants (purpose emergency) that expire by
    /// themselves; an existing active grant is never replaced (so never narrowed). Every
    /// answer is audited with the requester and the reason.
    pub async fn emergency_answer(&self, peer: &PracticeId, request: Request) -> Answer {
        let now = now_ms();
        // Over the per-practice limit: refused without a lookup; audited once a minute with
        // the count, so a flood of requests cannot flood the log.
        if !self.emergency_limits.by_peer.allow(&peer.to_string()) {
            if let Some(n) = self.emergency_limits.refusal_to_audit(&peer.to_string()) {
                let _ = self
                    .audit(vec![
                        AuditEvent::new(now, "emergency", "emergency-refused").peer(peer.to_string()).detail(format!(
                            "over the limit of {PEER_REQUESTS} requests per {} min from this practice; {n} refused",
                            PEER_WINDOW.as_secs() / 60
                        )),
                    ])
                    .await;
            }
            return Answer::Denied {
                why: "too many emergency requests from your practice; try again later".into(),
            };
        }
        // Names and reasons from a peer are held to the same bounds as local input, and a
        // bad one is audited by its size only.
        if let Err(why) = check_request(&request) {
            let _ = self
                .audit(vec![
                    AuditEvent::new(now, "emergency", "emergency-refused")
                        .peer(peer.to_string())
                        .detail(format!(
                            "malformed request ({why}); requester {} bytes, reason {} bytes",
                            request.requester.len(),
                            request.reason.len()
                        )),
                ])
                .await;
            return Answer::Denied { why };
        }
        let policy = self
            .config
            .emergency
            .policy()
            .unwrap_or(emergency::Policy::Deny);
        let matches = match policy {
            // Nothing is looked up when the answer is no.
            emergency::Policy::Deny => Vec::new(),
            emergency::Policy::Allow { .. } if request.query.validate().is_err() => Vec::new(),
            emergency::Policy::Allow { .. } => {
                let q = request.query.clone();
                self.read(move |s| {
                    Ok(s.find_own_charts(
                        q.mrn.as_deref(),
                        q.family.as_deref(),
                        q.birth_date.as_deref(),
                    )?)
                })
                .await
                .unwrap_or_default()
            }
        };
        let answer = emergency::decide(policy, &request, &matches, now);
        let who = format!(
            "requester={:?} reason={:?}",
            request.requester, request.reason
        );
        let result = match &answer {
            Answer::Granted {
                charts, expires_ms, ..
            } => {
                self.grant_emergency(peer, charts, *expires_ms, &request.requester, &who, now)
                    .await
            }
            Answer::Denied { why } => {
                self.audit(vec![
                    AuditEvent::new(now, "emergency", "emergency-refused")
                        .peer(peer.to_string())
                        .detail(format!("{why}; {who}")),
                ])
                .await
            }
            Answer::NotFound => {
                self.audit(vec![
                    AuditEvent::new(now, "emergency", "emergency-refused")
                        .peer(peer.to_string())
                        .detail(format!("no matching chart; {who}")),
                ])
                .await
            }
        };
        match result {
            Ok(()) => answer,
            // Not recorded, so not granted.
            Err(e) => {
                tracing::error!(error = %e, "emergency answer could not be recorded");
                Answer::Denied {
                    why: "the custodian could not record the access; try again".into(),
                }
            }
        }
    }

    async fn grant_emergency(
        &self,
        peer: &PracticeId,
        charts: &[String],
        expires_ms: i64,
        requester: &str,
        who: &str,
        now: i64,
    ) -> Result<(), NodeError> {
        let p = *peer;
        let existing = self.read(move |s| Ok(s.grants(Some(&p))?)).await?;
        let mut new = Vec::new();
        let mut audit = Vec::new();
        for c in charts {
            let already = !consent::emergency_grant_needed(&existing, c, now);
            audit.push(
                AuditEvent::new(now, "emergency", "emergency-access")
                    .chart(c)
                    .peer(peer.to_string())
                    .detail(if already {
                        format!("allowed by policy; already shared, grant unchanged; {who}")
                    } else {
                        format!(
                            "allowed by policy, read-only until {}; {who}",
                            rfc3339(expires_ms)
                        )
                    }),
            );
            if !already {
                new.push(Grant {
                    chart_id: c.clone(),
                    peer: *peer,
                    access: Access::Read,
                    purpose: Purpose::Emergency,
                    expires_ms: Some(expires_ms),
                    recorded_by: format!("break-glass: {requester} at {}", peer.short()),
                    recorded_ms: now,
                    revoked_ms: None,
                });
            }
        }
        // The access is audited before the grant can take effect.
        self.audit(audit).await?;
        if !new.is_empty() {
            self.store
                .grant(new)?
                .await
                .map_err(|_| StoreError::Closed)??;
        }
        Ok(())
    }

    /// Requester side: asks every connected custodian (or one) for the patient's chart.
    /// Granted charts are recorded as emergency access (removed when it ends) and waited for
    /// until they have arrived. Each answer is audited here too.
    pub async fn emergency_request(
        &self,
        query: Query,
        reason: &str,
        requester: &str,
        peer: Option<&str>,
    ) -> Result<Vec<Value>, NodeError> {
        query.validate().map_err(NodeError::Invalid)?;
        if reason.trim().is_empty() {
            return Err(NodeError::Invalid(
                "give the reason for emergency access (--reason)".into(),
            ));
        }
        crate::guard::check_text("--reason", reason, emergency::MAX_REASON)
            .map_err(NodeError::Invalid)?;
        if reason.len() > emergency::MAX_REASON {
            return Err(NodeError::Invalid(format!(
                "--reason is longer than {} bytes",
                emergency::MAX_REASON
            )));
        }
        for (what, v) in [
            ("--mrn", &query.mrn),
            ("--family", &query.family),
            ("--birth-date", &query.birth_date),
        ] {
            if let Some(v) = v {
                crate::guard::check_name(what, v).map_err(NodeError::Invalid)?;
            }
        }
        if !self.emergency_limits.by_actor.allow(requester) {
            self.audit(vec![AuditEvent::new(now_ms(), requester, "refuse").detail(
                format!(
                    "emergency request over the limit of {ACTOR_REQUESTS} per {} min for one user",
                    ACTOR_WINDOW.as_secs() / 60
                ),
            )])
            .await?;
            return Err(NodeError::Refused(format!(
                "{requester} has made {ACTOR_REQUESTS} emergency requests in the last {} minutes, the most allowed; wait, or ask a colleague to review (chartmesh emergency log)",
                ACTOR_WINDOW.as_secs() / 60
            )));
        }
        let sync = self
            .sync
            .get()
            .ok_or_else(|| NodeError::Invalid("sync is not running".into()))?
            .clone();
        let peers = match peer {
            Some(p) => {
                let p = self.peer_ref(p)?;
                if !sync.connected().contains(&p) {
                    return Err(NodeError::Invalid(format!(
                        "practice {} is not connected now; emergency requests need a live connection",
                        p.short()
                    )));
                }
                vec![p]
            }
            None => sync.connected(),
        };
        if peers.is_empty() {
            return Err(NodeError::Invalid(
                "no paired practice is connected now; emergency requests need a live connection (chartmesh status)".into(),
            ));
        }
        let request = Request {
            query,
            reason: reason.trim().to_string(),
            requester: requester.to_string(),
        };
        let mut out = Vec::new();
        // (custodian, chart id there) of every granted chart not here yet.
        let mut waiting: Vec<(String, String)> = Vec::new();
        for p in peers {
            let now = now_ms();
            let answer = sync.ask_emergency(&p, request.clone()).await;
            let (detail, v) = match &answer {
                Ok(Answer::Granted {
                    charts,
                    expires_ms,
                    valid_for_ms,
                }) => {
                    // Counted from now by this practice's clock (a skew between the two
                    // clocks never lengthens the access); the custodian's expiry event, when
                    // it arrives, ends it too.
                    let _ = expires_ms;
                    let ends = now + (*valid_for_ms).clamp(0, MAX_EMERGENCY_MS);
                    self.store
                        .record_emergency_access(
                            &p.to_string(),
                            charts.clone(),
                            ends,
                            requester,
                            now,
                        )?
                        .await
                        .map_err(|_| StoreError::Closed)??;
                    waiting.extend(charts.iter().map(|c| (p.to_string(), c.clone())));
                    (
                        format!(
                            "granted {} chart(s), read-only until {}",
                            charts.len(),
                            rfc3339(*expires_ms)
                        ),
                        json!({"peer": p.to_string(), "outcome": "granted", "charts": charts, "expiresMs": expires_ms, "expires": rfc3339(*expires_ms)}),
                    )
                }
                Ok(Answer::Denied { why }) => (
                    format!("denied: {why}"),
                    json!({"peer": p.to_string(), "outcome": "denied", "why": why}),
                ),
                Ok(Answer::NotFound) => (
                    "no matching chart".to_string(),
                    json!({"peer": p.to_string(), "outcome": "not-found"}),
                ),
                Err(e) => (
                    format!("no answer: {e}"),
                    json!({"peer": p.to_string(), "outcome": "error", "why": e}),
                ),
            };
            self.audit(vec![
                AuditEvent::new(now, requester, "emergency-request")
                    .peer(p.to_string())
                    .detail(format!("{detail}; reason={:?}", request.reason)),
            ])
            .await?;
            out.push(v);
        }
        // The charts travel by normal sync; wait (bounded) until they are here.
        let deadline = tokio::time::Instant::now() + ARRIVAL_WAIT;
        while !waiting.is_empty() && tokio::time::Instant::now() < deadline {
            let ids = waiting.clone();
            // Looked up by custodian: a received copy's key need not be the chart id.
            let present = self
                .read(move |s| {
                    let mut here = Vec::new();
                    for (peer, chart) in ids {
                        if s.received_copy_key(&peer, &chart)?.is_some() {
                            here.push((peer, chart));
                        }
                    }
                    Ok(here)
                })
                .await?;
            waiting.retain(|c| !present.contains(c));
            if !waiting.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for v in out.iter_mut() {
            let peer = v["peer"].as_str().unwrap_or_default().to_string();
            if let Some(charts) = v["charts"].as_array() {
                let arrived: Vec<&Value> = charts
                    .iter()
                    .filter(|c| {
                        !waiting
                            .iter()
                            .any(|(p, w)| *p == peer && Some(w.as_str()) == c.as_str())
                    })
                    .collect();
                v["arrived"] = json!(arrived);
            }
        }
        Ok(out)
    }

    /// Every emergency request made here and answered here, for review.
    pub async fn emergency_log(&self, actor: &str) -> Result<Vec<AuditEntry>, NodeError> {
        let log = self.read(|s| Ok(s.emergency_log()?)).await?;
        self.audit(vec![
            AuditEvent::new(now_ms(), actor, "read")
                .detail(format!("emergency log entries={}", log.len())),
        ])
        .await?;
        Ok(log)
    }

    /// Removes charts held by emergency access once it has ended; runs until shutdown.
    pub async fn emergency_expiry_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.store.end_emergency_access(now_ms(), self.identity.id) {
                Ok(None) => {}
                Ok(Some(rx)) => match rx.await {
                    Ok(Ok(removed)) if !removed.is_empty() => {
                        tracing::info!(
                            charts = removed.len(),
                            "emergency access ended; copies removed"
                        );
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "ending emergency access failed; retrying")
                    }
                    _ => {}
                },
                Err(StoreError::Closed) => return,
                Err(e) => tracing::warn!(error = %e, "checking emergency access failed; retrying"),
            }
        }
    }
}
