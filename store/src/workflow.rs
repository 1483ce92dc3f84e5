//! Workflow tables beside the charts: which chart holds each referral (kept on every write of
//! a chart, so listing referrals reads an index, not every document) and the clinical
//! conflict inbox (risky merges filed by the sync apply path, resolved by a person).
//!
//! Also the record of emergency access granted to this practice, and the removal of the
//! charts it brought once it has ended.
//!
//! Owns: the `referral_index`, `conflicts` and `emergency_access` tables and the charts'
//! `due_facts` column.
//! Must not touch: the documents themselves; referral steps are chart edits.

use chartmesh_core::audit::AuditEvent;
use chartmesh_core::conflicts::Conflict;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::{Store, StoreError};

/// Resolves, once durable, to the chart ids whose emergency copies were removed.
pub type EmergencyEnd = oneshot::Receiver<Result<Vec<String>, StoreError>>;

/// A referral id and the chart that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReferralRef {
    pub referral: String,
    pub chart: String,
}

/// An entry of the conflict inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConflictRecord {
    pub id: i64,
    pub chart: String,
    /// The practice whose changes were being merged.
    pub peer: Option<String>,
    pub detected_ms: i64,
    pub kind: String,
    pub summary: String,
    pub resolved_ms: Option<i64>,
    pub resolved_by: Option<String>,
    pub resolution: Option<String>,
}

/// Records the chart's referral ids (ids are never reused, so rows are only added).
pub(crate) fn index_referrals(
    tx: &Connection,
    chart_id: &str,
    ids: &[String],
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut st = tx.prepare_cached(
        "INSERT INTO referral_index(referral_id, chart_id) VALUES (?1, ?2) ON CONFLICT(referral_id) DO NOTHING",
    )?;
    for id in ids {
        st.execute(params![id, chart_id])?;
    }
    Ok(())
}

/// Files the conflicts a merge raised (once each: the same conflict raised again by a later
/// merge is not a new entry). Returns how many are new. The audit entry names the kind only.
pub(crate) fn file_conflicts(
    ctx: &mut crate::write::TaskCtx<'_>,
    chart_id: &str,
    peer: &str,
    now: i64,
    conflicts: &[Conflict],
) -> Result<usize, StoreError> {
    let mut new = 0;
    for c in conflicts {
        let n = ctx
            .conn
            .prepare_cached(
                "INSERT INTO conflicts(chart_id, peer, detected_ms, kind, summary) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(chart_id, kind, summary) DO NOTHING",
            )?
            .execute(params![chart_id, peer, now, c.kind.as_str(), c.summary])?;
        if n == 1 {
            new += 1;
            ctx.audit(
                &AuditEvent::new(now, "sync", "conflict")
                    .chart(chart_id)
                    .peer(peer)
                    .detail(format!("kind={}", c.kind.as_str())),
            )?;
        }
    }
    Ok(new)
}

/// How far the custodian's end of an emergency grant may lie after this practice's own count
/// of it (the two clocks differ) and still be the same grant.
const EMERGENCY_CLOCK_SLACK_MS: i64 = 60_000;

/// The copy of `custodian`'s chart `chart` held here: its key in `charts` (the custodian's
/// id, or `ID@CUSTODIAN` where received copies are keyed by custodian) and the end of the
/// grant it is held under. Looked up by origin, never by assuming key == chart id.
fn received_copy(
    c: &Connection,
    custodian: &str,
    chart: &str,
) -> Result<Option<(String, Option<i64>)>, StoreError> {
    Ok(c.prepare_cached(
        "SELECT id, expires_ms FROM charts WHERE origin = ?1 AND (id = ?2 OR id = ?2 || '@' || ?1)
             ORDER BY id LIMIT 1",
    )?
    .query_row(params![custodian, chart], |r| Ok((r.get(0)?, r.get(1)?)))
    .optional()?)
}

/// Removes every row of a held copy (its key in `charts`): the chart row with its search
/// index fields and due facts, its document and incremental changes, its referral index
/// rows and its open conflicts. Audit entries stay.
pub(crate) fn remove_copy(c: &Connection, key: &str) -> Result<(), StoreError> {
    for sql in [
        "DELETE FROM chart_changes WHERE chart_id = ?1",
        "DELETE FROM chart_docs WHERE chart_id = ?1",
        "DELETE FROM referral_index WHERE chart_id = ?1",
        "DELETE FROM conflicts WHERE chart_id = ?1 AND resolved_ms IS NULL",
        "DELETE FROM charts WHERE id = ?1",
    ] {
        c.prepare_cached(sql)?.execute([key])?;
    }
    Ok(())
}

const CONFLICT_COLUMNS: &str = "SELECT id, chart_id, peer, detected_ms, kind, summary, resolved_ms, resolved_by, resolution FROM conflicts";

