//! Reads: a small pool of read-only connections. In WAL mode readers see the last committed
//! state and never block the writer. An offline admin command's pool holds write
//! connections instead, shared by its reads and its inline writer
//! ([`crate::write::WriterHandle::inline`]).

use chartmesh_core::ChartDoc;
use chartmesh_core::audit::{AuditEntry, AuditEvent, ChainBreak, verify_chain};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::StoreError;

/// A chart as stored: its loaded document and bookkeeping.
pub struct ChartRecord {
    pub id: String,
    pub doc: ChartDoc,
    pub origin: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// For a received chart: the access its custodian granted (`read` or `read-write`).
    pub access: Option<String>,
    pub expires_ms: Option<i64>,
    /// For a received chart: when its custodian stopped sharing it (kept read-only).
    pub revoked_ms: Option<i64>,
}

/// A line of a search result.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChartSummary {
    pub id: String,
    pub mrn: String,
    pub family: String,
    pub given: String,
    pub birth_date: String,
    pub origin: Option<String>,
}

/// Prepared statements kept per connection.
pub(crate) const STATEMENT_CACHE: usize = 128;

pub(crate) struct ReaderPool {
    path: PathBuf,
    key: crate::StoreKey,
    idle: Mutex<Vec<Connection>>,
    /// Every connection is a write connection (an offline command's pool).
    writable: bool,
}

pub(crate) struct Lease<'a> {
    pool: &'a ReaderPool,
    conn: Option<Connection>,
    /// A read-only connection opened for a writable pool: closed after use, never pooled
    /// (the pool's connections must all take writes).
    read_only_extra: bool,
}

impl std::ops::Deref for Lease<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn.as_ref().expect("leased connection")
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("leased connection")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if self.read_only_extra {
            return;
        }
        if let Some(c) = self.conn.take() {
            let mut idle = self.pool.idle.lock().unwrap();
            if idle.len() < 8 {
                idle.push(c);
            }
        }
    }
}

impl ReaderPool {
    pub(crate) fn new(path: PathBuf, key: crate::StoreKey) -> Self {
        ReaderPool {
            path,
            key,
            idle: Mutex::new(Vec::new()),
            writable: false,
        }
    }

    /// A pool of write connections for an offline command; see [`ReaderPool::give`].
    pub(crate) fn writable(path: PathBuf, key: crate::StoreKey) -> Self {
        ReaderPool {
            writable: true,
            ..ReaderPool::new(path, key)
        }
    }

    /// Adds an open write connection to a writable pool.
    pub(crate) fn give(&self, conn: Connection) {
        debug_assert!(self.writable);
        self.idle.lock().unwrap().push(conn);
    }

