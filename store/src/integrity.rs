//! The store's start-up check: is the file what was committed, and is it intact?
//!
//! Two faults are looked for before the daemon serves anything:
//! - **Damaged pages** (flipped bytes, a torn write, a bad disk): `PRAGMA quick_check`
//!   reads every page of every table and index; SQLCipher verifies each page's HMAC as it
//!   is read, so any change to an encrypted page is caught, and the b-tree structure is
//!   checked. (`cipher_integrity_check` verifies only the HMACs and `integrity_check` adds
//!   index-content checks at several times the cost: measured in docs/RELIABILITY.md.)
//! - **Lost commits** (the WAL deleted or truncated while it held committed transactions
//!   not yet folded into the database): after every commit the writer records the audit
//!   chain's head in a small file beside the store ([`COMMIT_MARK_SUFFIX`]), tied to the
//!   store file's inode. If the store opens with an audit head behind the recorded one, the
//!   tail of committed work is gone. A store replaced on purpose (restore, key rotation) is a
//!   new file, so an old mark does not apply to it.
//!
//! - **A clean close** skips the page scan: when the daemon closed the store normally it
//!   records the store file's and its WAL's identity, size, modification and change times
//!   ([`CLEAN_SUFFIX`]); if nothing has touched either file since, the pages are the ones it
//!   wrote and verified as it wrote them, and the start opens at once (the scan at 10,000
//!   charts costs over a second). After a crash, a kill, or any other write to the files
//!   (a restore, a flipped byte, a copied-in file) the stamp does not match and the full scan
//!   runs. The stamp is removed as the store is opened, so it never outlives a run. Damage
//!   that appears at rest without touching the file's times is still caught page by page as
//!   it is read (each page's HMAC), and nothing that fails it is served or sent.
//!
//! Owns: the check, the commit mark and the clean-close stamp. Must not touch: repairing anything; what to do is
//! the operator's choice, and the error says how.

use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};

use crate::{StoreError, StoreKey};

/// The commit mark's file name: the store's path with this appended.
pub const COMMIT_MARK_SUFFIX: &str = "-commit";

/// What the start-up check read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrityReport {
    /// Pages read and verified (0 when the scan was skipped after a clean close).
    pub pages: u64,
    /// Whether every page was read (false: closed cleanly and untouched since).
    pub scanned: bool,
    /// The audit chain's head in the store.
    pub audit_head: i64,
    /// The head recorded after the last commit, when the mark applies to this file.
    pub recorded_head: Option<i64>,
    pub millis: u64,
}

fn mark_path(store: &Path) -> PathBuf {
    let mut p = store.as_os_str().to_owned();
    p.push(COMMIT_MARK_SUFFIX);
    PathBuf::from(p)
}

#[cfg(unix)]
fn inode(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| m.ino())
}

#[cfg(not(unix))]
fn inode(_p: &Path) -> Option<u64> {
    None
}

/// Records the audit head after a commit (called by the writer). Not synced: a commit's
/// own fsync comes first, so a mark that reached the disk never names an undurable commit;
/// after a power cut it may be behind (then it detects less, never wrongly).
pub(crate) fn record_commit(store: &Path, audit_head: i64) {
    if let Some(ino) = inode(store) {
        let _ = std::fs::write(mark_path(store), format!("{ino} {audit_head}\n"));
    }
}

/// The clean-close stamp's file name: the store's path with this appended.
pub const CLEAN_SUFFIX: &str = "-clean";

fn clean_path(store: &Path) -> PathBuf {
    let mut p = store.as_os_str().to_owned();
    p.push(CLEAN_SUFFIX);
    PathBuf::from(p)
}