fn conflict_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConflictRecord> {
    Ok(ConflictRecord {
        id: r.get(0)?,
        chart: r.get(1)?,
        peer: r.get(2)?,
        detected_ms: r.get(3)?,
        kind: r.get(4)?,
        summary: r.get(5)?,
        resolved_ms: r.get(6)?,
        resolved_by: r.get(7)?,
        resolution: r.get(8)?,
    })
}

impl Store {
    /// Every referral id with its chart.
    pub fn referral_index(&self) -> Result<Vec<ReferralRef>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(
                "SELECT referral_id, chart_id FROM referral_index ORDER BY chart_id, referral_id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(ReferralRef {
                    referral: r.get(0)?,
                    chart: r.get(1)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// The chart holding a referral.
    pub fn referral_chart(&self, referral: &str) -> Result<Option<String>, StoreError> {
        self.with_reader(|c| {
            Ok(
                c.prepare_cached("SELECT chart_id FROM referral_index WHERE referral_id = ?1")?
                    .query_row([referral], |r| r.get(0))
                    .optional()?,
            )
        })
    }

    /// The conflict inbox: open entries (or all), newest first.
    pub fn conflicts(&self, include_resolved: bool) -> Result<Vec<ConflictRecord>, StoreError> {
        self.with_reader(|c| {
            let sql = if include_resolved {
                format!("{CONFLICT_COLUMNS} ORDER BY id DESC")
            } else {
                format!("{CONFLICT_COLUMNS} WHERE resolved_ms IS NULL ORDER BY id DESC")
            };
            let mut st = c.prepare_cached(&sql)?;
            let rows = st.query_map([], conflict_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    pub fn conflict(&self, id: i64) -> Result<Option<ConflictRecord>, StoreError> {
        self.with_reader(|c| {
            Ok(
                c.prepare_cached(&format!("{CONFLICT_COLUMNS} WHERE id = ?1"))?
                    .query_row([id], conflict_row)
                    .optional()?,
            )
        })
    }

    /// Marks an open conflict reviewed, with what was done. Returns 1, or 0 if it was not
    /// open. Audited (the resolution text stays in the inbox, not in the audit log).
    pub fn resolve_conflict(
        &self,
        id: i64,
        chart: &str,
        by: &str,
        resolution: &str,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<u64, StoreError>>, StoreError> {
        let (by_s, res) = (by.to_string(), resolution.to_string());
        self.exec(
            Box::new(move |c: &Connection| {
                Ok(c.execute(
                    "UPDATE conflicts SET resolved_ms = ?2, resolved_by = ?3, resolution = ?4 WHERE id = ?1 AND resolved_ms IS NULL",
                    params![id, now_ms, by_s, res],
                )? as u64)
            }),
            vec![
                AuditEvent::new(now_ms, by, "conflict-resolved")
                    .chart(chart)
                    .detail(format!("conflict={id}")),
            ],
        )
    }

    /// This practice's own charts matching an emergency query: an exact MRN, or a family name
    /// (any case) with a birth date.
    pub fn find_own_charts(
        &self,
        mrn: Option<&str>,
        family: Option<&str>,
        birth_date: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        self.with_reader(|c| {
            let ids: Vec<String> = match (mrn.map(str::trim).filter(|m| !m.is_empty()), family, birth_date) {
                (Some(m), _, _) => c
                    .prepare_cached("SELECT id FROM charts WHERE mrn = ?1 AND origin IS NULL ORDER BY id")?
                    .query_map([m], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
                (None, Some(f), Some(b)) => c
                    .prepare_cached(
                        "SELECT id FROM charts WHERE birth_date = ?2 AND lower(family) = lower(?1) AND origin IS NULL ORDER BY id",
                    )?
                    .query_map(params![f.trim(), b.trim()], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
                _ => Vec::new(),
            };
            Ok(ids)
        })
    }

    /// Records emergency access granted to this practice by `peer` (before its charts
    /// arrive), so they can be removed when it ends.
    pub fn record_emergency_access(
        &self,
        peer: &str,
        charts: Vec<String>,
        expires_ms: i64,
        requester: &str,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<u64, StoreError>>, StoreError> {
        let (peer, requester) = (peer.to_string(), requester.to_string());
        self.exec(
            Box::new(move |c: &Connection| {
                let mut st = c.prepare_cached(
                    "INSERT INTO emergency_access(chart_id, peer, granted_ms, expires_ms, requester) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(chart_id, peer) DO UPDATE SET granted_ms = excluded.granted_ms, expires_ms = excluded.expires_ms, requester = excluded.requester",
                )?;
                for ch in &charts {
                    // Recorded by the local key the copy will be filed under.
                    let key = chartmesh_core::ids::copy_key(ch, &peer);
                    st.execute(params![key, peer, now_ms, expires_ms, requester])?;
                }
                Ok(charts.len() as u64)
            }),
            Vec::new(),
        )
    }

    /// Removes the charts held by emergency access that has ended (the custodian's grant
    /// expired and was not replaced by a lasting one): every row of each copy, in the same
    /// transaction as its audit entry. Returns the removed copies' keys in the store.
    /// None when nothing has ended (checked on a read connection, without the writer).
    ///
    /// A copy held since under another, still active grant of the same chart stays as that
    /// grant says. `me` is this practice: a copy holding entries written here (under a
    /// read-write grant of the same chart, before or after the emergency) is not removed, as
    /// no entry written here is ever deleted; it is kept marked revoked and read-only, like
    /// any copy whose grant ended.
    pub fn end_emergency_access(
        &self,
        now_ms: i64,
        me: chartmesh_core::PracticeId,
    ) -> Result<Option<EmergencyEnd>, StoreError> {
        // Ended: the time counted by this practice's clock has passed, or the custodian's
        // expiry (or revocation) has arrived and marked the copy since the access was
        // granted. A mark older than the grant is that of an earlier share that ended: the
        // emergency copy is still on its way and clears it when it arrives.
        const ENDED: &str =
            "SELECT chart_id, peer, expires_ms FROM emergency_access e WHERE e.expires_ms <= ?1
             OR EXISTS (SELECT 1 FROM charts c WHERE c.origin = e.peer
                        AND (c.id = e.chart_id OR c.id = e.chart_id || '@' || e.peer)
                        AND c.revoked_ms >= e.granted_ms)";
        let due: bool = self.with_reader(|c| {
            Ok(c.prepare_cached(&format!("SELECT EXISTS({ENDED})"))?
                .query_row([now_ms], |r| r.get(0))?)
        })?;
        if !due {
            return Ok(None);
        }
        let (tx, rx) = oneshot::channel();
        self.writer()?.send(crate::write::task(tx, move |ctx| {
            let ended: Vec<(String, String, i64)> = ctx
                .conn
                .prepare_cached(ENDED)?
                .query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let mut removed = Vec::new();
            for (chart, peer, emergency_ends) in ended {
                if let Some(key) = received_copy(ctx.conn, &peer, &chart)?.map(|(k, _)| k) {
                    let (access, expires, revoked): (Option<String>, Option<i64>, Option<i64>) =
                        ctx.conn
                            .prepare_cached(
                                "SELECT access, expires_ms, revoked_ms FROM charts WHERE id = ?1",
                            )?
                            .query_row([&key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                    // Held since under another grant of the custodian that is still active
                    // (an emergency grants reading until its end; a later share replaces it
                    // at the custodian): the copy stays, as that grant says.
                    let other_grant = revoked.is_none()
                        && match expires {
                            None => true,
                            Some(e) => {
                                e > now_ms
                                    && (access.as_deref() == Some("read-write")
                                        || e > emergency_ends + EMERGENCY_CLOCK_SLACK_MS)
                            }
                        };
                    if !other_grant {
                        let written_here = crate::write::load_doc(ctx.conn, &key)?
                            .is_some_and(|(mut doc, _, _)| doc.has_changes_by(&me));
                        if written_here {
                            ctx.conn.execute(
                                "UPDATE charts SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
                                params![key, now_ms],
                            )?;
                            ctx.audit(
                                &AuditEvent::new(now_ms, "emergency", "emergency-expired")
                                    .chart(&key)
                                    .peer(&peer)
                                    .detail("emergency access ended; the copy holds entries written here, so it is kept, read-only"),
                            )?;
                        } else {
                            remove_copy(ctx.conn, &key)?;
                            ctx.audit(
                                &AuditEvent::new(now_ms, "emergency", "emergency-expired")
                                    .chart(&key)
                                    .peer(&peer)
                                    .detail("emergency access ended; the copy was removed"),
                            )?;
                            removed.push(key);
                        }
                    }
                }
                ctx.conn.execute(
                    "DELETE FROM emergency_access WHERE chart_id = ?1 AND peer = ?2",
                    params![chart, peer],
                )?;
            }
            Ok(removed)
        }))?;
        Ok(Some(rx))
    }

    /// The key under which the copy of `custodian`'s chart `chart` is held here, if it is.
    pub fn received_copy_key(
        &self,
        custodian: &str,
        chart: &str,
    ) -> Result<Option<String>, StoreError> {
        self.with_reader(|c| Ok(received_copy(c, custodian, chart)?.map(|(k, _)| k)))
    }

    /// The audit entries of emergency access, both as requester and as custodian, oldest first.
    pub fn emergency_log(&self) -> Result<Vec<chartmesh_core::audit::AuditEntry>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "{} WHERE action LIKE 'emergency%' ORDER BY seq",
                crate::read::AUDIT_COLUMNS
            ))?;
            let rows = st.query_map([], crate::read::row_to_entry)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Every chart that is not a revoked copy, with its due-list facts when kept (None: read
    /// the document). One pass over the chart rows, which hold no documents.
    pub fn due_facts(&self) -> Result<Vec<(String, Option<String>)>, StoreError> {
        self.with_reader(|c| {
            let rows = c
                .prepare_cached(
                    "SELECT id, due_facts FROM charts WHERE origin IS NULL OR revoked_ms IS NULL ORDER BY id",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }
}
