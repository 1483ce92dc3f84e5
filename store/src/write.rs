//! The single writer. In the daemon a thread owns the write connection: it takes every
//! queued operation, runs each in its own savepoint inside one transaction, commits, and
//! only then answers each caller. A failed operation rolls back alone; a failed commit
//! fails them all. An offline command's writer runs the same batch code inline, one
//! operation per commit, on the connection its reads share ([`WriterHandle::inline`]).

use chartmesh_core::audit::{AuditEvent, GENESIS, entry_hash};
use chartmesh_core::{ChartDoc, CoreError};
use crossbeam_channel::{Receiver, Sender};
use rusqlite::{Connection, OptionalExtension, params};
use std::sync::Mutex;
use std::thread::JoinHandle;
use tokio::sync::oneshot;

use crate::{IndexFields, StoreError, StoreOptions};

/// A chart ready to insert: its saved document and index fields.
#[derive(Debug, Clone)]
pub struct NewChart {
    pub id: String,
    pub doc: Vec<u8>,
    pub index: IndexFields,
    /// None when created at this practice; the source practice id when received from a peer.
    pub origin: Option<String>,
    pub time_ms: i64,
    /// The document's heads (raw hashes).
    pub heads: Vec<[u8; 32]>,
    /// The ids of the referrals in the chart ([`chartmesh_core::ChartDoc::referral_ids`]).
    pub referrals: Vec<String>,
    /// The chart's due-list facts as JSON ([`chartmesh_core::due::facts`]).
    pub due_facts: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InsertOutcome {
    Inserted,
    AlreadyExists,
}

/// The change an edit makes to a chart's document.
pub type EditFn = Box<dyn FnOnce(&mut ChartDoc) -> Result<(), CoreError> + Send>;

#[derive(Debug, Clone)]
pub struct EditOutcome {
    /// The chart after the edit.
    pub chart: serde_json::Value,
    /// Hex hashes of the document's heads after the edit.
    pub heads: Vec<String>,
}

pub(crate) enum WriteOp {
    Insert {
        charts: Vec<NewChart>,
        actor: String,
        reply: oneshot::Sender<Result<Vec<InsertOutcome>, StoreError>>,
    },
    Edit {
        chart_id: String,
        edit: EditFn,
        audit: Vec<AuditEvent>,
        reply: oneshot::Sender<Result<EditOutcome, StoreError>>,
    },
    Audit {
        events: Vec<AuditEvent>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    PutMeta {
        key: String,
        value: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// A write defined by another module of this crate that audits as it goes.
    Task(TaskFn),
    /// A write defined by another module of this crate, with its audit events.
    Exec {
        f: ExecFn,
        audit: Vec<AuditEvent>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
}

impl WriteOp {
    /// The operation's kind, as named in its failpoints (`write.<kind>.before`, ...).
    fn kind(&self) -> &'static str {
        match self {
            WriteOp::Insert { .. } => "insert",
            WriteOp::Edit { .. } => "edit",
            WriteOp::Audit { .. } => "audit",
            WriteOp::PutMeta { .. } => "meta",
            WriteOp::Task(_) => "task",
            WriteOp::Exec { .. } => "exec",
        }
    }
}

/// A write run by the writer inside its savepoint; it answers its caller through the
/// returned held reply (see [`task`]).
pub(crate) type TaskFn = Box<dyn FnOnce(&mut TaskCtx<'_>) -> Reply + Send>;

/// What a task may use: the transaction, the audit chain, the store's options.
pub(crate) struct TaskCtx<'a> {
    pub conn: &'a Connection,
    head: &'a mut Head,
    pub options: &'a StoreOptions,
}

impl TaskCtx<'_> {
    pub fn audit(&mut self, e: &AuditEvent) -> Result<(), StoreError> {
        push_audit(self.conn, self.head, e)
    }
}

/// Wraps a task's work so its result reaches `reply` once the batch commits.
pub(crate) fn task<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, StoreError>>,
    work: impl FnOnce(&mut TaskCtx<'_>) -> Result<T, StoreError> + Send + 'static,
) -> WriteOp {
    WriteOp::Task(Box::new(move |ctx| held(reply, work(ctx))))
}

/// A write run by the writer inside the batch transaction; returns a count for the caller.
pub(crate) type ExecFn = Box<dyn FnOnce(&Connection) -> Result<u64, StoreError> + Send>;

pub(crate) struct WriterHandle {
    pub(crate) changes: tokio::sync::watch::Receiver<i64>,
    mode: Mode,
}

/// Where the writes run.
enum Mode {
    /// The daemon's: a thread owns the write connection and commits queued writes in batches.
    Thread {
        tx: Mutex<Option<Sender<WriteOp>>>,
        thread: Mutex<Option<JoinHandle<()>>>,
    },
    /// An offline admin command's: each write commits at once on the caller's thread, on a
    /// connection leased from the store's pool (the same one its reads use: one open, one
    /// key, one schema parse per command). `None` once closed.
    Inline {
        writer: Mutex<Option<Writer>>,
        pool: std::sync::Arc<crate::read::ReaderPool>,
    },
}

impl WriterHandle {
    /// Starts the daemon's writer thread; it folds the WAL into the database when it stops
    /// (an offline command's [`WriterHandle::inline`] leaves the WAL instead).
    pub(crate) fn spawn(
        conn: Connection,
        options: StoreOptions,
    ) -> Result<WriterHandle, StoreError> {
        let (tx, rx) = crossbeam_channel::bounded::<WriteOp>(1024);
        let (writer, changes) = Writer::new(&conn, options)?;
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(conn, rx))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the writer thread: {e}")))?;
        Ok(WriterHandle {
            changes,
            mode: Mode::Thread {
                tx: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
            },
        })
    }

