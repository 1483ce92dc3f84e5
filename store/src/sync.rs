//! What the sync layer reads and writes: per chart its heads, sharing state and sequence; per
//! peer its checkpoint; and the durable application of what a peer sent. The consent rules
//! themselves are passed in by the caller (`chartmesh_core::consent`); this module only
//! applies them inside the same transaction as the write they guard, with the grants as
//! stored at that moment.

use chartmesh_core::audit::AuditEvent;
use chartmesh_core::consent::{Access, Grant, Refusal};
use chartmesh_core::sync::{Offered, heads_digest};
use chartmesh_core::{Chart, ChartDoc};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use tokio::sync::oneshot;

use crate::write::{
    DocWrite, NewChart, Stored, doc_write, heads_blob, heads_from_blob, load_doc, task, write_doc,
};
use crate::{Store, StoreError};

/// A chart as the sync layer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncChart {
    pub id: String,
    pub seq: i64,
    pub heads: Vec<[u8; 32]>,
    /// None: this practice's own chart; Some(peer): received from that peer.
    pub origin: Option<String>,
    /// For a received chart: the access its custodian granted.
    pub access: Option<Access>,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
}

/// Sync bookkeeping of one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncPeerState {
    /// The peer's change sequence applied here up to this number.
    pub checkpoint: i64,
    pub last_pull_ms: Option<i64>,
    /// Our change sequence the peer confirmed it holds.
    pub served_upto: i64,
    pub last_served_ms: Option<i64>,
}

/// One item of a pull to apply.
#[derive(Debug, Clone)]
pub struct SyncItem {
    pub chart: String,
    pub kind: Offered,
    /// Changes to merge into an existing copy.
    pub data: Option<Vec<u8>>,
    /// The full document, already loaded and validated by the caller, for a chart not held
    /// here when the pull started.
    pub prepared: Option<NewChart>,
    /// The merge of `data` into the stored copy, computed by the caller off the writer
    /// ([`Store::prepare_merge`]); used only if the chart was not written since.
    pub merge: Option<PreparedMerge>,
}

/// A merge of a peer's changes into a stored chart, computed from the stored version with
/// change sequence `seq`.
#[derive(Debug, Clone)]
pub struct PreparedMerge {
    seq: i64,
    inc_seq: i64,
    inc_count: i64,
    /// Whether it was computed as one of this practice's own charts (validated in full).
    own: bool,
    result: MergeResult,
}

#[derive(Debug, Clone)]
enum MergeResult {
    Undecodable(String),
    MissingDeps(usize),
    Merged {
        added: usize,
        actors: Vec<[u8; 16]>,
        /// The practices named by referral steps the changes add.
        referral_claims: Vec<String>,
        /// What to store (None when nothing was new), or why the result is refused.
        ready: Result<Option<Box<Ready>>, String>,
    },
}

#[derive(Debug, Clone)]
struct Ready {
    write: DocWrite,
    ix: crate::IndexFields,
    conflicts: Vec<chartmesh_core::conflicts::Conflict>,
}

/// Merges `data` into the loaded document and computes everything the writer stores.
fn compute_merge(
    doc: &mut ChartDoc,
    chart: &str,
    data: &[u8],
    own: bool,
    options: &crate::StoreOptions,
    inc_count: i64,
) -> MergeResult {
    // Mark what is stored, so only the merge's changes are saved.
    let _ = doc.save_incremental();
    let referrals_before = doc.referrals().unwrap_or_default();
    let merged = match doc.merge(data) {
        Ok(m) => m,
        Err(e) => return MergeResult::Undecodable(e.to_string()),
    };
    if merged.missing_deps > 0 {
        return MergeResult::MissingDeps(merged.missing_deps);
    }
    let referral_claims = match doc.referrals() {
        Ok(after) => chartmesh_core::referral::claims_added(&referrals_before, &after),
        Err(_) => Vec::new(),
    };
    let ready = if merged.added == 0 {
        Ok(None)
    } else {
        index_of_merged(doc, chart, own).map(|ix| {
            // Concurrent edits merged: the clinically risky ones are filed for review. A
            // chart that does not read as records was refused above, so a failure is not
            // expected; it is reported without holding back the merge (the data is kept).
            let conflicts = doc.review_merge(&merged).unwrap_or_else(|_| {
                // The error may quote an entry: only the chart id is logged.
                tracing::warn!(chart, "conflict review skipped: its records do not read");
                Vec::new()
            });
            Some(Box::new(Ready {
                write: doc_write(doc, options, inc_count),
                ix,
                conflicts,
            }))
        })
    };
    MergeResult::Merged {
        added: merged.added,
        actors: merged.actors,
        referral_claims,
        ready,
    }
}

