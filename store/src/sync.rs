//! What the sync engine (`chartmesh_core::sync`) asks of the store: answers to its queries
//! ([`Store::answer`]), the durable application of what a peer sent ([`Store::apply_sync`],
//! prepared off the writer with [`Store::prepare_sync`]), and its bookkeeping
//! ([`Store::persist_sync`]): per peer the checkpoint of its store (with that store's
//! incarnation) and what it confirmed of ours; per chart its heads, sharing state, sequence
//! and size; grant expiry recorded as an event.
//!
//! SQL here only pre-selects candidates for speed. Every consent decision is
//! `chartmesh_core::consent`'s: the engine decides what is offered and sent from the rows
//! read here, and this module asks consent again inside the writer's transaction, with the
//! grants as stored at that moment, before it writes anything a peer sent.

use chartmesh_core::audit::AuditEvent;
use chartmesh_core::consent::{self, Access, Refusal};
use chartmesh_core::ids::copy_key;
use chartmesh_core::sync::{
    Answer, Candidates, ChartRow, FetchItem, Fetched, Incarnation, Incoming, LocalChart,
    MAX_CHART_BYTES, Offered, PeerRecord, Persist, Query, heads_digest,
};
use chartmesh_core::{Chart, ChartDoc, PracticeId};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use tokio::sync::oneshot;

use crate::write::{
    DocWrite, NewChart, Stored, doc_write, heads_blob, heads_from_blob, load_doc, task, write_doc,
};
use crate::{IndexFields, Store, StoreError};

/// A chart as the sync layer sees it (by local key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncChart {
    /// The local key (the chart id, or `id@custodian` for a copy).
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

impl SyncChart {
    /// How this practice holds the chart, if it is a copy of another practice's.
    pub fn held(&self) -> Option<consent::Held<'_>> {
        self.origin.as_deref().map(|custodian| consent::Held {
            custodian,
            access: self.access,
            expires_ms: self.expires_ms,
            revoked_ms: self.revoked_ms,
        })
    }

    fn row(self) -> ChartRow {
        let chart = chartmesh_core::ids::split_key(&self.id).0.to_string();
        ChartRow {
            key: self.id,
            chart,
            seq: self.seq as u64,
            heads: self.heads,
            origin: self.origin,
            access: self.access,
            expires_ms: self.expires_ms,
            revoked_ms: self.revoked_ms,
        }
    }
}

/// Sync bookkeeping of one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncPeerState {
    /// The peer's change sequence applied here up to this number.
    pub checkpoint: i64,
    /// The incarnation of the peer's store the checkpoint belongs to.
    pub checkpoint_inc: u64,
    pub last_pull_ms: Option<i64>,
    /// Our change sequence the peer confirmed it holds.
    pub served_upto: i64,
    pub last_served_ms: Option<i64>,
}

/// One received item, prepared for the writer.
#[derive(Debug, Clone)]
pub struct SyncItem {
    pub key: String,
    pub chart: String,
    pub kind: Offered,
    /// Changes to merge into an existing copy.
    pub data: Option<Vec<u8>>,
    /// The full document, loaded and checked, for a chart not held here when prepared.
    pub prepared: Option<Result<NewChart, String>>,
    /// The merge of `data` into the stored chart, computed off the writer
    /// ([`Store::prepare_merge`]); used only if the chart was not written since.
    pub merge: Option<PreparedMerge>,
    /// The pull looked the chart up as held here (see [`chartmesh_core::sync::Incoming`]).
    pub held: bool,
}

/// A merge of a peer's changes into a stored chart, computed from the stored version with
/// change sequence `seq`.
#[derive(Debug, Clone)]
pub struct PreparedMerge {
    seq: i64,
    inc_seq: i64,
    inc_count: i64,
    doc_bytes: i64,
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
    ix: IndexFields,
    conflicts: Vec<chartmesh_core::conflicts::Conflict>,
}