    /// The writer of an offline admin command: no thread; `conn` (a write connection,
    /// see [`crate::schema::open_write_connection_checked`]) goes into `pool`, which then
    /// serves reads and writes alike. The WAL is left for the daemon to fold in.
    pub(crate) fn inline(
        conn: Connection,
        options: StoreOptions,
        pool: std::sync::Arc<crate::read::ReaderPool>,
    ) -> Result<WriterHandle, StoreError> {
        leave_wal_at_close(&conn)?;
        let (writer, changes) = Writer::new(&conn, options)?;
        pool.give(conn);
        Ok(WriterHandle {
            changes,
            mode: Mode::Inline {
                writer: Mutex::new(Some(writer)),
                pool,
            },
        })
    }

    pub(crate) fn send(&self, op: WriteOp) -> Result<(), StoreError> {
        match &self.mode {
            Mode::Thread { tx, .. } => {
                let tx = tx.lock().unwrap().clone().ok_or(StoreError::Closed)?;
                tx.send(op).map_err(|_| StoreError::Closed)
            }
            Mode::Inline { writer, pool } => {
                // Poisoned: a write panicked (its transaction rolled back); no more writes.
                let mut w = writer.lock().map_err(|_| StoreError::Closed)?;
                let w = w.as_mut().ok_or(StoreError::Closed)?;
                let mut conn = pool.lease_writable()?;
                w.commit_batch(&mut conn, vec![op]);
                Ok(())
            }
        }
    }

    /// Closes the queue and waits for the writer to commit what was queued.
    pub(crate) fn close(&self) {
        match &self.mode {
            Mode::Thread { tx, thread } => {
                tx.lock().unwrap().take();
                if let Some(t) = thread.lock().unwrap().take() {
                    let _ = t.join();
                }
            }
            Mode::Inline { writer, .. } => {
                writer.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
        }
    }
}

/// Neither the writer nor SQLite's own close checkpoints: the WAL (committed and synced)
/// stays for the next opener.
pub(crate) fn leave_wal_at_close(conn: &Connection) -> Result<(), StoreError> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    Ok(())
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.close();
    }
}

/// The audit chain's head: last sequence number and hash.
#[derive(Clone)]
pub(crate) struct Head {
    seq: i64,
    hash: String,
}