/// Changes to one of our own charts are validated in full: the result must still be a valid
/// chart. A copy held from its custodian is filed by its header (id and index fields), like
/// a new copy (daemon::sync::prepare_new).
fn index_of_merged(doc: &ChartDoc, chart: &str, own: bool) -> Result<crate::IndexFields, String> {
    if own {
        let json = doc
            .to_json()
            .map_err(|e| format!("the merged chart is unreadable: {e}"))?;
        if json["id"].as_str() != Some(chart) {
            return Err("the changes alter the chart id".into());
        }
        let ix = crate::IndexFields::from_chart_json(&json);
        Chart::from_json_value(json).map_err(|e| format!("the merged chart is invalid: {e}"))?;
        Ok(ix)
    } else {
        match doc.header() {
            Ok(h) if h.id == chart => Ok(crate::IndexFields {
                mrn: h.mrn,
                family: h.family,
                given: h.given,
                birth_date: h.birth_date,
            }),
            Ok(_) => Err("the changes alter the chart id".into()),
            Err(e) => Err(format!("the merged chart is invalid: {e}")),
        }
    }
}

impl Store {
    /// Computes the merge of a peer's changes into the stored chart on the caller's thread
    /// (a read connection, one snapshot), so the writer only checks consent and stores it.
    /// None if the chart is not stored.
    pub fn prepare_merge(
        &self,
        chart: &str,
        data: &[u8],
        own: bool,
    ) -> Result<Option<PreparedMerge>, StoreError> {
        let options = self.inner.options.clone();
        let t0 = std::time::Instant::now();
        self.with_reader(|c| {
            let t_lease = t0.elapsed();
            let tx = c.unchecked_transaction()?;
            let Some(seq) = current_seq(&tx, chart)? else {
                return Ok(None);
            };
            let Some((mut doc, inc_seq, inc_count)) = load_doc(&tx, chart)? else {
                return Ok(None);
            };
            drop(tx);
            let t_load = t0.elapsed();
            let result = compute_merge(&mut doc, chart, data, own, &options, inc_count);
            tracing::trace!(
                lease_us = t_lease.as_micros() as u64,
                load_us = t_load.as_micros() as u64,
                total_us = t0.elapsed().as_micros() as u64,
                "merge prepared"
            );
            Ok(Some(PreparedMerge {
                seq,
                inc_seq,
                inc_count,
                own,
                result,
            }))
        })
    }
}

fn current_seq(conn: &Connection, chart: &str) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT seq FROM charts WHERE id = ?1")?
        .query_row([chart], |r| r.get(0))
        .optional()?)
}

/// What became of one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Stored (new chart, or changes merged); `changed` false if nothing was new.
    Applied { changed: bool },
    /// Only the grant it is held under changed.
    Updated,
    /// Marked revoked here.
    Revoked,
    /// Nothing to do.
    Ignored,
    /// Refused; the chart stays as it was. The reason went to the audit log.
    Refused(String),
}

/// Decides whether a peer's changes to one of this practice's charts may be applied: given
/// the peer's grants (as stored now), the chart id and the actors of the new changes.
pub type ChangeCheck = Box<dyn Fn(&[Grant], &str, &[[u8; 16]]) -> Result<(), Refusal> + Send>;

fn access_of(s: Option<String>) -> Option<Access> {
    s.and_then(|s| s.parse().ok())
}

fn access_str(a: Access) -> &'static str {
    match a {
        Access::Read => "read",
        Access::ReadWrite => "read-write",
    }
}

const SYNC_COLUMNS: &str =
    "SELECT id, seq, heads, origin, access, expires_ms, revoked_ms FROM charts";

fn row_to_sync(conn: &Connection, r: &rusqlite::Row<'_>) -> Result<SyncChart, StoreError> {
    let id: String = r.get(0)?;
    let heads = match r.get::<_, Option<Vec<u8>>>(2)? {
        Some(b) => heads_from_blob(&b),
        // Written before heads were kept: load the document once to learn them.
        None => match load_doc(conn, &id)? {
            Some((mut d, _, _)) => d.head_bytes(),
            None => Vec::new(),
        },
    };
    Ok(SyncChart {
        seq: r.get(1)?,
        heads,
        origin: r.get(3)?,
        access: access_of(r.get(4)?),
        expires_ms: r.get(5)?,
        revoked_ms: r.get(6)?,
        id,
    })
}

