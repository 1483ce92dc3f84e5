//! # chartmesh-store
//!
//! The practice's chart store: one SQLite database (WAL, `synchronous=FULL`) holding every
//! chart as an automerge document (a full save plus incremental changes, compacted now and
//! then), a search index over demographics, and the hash-chained audit log.
//!
//! Owns: the database file, its schema and migrations, the single writer thread.
//! Must not touch: the network, the clock policy or the consent rules; callers pass time and
//! decisions in. This is the only product crate that imports rusqlite.
//!
//! Writes go through one writer thread that owns the write connection and commits whatever
//! is queued in one transaction (group commit), so many small writes cost one fsync.
//! A write is acknowledged only after its transaction is durable. Reads use their own
//! connections and never wait for the writer.

mod consent;
mod error;
pub mod failpoint;
pub mod integrity;
mod key;
mod read;
mod schema;
mod sync;
mod workflow;
mod write;

pub use consent::{Peer, Revoked};
pub use error::StoreError;
pub use key::{StoreKey, is_plaintext, plaintext_count, rekey_copy};
pub use read::{AuditFilter, ChartRecord, ChartSummary, GrantState, StoreOverview};
pub use sync::{
    PreparedMerge, SyncChart, SyncItem, SyncOutcome, SyncPeerState, rotate_incarnation,
};
pub use workflow::{ConflictRecord, ReferralRef};
pub use write::{EditFn, EditOutcome, InsertOutcome, NewChart};

use chartmesh_core::audit::AuditEvent;
use rusqlite::params;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Demographic fields kept in the search index.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexFields {
    pub mrn: String,
    pub family: String,
    pub given: String,
    pub birth_date: String,
}