fn read_head(conn: &Connection) -> Result<Head, StoreError> {
    let h = conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| {
                Ok(Head {
                    seq: r.get(0)?,
                    hash: r.get(1)?,
                })
            },
        )
        .optional()?;
    Ok(h.unwrap_or(Head {
        seq: 0,
        hash: GENESIS.to_string(),
    }))
}

struct Writer {
    options: StoreOptions,
    head: Head,
    /// The change sequence after the last commit, for those waiting on local changes.
    changed: tokio::sync::watch::Sender<i64>,
}

/// A caller's answer, held until the batch's commit says whether it stands.
pub(crate) struct Reply {
    failed: bool,
    send: SendReply,
}

/// Sends the held answer, or the commit's error if the transaction failed.
type SendReply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

fn held<T: Send + 'static>(
    tx: oneshot::Sender<Result<T, StoreError>>,
    r: Result<T, StoreError>,
) -> Reply {
    Reply {
        failed: r.is_err(),
        send: Box::new(move |commit_error| {
            let _ = tx.send(match commit_error {
                Some(e) => Err(carried(e)),
                None => r,
            });
        }),
    }
}

/// The error a caller gets when the transaction holding its write failed: nothing was written.
fn carried(e: &StoreError) -> StoreError {
    match e {
        StoreError::DiskFull => StoreError::DiskFull,
        StoreError::Locked => StoreError::Locked,
        other => StoreError::Corrupt(format!("the write failed and was rolled back: {other}")),
    }
}

impl Writer {
    /// The writer's state as `conn` reads it, and the receiver of its change sequence.
    fn new(
        conn: &Connection,
        options: StoreOptions,
    ) -> Result<(Writer, tokio::sync::watch::Receiver<i64>), StoreError> {
        let head = read_head(conn)?;
        let seq: i64 = conn.query_row("SELECT n FROM sequence WHERE id = 1", [], |r| r.get(0))?;
        let (changed, changes) = tokio::sync::watch::channel(seq);
        Ok((
            Writer {
                options,
                head,
                changed,
            },
            changes,
        ))
    }