fn query_sync(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<SyncChart>, StoreError> {
    let mut st = conn.prepare_cached(sql)?;
    let mut rows = st.query(params)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(row_to_sync(conn, r)?);
    }
    Ok(out)
}

impl Store {
    /// Charts that changed after `since` and that `peer` may need (by the sequence index:
    /// left to itself SQLite prefers the origin index and scans every chart, which made a
    /// no-op reconnect grow with the number of charts): this practice's own charts
    /// (consent is for the caller to check) and the peer's charts held here read-write. A
    /// version the peer itself wrote and holds entirely is left out.
    pub fn sync_changed_since(&self, peer: &str, since: i64) -> Result<Vec<SyncChart>, StoreError> {
        self.with_reader(|c| {
            query_sync(
                c,
                &format!(
                    "{SYNC_COLUMNS} INDEXED BY charts_seq WHERE seq > ?2 AND (from_peer IS NULL OR from_peer != ?1)
                     AND (origin IS NULL OR (origin = ?1 AND access = 'read-write' AND revoked_ms IS NULL))
                     ORDER BY seq"
                ),
                params![peer, since],
            )
        })
    }

    /// This practice's own charts (all of them, or the listed ones).
    pub fn sync_own_charts(&self, ids: Option<&[String]>) -> Result<Vec<SyncChart>, StoreError> {
        self.with_reader(|c| match ids {
            None => query_sync(
                c,
                &format!("{SYNC_COLUMNS} WHERE origin IS NULL ORDER BY id"),
                [],
            ),
            Some(ids) => {
                let mut out = Vec::new();
                for id in ids {
                    out.extend(query_sync(
                        c,
                        &format!("{SYNC_COLUMNS} WHERE id = ?1 AND origin IS NULL"),
                        [id],
                    )?);
                }
                Ok(out)
            }
        })
    }

    /// The listed charts as held here (absent ones are left out).
    pub fn sync_charts(&self, ids: &[&str]) -> Result<HashMap<String, SyncChart>, StoreError> {
        self.with_reader(|c| {
            let mut out = HashMap::with_capacity(ids.len());
            for id in ids {
                for sc in query_sync(c, &format!("{SYNC_COLUMNS} WHERE id = ?1"), [id])? {
                    out.insert(sc.id.clone(), sc);
                }
            }
            Ok(out)
        })
    }