impl IndexFields {
    /// Extracts the indexed fields from a chart's JSON.
    pub fn from_chart_json(v: &serde_json::Value) -> IndexFields {
        let p = &v["patient"];
        let s = |x: &serde_json::Value| x.as_str().unwrap_or_default().to_string();
        IndexFields {
            mrn: s(&p["mrn"]),
            family: s(&p["name"]["family"]),
            given: p["name"]["given"]
                .as_array()
                .map(|g| {
                    g.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default(),
            birth_date: s(&p["birthDate"]),
        }
    }
}

/// A handle on the store; cheap to clone, shared by the daemon's tasks.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Option<write::WriterHandle>,
    readers: Arc<read::ReaderPool>,
    options: StoreOptions,
    /// An offline command's store that was closed cleanly when it opened: closing it
    /// records a clean close again ([`integrity::record_clean_close`]).
    clean_at_open: bool,
}

/// Tunables; the defaults suit a practice PC.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Incremental changes kept per chart before they are folded into a new full save.
    pub compact_after: u32,
    /// The most write operations committed in one transaction.
    pub max_batch: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            compact_after: 32,
            max_batch: 256,
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`, migrates it and starts the writer.
    pub fn open(path: &Path, key: &StoreKey, options: StoreOptions) -> Result<Store, StoreError> {
        Ok(Self::open_writer(path, key, options, true, false)?.0)
    }

    /// [`Store::open`] for the daemon's start: first the start-up check of
    /// [`integrity`] (damaged pages after an unclean stop, lost commits) on the same
    /// connection that then becomes the writer's, so the file is opened and keyed once.
    /// Returns what the check read (`None` for a store it creates). A damaged store is
    /// [`StoreError::Damaged`] and nothing is written to it.
    pub fn open_checked(
        path: &Path,
        key: &StoreKey,
        options: StoreOptions,
    ) -> Result<(Store, Option<integrity::IntegrityReport>), StoreError> {
        Self::open_writer(path, key, options, true, true)
    }

    /// The store with its writer; `daemon` false for an offline admin command (no upgrade,
    /// the WAL left at close); `check` runs the start-up check first.
    fn open_writer(
        path: &Path,
        key: &StoreKey,
        options: StoreOptions,
        daemon: bool,
        check: bool,
    ) -> Result<(Store, Option<integrity::IntegrityReport>), StoreError> {
        failpoint::setup_from_env();
        // Read before the open touches the files (it may create the WAL).
        let clean_at_open = !daemon && integrity::still_clean(path);
        let (conn, report) = schema::open_write_connection_checked(path, key, daemon, check)?;
        let (writer, readers) = if daemon {
            let readers = Arc::new(read::ReaderPool::new(path.to_path_buf(), key.clone()));
            (write::WriterHandle::spawn(conn, options.clone())?, readers)
        } else {
            // An offline command reads and writes through this one connection.
            let readers = Arc::new(read::ReaderPool::writable(path.to_path_buf(), key.clone()));
            let writer = write::WriterHandle::inline(conn, options.clone(), readers.clone())?;
            (writer, readers)
        };
        let store = Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                writer: Some(writer),
                readers,
                options,
                clean_at_open,
            }),
        };
        Ok((store, report))
    }

    /// Opens an existing store of this build's schema for an admin command run while the
    /// daemon is stopped (the caller holds the daemon's lock): reads and audit entries, no
    /// upgrade. A store of another schema version (or a plaintext one) is refused before
    /// anything is written to it; chartmeshd upgrades stores. The WAL is left for the daemon
    /// to fold in at its next start instead of being checkpointed at close.
    pub fn open_existing(path: &Path, key: &StoreKey) -> Result<Store, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        Ok(Self::open_writer(path, key, StoreOptions::default(), false, false)?.0)
    }

    /// Opens an existing database for reading only (another process may be writing).
    pub fn open_read_only(path: &Path, key: &StoreKey) -> Result<Store, StoreError> {
        Self::open_reader(path, key, false)
    }

    /// Opens a store file only to check it ([`Store::count`], [`Store::verify_audit`]): a
    /// backup or an older store being upgraded may have any earlier schema (chartmeshd
    /// migrates it when it opens it). Other reads need the current schema.
    pub fn open_to_check(path: &Path, key: &StoreKey) -> Result<Store, StoreError> {
        Self::open_reader(path, key, true)
    }

    fn open_reader(path: &Path, key: &StoreKey, older_ok: bool) -> Result<Store, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        let readers = Arc::new(read::ReaderPool::new(path.to_path_buf(), key.clone()));
        readers.check_schema(older_ok)?;
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                writer: None,
                readers,
                options: StoreOptions::default(),
                clean_at_open: false,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub(crate) fn with_reader<T>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.inner.readers.with(f)
    }

    pub(crate) fn writer(&self) -> Result<&write::WriterHandle, StoreError> {
        self.inner.writer.as_ref().ok_or(StoreError::ReadOnly)
    }

    /// Inserts new charts. Resolves once the transaction holding them is durable.
    pub fn insert_charts(
        &self,
        charts: Vec<NewChart>,
        actor: String,
    ) -> Result<oneshot::Receiver<Result<Vec<InsertOutcome>, StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer()?.send(write::WriteOp::Insert {
            charts,
            actor,
            reply: tx,
        })?;
        Ok(rx)
    }

    /// Applies `edit` to the chart's document and persists the resulting change durably.
    pub fn edit(
        &self,
        chart_id: String,
        edit: EditFn,
        audit: Vec<AuditEvent>,
    ) -> Result<oneshot::Receiver<Result<EditOutcome, StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer()?.send(write::WriteOp::Edit {
            chart_id,
            edit,
            audit,
            reply: tx,
        })?;
        Ok(rx)
    }

    /// Appends audit events (e.g. reads, refusals) that go with no other write.
    pub fn audit(
        &self,
        events: Vec<AuditEvent>,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer()?
            .send(write::WriteOp::Audit { events, reply: tx })?;
        Ok(rx)
    }

    /// The change sequence after each commit: wakes whoever waits for local changes (the
    /// sync layer nudges peers). None for a read-only store.
    pub fn subscribe_changes(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        self.inner.writer.as_ref().map(|w| w.changes.clone())
    }

    /// Stores a small key/value setting in the database.
    pub fn put_meta(
        &self,
        key: &str,
        value: &str,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer()?.send(write::WriteOp::PutMeta {
            key: key.into(),
            value: value.into(),
            reply: tx,
        })?;
        Ok(rx)
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.readers.get_meta(key)
    }

    /// One chart's stored record (document loaded), or None.
    pub fn get(&self, id: &str) -> Result<Option<ChartRecord>, StoreError> {
        self.inner.readers.get(id)
    }

    /// Every chart id, in order (an index scan).
    pub fn chart_ids(&self) -> Result<Vec<String>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached("SELECT id FROM charts ORDER BY id")?;
            let rows = st.query_map([], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Resolves a chart as a person names it to its local key: the key itself (a chart of
    /// this practice's own, or a copy's full `CHART@PRACTICE` key); else a chart id held
    /// here only as one practice's copy; else `CHART@PREFIX` with the start of the
    /// custodian's id. An id held as several copies is ambiguous: the error lists them.
    pub fn resolve_chart(&self, typed: &str) -> Result<Option<String>, StoreError> {
        self.with_reader(|c| {
            let exact: bool = c
                .prepare_cached("SELECT EXISTS(SELECT 1 FROM charts WHERE id = ?1)")?
                .query_row([typed], |r| r.get(0))?;
            if exact {
                return Ok(Some(typed.to_string()));
            }
            // A chart id never contains '@': everything after it names the custodian.
            let prefix = if typed.contains('@') {
                typed.to_string()
            } else {
                format!("{typed}@")
            };
            // Keys starting with the prefix: a range on the primary key ('~' sorts after
            // every character of a practice id).
            let mut st = c.prepare_cached(
                "SELECT id FROM charts WHERE id >= ?1 AND id < ?2 AND origin IS NOT NULL ORDER BY id LIMIT 6",
            )?;
            let hits: Vec<String> = st
                .query_map(params![prefix, format!("{prefix}~")], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            match hits.len() {
                0 => Ok(None),
                1 => Ok(hits.into_iter().next()),
                _ => Err(StoreError::Ambiguous(typed.to_string(), hits.join(", "))),
            }
        })
    }

    pub fn count(&self) -> Result<u64, StoreError> {
        self.inner.readers.count()
    }

    /// Charts whose MRN equals, whose birth date equals, or whose name starts with `query`.
    pub fn search(&self, query: &str, limit: usize) -> Result<Vec<ChartSummary>, StoreError> {
        self.inner.readers.search(query, limit)
    }

    /// Calls `f` for every chart (or the listed ones), in id order, one document in memory at a time.
    pub fn for_each_chart(
        &self,
        ids: Option<&[String]>,
        f: &mut dyn FnMut(ChartRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.inner.readers.for_each_chart(ids, f)
    }

    /// Audit entries in order. For one chart, an entry for a list keeps only that chart in
    /// `charts` (`charts_named` says how many it names); the whole log keeps every chart.
    pub fn audit_entries(
        &self,
        chart: Option<&str>,
        since_ms: Option<i64>,
        limit: Option<usize>,
    ) -> Result<Vec<chartmesh_core::audit::AuditEntry>, StoreError> {
        self.inner.readers.audit_entries(chart, since_ms, limit)
    }

    /// How many audit entries there are of each action (for `/metrics`).
    pub fn audit_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.readers.audit_counts()
    }

    /// Audit entries matching a filter, newest first (the console's audit search). An entry
    /// for a list keeps in `charts` only the chart searched for (none without a chart
    /// filter); `charts_named` says how many it names.
    pub fn audit_search(
        &self,
        filter: &AuditFilter,
    ) -> Result<Vec<chartmesh_core::audit::AuditEntry>, StoreError> {
        self.inner.readers.audit_search(filter)
    }

    /// Paired practices, grants, charts' last writes and the audit log's length, from one
    /// snapshot, whatever the schema (for comparing a backup with the store it would replace).
    pub fn overview(&self) -> Result<StoreOverview, StoreError> {
        self.inner.readers.overview()
    }

    /// Recomputes the whole audit chain; the error says where it first breaks.
    pub fn verify_audit(
        &self,
    ) -> Result<Result<usize, chartmesh_core::audit::ChainBreak>, StoreError> {
        self.inner.readers.verify_audit()
    }

    /// Writes a consistent copy of the store to `dest` while the store stays in use: one
    /// read snapshot copied page by page (still encrypted with the same key), written to a
    /// temporary file readable by its owner only (0600), synced, then given its name. An
    /// existing `dest` is never replaced (the caller checks first; a file appearing
    /// meanwhile is still not overwritten). Returns the bytes written.
    pub fn backup_to(&self, dest: &Path) -> Result<u64, StoreError> {
        let key = self.inner.readers.key().clone();
        let io = |e: std::io::Error| StoreError::Io(format!("writing {}: {e}", dest.display()));
        let tmp = private_temp_file(dest).map_err(io)?;
        let result = self.with_reader(|src| {
            let mut out = rusqlite::Connection::open(&tmp)?;
            key.apply(&out, &tmp)?;
            {
                let b = rusqlite::backup::Backup::new(src, &mut out)?;
                // All pages in one step: one read snapshot, so the copy is consistent while
                // the writer carries on (WAL readers never block it).
                match b.step(-1)? {
                    rusqlite::backup::StepResult::Done => {}
                    other => {
                        return Err(StoreError::Corrupt(format!(
                            "backup did not complete ({other:?}); try again"
                        )));
                    }
                }
            }
            out.execute_batch("PRAGMA journal_mode=DELETE;")?;
            drop(out);
            Ok(())
        });
        let placed = result.and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io)?;
            place_no_clobber(&tmp, dest).map_err(io)
        });
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::File::open(dir).and_then(|f| f.sync_all());
        }
        Ok(std::fs::metadata(dest).map_err(io)?.len())
    }

    /// Bytes of the database and its WAL on disk.
    pub fn disk_bytes(&self) -> u64 {
        let mut total = 0;
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.inner.path.clone().into_os_string();
            p.push(suffix);
            total += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        }
        total
    }

    /// Stops the writer after the queued writes are committed. Later writes fail with `Closed`.
    pub fn close(&self) {
        self.inner.readers.close_idle();
        if let Some(w) = &self.inner.writer {
            w.close();
        }
        // An offline command leaves the files as a clean close would (every write committed,
        // the WAL kept): the daemon's next start need not scan every page because of it.
        if self.inner.clean_at_open {
            integrity::record_clean_close(&self.inner.path);
        }
    }
}

/// A new, empty file beside `dest` readable by its owner only (`DEST.partial-<random>`):
/// never an existing file.
fn private_temp_file(dest: &Path) -> std::io::Result<PathBuf> {
    loop {
        let mut name = dest.as_os_str().to_owned();
        name.push(format!(".partial-{:08x}", rand_u32()));
        let tmp = PathBuf::from(name);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        match opts.open(&tmp) {
            Ok(_) => return Ok(tmp),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// Gives `tmp` the name `dest` unless `dest` exists: a hard link fails if the name is
/// taken, atomically; where links are not supported (FAT USB sticks), a rename after a check.
fn place_no_clobber(tmp: &Path, dest: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(tmp, dest) {
        Ok(()) => std::fs::remove_file(tmp),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the file already exists; a backup never replaces a file, choose a new name",
        )),
        Err(_) => {
            if std::fs::symlink_metadata(dest).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the file already exists; a backup never replaces a file, choose a new name",
                ));
            }
            std::fs::rename(tmp, dest)
        }
    }
}