    fn run(mut self, mut conn: Connection, rx: Receiver<WriteOp>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < self.options.max_batch {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit_batch(&mut conn, batch);
        }
        // Fold the WAL into the database so the next open does not have to replay it.
        if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(error = %e, "checkpoint at shutdown failed; the WAL is replayed at the next start");
        }
        tracing::debug!("store writer stopped");
    }

    fn commit_batch(&mut self, conn: &mut Connection, batch: Vec<WriteOp>) {
        let head_before = self.head.clone();
        let options = self.options.clone();
        let mut head = self.head.clone();
        let mut replies = Vec::with_capacity(batch.len());
        let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                let e = StoreError::from(e);
                for op in batch {
                    reply_error(op, &e);
                }
                return;
            }
        };
        let mut tx = tx;
        // Failpoints (docs/RELIABILITY.md): an error injected at a batch-level point fails
        // the whole batch, as an I/O error there would.
        let mut kinds: Vec<&'static str> = Vec::new();
        if crate::failpoint::ENABLED {
            kinds.extend(batch.iter().map(WriteOp::kind));
            kinds.sort_unstable();
            kinds.dedup();
        }
        let mut batch_error = crate::failpoint::hit("write.begin").err();
        for op in batch {
            let kind = op.kind();
            if let Some(e) = &batch_error {
                reply_error(op, e);
                continue;
            }
            let saved = head.clone();
            let mut sp = match tx.savepoint() {
                Ok(sp) => sp,
                Err(e) => {
                    reply_error(op, &StoreError::from(e));
                    continue;
                }
            };
            if let Err(e) = crate::failpoint::hit_fmt(format_args!("write.{kind}.before")) {
                let _ = sp.rollback();
                drop(sp);
                reply_error(op, &e);
                continue;
            }
            let reply = match op {
                WriteOp::Insert { charts, actor, reply } => held(reply, insert(&sp, &mut head, charts, &actor)),
                WriteOp::Edit { chart_id, edit, audit, reply } => {
                    held(reply, apply_edit(&sp, &mut head, &options, &chart_id, edit, audit))
                }
                WriteOp::Audit { events, reply } => held(reply, append_audit(&sp, &mut head, events)),
                WriteOp::PutMeta { key, value, reply } => held(
                    reply,
                    sp.execute("INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value", params![key, value])
                        .map(|_| ())
                        .map_err(StoreError::from),
                ),
                WriteOp::Task(f) => f(&mut TaskCtx { conn: &sp, head: &mut head, options: &options }),
                WriteOp::Exec { f, audit, reply } => held(
                    reply,
                    f(&sp).and_then(|n| append_audit(&sp, &mut head, audit).map(|_| n)),
                ),
            };
            if reply.failed {
                let _ = sp.rollback();
                head = saved;
            }
            let _ = sp.commit();
            replies.push(reply);
            if let Err(e) = crate::failpoint::hit_fmt(format_args!("write.{kind}.after")) {
                batch_error = Some(e);
            }
        }
        if batch_error.is_none() {
            batch_error = before_commit_failpoints(&kinds).err();
        }
        // The chain head is kept apart from the log, so a truncated tail is detected.
        let result = if let Some(e) = batch_error {
            // Nothing of the batch is kept.
            drop(tx);
            Err(e)
        } else if head.seq != head_before.seq {
            tx.execute(
                "INSERT INTO meta(key, value) VALUES ('audit_head', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [format!("{}:{}", head.seq, head.hash)],
            )
            .map(|_| ())
            .and_then(|_| tx.commit())
            .map_err(StoreError::from)
        } else {
            tx.commit().map_err(StoreError::from)
        };
        match result {
            Ok(()) => {
                if head.seq != head_before.seq
                    && let Some(path) = conn.path()
                {
                    crate::integrity::record_commit(std::path::Path::new(path), head.seq);
                }
                self.head = head;
                // Committed but nobody answered yet: a crash here must still keep the batch.
                let _ = crate::failpoint::hit("write.after_commit");
                for k in &kinds {
                    let _ = crate::failpoint::hit_fmt(format_args!("write.after_commit.{k}"));
                }
                // The new sequence is published before anyone is answered, so a caller
                // that saw its write acknowledged also sees the sequence it reached.
                if let Ok(n) = conn
                    .prepare_cached("SELECT n FROM sequence WHERE id = 1")
                    .and_then(|mut st| st.query_row([], |r| r.get::<_, i64>(0)))
                {
                    self.changed.send_if_modified(|v| {
                        let changed = *v != n;
                        *v = n;
                        changed
                    });
                }
                for r in replies {
                    (r.send)(None);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; the batch was rolled back");
                self.head = head_before;
                for r in replies {
                    (r.send)(Some(&e));
                }
            }
        }
    }
}

/// The failpoints just before COMMIT: `write.before_commit`, then one per kind of operation
/// in the batch (`write.before_commit.insert`, ...), so a test can aim at one kind of write.
fn before_commit_failpoints(kinds: &[&str]) -> Result<(), StoreError> {
    crate::failpoint::hit("write.before_commit")?;
    for k in kinds {
        crate::failpoint::hit_fmt(format_args!("write.before_commit.{k}"))?;
    }
    Ok(())
}

fn reply_error(op: WriteOp, e: &StoreError) {
    let msg = || carried(e);
    match op {
        WriteOp::Insert { reply, .. } => drop(reply.send(Err(msg()))),
        WriteOp::Edit { reply, .. } => drop(reply.send(Err(msg()))),
        WriteOp::Audit { reply, .. } => drop(reply.send(Err(msg()))),
        WriteOp::PutMeta { reply, .. } => drop(reply.send(Err(msg()))),
        WriteOp::Exec { reply, .. } => drop(reply.send(Err(msg()))),
        // Dropping the task drops its reply sender: the caller sees the write did not happen.
        WriteOp::Task(f) => drop(f),
    }
}