    /// A chart's stored document as bytes loadable by automerge (the full save followed by
    /// its incremental changes), without loading it.
    pub fn chart_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_reader(|c| {
            let base: Option<(Vec<u8>, i64)> = c
                .prepare_cached(
                    "SELECT d.doc, c.inc_count FROM charts c JOIN chart_docs d ON d.chart_id = c.id WHERE c.id = ?1",
                )?
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((mut bytes, incs)) = base else {
                return Ok(None);
            };
            if incs > 0 {
                let mut st = c.prepare_cached(
                    "SELECT data FROM chart_changes WHERE chart_id = ?1 ORDER BY seq",
                )?;
                let rows = st.query_map([id], |r| r.get::<_, Vec<u8>>(0))?;
                for r in rows {
                    bytes.extend(r?);
                }
            }
            Ok(Some(bytes))
        })
    }

    /// The changes of a chart that a peer with heads `have` lacks.
    pub fn chart_changes_after(
        &self,
        id: &str,
        have: &[[u8; 32]],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_reader(|c| {
            // Fast path: the peer is at the start of one of our stored chunks.
            let mut want = have.to_vec();
            want.sort_unstable();
            let mut st = c.prepare_cached(
                "SELECT heads_before, data FROM chart_changes WHERE chart_id = ?1 ORDER BY seq",
            )?;
            let rows = st.query_map([id], |r| {
                Ok((r.get::<_, Option<Vec<u8>>>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?;
            let mut out: Option<Vec<u8>> = None;
            for row in rows {
                let (before, data) = row?;
                match &mut out {
                    Some(bytes) => bytes.extend(data),
                    None => {
                        if let Some(b) = before {
                            let mut hb = heads_from_blob(&b);
                            hb.sort_unstable();
                            if !want.is_empty() && hb == want {
                                out = Some(data);
                            }
                        }
                    }
                }
            }
            if out.is_some() {
                return Ok(out);
            }
            Ok(load_doc(c, id)?.map(|(mut d, _, _)| d.changes_after(have)))
        })
    }

    /// Whether anything changed after `since` that `peer` may need (cheap: existence only).
    pub fn sync_pending(&self, peer: &str, since: i64) -> Result<bool, StoreError> {
        self.with_reader(|c| {
            let charts: bool = c
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM charts INDEXED BY charts_seq WHERE seq > ?2 AND (from_peer IS NULL OR from_peer != ?1)
                     AND (origin IS NULL OR (origin = ?1 AND access = 'read-write' AND revoked_ms IS NULL)))",
                )?
                .query_row(params![peer, since], |r| r.get(0))?;
            let grants: bool = c
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM grants WHERE peer = ?1 AND seq > ?2)")?
                .query_row(params![peer, since], |r| r.get(0))?;
            Ok(charts || grants)
        })
    }

    /// Grants of `peer` recorded, changed, revoked after `since` (with their sequence).
    pub fn grants_changed_since(&self, peer: &str, since: i64) -> Result<Vec<String>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(
                "SELECT chart_id FROM grants WHERE peer = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            let rows = st.query_map(params![peer, since], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub fn sync_peer_state(&self, peer: &str) -> Result<SyncPeerState, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached(
                "SELECT checkpoint, last_pull_ms, served_upto, last_served_ms FROM sync_peers WHERE peer = ?1",
            )?
            .query_row([peer], |r| {
                Ok(SyncPeerState {
                    checkpoint: r.get(0)?,
                    last_pull_ms: r.get(1)?,
                    served_upto: r.get(2)?,
                    last_served_ms: r.get(3)?,
                })
            })
            .optional()?
            .unwrap_or_default())
        })
    }

    /// Counts of charts shared each way with `peer`: (ours it may receive under an active
    /// grant is for the caller; here) received from it and not revoked.
    pub fn received_count(&self, peer: &str) -> Result<u64, StoreError> {
        self.with_reader(|c| {
            Ok(c.query_row(
                "SELECT count(*) FROM charts WHERE origin = ?1 AND revoked_ms IS NULL",
                [peer],
                |r| r.get::<_, i64>(0),
            )? as u64)
        })
    }

    /// How many charts this practice holds as its own (not received).
    pub fn own_count(&self) -> Result<u64, StoreError> {
        self.with_reader(|c| {
            Ok(c.query_row(
                "SELECT count(*) FROM charts WHERE origin IS NULL",
                [],
                |r| r.get::<_, i64>(0),
            )? as u64)
        })
    }

    /// Records that everything `peer` offered up to `upto` is durable here.
    pub fn set_checkpoint(
        &self,
        peer: &str,
        upto: i64,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        self.raise_sync_mark(peer, "checkpoint", "last_pull_ms", upto, now_ms)
    }

    /// Records that `peer` confirmed holding everything of ours up to `upto`.
    pub fn set_served(
        &self,
        peer: &str,
        upto: i64,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        self.raise_sync_mark(peer, "served_upto", "last_served_ms", upto, now_ms)
    }

    /// Raises one of a peer's sync marks (never lowers it) and stamps when.
    fn raise_sync_mark(
        &self,
        peer: &str,
        mark: &'static str,
        stamp: &'static str,
        upto: i64,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        let peer = peer.to_string();
        self.writer()?.send(task(tx, move |ctx| {
            ctx.conn.execute(
                &format!(
                    "INSERT INTO sync_peers(peer, {mark}, {stamp}) VALUES (?1, ?2, ?3)
                     ON CONFLICT(peer) DO UPDATE SET {mark} = max({mark}, excluded.{mark}), {stamp} = excluded.{stamp}"
                ),
                params![peer, upto, now_ms],
            )?;
            Ok(())
        }))?;
        Ok(rx)
    }

    /// Applies what `peer` sent, item by item, in one transaction: new charts, merged
    /// changes, grant updates and revocations. `check` decides on changes to this practice's
    /// own charts. Every receipt and refusal is audited in the same transaction.
    pub fn apply_sync(
        &self,
        peer: String,
        items: Vec<SyncItem>,
        check: ChangeCheck,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<Vec<SyncOutcome>, StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer()?.send(task(tx, move |ctx| {
            let t = std::time::Instant::now();
            let grants = crate::consent::grants_of(ctx.conn, &peer)?;
            let mut out = Vec::with_capacity(items.len());
            let n = items.len();
            for item in items {
                out.push(apply_one(ctx, &peer, item, &check, &grants, now_ms)?);
            }
            tracing::debug!(
                items = n,
                apply_us = t.elapsed().as_micros() as u64,
                "sync batch applied in the writer"
            );
            Ok(out)
        }))?;
        Ok(rx)
    }
}