    /// A connection the inline writer may write through: one of a writable pool's, or (while
    /// that one is leased, e.g. by a read on another thread) a new write connection.
    pub(crate) fn lease_writable(&self) -> Result<Lease<'_>, StoreError> {
        if !self.writable {
            return Err(StoreError::ReadOnly);
        }
        let conn = self.idle.lock().unwrap().pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let (c, _) = crate::schema::open_write_connection_checked(
                    &self.path, &self.key, false, false,
                )?;
                crate::write::leave_wal_at_close(&c)?;
                c
            }
        };
        Ok(Lease {
            pool: self,
            conn: Some(conn),
            read_only_extra: false,
        })
    }

    /// A connection to read through: an idle one of the pool, or a new read-only one (for
    /// a writable pool, one that is closed after this read: reads never wait for the write
    /// lock a write connection's set-up takes).
    fn lease(&self) -> Result<Lease<'_>, StoreError> {
        let conn = self.idle.lock().unwrap().pop();
        let read_only_extra = conn.is_none() && self.writable;
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(std::time::Duration::from_secs(5))?;
                self.key.apply(&c, &self.path)?;
                // The sync and consent reads alone use more distinct statements than the
                // default cache of 16 holds; a miss parses the SQL again.
                c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
                c
            }
        };
        Ok(Lease {
            pool: self,
            conn: Some(conn),
            read_only_extra,
        })
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.lease()?;
        f(&conn)
    }

    pub(crate) fn key(&self) -> &crate::StoreKey {
        &self.key
    }

    /// Closes the idle read connections (at shutdown, so the writer's close can checkpoint).
    pub(crate) fn close_idle(&self) {
        self.idle.lock().unwrap().clear();
    }

    pub(crate) fn check_schema(&self, older_ok: bool) -> Result<(), StoreError> {
        crate::schema::check_version(&*self.lease()?, older_ok)
    }

    pub(crate) fn get(&self, id: &str) -> Result<Option<ChartRecord>, StoreError> {
        let conn = self.lease()?;
        let meta = conn
            .prepare_cached("SELECT origin, created_ms, updated_ms, access, expires_ms, revoked_ms FROM charts WHERE id = ?1")?
            .query_row([id], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            })
            .optional()?;
        let Some((origin, created_ms, updated_ms, access, expires_ms, revoked_ms)) = meta else {
            return Ok(None);
        };
        let Some((doc, _, _)) = crate::write::load_doc(&conn, id)? else {
            return Ok(None);
        };
        Ok(Some(ChartRecord {
            id: id.to_string(),
            doc,
            origin,
            created_ms,
            updated_ms,
            access,
            expires_ms,
            revoked_ms,
        }))
    }

    pub(crate) fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let conn = self.lease()?;
        Ok(conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub(crate) fn count(&self) -> Result<u64, StoreError> {
        let conn = self.lease()?;
        Ok(conn.query_row("SELECT count(*) FROM charts", [], |r| r.get::<_, i64>(0))? as u64)
    }

    pub(crate) fn search(
        &self,
        query: &str,
        limit: usize,
    ) -> Result<Vec<ChartSummary>, StoreError> {
        let conn = self.lease()?;
        let q = query.trim();
        let like = format!(
            "{}%",
            q.to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        let mut stmt = conn.prepare_cached(
            "SELECT id, mrn, family, given, birth_date, origin FROM charts
             WHERE (mrn = ?1 OR birth_date = ?1 OR id = ?1 OR name_key LIKE ?2 ESCAPE '\\'
                OR lower(given) LIKE ?2 ESCAPE '\\') AND revoked_ms IS NULL
             ORDER BY family, given, id LIMIT ?3",
        )?;
        let rows = stmt.query_map(rusqlite::params![q, like, limit as i64], |r| {
            Ok(ChartSummary {
                id: r.get(0)?,
                mrn: r.get(1)?,
                family: r.get(2)?,
                given: r.get(3)?,
                birth_date: r.get(4)?,
                origin: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(crate) fn for_each_chart(
        &self,
        ids: Option<&[String]>,
        f: &mut dyn FnMut(ChartRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        match ids {
            Some(ids) => {
                for id in ids {
                    match self.get(id)? {
                        Some(rec) => f(rec)?,
                        None => return Err(StoreError::NotFound(id.clone())),
                    }
                }
                Ok(())
            }
            None => {
                // Page through ids so no read transaction stays open for the whole export.
                let mut after = String::new();
                loop {
                    let page: Vec<String> = {
                        let conn = self.lease()?;
                        let mut stmt = conn.prepare_cached(
                            "SELECT id FROM charts WHERE id > ?1 ORDER BY id LIMIT 512",
                        )?;
                        let rows = stmt.query_map([&after], |r| r.get::<_, String>(0))?;
                        rows.collect::<Result<_, _>>()?
                    };
                    let Some(last) = page.last() else {
                        return Ok(());
                    };
                    after = last.clone();
                    for id in &page {
                        if let Some(rec) = self.get(id)? {
                            f(rec)?;
                        }
                    }
                }
            }
        }
    }

    pub(crate) fn audit_entries(
        &self,
        chart: Option<&str>,
        since_ms: Option<i64>,
        limit: Option<usize>,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.lease()?;
        let mut stmt = conn.prepare_cached(&format!(
            "{AUDIT_COLUMNS}
             WHERE (?1 IS NULL OR {BY_CHART}) AND (?2 IS NULL OR time_ms >= ?2)
             ORDER BY seq LIMIT ?3"
        ))?;
        let lim = limit.map(|l| l as i64).unwrap_or(-1);
        let rows = stmt.query_map(rusqlite::params![chart, since_ms, lim], row_to_entry)?;
        let mut entries: Vec<AuditEntry> = rows.collect::<Result<_, _>>()?;
        if chart.is_some() {
            for e in &mut entries {
                e.trim_charts(chart);
            }
        }
        Ok(entries)
    }

    /// How many audit entries there are of each action.
    pub(crate) fn audit_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let conn = self.lease()?;
        let mut stmt = conn
            .prepare_cached("SELECT action, count(*) FROM audit GROUP BY action ORDER BY action")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Audit entries matching every given filter, newest first, at most `limit`.
    pub(crate) fn audit_search(&self, f: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.lease()?;
        let mut stmt = conn.prepare_cached(&format!(
            "{AUDIT_COLUMNS}
             WHERE (?1 IS NULL OR {BY_CHART}) AND (?2 IS NULL OR actor = ?2)
               AND (?3 IS NULL OR action = ?3) AND (?4 IS NULL OR time_ms >= ?4)
               AND (?5 IS NULL OR time_ms < ?5)
             ORDER BY seq DESC LIMIT ?6"
        ))?;
        let rows = stmt.query_map(
            rusqlite::params![
                f.chart,
                f.actor,
                f.action,
                f.since_ms,
                f.until_ms,
                f.limit as i64
            ],
            row_to_entry,
        )?;
        let mut entries: Vec<AuditEntry> = rows.collect::<Result<_, _>>()?;
        for e in &mut entries {
            e.trim_charts(f.chart.as_deref());
        }
        Ok(entries)
    }

    /// Recomputes the chain. The entries and the recorded head are read in one read
    /// transaction (one WAL snapshot): read apart, a commit landing between the two reads
    /// looks exactly like a truncated log.
    pub(crate) fn verify_audit(&self) -> Result<Result<usize, ChainBreak>, StoreError> {
        let conn = self.lease()?;
        let tx = conn.unchecked_transaction()?;
        // A backup or a store before schema 11 has no entries naming several charts.
        let names_charts: bool = tx.query_row(
            "SELECT count(*) > 0 FROM pragma_table_info('audit') WHERE name = 'charts'",
            [],
            |r| r.get(0),
        )?;
        let columns = if names_charts {
            AUDIT_COLUMNS.to_string()
        } else {
            AUDIT_COLUMNS.replace(", charts FROM", ", NULL FROM")
        };
        let entries: Vec<AuditEntry> = tx
            .prepare(&format!("{columns} ORDER BY rowid"))?
            .query_map([], row_to_entry)?
            .collect::<Result<_, _>>()?;
        let index: Vec<(String, i64)> = if names_charts {
            tx.prepare("SELECT chart_id, seq FROM audit_charts")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        let head = tx
            .query_row("SELECT value FROM meta WHERE key = 'audit_head'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()?;
        tx.finish()?;
        let head = head.and_then(|h| {
            let (s, hash) = h.split_once(':')?;
            Some((s.parse::<i64>().ok()?, hash.to_string()))
        });
        Ok(
            verify_chain(&entries, head.as_ref().map(|(s, h)| (*s, h.as_str())))
                .and_then(|n| chart_index_matches(&entries, &index).map(|()| n)),
        )
    }
}

/// What `chartmesh restore` compares between a backup and the store it would replace:
/// paired practices, consent grants, when each chart was last written, and the audit log's
/// length. Read from any schema a backup may have (missing tables read as empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreOverview {
    /// (practice id, name)
    pub peers: Vec<(String, String)>,
    pub grants: Vec<GrantState>,
    /// (chart id, last written in ms)
    pub charts: Vec<(String, i64)>,
    pub audit_entries: i64,
}

/// A consent grant as stored, for comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantState {
    pub chart_id: String,
    pub peer: String,
    pub access: String,
    pub purpose: String,
    pub expires_ms: Option<i64>,
    pub recorded_ms: i64,
    pub revoked_ms: Option<i64>,
}

impl ReaderPool {
    pub(crate) fn overview(&self) -> Result<StoreOverview, StoreError> {
        let conn = self.lease()?;
        let tx = conn.unchecked_transaction()?;
        let has = |t: &str| -> Result<bool, StoreError> {
            Ok(tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
                [t],
                |r| r.get(0),
            )?)
        };
        let mut o = StoreOverview::default();
        if has("peers")? {
            o.peers = tx
                .prepare("SELECT id, name FROM peers ORDER BY id")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
        }
        if has("grants")? {
            o.grants = tx
                .prepare(
                    "SELECT chart_id, peer, access, purpose, expires_ms, recorded_ms, revoked_ms FROM grants ORDER BY peer, chart_id",
                )?
                .query_map([], |r| {
                    Ok(GrantState {
                        chart_id: r.get(0)?,
                        peer: r.get(1)?,
                        access: r.get(2)?,
                        purpose: r.get(3)?,
                        expires_ms: r.get(4)?,
                        recorded_ms: r.get(5)?,
                        revoked_ms: r.get(6)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
        }
        o.charts = tx
            .prepare("SELECT id, updated_ms FROM charts ORDER BY id")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        o.audit_entries = tx.query_row("SELECT count(*) FROM audit", [], |r| r.get(0))?;
        tx.finish()?;
        Ok(o)
    }
}

/// The index rows that find an entry by chart name exactly the charts the (verified)
/// entries name: a row removed would hide an access from a search for that patient, a row
/// added would invent one.
fn chart_index_matches(entries: &[AuditEntry], index: &[(String, i64)]) -> Result<(), ChainBreak> {
    use std::collections::HashSet;
    let named: HashSet<(i64, &str)> = entries
        .iter()
        .flat_map(|e| e.event.charts.iter().map(move |c| (e.seq, c.as_str())))
        .collect();
    let indexed: HashSet<(i64, &str)> = index.iter().map(|(c, s)| (*s, c.as_str())).collect();
    if let Some((seq, c)) = indexed.iter().filter(|k| !named.contains(k)).min() {
        return Err(ChainBreak {
            seq: *seq,
            reason: format!("the chart index ties chart {c} to this entry, which does not name it"),
        });
    }
    if let Some((seq, c)) = named.iter().filter(|k| !indexed.contains(k)).min() {
        return Err(ChainBreak {
            seq: *seq,
            reason: format!(
                "the chart index lacks chart {c} of this entry (a search for that chart would miss it)"
            ),
        });
    }
    Ok(())
}

pub(crate) const AUDIT_COLUMNS: &str = "SELECT seq, time_ms, actor, action, chart_id, peer, detail, prev_hash, hash, charts FROM audit";

/// The audit entries about chart ?1: by its own column, or among the charts one entry
/// disclosed together.
const BY_CHART: &str = "chart_id = ?1 OR seq IN (SELECT seq FROM audit_charts WHERE chart_id = ?1)";

pub(crate) fn row_to_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        seq: r.get(0)?,
        event: AuditEvent {
            time_ms: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            chart_id: r.get(4)?,
            peer: r.get(5)?,
            detail: r.get(6)?,
            // Written by push_audit as a JSON array of strings; anything else was edited in
            // the file: the entry is still listed, and verification fails at it (the hash
            // covers the charts it names).
            charts: match r.get::<_, Option<String>>(9)? {
                None => Vec::new(),
                Some(json) => serde_json::from_str(&json)
                    .unwrap_or_else(|_| vec![format!("(unreadable charts column: {json})")]),
            },
        },
        prev_hash: r.get(7)?,
        hash: r.get(8)?,
        charts_named: None,
    })
}

#[cfg(test)]
mod tests {
    use chartmesh_core::audit::AuditEvent;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// An offline command's pool: a write while its connection is leased (a read on another
    /// thread) goes through a second write connection, set up as the first (synchronous=FULL,
    /// no checkpoint at close); a read while it is leased uses a read-only connection that is
    /// not kept, so every pooled connection takes writes.
    #[test]
    fn an_offline_pool_writes_through_a_second_write_connection_and_keeps_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let key = crate::StoreKey::from_bytes([9; 32]);
        crate::Store::open(&path, &key, crate::StoreOptions::default())
            .unwrap()
            .close();
        let store = crate::Store::open_existing(&path, &key).unwrap();
        let pool = &store.inner.readers;
        let held = pool.lease().unwrap();
        // A read meanwhile: a read-only connection, closed after use.
        let extra = pool.lease().unwrap();
        assert!(extra.read_only_extra);
        assert!(
            extra.execute_batch("CREATE TABLE x(y)").is_err(),
            "read-only"
        );
        drop(extra);
        assert!(pool.idle.lock().unwrap().is_empty());
        // A write meanwhile: committed at once through a new write connection.
        let mut rx = store
            .audit(vec![AuditEvent::new(1, "admin", "read").chart("c1")])
            .unwrap();
        rx.try_recv()
            .expect("committed before audit returned")
            .unwrap();
        drop(held);
        let (a, b) = (
            pool.lease_writable().unwrap(),
            pool.lease_writable().unwrap(),
        );
        for c in [&a, &b] {
            let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
            assert_eq!(sync, 2, "synchronous=FULL");
            assert!(
                c.db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE)
                    .unwrap()
            );
        }
        drop((a, b));
        assert_eq!(
            store.audit_entries(Some("c1"), None, None).unwrap().len(),
            1
        );
        store.close();
        drop(store);
        let next = crate::Store::open(&path, &key, crate::StoreOptions::default()).unwrap();
        assert_eq!(next.audit_entries(Some("c1"), None, None).unwrap().len(), 1);
        assert!(next.verify_audit().unwrap().is_ok());
    }

    /// A `charts` column edited into something that is not a list of chart ids: the entry is
    /// still listed, and `audit verify` fails at that entry (not with a read error).
    #[test]
    fn an_unreadable_charts_column_fails_verification_at_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let key = crate::StoreKey::from_bytes([9; 32]);
        let store = crate::Store::open(&path, &key, crate::StoreOptions::default()).unwrap();
        store
            .audit(vec![
                AuditEvent::new(1, "nurse", "read").chart("c9"),
                AuditEvent::new(2, "nurse", "read").charts(["c1", "c2"]),
            ])
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        let seq = store.audit_entries(Some("c1"), None, None).unwrap()[0].seq;
        store.close();
        drop(store);
        for edited in ["'x'", "'null'", "'[1]'"] {
            let conn = rusqlite::Connection::open(&path).unwrap();
            key.apply(&conn, &path).unwrap();
            conn.execute(
                &format!("UPDATE audit SET charts = {edited} WHERE seq = ?1"),
                [seq],
            )
            .unwrap();
            drop(conn);
            let store = crate::Store::open_to_check(&path, &key).unwrap();
            assert_eq!(
                store.verify_audit().unwrap().unwrap_err().seq,
                seq,
                "{edited}"
            );
            assert!(store.audit_entries(None, None, None).unwrap().len() >= 2);
        }
    }

    /// `audit verify` while the log grows: the entries and the recorded head must come from
    /// one snapshot, or a commit landing between the two reads looks like a truncated log.
    #[test]
    fn audit_verify_reads_one_snapshot_while_writers_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let key = crate::StoreKey::from_bytes([9; 32]);
        let store = crate::Store::open(&path, &key, crate::StoreOptions::default()).unwrap();
        // A log long enough that reading it takes a while.
        for chunk in 0..20 {
            let events = (0..1000)
                .map(|i| AuditEvent::new(chunk * 1000 + i, "seed", "read").chart("c1"))
                .collect();
            store
                .audit(events)
                .unwrap()
                .blocking_recv()
                .unwrap()
                .unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let (store, stop) = (store.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0i64;
                    while !stop.load(Ordering::Relaxed) {
                        let ev = AuditEvent::new(n, format!("writer-{w}"), "read").chart("c2");
                        store
                            .audit(vec![ev])
                            .unwrap()
                            .blocking_recv()
                            .unwrap()
                            .unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut failures = Vec::new();
        for _ in 0..40 {
            match store.verify_audit().unwrap() {
                Ok(_) => {}
                Err(b) => failures.push(format!("entry {}: {}", b.seq, b.reason)),
            }
        }
        stop.store(true, Ordering::Relaxed);
        let written: i64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
        assert!(written > 0, "the writers wrote nothing during the checks");
        assert!(
            failures.is_empty(),
            "{} of 40 checks reported tampering that did not happen: {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
        store.close();
    }
}

/// What `Store::audit_search` matches: every field given must be equal (times: `since_ms`
/// inclusive, `until_ms` exclusive).
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub chart: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: usize,
}