fn push_audit(tx: &Connection, head: &mut Head, e: &AuditEvent) -> Result<(), StoreError> {
    // The charts as the store keeps them and reads them back (sorted, no repeats).
    let normalized;
    let e = if e.charts.is_sorted_by(|a, b| a < b) {
        e
    } else {
        let mut n = e.clone();
        n.normalize_charts();
        normalized = n;
        &normalized
    };
    let seq = head.seq + 1;
    let hash = entry_hash(&head.hash, seq, e);
    let charts = (!e.charts.is_empty())
        .then(|| serde_json::to_string(&e.charts).expect("chart ids serialize"));
    tx.prepare_cached(
        "INSERT INTO audit(seq, time_ms, actor, action, chart_id, peer, detail, prev_hash, hash, charts) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
    )?
    .execute(params![seq, e.time_ms, e.actor, e.action, e.chart_id, e.peer, e.detail, head.hash, hash, charts])?;
    if !e.charts.is_empty() {
        let mut index =
            tx.prepare_cached("INSERT INTO audit_charts(chart_id, seq) VALUES (?1, ?2)")?;
        for c in &e.charts {
            index.execute(params![c, seq])?;
        }
    }
    head.seq = seq;
    head.hash = hash;
    Ok(())
}

fn append_audit(
    tx: &Connection,
    head: &mut Head,
    events: Vec<AuditEvent>,
) -> Result<(), StoreError> {
    for e in &events {
        push_audit(tx, head, e)?;
    }
    Ok(())
}

/// Heads as stored: the raw 32-byte hashes, concatenated.
pub(crate) fn heads_blob(heads: &[[u8; 32]]) -> Vec<u8> {
    heads.concat()
}

pub(crate) fn heads_from_blob(b: &[u8]) -> Vec<[u8; 32]> {
    b.chunks_exact(32)
        .map(|c| c.try_into().expect("32 bytes"))
        .collect()
}

pub(crate) fn name_key(ix: &IndexFields) -> String {
    format!("{} {}", ix.family, ix.given).to_lowercase()
}

fn insert(
    tx: &Connection,
    head: &mut Head,
    charts: Vec<NewChart>,
    actor: &str,
) -> Result<Vec<InsertOutcome>, StoreError> {
    let mut out = Vec::with_capacity(charts.len());
    let first_seq = crate::schema::take_seq(tx, charts.len() as i64)?;
    let mut stmt = tx.prepare_cached(
        "INSERT INTO charts(id, origin, created_ms, updated_ms, mrn, family, given, birth_date, name_key, seq, heads, due_facts, doc_bytes)
         VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) ON CONFLICT(id) DO NOTHING",
    )?;
    for (seq, c) in (first_seq..).zip(charts) {
        let n = stmt.execute(params![
            c.id,
            c.origin,
            c.time_ms,
            c.index.mrn,
            c.index.family,
            c.index.given,
            c.index.birth_date,
            name_key(&c.index),
            seq,
            heads_blob(&c.heads),
            c.due_facts,
            c.doc.len() as i64
        ])?;
        if n == 1 {
            crate::failpoint!("write.insert.row");
            insert_doc(tx, &c.id, &c.doc)?;
            crate::workflow::index_referrals(tx, &c.id, &c.referrals)?;
            let mut ev = AuditEvent::new(c.time_ms, actor, "create").chart(&c.id);
            if let Some(o) = &c.origin {
                ev = ev.peer(o.clone());
            }
            push_audit(tx, head, &ev)?;
            out.push(InsertOutcome::Inserted);
        } else {
            out.push(InsertOutcome::AlreadyExists);
        }
        crate::failpoint!("write.insert.between_charts");
    }
    Ok(out)
}

/// Where a loaded document stands in the store.
pub(crate) struct Stored<'a> {
    pub chart_id: &'a str,
    pub inc_seq: i64,
    pub inc_count: i64,
    /// The stored size of the document (full save plus incremental changes).
    pub doc_bytes: i64,
}