struct Row {
    origin: Option<String>,
    access: Option<String>,
    expires_ms: Option<i64>,
    revoked_ms: Option<i64>,
}

fn apply_one(
    ctx: &mut crate::write::TaskCtx<'_>,
    peer: &str,
    item: SyncItem,
    check: &ChangeCheck,
    grants: &[Grant],
    now: i64,
) -> Result<SyncOutcome, StoreError> {
    let row: Option<Row> = ctx
        .conn
        .prepare_cached("SELECT origin, access, expires_ms, revoked_ms FROM charts WHERE id = ?1")?
        .query_row([&item.chart], |r| {
            Ok(Row {
                origin: r.get(0)?,
                access: r.get(1)?,
                expires_ms: r.get(2)?,
                revoked_ms: r.get(3)?,
            })
        })
        .optional()?;
    let audit = |action: &str| {
        AuditEvent::new(now, "sync", action)
            .chart(&item.chart)
            .peer(peer)
    };
    let from_peer_row = row
        .as_ref()
        .is_some_and(|r| r.origin.as_deref() == Some(peer));
    match (item.kind, row) {
        (Offered::Revoked, Some(r)) if from_peer_row => {
            if r.revoked_ms.is_some() {
                return Ok(SyncOutcome::Ignored);
            }
            ctx.conn.execute(
                "UPDATE charts SET revoked_ms = ?2 WHERE id = ?1",
                params![item.chart, now],
            )?;
            ctx.audit(&audit("revoked").detail("the custodian stopped sharing this chart"))?;
            Ok(SyncOutcome::Revoked)
        }
        (Offered::Revoked, _) => Ok(SyncOutcome::Ignored),
        (
            Offered::Shared {
                digest,
                access,
                expires_ms,
            },
            None,
        ) => {
            let Some(nc) = item.prepared else {
                return refuse(
                    ctx,
                    audit("refuse"),
                    "a new chart arrived without its document",
                );
            };
            let seq = crate::schema::take_seq(ctx.conn, 1)?;
            let from = (heads_digest(&nc.heads) == digest).then_some(peer);
            ctx.conn
                .prepare_cached(
                    "INSERT INTO charts(id, origin, created_ms, updated_ms, mrn, family, given, birth_date, name_key, seq, heads, access, expires_ms, from_peer, due_facts)
                     VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )?
                .execute(params![
                    nc.id,
                    peer,
                    now,
                    nc.index.mrn,
                    nc.index.family,
                    nc.index.given,
                    nc.index.birth_date,
                    crate::write::name_key(&nc.index),
                    seq,
                    heads_blob(&nc.heads),
                    access_str(access),
                    expires_ms,
                    from,
                    nc.due_facts
                ])?;
            crate::write::insert_doc(ctx.conn, &nc.id, &nc.doc)?;
            crate::workflow::index_referrals(ctx.conn, &nc.id, &nc.referrals)?;
            ctx.audit(
                &audit("sync-receive").detail(format!("new copy, access={}", access_str(access))),
            )?;
            Ok(SyncOutcome::Applied { changed: true })
        }
        (
            Offered::Shared {
                digest,
                access,
                expires_ms,
            },
            Some(r),
        ) if from_peer_row => {
            let grant_changed = r.access.as_deref() != Some(access_str(access))
                || r.expires_ms != expires_ms
                || r.revoked_ms.is_some();
            if grant_changed {
                ctx.conn.execute(
                    "UPDATE charts SET access = ?2, expires_ms = ?3, revoked_ms = NULL WHERE id = ?1",
                    params![item.chart, access_str(access), expires_ms],
                )?;
                ctx.audit(
                    &audit("share-received").detail(format!("access={}", access_str(access))),
                )?;
            }
            match item.data {
                Some(data) => merge(
                    ctx,
                    peer,
                    &item.chart,
                    &data,
                    digest,
                    None,
                    item.merge,
                    grants,
                    now,
                ),
                None if grant_changed => Ok(SyncOutcome::Updated),
                None => Ok(SyncOutcome::Ignored),
            }
        }
        (Offered::Shared { .. }, Some(_)) => {
            // Our own chart, or one held from another practice, under the same id.
            refuse(ctx, audit("refuse"), Refusal::NotOurs.as_str())
        }
        (Offered::Returned { digest }, Some(r)) if r.origin.is_none() => match item.data {
            Some(data) => merge(
                ctx,
                peer,
                &item.chart,
                &data,
                digest,
                Some(check),
                item.merge,
                grants,
                now,
            ),
            None => Ok(SyncOutcome::Ignored),
        },
        (Offered::Returned { .. }, _) => refuse(ctx, audit("refuse"), Refusal::NoGrant.as_str()),
    }
}