/// Identity, size, modification and change time of the store and of its WAL (if any).
#[cfg(unix)]
fn stamp(store: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let one = |p: &Path| match std::fs::metadata(p) {
        Ok(m) => Some(format!(
            "{} {} {}.{} {}.{}",
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("none".into()),
        Err(_) => None,
    };
    let mut wal = store.as_os_str().to_owned();
    wal.push("-wal");
    Some(format!("{} / {}\n", one(store)?, one(Path::new(&wal))?))
}

#[cfg(not(unix))]
fn stamp(_store: &Path) -> Option<String> {
    None
}

/// Records that the store at `path` was closed cleanly (called by the daemon after its
/// last connection to the store closed). The next start skips the page scan if the files
/// are untouched by then.
pub fn record_clean_close(path: &Path) {
    if let Some(s) = stamp(path) {
        let _ = std::fs::write(clean_path(path), s);
    }
}

/// Was the store closed cleanly and left untouched since? Leaves the stamp in place: an
/// offline command that opens the store this way records a new one when it closes cleanly
/// (a crash meanwhile leaves the old one, which no longer matches the files).
pub(crate) fn still_clean(path: &Path) -> bool {
    let recorded = std::fs::read_to_string(clean_path(path)).ok();
    recorded.is_some() && recorded == stamp(path)
}

/// Was the store closed cleanly and left untouched since? Consumes the stamp either way.
fn closed_cleanly(path: &Path) -> bool {
    let clean = clean_path(path);
    let recorded = std::fs::read_to_string(&clean).ok();
    let _ = std::fs::remove_file(&clean);
    recorded.is_some() && recorded == stamp(path)
}

/// The recorded head, if the mark exists, parses and belongs to this store file.
fn recorded_head(store: &Path) -> Option<i64> {
    let text = std::fs::read_to_string(mark_path(store)).ok()?;
    let mut it = text.split_whitespace();
    let ino: u64 = it.next()?.parse().ok()?;
    let head: i64 = it.next()?.parse().ok()?;
    (Some(ino) == inode(store)).then_some(head)
}

/// What the operator should do, said once for every kind of damage.
pub const RECOVERY: &str = "chartmeshd will not serve or send anything from it. Keep the data directory as it is, then restore the latest backup with `chartmesh restore BACKUP` (daemon stopped); charts received from other practices come back from their custodians at the next sync, and charts written here since the backup must be entered or imported again. See docs/OPERATIONS.md";

fn damaged(what: String) -> StoreError {
    StoreError::Damaged(format!("the chart store is damaged: {what}. {RECOVERY}"))
}

/// With a key that does not open the first page: are the other pages' HMACs good? Then the
/// key is right and the first page is damaged; with a wrong key no page verifies.
fn first_page_damaged(path: &Path, key: &StoreKey) -> bool {
    let Ok(conn) = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return false;
    };
    let _ = conn.execute_batch("PRAGMA cipher_log_level = NONE;");
    if conn
        .execute_batch(&format!("PRAGMA key = \"x'{}'\";", key.to_hex()))
        .is_err()
    {
        return false;
    }
    let pages = std::fs::metadata(path).map(|m| m.len() / 4096).unwrap_or(0);
    let failed = conn
        .prepare("PRAGMA cipher_integrity_check")
        .and_then(|mut st| {
            st.query_map([], |r| r.get::<_, String>(0))
                .map(|rows| rows.filter_map(Result::ok).count() as u64)
        })
        .unwrap_or(u64::MAX);
    pages > 1 && failed < pages
}

/// Checks the store at `path` before it is opened for writing (see the module docs), on a
/// connection of its own that changes nothing. A missing store is fine (it is about to be
/// created). The daemon checks on its write connection instead: [`crate::Store::open_checked`].
pub fn check_store(path: &Path, key: &StoreKey) -> Result<Option<IntegrityReport>, StoreError> {
    if !path.exists() {
        forget_marks(path);
        return Ok(None);
    }
    let conn = open_to_check(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    // Looking must not change anything: no checkpoint of the WAL when this connection closes.
    let _ = conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    );
    check_connection(&conn, path, key).map(Some)
}

/// A new store: a mark left by a deleted one must not apply to it (inodes are reused).
pub(crate) fn forget_marks(path: &Path) {
    let _ = std::fs::remove_file(mark_path(path));
    let _ = std::fs::remove_file(clean_path(path));
}

/// Opens an existing store file to check it. Files this process may not read and write are
/// said to be that (see [`access_problem`]); a file that does not open otherwise is damaged.
pub(crate) fn open_to_check(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    if flags.contains(OpenFlags::SQLITE_OPEN_READ_WRITE)
        && let Some(e) = access_problem(path)
    {
        return Err(e);
    }
    Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(|e| {
        access_problem(path).unwrap_or_else(|| damaged(format!("it does not open ({e})")))
    })
}

/// Why this process cannot read and write the store, if it cannot: the store, its WAL or its
/// shared-memory file belong to another user, the directory the WAL is created in is not
/// writable, or the file system is read-only. Such a store is not damaged, and telling the
/// operator to restore a backup would lose what was written since; nothing is changed.
///
/// Asked with `access(2)`, never by opening the files: closing a descriptor of the store
/// would drop every POSIX lock SQLite holds on it in this process.
pub(crate) fn access_problem(path: &Path) -> Option<StoreError> {
    #[cfg(unix)]
    {
        use std::io::ErrorKind::{PermissionDenied, ReadOnlyFilesystem};
        use std::os::unix::ffi::OsStrExt;
        let beside = |suffix: &str| {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        };
        // SQLite creates the WAL and shared-memory files beside the store.
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let checks = [
            (path.to_path_buf(), libc::R_OK | libc::W_OK),
            (beside("-wal"), libc::R_OK | libc::W_OK),
            (beside("-shm"), libc::R_OK | libc::W_OK),
            (dir, libc::W_OK | libc::X_OK),
        ];
        for (what, mode) in checks {
            let c = std::ffi::CString::new(what.as_os_str().as_bytes()).ok()?;
            // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
            if unsafe { libc::access(c.as_ptr(), mode) } != 0 {
                // A missing WAL or shared-memory file is fine: SQLite creates it.
                let e = std::io::Error::last_os_error();
                if matches!(e.kind(), PermissionDenied | ReadOnlyFilesystem) {
                    return Some(StoreError::NoAccess(format!(
                        "cannot open {} for reading and writing ({e})",
                        what.display()
                    )));
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    None
}

/// The check on `conn`, a connection just opened to the existing store at `path` and not
/// keyed yet: applies `key` (telling a wrong key from a damaged first page), then reads
/// with the connection held query-only, and gives it back writable.
pub(crate) fn check_connection(
    conn: &Connection,
    path: &Path,
    key: &StoreKey,
) -> Result<IntegrityReport, StoreError> {
    let t = std::time::Instant::now();
    let scan = !closed_cleanly(path);
    key.apply(conn, path).map_err(|e| match e {
        StoreError::WrongKey(p) if first_page_damaged(path, key) => {
            damaged(format!("its first page does not verify ({})", p.display()))
        }
        StoreError::WrongKey(p) => StoreError::WrongKey(p),
        other => access_problem(path)
            .unwrap_or_else(|| damaged(format!("its first page does not read ({other})"))),
    })?;
    let _ = conn.execute_batch("PRAGMA query_only = 1;");
    let report = read_check(conn, path, scan, t);
    conn.execute_batch("PRAGMA query_only = 0;")?;
    if scan {
        // The scan went through every page: give back the page cache it filled.
        let _ = conn.execute_batch("PRAGMA shrink_memory;");
    }
    report
}

fn read_check(
    conn: &Connection,
    path: &Path,
    scan: bool,
    t: std::time::Instant,
) -> Result<IntegrityReport, StoreError> {
    let mut problems: Vec<String> = Vec::new();
    let run = (|| -> Result<(), rusqlite::Error> {
        if !scan {
            return Ok(());
        }
        let mut st = conn.prepare("PRAGMA quick_check(20)")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        for r in rows {
            let r = r?;
            if r != "ok" {
                problems.push(r);
            }
        }
        Ok(())
    })();
    if let Err(e) = run {
        return Err(damaged(format!("a page does not read ({e})")));
    }
    if !problems.is_empty() {
        return Err(damaged(format!(
            "{} problem(s) found, first: {}",
            problems.len(),
            problems[0]
        )));
    }
    let pages: u64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
        .map_err(|e| damaged(format!("page count: {e}")))? as u64;
    let has_audit: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'audit'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(|e| damaged(e.to_string()))?
        > 0;
    let audit_head: i64 = if has_audit {
        conn.query_row("SELECT coalesce(max(seq), 0) FROM audit", [], |r| r.get(0))
            .map_err(|e| damaged(format!("the audit log does not read ({e})")))?
    } else {
        0
    };
    let recorded = recorded_head(path);
    if let Some(r) = recorded
        && audit_head < r
    {
        return Err(damaged(format!(
            "committed work is missing: the last commit recorded audit entry {r}, but the store ends at entry {audit_head} (its write-ahead log {}-wal was deleted, truncated or damaged)",
            path.display()
        )));
    }
    Ok(IntegrityReport {
        pages: if scan { pages } else { 0 },
        scanned: scan,
        audit_head,
        recorded_head: recorded,
        millis: t.elapsed().as_millis() as u64,
    })
}

/// What the full check (`chartmesh doctor`, `chartmesh backup verify`) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeepReport {
    /// Pages in the file.
    pub pages: u64,
    /// Pages whose SQLCipher HMAC does not verify (`PRAGMA cipher_integrity_check`).
    pub cipher_problems: Vec<String>,
    /// Structure and index problems (`PRAGMA integrity_check`), "ok" left out.
    pub problems: Vec<String>,
    pub millis: u64,
}

impl DeepReport {
    pub fn ok(&self) -> bool {
        self.cipher_problems.is_empty() && self.problems.is_empty()
    }
}

/// The full check of a store file, read-only: every page's HMAC
/// (`PRAGMA cipher_integrity_check`) and the b-tree and index structure
/// (`PRAGMA integrity_check`), up to 20 problems of each. Slower than the start-up check;
/// safe while a daemon has the store open (WAL readers do not block it). A wrong key is
/// [`StoreError::WrongKey`]; a file that does not open at all is [`StoreError::Corrupt`].
pub fn deep_check(path: &Path, key: &StoreKey) -> Result<DeepReport, StoreError> {
    let t = std::time::Instant::now();
    if !path.exists() {
        return Err(StoreError::Io(format!("{} does not exist", path.display())));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| damaged(format!("it does not open ({e})")))?;
    key.apply(&conn, path).map_err(|e| match e {
        StoreError::WrongKey(p) if first_page_damaged(path, key) => {
            damaged(format!("its first page does not verify ({})", p.display()))
        }
        other => other,
    })?;
    let rows = |sql: &str| -> Result<Vec<String>, StoreError> {
        let mut st = conn
            .prepare(sql)
            .map_err(|e| damaged(format!("{sql}: {e}")))?;
        let out = st
            .query_map([], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.take(20).collect::<Result<Vec<_>, _>>())
            .map_err(|e| damaged(format!("a page does not read ({e})")))?;
        Ok(out)
    };
    let cipher_problems = rows("PRAGMA cipher_integrity_check")?;
    let problems: Vec<String> = match rows("PRAGMA integrity_check(20)") {
        Ok(r) => r.into_iter().filter(|r| r != "ok").collect(),
        Err(e) => vec![e.to_string()],
    };
    let pages = conn
        .query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
        .unwrap_or(0) as u64;
    Ok(DeepReport {
        pages,
        cipher_problems,
        problems,
        millis: t.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Store, StoreOptions};

    /// The full check passes a good store and names a flipped byte in a page.
    #[test]
    fn the_deep_check_finds_a_damaged_page() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let key = StoreKey::from_bytes([9; 32]);
        let store = Store::open(&path, &key, StoreOptions::default()).unwrap();
        store.close();
        let r = deep_check(&path, &key).unwrap();
        assert!(r.ok(), "{r:?}");
        assert!(r.pages > 1);
        // Flip a byte in the middle of the second page (its HMAC no longer verifies).
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[4096 + 2000] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        let r = deep_check(&path, &key);
        assert!(
            match &r {
                Ok(r) => !r.ok(),
                Err(StoreError::Corrupt(_)) => true,
                Err(_) => false,
            },
            "{r:?}"
        );
    }

    /// A closed store in a new directory holding one audit entry.
    fn store_with_one_entry(key_byte: u8) -> (tempfile::TempDir, PathBuf, StoreKey) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let key = StoreKey::from_bytes([key_byte; 32]);
        let store = Store::open(&path, &key, StoreOptions::default()).unwrap();
        let rx = store
            .audit(vec![chartmesh_core::audit::AuditEvent::new(1, "t", "read")])
            .unwrap();
        rx.blocking_recv().unwrap().unwrap();
        store.close();
        (dir, path, key)
    }

    /// A wrong key is still told as a wrong key (no page verifies), not as damage; the
    /// right key passes, and the commit mark follows the audit head.
    #[test]
    fn a_wrong_key_is_not_damage_and_a_good_store_passes() {
        let (_dir, path, key) = store_with_one_entry(7);
        assert_eq!(recorded_head(&path), Some(1));
        let r = check_store(&path, &key).unwrap().unwrap();
        assert_eq!((r.audit_head, r.recorded_head), (1, Some(1)));
        match check_store(&path, &StoreKey::from_bytes([8; 32])) {
            Err(StoreError::WrongKey(_)) => {}
            other => panic!("expected WrongKey, got {other:?}"),
        }
        // A mark from another file (a restored or re-keyed store) does not apply.
        std::fs::write(mark_path(&path), "1 99\n").unwrap();
        assert!(check_store(&path, &key).is_ok());
    }

    /// Makes a file unwritable for this process until dropped: read-only for a user,
    /// immutable for root (whom file modes do not bind). None where that is not possible
    /// (no `chattr`, or a file system without the attribute).
    struct Unwritable(PathBuf, bool);

    impl Unwritable {
        fn make(path: &Path) -> Option<Unwritable> {
            use std::os::unix::fs::PermissionsExt;
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                let ok = std::process::Command::new("chattr")
                    .arg("+i")
                    .arg(path)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                ok.then(|| Unwritable(path.to_path_buf(), true))
            } else {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)).ok()?;
                Some(Unwritable(path.to_path_buf(), false))
            }
        }
    }

    impl Drop for Unwritable {
        fn drop(&mut self) {
            use std::os::unix::fs::PermissionsExt;
            if self.1 {
                let _ = std::process::Command::new("chattr")
                    .arg("-i")
                    .arg(&self.0)
                    .status();
            } else {
                let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o600));
            }
        }
    }

    /// A store this process may not write (another user's files, a read-only mount) is
    /// reported as that, by the daemon's start-up check and by an offline command alike,
    /// never as damage: the advice for damage (restore a backup) would lose what was
    /// written since. Nothing is changed, and it opens as before once it may be written.
    #[test]
    fn a_store_that_may_not_be_written_is_not_reported_as_damaged() {
        let (_dir, path, key) = store_with_one_entry(5);
        let before = std::fs::read(&path).unwrap();
        {
            let Some(_guard) = Unwritable::make(&path) else {
                println!("SKIPPED: cannot make the store unwritable here (chattr +i as root)");
                return;
            };
            let results = [
                check_store(&path, &key).map(|_| ()),
                Store::open_checked(&path, &key, StoreOptions::default()).map(|_| ()),
                Store::open_existing(&path, &key).map(|_| ()),
            ];
            for r in results {
                match r {
                    Err(e @ StoreError::NoAccess(_)) => {
                        let m = e.to_string();
                        assert!(m.contains("store.db") && m.contains("not damaged"), "{m}");
                        assert!(!m.contains("restore"), "{m}");
                    }
                    other => panic!("expected NoAccess, got {other:?}"),
                }
            }
        }
        assert_eq!(std::fs::read(&path).unwrap(), before, "nothing changed");
        let (store, report) = Store::open_checked(&path, &key, StoreOptions::default()).unwrap();
        assert_eq!(report.map(|r| r.audit_head), Some(1));
        store.close();
    }

    /// An offline command on a cleanly closed store (it writes its audit entry and leaves
    /// the WAL) keeps the next start free of the page scan; on a store that was not closed
    /// cleanly it does not make it look clean.
    #[test]
    fn an_offline_command_keeps_a_clean_close_clean_and_an_unclean_one_unclean() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let key = StoreKey::from_bytes([7; 32]);
        let offline_read = || {
            let off = Store::open_existing(&path, &key).unwrap();
            off.audit(vec![chartmesh_core::audit::AuditEvent::new(
                1, "admin", "read",
            )])
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
            off.close();
        };
        let store = Store::open(&path, &key, StoreOptions::default()).unwrap();
        store.close();
        drop(store);
        record_clean_close(&path);
        offline_read();
        let wal = std::fs::metadata(dir.path().join("store.db-wal")).unwrap();
        assert!(wal.len() > 0, "the offline entry stays in the WAL");
        let r = check_store(&path, &key).unwrap().unwrap();
        assert!(!r.scanned, "{r:?}");
        // Not closed cleanly (the stamp was used by the start above): still scanned after.
        offline_read();
        assert!(check_store(&path, &key).unwrap().unwrap().scanned);
        // A stamp left by a clean close, then a write by something else: scanned.
        record_clean_close(&path);
        let other = Store::open(&path, &key, StoreOptions::default()).unwrap();
        other
            .audit(vec![chartmesh_core::audit::AuditEvent::new(2, "x", "read")])
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        other.close();
        drop(other);
        offline_read();
        assert!(check_store(&path, &key).unwrap().unwrap().scanned);
    }

    /// A store closed cleanly and untouched opens without the page scan; a byte changed
    /// after the clean close (or no clean close at all) brings the scan back, and it finds
    /// the damage.
    #[test]
    fn a_clean_close_skips_the_scan_until_the_file_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let key = StoreKey::from_bytes([7; 32]);
        let store = Store::open(&path, &key, StoreOptions::default()).unwrap();
        for i in 0..200 {
            let rx = store
                .audit(vec![chartmesh_core::audit::AuditEvent::new(i, "t", "read")])
                .unwrap();
            rx.blocking_recv().unwrap().unwrap();
        }
        store.close();
        drop(store);
        // No stamp: scanned.
        assert!(check_store(&path, &key).unwrap().unwrap().scanned);
        record_clean_close(&path);
        let r = check_store(&path, &key).unwrap().unwrap();
        assert!(!r.scanned, "{r:?}");
        // The stamp is used once: the next start scans again unless closed cleanly again.
        assert!(check_store(&path, &key).unwrap().unwrap().scanned);
        record_clean_close(&path);
        // A flipped byte in a middle page, written after the clean close.
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 3 * 4096, "{} bytes", bytes.len());
        let at = 2 * 4096 + 100;
        bytes[at] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        match check_store(&path, &key) {
            Err(StoreError::Damaged(m)) => assert!(m.contains("damaged"), "{m}"),
            other => panic!("the damage went unnoticed: {other:?}"),
        }
    }

    /// The daemon's start checks on the connection that becomes its writer: a new store
    /// has no report, a clean close skips the scan, the connection writes afterwards (not
    /// left query-only), and a wrong key or a damaged page refuses the start with nothing
    /// written.
    #[test]
    fn open_checked_checks_on_the_write_connection_and_then_writes_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let key = StoreKey::from_bytes([7; 32]);
        // A stale mark of a deleted store must not apply to a new one.
        std::fs::write(mark_path(&path), "1 99\n").unwrap();
        let (store, report) = Store::open_checked(&path, &key, StoreOptions::default()).unwrap();
        assert_eq!(report, None);
        assert!(!mark_path(&path).exists() || recorded_head(&path) != Some(99));
        let audit = |store: &Store, n: i64| {
            for i in 0..n {
                let rx = store
                    .audit(vec![chartmesh_core::audit::AuditEvent::new(i, "t", "read")])
                    .unwrap();
                rx.blocking_recv().unwrap().unwrap();
            }
        };
        audit(&store, 150);
        store.close();
        drop(store);
        record_clean_close(&path);
        let (store, report) = Store::open_checked(&path, &key, StoreOptions::default()).unwrap();
        let report = report.unwrap();
        assert!(!report.scanned, "{report:?}");
        assert_eq!((report.audit_head, report.recorded_head), (150, Some(150)));
        audit(&store, 1);
        store.close();
        drop(store);
        // No clean close: the next start scans.
        let (store, report) = Store::open_checked(&path, &key, StoreOptions::default()).unwrap();
        let report = report.unwrap();
        assert!(report.scanned && report.pages > 3, "{report:?}");
        assert_eq!(report.audit_head, 151);
        store.close();
        drop(store);
        match Store::open_checked(
            &path,
            &StoreKey::from_bytes([8; 32]),
            StoreOptions::default(),
        ) {
            Err(StoreError::WrongKey(_)) => {}
            other => panic!("expected WrongKey, got {:?}", other.map(|(_, r)| r)),
        }
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[2 * 4096 + 100] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        match Store::open_checked(&path, &key, StoreOptions::default()) {
            Err(StoreError::Damaged(m)) => assert!(m.contains("damaged"), "{m}"),
            other => panic!("the damage went unnoticed: {:?}", other.map(|(_, r)| r)),
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "a refused start wrote to the store"
        );
    }
}