/// What writing a changed document stores, computed from the document alone (so it can be
/// prepared away from the writer): its new bytes, heads, referral ids and due-list facts.
#[derive(Debug, Clone)]
pub struct DocWrite {
    pub(crate) heads: Vec<[u8; 32]>,
    /// A new full save (compaction) or the changes since the last save.
    pub(crate) body: DocBody,
    pub(crate) referrals: Vec<String>,
    pub(crate) facts: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) enum DocBody {
    Full(Vec<u8>),
    Incremental(Vec<u8>),
}

impl DocWrite {
    /// The document's stored size after this write, from its size before.
    pub(crate) fn stored_size(&self, before: i64) -> i64 {
        match &self.body {
            DocBody::Full(b) => b.len() as i64,
            DocBody::Incremental(b) => before + b.len() as i64,
        }
    }
}

/// Takes the document's changes since its last `save_incremental` (or a full save when
/// `inc_count` incremental rows have piled up) and what is indexed beside it.
pub(crate) fn doc_write(doc: &mut ChartDoc, options: &StoreOptions, inc_count: i64) -> DocWrite {
    let body = if inc_count as u32 + 1 >= options.compact_after {
        DocBody::Full(doc.save())
    } else {
        DocBody::Incremental(doc.save_incremental())
    };
    // A chart whose due view does not read is still stored; its facts are then dropped and
    // the due list reads its document instead.
    let facts = doc
        .due_view()
        .ok()
        .map(|c| serde_json::to_string(&chartmesh_core::due::facts(&c)).expect("facts serialize"));
    DocWrite {
        heads: doc.head_bytes(),
        body,
        referrals: doc.referral_ids(),
        facts,
    }
}

/// Persists the changes made to a loaded document since its last `save_incremental` (as an
/// incremental row, or a new full save when enough have piled up), with its index fields,
/// heads and a new change sequence number. `from_peer`: the peer whose sync wrote this
/// version and holds all of it (so it is not offered back), or None.
pub(crate) fn persist_doc(
    tx: &Connection,
    options: &StoreOptions,
    at: &Stored<'_>,
    doc: &mut ChartDoc,
    ix: &IndexFields,
    now: i64,
    from_peer: Option<&str>,
) -> Result<(), StoreError> {
    let w = doc_write(doc, options, at.inc_count);
    write_doc(tx, at, w, ix, now, from_peer)
}