/// Loads a document (or changes) a peer sent, within the limits for peer documents.
fn load_peer_doc(data: &[u8]) -> Result<ChartDoc, String> {
    if data.len() > MAX_CHART_BYTES {
        return Err(format!(
            "a document of {} bytes, over the {MAX_CHART_BYTES}-byte limit",
            data.len()
        ));
    }
    // Refused before automerge sees it if it holds more operations, changes or decoded bytes
    // than a chart can (a few hundred bytes can encode millions of operations).
    ChartDoc::load_limited(data, &chartmesh_core::doc_limits::LoadLimits::default())
        .map_err(|e| e.to_string())
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
    if data.len() > MAX_CHART_BYTES {
        return MergeResult::Undecodable(format!(
            "changes of {} bytes, over the {MAX_CHART_BYTES}-byte limit",
            data.len()
        ));
    }
    // Mark what is stored, so only the merge's changes are saved.
    doc.mark_saved();
    let referrals_before = doc.referrals().unwrap_or_default();
    // Within the limits for peer documents, counting what the chart holds already.
    let merged = match doc.merge_limited(data, &chartmesh_core::doc_limits::LoadLimits::default()) {
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
/// a new copy ([`prepare_new`]).
fn index_of_merged(doc: &ChartDoc, chart: &str, own: bool) -> Result<IndexFields, String> {
    if own {
        let json = doc
            .to_json()
            .map_err(|e| format!("the merged chart is unreadable: {e}"))?;
        if json["id"].as_str() != Some(chart) {
            return Err("the changes alter the chart id".into());
        }
        let ix = IndexFields::from_chart_json(&json);
        Chart::from_json_value(json).map_err(|e| format!("the merged chart is invalid: {e}"))?;
        Ok(ix)
    } else {
        match doc.header() {
            Ok(h) if h.id == chart => Ok(IndexFields {
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

/// Loads a chart received whole from its custodian and checks what filing it needs: a
/// complete automerge document (every change hash verified by the load) within the limits
/// for peer documents, the chart id it was offered under, `type` chart, and the demographic
/// fields of the search index. The full schema was validated where the chart was written;
/// received copies are stored as sent and never merged into this practice's own charts
/// (every change to those is validated in full). Measured: this check costs ~30 µs after the
/// ~100 µs load, a full conversion and validation ~135 µs (core/examples/receive_cost.rs).
fn prepare_new(key: &str, chart: &str, data: &[u8], now: i64) -> Result<NewChart, String> {
    consent::may_accept_copy(chart).map_err(|r| r.as_str().to_string())?;
    let mut doc = load_peer_doc(data)?;
    if !doc.automerge().get_missing_deps(&[]).is_empty() {
        return Err("incomplete document".into());
    }
    let h = doc.header().map_err(|e| e.to_string())?;
    if h.id != chart {
        return Err("the document is another chart".into());
    }
    Ok(NewChart {
        id: key.to_string(),
        doc: data.to_vec(),
        index: IndexFields {
            mrn: h.mrn,
            family: h.family,
            given: h.given,
            birth_date: h.birth_date,
        },
        origin: None,
        time_ms: now,
        heads: doc.head_bytes(),
        referrals: doc.referral_ids(),
        due_facts: doc.due_view().ok().map(|c| {
            serde_json::to_string(&chartmesh_core::due::facts(&c)).expect("facts serialize")
        }),
    })
}

fn current(conn: &Connection, key: &str) -> Result<Option<(i64, i64)>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT seq, doc_bytes FROM charts WHERE id = ?1")?
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

impl Store {
    /// Computes the merge of a peer's changes into the stored chart on the caller's thread
    /// (a read connection, one snapshot), so the writer only checks consent and stores it.
    /// None if the chart is not stored.
    pub fn prepare_merge(
        &self,
        key: &str,
        data: &[u8],
        own: bool,
    ) -> Result<Option<PreparedMerge>, StoreError> {
        let options = self.inner.options.clone();
        let chart = chartmesh_core::ids::split_key(key).0.to_string();
        self.with_reader(|c| {
            let tx = c.unchecked_transaction()?;
            let Some((seq, doc_bytes)) = current(&tx, key)? else {
                return Ok(None);
            };
            let Some((mut doc, inc_seq, inc_count)) = load_doc(&tx, key)? else {
                return Ok(None);
            };
            drop(tx);
            let result = compute_merge(&mut doc, &chart, data, own, &options, inc_count);
            Ok(Some(PreparedMerge {
                seq,
                inc_seq,
                inc_count,
                doc_bytes,
                own,
                result,
            }))
        })
    }

    /// Prepares one received item for the writer, on the caller's thread (CPU work: loading
    /// and checking a new copy, or merging changes into the stored chart from a read
    /// snapshot). Call it on a CPU pool; the writer then only checks consent and stores.
    pub fn prepare_sync(&self, item: Incoming, now_ms: i64) -> SyncItem {
        let held = current_seq_of(self, &item.key);
        let prepared = match (&item.kind, &item.data, held) {
            (Offered::Shared { .. }, Some(data), false) => {
                Some(prepare_new(&item.key, &item.chart, data, now_ms))
            }
            _ => None,
        };
        let merge = match (&item.kind, &item.data, held) {
            (Offered::Shared { .. } | Offered::Returned { .. }, Some(data), true) => self
                .prepare_merge(&item.key, data, item.kind.returned())
                .ok()
                .flatten(),
            _ => None,
        };
        let data = if prepared.is_some() { None } else { item.data };
        SyncItem {
            key: item.key,
            chart: item.chart,
            kind: item.kind,
            data,
            prepared,
            merge,
            held: item.held,
        }
    }
}

fn current_seq_of(store: &Store, key: &str) -> bool {
    store
        .with_reader(|c| current(c, key))
        .ok()
        .flatten()
        .is_some()
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

pub(crate) fn access_of(s: Option<String>) -> Option<Access> {
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

fn sync_chart(conn: &Connection, key: &str) -> Result<Option<SyncChart>, StoreError> {
    Ok(
        query_sync(conn, &format!("{SYNC_COLUMNS} WHERE id = ?1"), [key])?
            .into_iter()
            .next(),
    )
}

fn seq_of(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT n FROM sequence WHERE id = 1")?
        .query_row([], |r| r.get(0))?)
}

/// Whether anything changed after `since` that `peer` may need (a pre-selection: the engine
/// decides what is offered).
fn pending(conn: &Connection, peer: &str, since: i64) -> Result<bool, StoreError> {
    let charts: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM charts INDEXED BY charts_seq WHERE seq > ?2 AND (from_peer IS NULL OR from_peer != ?1)
             AND (origin IS NULL OR (origin = ?1 AND access = 'read-write' AND revoked_ms IS NULL)))",
        )?
        .query_row(params![peer, since], |r| r.get(0))?;
    let grants: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM grants WHERE peer = ?1 AND seq > ?2)")?
        .query_row(params![peer, since], |r| r.get(0))?;
    Ok(charts || grants)
}

/// The stored document of a chart as bytes loadable by automerge (the full save followed by
/// its incremental changes), without loading it.
fn chart_bytes(c: &Connection, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let base: Option<(Vec<u8>, i64)> = c
        .prepare_cached(
            "SELECT d.doc, c.inc_count FROM charts c JOIN chart_docs d ON d.chart_id = c.id WHERE c.id = ?1",
        )?
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((mut bytes, incs)) = base else {
        return Ok(None);
    };
    if incs > 0 {
        let mut st =
            c.prepare_cached("SELECT data FROM chart_changes WHERE chart_id = ?1 ORDER BY seq")?;
        let rows = st.query_map([key], |r| r.get::<_, Vec<u8>>(0))?;
        for r in rows {
            bytes.extend(r?);
        }
    }
    Ok(Some(bytes))
}

/// The changes of a chart that a peer with heads `have` lacks.
fn changes_after(
    c: &Connection,
    key: &str,
    have: &[[u8; 32]],
) -> Result<Option<Vec<u8>>, StoreError> {
    // Fast path: the peer is at the start of one of our stored chunks.
    let mut want = have.to_vec();
    want.sort_unstable();
    let mut st = c.prepare_cached(
        "SELECT heads_before, data FROM chart_changes WHERE chart_id = ?1 ORDER BY seq",
    )?;
    let rows = st.query_map([key], |r| {
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
    Ok(load_doc(c, key)?.map(|(mut d, _, _)| d.changes_after(have)))
}

impl Store {
    /// The store's incarnation (drawn when it was created; drawn again when it is restored
    /// from a backup or found rolled back).
    pub fn incarnation(&self) -> Result<Incarnation, StoreError> {
        let v = self.get_meta("incarnation")?;
        Ok(v.and_then(|s| s.parse().ok()).unwrap_or(0))
    }

    /// What this store remembers of a peer, for a new sync session with it.
    pub fn peer_record(&self, peer: &str) -> Result<PeerRecord, StoreError> {
        let s = self.sync_peer_state(peer)?;
        Ok(PeerRecord {
            checkpoint: s.checkpoint.max(0) as u64,
            checkpoint_incarnation: s.checkpoint_inc,
            served_upto: s.served_upto.max(0) as u64,
            last_pull_ms: s.last_pull_ms,
        })
    }

    /// Answers one of the sync engine's questions about `peer`. Each answer is read in one
    /// read transaction (one snapshot).
    pub fn answer(&self, peer: &str, query: &Query) -> Answer {
        let r = self.with_reader(|c| {
            let tx = c.unchecked_transaction()?;
            let a = match query {
                Query::Local { keys } => {
                    let mut out = Vec::with_capacity(keys.len());
                    for k in keys {
                        out.push(sync_chart(&tx, k)?.map(|c| LocalChart {
                            heads: c.heads,
                            revoked: c.revoked_ms.is_some(),
                            access: c.access,
                            expires_ms: c.expires_ms,
                        }));
                    }
                    Answer::Local(out)
                }
                Query::Candidates { since } => {
                    Answer::Candidates(candidates(&tx, peer, *since as i64)?)
                }
                Query::Fetch { items, budget } => fetch(&tx, peer, items, *budget)?,
                Query::Pending { since } => Answer::Pending {
                    upto: seq_of(&tx)? as u64,
                    pending: pending(&tx, peer, *since as i64)?,
                },
            };
            drop(tx);
            Ok(a)
        });
        r.unwrap_or_else(|e| Answer::Failed(e.to_string()))
    }
}

/// What may be offered to `peer` after `since` (the engine decides with consent): our own
/// charts changed since (by the sequence index: left to itself SQLite prefers the origin
/// index and scans every chart, which made a no-op reconnect grow with the number of charts)
/// or whose grant changed since (every own chart when an all-charts grant changed), and the
/// peer's charts held here read-write and changed here. A version the peer itself wrote and
/// holds entirely is left out.
fn candidates(c: &Connection, peer: &str, since: i64) -> Result<Candidates, StoreError> {
    let upto = seq_of(c)? as u64;
    let grants = crate::consent::grants_of(c, peer)?;
    let changed_grants: Vec<String> = {
        let mut st = c.prepare_cached(
            "SELECT chart_id FROM grants WHERE peer = ?1 AND seq > ?2 ORDER BY seq",
        )?;
        let rows = st.query_map(params![peer, since], |r| r.get::<_, String>(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut own: Vec<SyncChart> = query_sync(
        c,
        &format!(
            "{SYNC_COLUMNS} INDEXED BY charts_seq WHERE seq > ?2 AND origin IS NULL
             AND (from_peer IS NULL OR from_peer != ?1) ORDER BY seq"
        ),
        params![peer, since],
    )?;
    let mut seen: std::collections::HashSet<String> = own.iter().map(|c| c.id.clone()).collect();
    if changed_grants.iter().any(|g| g == consent::ALL_CHARTS) {
        for row in query_sync(
            c,
            &format!("{SYNC_COLUMNS} WHERE origin IS NULL ORDER BY seq"),
            [],
        )? {
            if seen.insert(row.id.clone()) {
                own.push(row);
            }
        }
    } else {
        for id in &changed_grants {
            if seen.contains(id) {
                continue;
            }
            if let Some(row) = sync_chart(c, id)?.filter(|r| r.origin.is_none()) {
                seen.insert(row.id.clone());
                own.push(row);
            }
        }
    }
    let returned = query_sync(
        c,
        &format!(
            "{SYNC_COLUMNS} INDEXED BY charts_seq WHERE seq > ?2 AND origin = ?1
             AND access = 'read-write' AND revoked_ms IS NULL
             AND (from_peer IS NULL OR from_peer != ?1) ORDER BY seq"
        ),
        params![peer, since],
    )?;
    Ok(Candidates {
        upto,
        grants,
        changed_grants,
        own: own.into_iter().map(SyncChart::row).collect(),
        returned: returned.into_iter().map(SyncChart::row).collect(),
    })
}

/// Reads wanted charts until `budget` bytes are read. A chart that cannot be read (a damaged
/// page) is answered with the error, alone; it is never sent.
fn fetch(
    c: &Connection,
    peer: &str,
    items: &[FetchItem],
    budget: usize,
) -> Result<Answer, StoreError> {
    // The grants that apply to these charts (each one's own, and an all-charts grant): the
    // engine decides with them, and reading every grant of the peer for each batch would
    // cost batches × grants.
    let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
    let grants = crate::consent::grants_for(c, peer, &keys)?;
    let mut out = Vec::with_capacity(items.len());
    let mut bytes = 0usize;
    let mut rest = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if bytes >= budget {
            rest.extend_from_slice(&items[i..]);
            break;
        }
        let row = sync_chart(c, &item.key)?;
        // Read the bytes only of a chart on the side the want names (own, or the peer's
        // copy); whether it may leave is the engine's decision.
        let side_ok = row.as_ref().is_some_and(|r| match &r.origin {
            None => !item.returned,
            Some(o) => item.returned && o == peer,
        });
        let data = if side_ok {
            let r = if item.have.is_empty() {
                chart_bytes(c, &item.key)
            } else {
                changes_after(c, &item.key, &item.have)
            };
            r.map_err(|e| e.to_string())
        } else {
            Ok(None)
        };
        if let Ok(Some(d)) = &data {
            bytes += d.len();
        }
        out.push(Fetched {
            item: item.clone(),
            row: row.map(SyncChart::row),
            data,
        });
    }
    Ok(Answer::Fetched {
        grants,
        items: out,
        rest,
    })
}

impl Store {
    /// The listed charts as held here, by local key (absent ones are left out).
    pub fn sync_charts(&self, keys: &[&str]) -> Result<HashMap<String, SyncChart>, StoreError> {
        self.with_reader(|c| {
            let mut out = HashMap::with_capacity(keys.len());
            for k in keys {
                if let Some(sc) = sync_chart(c, k)? {
                    out.insert(sc.id.clone(), sc);
                }
            }
            Ok(out)
        })
    }

    /// Whether anything changed after `since` that `peer` may need (cheap: existence only).
    pub fn sync_pending(&self, peer: &str, since: i64) -> Result<bool, StoreError> {
        self.with_reader(|c| pending(c, peer, since))
    }

    pub fn sync_peer_state(&self, peer: &str) -> Result<SyncPeerState, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached(
                "SELECT checkpoint, checkpoint_inc, last_pull_ms, served_upto, last_served_ms FROM sync_peers WHERE peer = ?1",
            )?
            .query_row([peer], |r| {
                Ok(SyncPeerState {
                    checkpoint: r.get(0)?,
                    checkpoint_inc: r.get::<_, i64>(1)? as u64,
                    last_pull_ms: r.get(2)?,
                    served_upto: r.get(3)?,
                    last_served_ms: r.get(4)?,
                })
            })
            .optional()?
            .unwrap_or_default())
        })
    }

    /// Charts received from `peer` and not revoked.
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

    /// Records the engine's bookkeeping for `peer` (not awaited by the engine).
    pub fn persist_sync(
        &self,
        peer: &str,
        p: Persist,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        let peer = peer.to_string();
        self.writer()?.send(task(tx, move |ctx| {
            match p {
                Persist::Checkpoint { upto, incarnation } => {
                    // A checkpoint of another incarnation replaces the old one whatever its
                    // number; within one incarnation it only moves forward, except to reset.
                    ctx.conn.execute(
                        "INSERT INTO sync_peers(peer, checkpoint, checkpoint_inc, last_pull_ms) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT(peer) DO UPDATE SET
                            checkpoint = CASE WHEN checkpoint_inc != excluded.checkpoint_inc OR excluded.checkpoint = 0
                                              THEN excluded.checkpoint ELSE max(checkpoint, excluded.checkpoint) END,
                            checkpoint_inc = excluded.checkpoint_inc,
                            last_pull_ms = excluded.last_pull_ms",
                        params![peer, upto as i64, incarnation as i64, now_ms],
                    )?;
                }
                Persist::Served { upto } => {
                    ctx.conn.execute(
                        "INSERT INTO sync_peers(peer, served_upto, last_served_ms) VALUES (?1, ?2, ?3)
                         ON CONFLICT(peer) DO UPDATE SET served_upto = max(served_upto, excluded.served_upto),
                            last_served_ms = excluded.last_served_ms",
                        params![peer, upto as i64, now_ms],
                    )?;
                }
                Persist::NewIncarnation { incarnation } => {
                    set_incarnation(ctx.conn, incarnation)?;
                }
            }
            Ok(())
        }))?;
        Ok(rx)
    }

    /// Records as events the expiry of every grant that has expired by `now_ms` and was not
    /// recorded yet: each takes a sequence number, so peers learn of it on their next pull
    /// (their copies are marked). Returns how many.
    pub fn record_expiries(
        &self,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<usize, StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer()?.send(task(tx, move |ctx| {
            let due: Vec<(String, String)> = {
                let mut st = ctx.conn.prepare_cached(
                    "SELECT chart_id, peer FROM grants WHERE expires_ms IS NOT NULL AND expires_ms <= ?1
                     AND revoked_ms IS NULL AND expired_ms IS NULL",
                )?;
                let rows = st.query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            if due.is_empty() {
                return Ok(0);
            }
            let seq = crate::schema::take_seq(ctx.conn, 1)?;
            for (chart, peer) in &due {
                ctx.conn.execute(
                    "UPDATE grants SET expired_ms = ?3, seq = ?4 WHERE chart_id = ?1 AND peer = ?2",
                    params![chart, peer, now_ms, seq],
                )?;
                ctx.audit(
                    &AuditEvent::new(now_ms, "consent", "expire")
                        .chart(chart.clone())
                        .peer(peer.clone())
                        .detail("the grant reached its expiry"),
                )?;
            }
            Ok(due.len())
        }))?;
        Ok(rx)
    }

    /// Appends the audit entries of a message about to leave for `peer`, deciding each chart
    /// it sends again inside the writer's transaction (`chartmesh_core::consent`): a
    /// revocation or expiry committed after the chart was read for sending stops it here, so
    /// it takes effect from the next message after it is recorded. Returns false — and
    /// audits the refusal instead of the send — when any chart of the message may no longer
    /// leave; the message must then not be sent.
    pub fn audit_sends(
        &self,
        peer: &str,
        events: Vec<AuditEvent>,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<bool, StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        let peer = peer.to_string();
        self.writer()?.send(task(tx, move |ctx| {
            let sent: Vec<&str> = events
                .iter()
                .filter(|e| e.action == "sync-send")
                .map(|e| e.chart_id.as_deref().unwrap_or_default())
                .collect();
            let grants = crate::consent::grants_for(ctx.conn, &peer, &sent)?;
            let grants = consent::GrantIndex::new(&grants);
            let mut refused = Vec::new();
            for e in events.iter().filter(|e| e.action == "sync-send") {
                let key = e.chart_id.as_deref().unwrap_or_default();
                let row = sync_chart(ctx.conn, key)?;
                let allowed = match row.as_ref().map(|r| (r, r.held())) {
                    Some((_, None)) => consent::may_send(grants.applicable(key), None, now_ms),
                    Some((_, Some(h))) => consent::may_return(&h, &peer, now_ms),
                    None => Err(Refusal::NoGrant),
                };
                if let Err(r) = allowed {
                    refused.push(
                        AuditEvent::new(now_ms, "sync", "refuse")
                            .chart(key)
                            .peer(peer.clone())
                            .detail(format!(
                                "not sent: {} since it was read for sending",
                                r.as_str()
                            )),
                    );
                }
            }
            if refused.is_empty() {
                for e in &events {
                    ctx.audit(e)?;
                }
                return Ok(true);
            }
            for e in events
                .iter()
                .filter(|e| e.action != "sync-send")
                .chain(&refused)
            {
                ctx.audit(e)?;
            }
            Ok(false)
        }))?;
        Ok(rx)
    }

    /// The change sequence number of `peer`'s grant of `chart_id` (or `*`), if recorded.
    pub fn grant_seq(&self, peer: &str, chart_id: &str) -> Result<Option<i64>, StoreError> {
        self.with_reader(|c| {
            Ok(
                c.prepare_cached("SELECT seq FROM grants WHERE peer = ?1 AND chart_id = ?2")?
                    .query_row(params![peer, chart_id], |r| r.get(0))
                    .optional()?,
            )
        })
    }

    /// When the next grant expires that is not recorded as expired yet.
    pub fn next_expiry(&self) -> Result<Option<i64>, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached(
                "SELECT min(expires_ms) FROM grants WHERE expires_ms IS NOT NULL AND revoked_ms IS NULL AND expired_ms IS NULL",
            )?
            .query_row([], |r| r.get::<_, Option<i64>>(0))?)
        })
    }

    /// Applies what `peer` sent, item by item, in one transaction: new copies, merged
    /// changes, grant updates and revocations. Consent is decided inside the transaction by
    /// `chartmesh_core::consent`, with the grants as stored now. Every receipt and refusal is
    /// audited in the same transaction.
    pub fn apply_sync(
        &self,
        peer: String,
        items: Vec<SyncItem>,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<Vec<SyncOutcome>, StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        let peer_id: PracticeId = peer
            .parse()
            .map_err(|_| StoreError::Io(format!("{peer:?} is not a practice id")))?;
        self.writer()?.send(task(tx, move |ctx| {
            let t = std::time::Instant::now();
            let charts: Vec<&str> = items.iter().map(|i| i.chart.as_str()).collect();
            let grants = crate::consent::grants_for(ctx.conn, &peer, &charts)?;
            let grants = consent::GrantIndex::new(&grants);
            let mut out = Vec::with_capacity(items.len());
            let n = items.len();
            for item in items {
                out.push(apply_one(ctx, &peer, &peer_id, item, &grants, now_ms)?);
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

fn set_incarnation(conn: &Connection, incarnation: Incarnation) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('incarnation', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [incarnation.to_string()],
    )?;
    // What peers confirmed of the old incarnation says nothing of the new one.
    conn.execute("UPDATE sync_peers SET served_upto = 0", [])?;
    Ok(())
}

/// Gives the store at `path` a new incarnation (after it was restored from a backup, or
/// otherwise rolled back): every peer's checkpoint of it is then void, and they pull
/// everything again (unchanged charts compare equal and cost nothing).
pub fn rotate_incarnation(
    path: &std::path::Path,
    key: &crate::StoreKey,
) -> Result<Incarnation, StoreError> {
    let mut conn = crate::schema::open_write_connection_as(path, key, true)?;
    let incarnation = new_incarnation();
    let tx = conn.transaction()?;
    set_incarnation(&tx, incarnation)?;
    tx.commit()?;
    // Leave a single self-contained file, as a backup is.
    let _: String = conn.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))?;
    Ok(incarnation)
}

/// A fresh random incarnation (never 0, which means "none").
pub(crate) fn new_incarnation() -> Incarnation {
    loop {
        let n: u64 = rand::random();
        if n != 0 {
            return n;
        }
    }
}

/// Gives a store that has none an incarnation (a store created before protocol 2, or new).
pub(crate) fn ensure_incarnation(conn: &Connection) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('incarnation', ?1) ON CONFLICT(key) DO NOTHING",
        [new_incarnation().to_string()],
    )?;
    Ok(())
}

struct Row {
    origin: Option<String>,
    access: Option<String>,
    expires_ms: Option<i64>,
    revoked_ms: Option<i64>,
    /// The peer whose version this is, held entirely (None: changed here since, or unknown).
    from_peer: Option<String>,
}

fn apply_one(
    ctx: &mut crate::write::TaskCtx<'_>,
    peer: &str,
    peer_id: &PracticeId,
    item: SyncItem,
    grants: &consent::GrantIndex<'_>,
    now: i64,
) -> Result<SyncOutcome, StoreError> {
    crate::failpoint!("sync.apply.item");
    let row: Option<Row> = ctx
        .conn
        .prepare_cached(
            "SELECT origin, access, expires_ms, revoked_ms, from_peer FROM charts WHERE id = ?1",
        )?
        .query_row([&item.key], |r| {
            Ok(Row {
                origin: r.get(0)?,
                access: r.get(1)?,
                expires_ms: r.get(2)?,
                revoked_ms: r.get(3)?,
                from_peer: r.get(4)?,
            })
        })
        .optional()?;
    let audit = |action: &str| {
        AuditEvent::new(now, "sync", action)
            .chart(&item.key)
            .peer(peer)
    };
    // The key says which side the chart is on: a copy of the peer's chart is filed under
    // `chart@peer`, one of our own under its id. Anything else is not this peer's to send.
    let expected_key = if item.kind.returned() {
        item.chart.clone()
    } else {
        copy_key(&item.chart, peer)
    };
    if item.key != expected_key {
        return refuse(ctx, audit("refuse"), Refusal::NotOurs.as_str());
    }
    match (item.kind, row) {
        (Offered::Revoked, Some(r)) if r.origin.as_deref() == Some(peer) => {
            if r.revoked_ms.is_some() {
                return Ok(SyncOutcome::Ignored);
            }
            ctx.conn.execute(
                "UPDATE charts SET revoked_ms = ?2 WHERE id = ?1",
                params![item.key, now],
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
            if let Err(r) = consent::may_accept_copy(&item.chart) {
                return refuse(ctx, audit("refuse"), r.as_str());
            }
            let nc = match item.prepared {
                Some(Ok(nc)) => nc,
                // Changes to (or the grant of) the copy held when the pull looked it up,
                // and the copy is gone since: refusing would let the checkpoint move past
                // a chart still shared with us. Fail the batch; the pull is redone and asks
                // for the whole document.
                _ if item.held => return Err(StoreError::GoneDuringPull(item.key)),
                Some(Err(why)) => {
                    return refuse(
                        ctx,
                        audit("refuse"),
                        &format!("the document was refused: {why}"),
                    );
                }
                None => {
                    return refuse(
                        ctx,
                        audit("refuse"),
                        "a new chart arrived without its document",
                    );
                }
            };
            if nc.doc.len() > MAX_CHART_BYTES {
                return refuse(
                    ctx,
                    audit("refuse"),
                    "the document is over the chart size limit",
                );
            }
            let seq = crate::schema::take_seq(ctx.conn, 1)?;
            let from = (heads_digest(&nc.heads) == digest).then_some(peer);
            ctx.conn
                .prepare_cached(
                    "INSERT INTO charts(id, origin, created_ms, updated_ms, mrn, family, given, birth_date, name_key, seq, heads, access, expires_ms, from_peer, due_facts, doc_bytes)
                     VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                )?
                .execute(params![
                    item.key,
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
                    nc.due_facts,
                    nc.doc.len() as i64
                ])?;
            crate::failpoint!("sync.apply.after_row");
            crate::write::insert_doc(ctx.conn, &item.key, &nc.doc)?;
            crate::workflow::index_referrals(ctx.conn, &item.key, &nc.referrals)?;
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
        ) if r.origin.as_deref() == Some(peer) => {
            let grant_changed = r.access.as_deref() != Some(access_str(access))
                || r.expires_ms != expires_ms
                || r.revoked_ms.is_some();
            if grant_changed {
                ctx.conn.execute(
                    "UPDATE charts SET access = ?2, expires_ms = ?3, revoked_ms = NULL WHERE id = ?1",
                    params![item.key, access_str(access), expires_ms],
                )?;
                // Read-write again (after a read grant or a revocation) while the copy holds
                // entries written here that the custodian may not have (written under the
                // read-write grant before, and refused or never offered meanwhile): a new
                // sequence number offers them to the custodian at its next pull, past the
                // checkpoint that went by while they could not be returned.
                let before = consent::Held {
                    custodian: peer,
                    access: access_of(r.access.clone()),
                    expires_ms: r.expires_ms,
                    revoked_ms: r.revoked_ms,
                };
                let after = consent::Held {
                    custodian: peer,
                    access: Some(access),
                    expires_ms,
                    revoked_ms: None,
                };
                if r.from_peer.is_none()
                    && consent::may_return(&after, peer, now).is_ok()
                    && consent::may_return(&before, peer, now).is_err()
                {
                    let seq = crate::schema::take_seq(ctx.conn, 1)?;
                    ctx.conn.execute(
                        "UPDATE charts SET seq = ?2 WHERE id = ?1",
                        params![item.key, seq],
                    )?;
                }
                ctx.audit(
                    &audit("share-received").detail(format!("access={}", access_str(access))),
                )?;
            }
            match item.data {
                Some(data) => merge(
                    ctx,
                    peer,
                    &item.key,
                    &item.chart,
                    &data,
                    digest,
                    None,
                    item.merge,
                    now,
                ),
                None if grant_changed => Ok(SyncOutcome::Updated),
                None => Ok(SyncOutcome::Ignored),
            }
        }
        (Offered::Shared { .. }, Some(_)) => {
            refuse(ctx, audit("refuse"), Refusal::NotOurs.as_str())
        }
        (Offered::Returned { digest }, Some(r)) if r.origin.is_none() => match item.data {
            Some(data) => merge(
                ctx,
                peer,
                &item.key,
                &item.chart,
                &data,
                digest,
                Some((peer_id, grants)),
                item.merge,
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

/// Merges a peer's changes into the chart stored under `key`. `own`: one of this practice's
/// charts, changed by the peer under a grant (consent decides, with `grants` as stored now);
/// None: our copy of the peer's own chart.
#[allow(clippy::too_many_arguments)]
fn merge(
    ctx: &mut crate::write::TaskCtx<'_>,
    peer: &str,
    key: &str,
    chart: &str,
    data: &[u8],
    digest: u64,
    own: Option<(&PracticeId, &consent::GrantIndex<'_>)>,
    prepared: Option<PreparedMerge>,
    now: i64,
) -> Result<SyncOutcome, StoreError> {
    let audit = || AuditEvent::new(now, "sync", "refuse").chart(key).peer(peer);
    let t0 = std::time::Instant::now();
    let is_own = own.is_some();
    // A merge prepared off the writer is used only if nothing wrote the chart since it was
    // read; otherwise it is computed here from the stored version.
    let current = current(ctx.conn, key)?;
    let fresh = prepared
        .as_ref()
        .is_some_and(|p| Some(p.seq) == current.map(|c| c.0) && p.own == is_own);
    let p = match prepared {
        Some(p) if fresh => p,
        _ => {
            let Some((mut doc, inc_seq, inc_count)) = load_doc(ctx.conn, key)? else {
                return Ok(SyncOutcome::Ignored);
            };
            PreparedMerge {
                seq: current.map(|c| c.0).unwrap_or(0),
                inc_seq,
                inc_count,
                doc_bytes: current.map(|c| c.1).unwrap_or(0),
                own: is_own,
                result: compute_merge(&mut doc, chart, data, is_own, ctx.options, inc_count),
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
    if let Some((peer_id, grants)) = own {
        // Changes to one of our charts: an active read-write grant, every change under the
        // peer's own actor, and referral steps only in its own name.
        if let Err(r) = consent::may_apply_change(grants.applicable(chart), peer_id, &actors, now)
            .and_then(|_| consent::may_claim_referral_steps(&referral_claims, peer))
        {
            return refuse(ctx, audit(), r.as_str());
        }
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
    let size = write.stored_size(p.doc_bytes);
    if size > MAX_CHART_BYTES as i64 {
        return refuse(
            ctx,
            audit(),
            &format!(
                "the merged chart would be {size} bytes, over the {MAX_CHART_BYTES}-byte limit"
            ),
        );
    }
    let from = (heads_digest(&write.heads) == digest).then_some(peer);
    write_doc(
        ctx.conn,
        &Stored {
            chart_id: key,
            inc_seq: p.inc_seq,
            inc_count: p.inc_count,
            doc_bytes: p.doc_bytes,
        },
        write,
        &ix,
        now,
        from,
    )?;
    crate::failpoint!("sync.apply.after_merge");
    ctx.audit(
        &AuditEvent::new(now, "sync", "sync-receive")
            .chart(key)
            .peer(peer)
            .detail(format!("{added} changes")),
    )?;
    if !conflicts.is_empty() {
        crate::workflow::file_conflicts(ctx, key, peer, now, &conflicts)?;
    }
    tracing::trace!(
        prepared = fresh,
        total_us = t0.elapsed().as_micros() as u64,
        "merged"
    );
    Ok(SyncOutcome::Applied { changed: true })
}