fn refuse(
    ctx: &mut crate::write::TaskCtx<'_>,
    event: AuditEvent,
    why: &str,
) -> Result<SyncOutcome, StoreError> {
    ctx.audit(&event.detail(why))?;
    Ok(SyncOutcome::Refused(why.to_string()))
}

#[allow(clippy::too_many_arguments)]
fn merge(
    ctx: &mut crate::write::TaskCtx<'_>,
    peer: &str,
    chart: &str,
    data: &[u8],
    digest: u64,
    check: Option<&ChangeCheck>,
    prepared: Option<PreparedMerge>,
    grants: &[Grant],
    now: i64,
) -> Result<SyncOutcome, StoreError> {
    let audit = || {
        AuditEvent::new(now, "sync", "refuse")
            .chart(chart)
            .peer(peer)
    };
    let t0 = std::time::Instant::now();
    let own = check.is_some();
    // A merge prepared off the writer is used only if nothing wrote the chart since it was
    // read; otherwise it is computed here from the stored version.
    let current = current_seq(ctx.conn, chart)?;
    let fresh = prepared
        .as_ref()
        .is_some_and(|p| Some(p.seq) == current && p.own == own);
    let p = match prepared {
        Some(p) if fresh => p,
        _ => {
            let Some((mut doc, inc_seq, inc_count)) = load_doc(ctx.conn, chart)? else {
                return Ok(SyncOutcome::Ignored);
            };
            PreparedMerge {
                seq: current.unwrap_or(0),
                inc_seq,
                inc_count,
                own,
                result: compute_merge(&mut doc, chart, data, own, ctx.options, inc_count),
            }
        }
    };
    let (added, actors, referral_claims, ready) = match p.result {
        MergeResult::Undecodable(e) => {
            return refuse(ctx, audit(), &format!("undecodable changes: {e}"));
        }
        MergeResult::MissingDeps(n) => {
            return refuse(
                ctx,
                audit(),
                &format!("{n} changes depend on changes not sent"),
            );
        }
        MergeResult::Merged {
            added,
            actors,
            referral_claims,
            ready,
        } => (added, actors, referral_claims, ready),
    };
    if let Some(check) = check
        && let Err(r) = check(grants, chart, &actors)
    {
        return refuse(ctx, audit(), r.as_str());
    }
    // On our own chart, a peer may add referral steps only in its own name (its changes are
    // all under its own actor, checked above). A copy held from its custodian carries the
    // steps other practices took, relayed by the custodian, which checked them.
    if check.is_some() && referral_claims.iter().any(|p| p != peer) {
        return refuse(
            ctx,
            audit(),
            "a referral step in the changes claims another practice",
        );
    }
    let ready = match ready {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(SyncOutcome::Applied { changed: false }),
        Err(why) => return refuse(ctx, audit(), &why),
    };
    let Ready {
        write,
        ix,
        conflicts,
    } = *ready;
    let from = (heads_digest(&write.heads) == digest).then_some(peer);
    write_doc(
        ctx.conn,
        &Stored {
            chart_id: chart,
            inc_seq: p.inc_seq,
            inc_count: p.inc_count,
        },
        write,
        &ix,
        now,
        from,
    )?;
    ctx.audit(
        &AuditEvent::new(now, "sync", "sync-receive")
            .chart(chart)
            .peer(peer)
            .detail(format!("{added} changes")),
    )?;
    if !conflicts.is_empty() {
        crate::workflow::file_conflicts(ctx, chart, peer, now, &conflicts)?;
    }
    tracing::trace!(
        prepared = fresh,
        total_us = t0.elapsed().as_micros() as u64,
        "merged"
    );
    Ok(SyncOutcome::Applied { changed: true })
}
