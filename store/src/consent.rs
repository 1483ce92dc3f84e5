//! Paired practices and consent grants, as stored. The rules that decide what a grant allows
//! are in `chartmesh_core::consent`; this module only keeps the records.

use chartmesh_core::PracticeId;
use chartmesh_core::audit::AuditEvent;
use chartmesh_core::consent::{ALL_CHARTS, Access, Grant, Purpose};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::{Store, StoreError, write::WriteOp};

/// A paired practice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub id: PracticeId,
    pub name: String,
    /// host:port of its QUIC endpoint.
    pub addr: String,
    pub added_by: String,
    pub added_ms: i64,
}

fn access_str(a: Access) -> &'static str {
    match a {
        Access::Read => "read",
        Access::ReadWrite => "read-write",
    }
}

fn purpose_str(p: Purpose) -> &'static str {
    match p {
        Purpose::Referral => "referral",
        Purpose::Continuity => "continuity",
        Purpose::Emergency => "emergency",
        Purpose::Replica => "replica",
    }
}

fn row_to_grant(r: &rusqlite::Row<'_>) -> rusqlite::Result<Grant> {
    let bad = |i: usize, e: chartmesh_core::ValidationError| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    };
    Ok(Grant {
        chart_id: r.get(0)?,
        peer: r.get::<_, String>(1)?.parse().map_err(|e| bad(1, e))?,
        access: r.get::<_, String>(2)?.parse().map_err(|e| bad(2, e))?,
        purpose: r.get::<_, String>(3)?.parse().map_err(|e| bad(3, e))?,
        expires_ms: r.get(4)?,
        recorded_by: r.get(5)?,
        recorded_ms: r.get(6)?,
        revoked_ms: r.get(7)?,
    })
}

const GRANT_COLUMNS: &str = "SELECT chart_id, peer, access, purpose, expires_ms, recorded_by, recorded_ms, revoked_ms FROM grants";

/// What a revocation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Revoked {
    /// Grants that were in force and are revoked now (with `--all`: every grant of the peer).
    pub revoked: u64,
    /// The listed charts that stopped being shared.
    pub charts: Vec<String>,
    /// The listed charts that were not shared with the peer (nothing to revoke).
    pub not_shared: Vec<String>,
}

/// Whether `id` is one of this practice's own charts (not a received copy).
fn own_chart(c: &Connection, id: &str) -> Result<bool, StoreError> {
    Ok(
        c.prepare_cached("SELECT origin IS NULL FROM charts WHERE id = ?1")?
            .query_row([id], |r| r.get::<_, bool>(0))
            .optional()?
            .unwrap_or(false),
    )
}