/// Stores a [`DocWrite`] for the chart at `at` (see [`persist_doc`]).
pub(crate) fn write_doc(
    tx: &Connection,
    at: &Stored<'_>,
    w: DocWrite,
    ix: &IndexFields,
    now: i64,
    from_peer: Option<&str>,
) -> Result<(), StoreError> {
    let chart_id = at.chart_id;
    let size = w.stored_size(at.doc_bytes);
    if size > chartmesh_core::sync::MAX_CHART_BYTES as i64 {
        return Err(StoreError::TooLarge {
            chart: chart_id.to_string(),
            bytes: size,
        });
    }
    let change_seq = crate::schema::take_seq(tx, 1)?;
    let heads = heads_blob(&w.heads);
    crate::workflow::index_referrals(tx, chart_id, &w.referrals)?;
    let (inc_seq, inc_count) = match w.body {
        DocBody::Full(full) => {
            tx.execute("DELETE FROM chart_changes WHERE chart_id = ?1", [chart_id])?;
            tx.prepare_cached("UPDATE chart_docs SET doc = ?2 WHERE chart_id = ?1")?
                .execute(params![chart_id, full])?;
            (at.inc_seq, 0)
        }
        DocBody::Incremental(inc) if inc.is_empty() => (at.inc_seq, at.inc_count),
        DocBody::Incremental(inc) => {
            let seq = at.inc_seq + 1;
            // The heads this chunk starts from: a peer at exactly those heads needs only this
            // chunk and the later ones, without loading the document.
            let before: Option<Vec<u8>> = tx
                .prepare_cached("SELECT heads FROM charts WHERE id = ?1")?
                .query_row([chart_id], |r| r.get(0))
                .optional()?
                .flatten();
            tx.prepare_cached(
                "INSERT INTO chart_changes(chart_id, seq, data, heads_before) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![chart_id, seq, inc, before])?;
            (seq, at.inc_count + 1)
        }
    };
    crate::failpoint!("write.doc.body");
    tx.prepare_cached(
        "UPDATE charts SET inc_seq = ?2, inc_count = ?3, updated_ms = ?4, seq = ?5, heads = ?6, from_peer = ?7, due_facts = ?8, doc_bytes = ?9 WHERE id = ?1",
    )?
    .execute(params![chart_id, inc_seq, inc_count, now, change_seq, heads, from_peer, w.facts, size])?;
    // The search index only when a demographic field changed (naming a column in SET
    // rewrites its index entries even when the value is the same).
    tx.prepare_cached(
        "UPDATE charts SET mrn = ?2, family = ?3, given = ?4, birth_date = ?5, name_key = ?6 WHERE id = ?1
         AND (mrn IS NOT ?2 OR family IS NOT ?3 OR given IS NOT ?4 OR birth_date IS NOT ?5)",
    )?
    .execute(params![chart_id, ix.mrn, ix.family, ix.given, ix.birth_date, name_key(ix)])?;
    Ok(())
}

/// Stores a new chart's document (its row in `charts` is written by the caller).
pub(crate) fn insert_doc(tx: &Connection, chart_id: &str, doc: &[u8]) -> Result<(), StoreError> {
    tx.prepare_cached("INSERT INTO chart_docs(chart_id, doc) VALUES (?1, ?2)")?
        .execute(params![chart_id, doc])?;
    Ok(())
}

pub(crate) fn load_doc(
    conn: &Connection,
    id: &str,
) -> Result<Option<(ChartDoc, i64, i64)>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT d.doc, c.inc_seq, c.inc_count FROM charts c JOIN chart_docs d ON d.chart_id = c.id WHERE c.id = ?1",
        )?
        .query_row([id], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .optional()?;
    let Some((base, inc_seq, inc_count)) = row else {
        return Ok(None);
    };
    let mut incs: Vec<Vec<u8>> = Vec::new();
    if inc_count > 0 {
        let mut stmt =
            conn.prepare_cached("SELECT data FROM chart_changes WHERE chart_id = ?1 ORDER BY seq")?;
        let rows = stmt.query_map([id], |r| r.get::<_, Vec<u8>>(0))?;
        for r in rows {
            incs.push(r?);
        }
    }
    let doc = ChartDoc::load(&base, incs.iter().map(|v| v.as_slice()))?;
    Ok(Some((doc, inc_seq, inc_count)))
}

fn apply_edit(
    tx: &Connection,
    head: &mut Head,
    options: &StoreOptions,
    chart_id: &str,
    edit: EditFn,
    audit: Vec<AuditEvent>,
) -> Result<EditOutcome, StoreError> {
    let (mut doc, inc_seq, inc_count) =
        load_doc(tx, chart_id)?.ok_or_else(|| StoreError::NotFound(chart_id.to_string()))?;
    let doc_bytes: i64 = tx
        .prepare_cached("SELECT doc_bytes FROM charts WHERE id = ?1")?
        .query_row([chart_id], |r| r.get(0))?;
    // Mark what is stored, so save_incremental returns only this edit's changes.
    doc.mark_saved();
    edit(&mut doc)?;
    let json = doc.to_json()?;
    let now = audit.first().map(|a| a.time_ms).unwrap_or(0);
    persist_doc(
        tx,
        options,
        &Stored {
            chart_id,
            inc_seq,
            inc_count,
            doc_bytes,
        },
        &mut doc,
        &IndexFields::from_chart_json(&json),
        now,
        None,
    )?;
    crate::failpoint!("write.edit.persisted");
    append_audit(tx, head, audit)?;
    let heads = doc.heads().iter().map(|h| h.to_string()).collect();
    Ok(EditOutcome { chart: json, heads })
}
