//! Workflow tables beside the charts: which chart holds each referral (kept on every write of
//! a chart, so listing referrals reads an index, not every document) and the clinical
//! conflict inbox (risky merges filed by the sync apply path, resolved by a person).
//!
//! Owns: the `referral_index` and `conflicts` tables.
//! Must not touch: the documents themselves; referral steps are chart edits.

use chartmesh_core::audit::AuditEvent;
use chartmesh_core::conflicts::Conflict;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::{Store, StoreError};

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
}