/// A peer's grants as stored now (inside the caller's transaction).
pub(crate) fn grants_of(c: &Connection, peer: &str) -> Result<Vec<Grant>, StoreError> {
    let mut st = c.prepare_cached(&format!(
        "{GRANT_COLUMNS} WHERE peer = ?1 ORDER BY chart_id"
    ))?;
    let rows = st.query_map([peer], row_to_grant)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// The peer's grants that apply to `charts`: each chart's own grant and an all-charts grant
/// (what [`chartmesh_core::consent::applicable`] looks at), by primary key, instead of every
/// grant of the peer.
pub(crate) fn grants_for(
    c: &Connection,
    peer: &str,
    charts: &[&str],
) -> Result<Vec<Grant>, StoreError> {
    let mut st = c.prepare_cached(&format!(
        "{GRANT_COLUMNS} WHERE chart_id = ?1 AND peer = ?2"
    ))?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for chart in std::iter::once(ALL_CHARTS).chain(charts.iter().copied()) {
        if !seen.insert(chart) {
            continue;
        }
        if let Some(g) = st
            .query_row(params![chart, peer], row_to_grant)
            .optional()?
        {
            out.push(g);
        }
    }
    Ok(out)
}

impl Store {
    pub(crate) fn exec(
        &self,
        f: crate::write::ExecFn,
        audit: Vec<AuditEvent>,
    ) -> Result<oneshot::Receiver<Result<u64, StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer()?.send(WriteOp::Exec {
            f,
            audit,
            reply: tx,
        })?;
        Ok(rx)
    }

    /// Adds (or updates the name and address of) a paired practice.
    pub fn put_peer(
        &self,
        peer: Peer,
    ) -> Result<oneshot::Receiver<Result<u64, StoreError>>, StoreError> {
        let audit = vec![
            AuditEvent::new(peer.added_ms, &peer.added_by, "pair")
                .peer(peer.id.to_string())
                .detail(format!("addr={}", peer.addr)),
        ];
        self.exec(
            Box::new(move |c: &Connection| {
                Ok(c.execute(
                    "INSERT INTO peers(id, name, addr, added_by, added_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(id) DO UPDATE SET name = excluded.name, addr = excluded.addr",
                    params![peer.id.to_string(), peer.name, peer.addr, peer.added_by, peer.added_ms],
                )? as u64)
            }),
            audit,
        )
    }

    /// Removes a paired practice and revokes every grant it held.
    pub fn remove_peer(
        &self,
        id: PracticeId,
        by: &str,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<u64, StoreError>>, StoreError> {
        let audit = vec![AuditEvent::new(now_ms, by, "unpair").peer(id.to_string())];
        self.exec(
            Box::new(move |c: &Connection| {
                let n = c.execute("DELETE FROM peers WHERE id = ?1", [id.to_string()])?;
                let seq = crate::schema::take_seq(c, 1)?;
                c.execute(
                    "UPDATE grants SET revoked_ms = ?2, seq = ?3 WHERE peer = ?1 AND revoked_ms IS NULL",
                    params![id.to_string(), now_ms, seq],
                )?;
                Ok(n as u64)
            }),
            audit,
        )
    }

    pub fn peers(&self) -> Result<Vec<Peer>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, name, addr, added_by, added_ms FROM peers ORDER BY name, id",
            )?;
            let rows = st.query_map([], |r| {
                let id: String = r.get(0)?;
                Ok((id, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, name, addr, added_by, added_ms): (String, String, String, String, i64) =
                    row?;
                if let Ok(id) = id.parse() {
                    out.push(Peer {
                        id,
                        name,
                        addr,
                        added_by,
                        added_ms,
                    });
                }
            }
            Ok(out)
        })
    }

    pub fn peer(&self, id: &PracticeId) -> Result<Option<Peer>, StoreError> {
        Ok(self.peers()?.into_iter().find(|p| &p.id == id))
    }

    /// Records grants (replacing an earlier grant of the same chart to the same peer). Each is
    /// audited as a share.
    pub fn grant(
        &self,
        grants: Vec<Grant>,
    ) -> Result<oneshot::Receiver<Result<u64, StoreError>>, StoreError> {
        let audit = grants
            .iter()
            .map(|g| {
                AuditEvent::new(g.recorded_ms, &g.recorded_by, "share")
                    .chart(&g.chart_id)
                    .peer(g.peer.to_string())
                    .detail(format!(
                        "access={} purpose={}",
                        access_str(g.access),
                        purpose_str(g.purpose)
                    ))
            })
            .collect();
        self.exec(
            Box::new(move |c: &Connection| {
                let seq = crate::schema::take_seq(c, 1)?;
                let mut st = c.prepare_cached(
                    "INSERT INTO grants(chart_id, peer, access, purpose, expires_ms, recorded_by, recorded_ms, revoked_ms, seq)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8)
                     ON CONFLICT(chart_id, peer) DO UPDATE SET access = excluded.access, purpose = excluded.purpose,
                        expires_ms = excluded.expires_ms, recorded_by = excluded.recorded_by,
                        recorded_ms = excluded.recorded_ms, revoked_ms = NULL, expired_ms = NULL, seq = excluded.seq",
                )?;
                for g in &grants {
                    st.execute(params![
                        g.chart_id,
                        g.peer.to_string(),
                        access_str(g.access),
                        purpose_str(g.purpose),
                        g.expires_ms,
                        g.recorded_by,
                        g.recorded_ms,
                        seq
                    ])?;
                }
                Ok(grants.len() as u64)
            }),
            audit,
        )
    }

    /// Revokes the peer's grants of the listed charts, or all its grants. A listed chart
    /// shared only under the peer's all-charts grant gets a revoked grant of its own, which
    /// wins over `*` (`consent::applicable` prefers a chart's own grant), so it stops being
    /// sent while the others still are. Each revocation is audited in the same transaction,
    /// saying which kind it was; a chart that was not shared is reported, not audited.
    pub fn revoke(
        &self,
        peer: PracticeId,
        charts: Option<Vec<String>>,
        by: &str,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<Revoked, StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        let by = by.to_string();
        self.writer()?.send(crate::write::task(tx, move |ctx| {
            let p = peer.to_string();
            let seq = crate::schema::take_seq(ctx.conn, 1)?;
            let mut out = Revoked::default();
            let Some(ids) = charts else {
                let n = ctx.conn.execute(
                    "UPDATE grants SET revoked_ms = ?2, seq = ?3 WHERE peer = ?1 AND revoked_ms IS NULL",
                    params![p, now_ms, seq],
                )?;
                if n > 0 {
                    ctx.audit(
                        &AuditEvent::new(now_ms, &by, "revoke")
                            .chart(ALL_CHARTS)
                            .peer(&p)
                            .detail(format!("all: {n} grant(s)")),
                    )?;
                }
                out.revoked = n as u64;
                return Ok(out);
            };
            let all = grants_of(ctx.conn, &p)?
                .into_iter()
                .find(|g| g.chart_id == ALL_CHARTS && g.is_active(now_ms));
            for id in ids {
                let own: Option<(Option<i64>,)> = ctx
                    .conn
                    .prepare_cached("SELECT revoked_ms FROM grants WHERE peer = ?1 AND chart_id = ?2")?
                    .query_row(params![p, id], |r| Ok((r.get(0)?,)))
                    .optional()?;
                let detail = match (own, &all) {
                    // The chart's own grant, still in force.
                    (Some((None,)), _) => {
                        ctx.conn.execute(
                            "UPDATE grants SET revoked_ms = ?3, seq = ?4 WHERE peer = ?1 AND chart_id = ?2",
                            params![p, id, now_ms, seq],
                        )?;
                        "grant of this chart".to_string()
                    }
                    // Shared only under `*`: record this chart's exception (one of our own
                    // charts only; `*` never covers a received copy).
                    (None, Some(g)) if own_chart(ctx.conn, &id)? => {
                        ctx.conn.execute(
                            "INSERT INTO grants(chart_id, peer, access, purpose, expires_ms, recorded_by, recorded_ms, revoked_ms, seq)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)",
                            params![id, p, access_str(g.access), purpose_str(g.purpose), g.expires_ms, by, now_ms, seq],
                        )?;
                        format!(
                            "exception to the all-charts grant ({} {})",
                            access_str(g.access),
                            purpose_str(g.purpose)
                        )
                    }
                    _ => {
                        out.not_shared.push(id);
                        continue;
                    }
                };
                ctx.audit(
                    &AuditEvent::new(now_ms, &by, "revoke")
                        .chart(&id)
                        .peer(&p)
                        .detail(detail),
                )?;
                out.revoked += 1;
                out.charts.push(id);
            }
            Ok(out)
        }))?;
        Ok(rx)
    }

    /// Grants, optionally of one peer, revoked ones included (they say when).
    pub fn grants(&self, peer: Option<&PracticeId>) -> Result<Vec<Grant>, StoreError> {
        let p = peer.map(|p| p.to_string());
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "{GRANT_COLUMNS} WHERE (?1 IS NULL OR peer = ?1) ORDER BY peer, chart_id"
            ))?;
            let rows = st.query_map([&p], row_to_grant)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// The last number taken from the change sequence.
    pub fn seq(&self) -> Result<i64, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached("SELECT n FROM sequence WHERE id = 1")?
                .query_row([], |r| r.get(0))?)
        })
    }

    /// Charts changed after `since` (id and sequence), oldest first, at most `limit`.
    pub fn charts_since(&self, since: i64, limit: usize) -> Result<Vec<(String, i64)>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, seq FROM charts WHERE seq > ?1 ORDER BY seq, id LIMIT ?2",
            )?;
            let rows =
                st.query_map(params![since, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Where a chart came from: `Some(None)` for this practice's own chart, `Some(Some(peer))`
    /// for one received from a peer, `None` if there is no such chart.
    pub fn chart_origin(&self, id: &str) -> Result<Option<Option<String>>, StoreError> {
        self.with_reader(|c| {
            Ok(
                c.query_row("SELECT origin FROM charts WHERE id = ?1", [id], |r| {
                    r.get::<_, Option<String>>(0)
                })
                .optional()?,
            )
        })
    }
}
