//! The data directory: everything a practice's daemon keeps, in one place.
//!
//! ```text
//! DIR/config.toml        settings (defaults filled in at init)
//! DIR/identity/          cert.der, key.der (0600): the practice identity
//! DIR/api-token          the local API's bearer token (0600)
//! DIR/store.db           charts, indexes, audit log (SQLCipher: encrypted SQLite, WAL)
//! DIR/store.key          the store's 256-bit encryption key (0600); back it up apart from the data
//! DIR/api.addr           the address the running daemon's API is bound to
//! DIR/chartmeshd.lock    held while a daemon runs: one daemon per directory
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::identity::Identity;

pub const CONFIG: &str = "config.toml";
pub const TOKEN: &str = "api-token";
pub const STORE: &str = "store.db";
pub const STORE_KEY: &str = "store.key";
pub const API_ADDR: &str = "api.addr";
/// The sync endpoint's actual UDP address, written at start (useful when the port is 0).
pub const SYNC_ADDR: &str = "sync.addr";
pub const LOCK: &str = "chartmeshd.lock";
/// The last backup written and verified (by `chartmesh backup` or the schedule): JSON.
pub const LAST_BACKUP: &str = "last-backup.json";

/// `--data-dir`, else `CHARTMESH_DATA_DIR`, else the platform's data directory.
pub fn resolve(flag: Option<PathBuf>) -> PathBuf {
    if let Some(d) = flag {
        return d;
    }
    if let Some(d) = std::env::var_os("CHARTMESH_DATA_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(d);
    }
    match directories::ProjectDirs::from("org", "chartmesh", "chartmesh") {
        Some(p) => p.data_dir().to_path_buf(),
        None => PathBuf::from(".chartmesh"),
    }
}

/// What stops this user from using `dir`, in words, when it exists but cannot be read
/// (permission denied): None when it is readable or does not exist yet.
pub fn unreadable(dir: &Path) -> Option<String> {
    let denied = |p: &Path| {
        format!(
            "permission denied reading {}: this user may not use the data directory {}; run as the user that owns it (e.g. the service's `chartmesh` user) or see docs/OPERATIONS.md, \"Staff access\"",
            p.display(),
            dir.display()
        )
    };
    for p in [
        dir.to_path_buf(),
        dir.join(CONFIG),
        dir.join("identity").join("cert.der"),
    ] {
        match std::fs::metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Some(denied(&p)),
            _ => {}
        }
    }
    match std::fs::File::open(dir.join(CONFIG)) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Some(denied(&dir.join(CONFIG)))
        }
        _ => None,
    }
}

pub fn is_initialized(dir: &Path) -> bool {
    dir.join(CONFIG).exists() && dir.join("identity").join("cert.der").exists()
}

/// Writes a file readable by its owner only, atomically (temp file, fsync, rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // A missing directory is made private; an existing one keeps its mode (an admin may
    // have opened the data directory to the staff group: docs/OPERATIONS.md, "Staff access").
    if let Some(parent) = path.parent()
        && !parent.is_dir()
    {
        create_private_dir(parent)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Writes a file anyone who may enter the directory can read (0644 whatever the umask):
/// for what is not secret and staff need, such as the running daemon's API address.
pub fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "{0} is already a chartmesh data directory (practice {1}); use another --data-dir to make a new practice"
    )]
    Exists(String, String),
    #[error("cannot create {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("invalid setting: {0}")]
    Config(String),
}

pub struct InitOptions {
    pub name: String,
    pub api: Option<std::net::SocketAddr>,
    pub listen: Option<std::net::SocketAddr>,
    /// `sync.relay` and `sync.relay_id`.
    pub relay: Option<String>,
    pub relay_id: Option<String>,
    /// `sync.stun`.
    pub stun: Option<String>,
}

/// Creates the directory, the identity, the token and the config. Works without a daemon.
pub fn init(dir: &Path, opts: InitOptions) -> Result<Identity, InitError> {
    if is_initialized(dir) {
        let id = Identity::load(dir)
            .map(|i| i.id.to_string())
            .unwrap_or_default();
        return Err(InitError::Exists(dir.display().to_string(), id));
    }
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e| InitError::Io {
            path: p.clone(),
            source: e,
        }
    };
    create_private_dir(dir).map_err(io(dir))?;
    let mut config = Config::default();
    config.practice.name = opts.name.clone();
    if let Some(a) = opts.api {
        config.api.listen = a;
    }
    if let Some(l) = opts.listen {
        config.sync.listen = l;
    }
    config.sync.relay = opts.relay.clone();
    config.sync.relay_id = opts.relay_id.clone();
    config.sync.stun = opts.stun.clone();
    config.validate().map_err(InitError::Config)?;
    let identity = Identity::generate(&opts.name)?;
    identity.save(dir)?;
    let token = new_token();
    write_private(&dir.join(TOKEN), token.as_bytes()).map_err(io(&dir.join(TOKEN)))?;
    if !dir.join(STORE_KEY).exists() {
        let key = chartmesh_store::StoreKey::from_bytes(rand::random());
        write_private(&dir.join(STORE_KEY), key.to_hex().as_bytes())
            .map_err(io(&dir.join(STORE_KEY)))?;
    }
    // The config goes last: its presence marks a complete init.
    write_private(&dir.join(CONFIG), config.to_toml().as_bytes()).map_err(io(&dir.join(CONFIG)))?;
    Ok(identity)
}

/// What a new practice is told after its data directory is made (by `chartmesh init` or a
/// daemon's first start): where its data lives, its id, which address other practices will
/// use and how to open it to them, and what to do next.
pub fn first_run_guide(
    dir: &Path,
    name: &str,
    id: &chartmesh_core::PracticeId,
    config: &Config,
) -> String {
    let listen = config.sync.listen;
    let mut g = format!(
        "Created practice {name:?} in {dir}\n\
         \x20 (its identity, API token, store key and config.toml; keep a copy of {key} apart from your backups)\n\
         Practice id: {checked}\n\
         Other practices connect to this one at {listen} (UDP).\n",
        dir = dir.display(),
        key = dir.join(STORE_KEY).display(),
        checked = id.checked(),
    );
    if listen.ip().is_loopback() {
        g.push_str(&format!(
            "  That address is this computer only. To let another practice connect, set\n\
             \x20 [sync] listen = \"0.0.0.0:{port}\" in {cfg}, allow UDP port {port} in the firewall,\n\
             \x20 and restart chartmeshd (docs/OPERATIONS.md, \"Sync with other practices\").\n",
            port = listen.port(),
            cfg = dir.join(CONFIG).display()
        ));
    }
    g.push_str(&format!(
        "Next:\n\
         \x20 chartmesh service install       run chartmeshd as a service (or: chartmeshd --data-dir {dir})\n\
         \x20 chartmesh console               open the console page in a browser\n\
         \x20 chartmesh id                    this id and a QR code, for the other practice\n\
         \x20 chartmesh peer add ID --addr HOST:PORT --name \"Their name\"\n",
        dir = dir.display()
    ));
    g
}

fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

pub fn read_token(dir: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(dir.join(TOKEN))?.trim().to_string())
}

/// The address of the running daemon's API: the one it wrote at start-up, else the config's.
pub fn api_address(dir: &Path) -> Option<std::net::SocketAddr> {
    if let Ok(s) = std::fs::read_to_string(dir.join(API_ADDR))
        && let Ok(a) = s.trim().parse()
    {
        return Some(a);
    }
    Config::load(&dir.join(CONFIG)).ok().map(|c| c.api.listen)
}

pub fn store_path(dir: &Path) -> PathBuf {
    dir.join(STORE)
}

/// The store's encryption key. When neither the key nor the store exists yet (a directory
/// initialised before encryption), a new key is made; a store without its key is an error,
/// never a reason to start over.
pub fn store_key(dir: &Path) -> Result<chartmesh_store::StoreKey, chartmesh_store::StoreError> {
    let path = dir.join(STORE_KEY);
    if !path.exists() && !store_path(dir).exists() {
        let key = chartmesh_store::StoreKey::from_bytes(rand::random());
        write_private(&path, key.to_hex().as_bytes()).map_err(|e| {
            chartmesh_store::StoreError::BadKey(format!("cannot create {}: {e}", path.display()))
        })?;
        return Ok(key);
    }
    if !path.exists() {
        if chartmesh_store::is_plaintext(&store_path(dir)) {
            return Err(chartmesh_store::StoreError::BadKey(format!(
                "{} was written before encryption at rest: start chartmeshd once and it encrypts the store",
                store_path(dir).display()
            )));
        }
        return Err(chartmesh_store::StoreError::BadKey(format!(
            "{} exists but its key {} is missing; put back the store.key from your key backup",
            store_path(dir).display(),
            path.display()
        )));
    }
    chartmesh_store::StoreKey::read(&path)
}

/// The store key for the daemon, which holds the directory's lock: like [`store_key`], and a
/// store written before encryption at rest is encrypted first.
pub fn daemon_store_key(
    dir: &Path,
) -> Result<chartmesh_store::StoreKey, chartmesh_store::StoreError> {
    if !dir.join(STORE_KEY).exists() && chartmesh_store::is_plaintext(&store_path(dir)) {
        return encrypt_plaintext_store(dir);
    }
    store_key(dir)
}

/// Checks a store file before it is put in place (a backup, a re-keyed or encrypted copy):
/// it opens with `key`, has a schema this chartmesh knows, and its audit chain verifies.
/// Returns (charts, audit entries), or what was wrong.
fn verify_store_file(path: &Path, key: &chartmesh_store::StoreKey) -> Result<(u64, usize), String> {
    let copy = chartmesh_store::Store::open_to_check(path, key).map_err(|e| e.to_string())?;
    let charts = copy.count().map_err(|e| e.to_string())?;
    let entries = copy
        .verify_audit()
        .map_err(|e| e.to_string())?
        .map_err(|b| {
            format!(
                "its audit log fails verification at entry {}: {}",
                b.seq, b.reason
            )
        })?;
    copy.close();
    Ok((charts, entries))
}

/// What `chartmesh backup verify` and the check after each backup found in a backup file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupCheck {
    pub file: String,
    pub charts: u64,
    pub audit_entries: usize,
    /// Pages whose encryption HMAC and structure were checked.
    pub pages: u64,
}

/// Verifies a backup with this data directory's store key: every page (SQLCipher's
/// `cipher_integrity_check` and SQLite's `integrity_check`), the charts readable, the
/// audit chain intact. Changes nothing.
pub fn verify_backup(dir: &Path, backup: &Path) -> Result<BackupCheck, RestoreError> {
    let bad = |reason: String| RestoreError::BadBackup {
        file: backup.display().to_string(),
        reason,
    };
    if !backup.is_file() {
        return Err(bad("there is no such file".into()));
    }
    let key = store_key(dir).map_err(|e| bad(e.to_string()))?;
    let deep = chartmesh_store::integrity::deep_check(backup, &key).map_err(|e| match e {
        chartmesh_store::StoreError::WrongKey(_) => bad(format!(
            "it does not open with {} (a backup made under another key, or not a chartmesh store)",
            dir.join(STORE_KEY).display()
        )),
        other => bad(other.to_string()),
    })?;
    if !deep.ok() {
        let first = deep
            .cipher_problems
            .first()
            .or(deep.problems.first())
            .cloned()
            .unwrap_or_default();
        return Err(bad(format!(
            "{} damaged page(s) and {} structure problem(s); first: {first}",
            deep.cipher_problems.len(),
            deep.problems.len()
        )));
    }
    let (charts, audit_entries) = verify_store_file(backup, &key).map_err(bad)?;
    Ok(BackupCheck {
        file: backup.display().to_string(),
        charts,
        audit_entries,
        pages: deep.pages,
    })
}

/// The record of the last backup written and verified.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastBackup {
    pub time_ms: i64,
    pub path: String,
    pub bytes: u64,
}

/// Records a verified backup (readable by its owner only: it names a path).
pub fn record_backup(dir: &Path, b: &LastBackup) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(b).map_err(std::io::Error::other)?;
    write_private(&dir.join(LAST_BACKUP), &json)
}

/// The last verified backup, if one was recorded.
pub fn last_backup(dir: &Path) -> Option<LastBackup> {
    serde_json::from_slice(&std::fs::read(dir.join(LAST_BACKUP)).ok()?).ok()
}

/// A store written before encryption at rest is encrypted in place on first start: an
/// encrypted copy under a new key is made and checked (same charts, audit chain verifies)
/// before the plaintext file and its WAL are removed and the copy takes its name.
fn encrypt_plaintext_store(
    dir: &Path,
) -> Result<chartmesh_store::StoreKey, chartmesh_store::StoreError> {
    use chartmesh_store::{StoreError, StoreKey};
    let store = store_path(dir);
    let staged = dir.join("store.db.encrypting");
    let key = StoreKey::from_bytes(rand::random());
    let before = chartmesh_store::plaintext_count(&store)?;
    chartmesh_store::rekey_copy(&store, None, &staged, &key)?;
    let (after, _) = verify_store_file(&staged, &key).map_err(|e| {
        StoreError::Corrupt(format!(
            "the encrypted copy is not right ({e}); the plaintext store is untouched"
        ))
    })?;
    if after != before {
        return Err(StoreError::Corrupt(format!(
            "the encrypted copy holds {after} charts, the store {before}; the plaintext store is untouched"
        )));
    }
    let key_path = dir.join(STORE_KEY);
    write_private(&key_path, key.to_hex().as_bytes())
        .map_err(|e| StoreError::Io(format!("writing {}: {e}", key_path.display())))?;
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", store.display()));
    }
    std::fs::rename(&staged, &store)
        .map_err(|e| StoreError::Io(format!("replacing {}: {e}", store.display())))?;
    let _ = std::fs::File::open(dir).and_then(|f| f.sync_all());
    tracing::info!(
        charts = after,
        "store encrypted at rest (it was written before encryption); back up store.key"
    );
    Ok(key)
}

/// Takes the directory's daemon lock (`chartmeshd.lock`, created if missing): Some(file)
/// holding it until dropped, or None if a daemon (or an offline command) holds it.
pub fn try_lock(dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    use fs4::fs_std::FileExt;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK))?;
    Ok(lock.try_lock_exclusive().unwrap_or(false).then_some(lock))
}

/// Whether a daemon holds this directory's lock right now.
pub fn daemon_running(dir: &Path) -> bool {
    use fs4::fs_std::FileExt;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(LOCK))
    else {
        return false;
    };
    match f.try_lock_exclusive() {
        Ok(true) => {
            let _ = FileExt::unlock(&f);
            false
        }
        _ => true,
    }
}

/// Checks where a backup is to be written, before anything is written: an absolute path to
/// a file that does not exist yet, in a directory that exists, outside the data directory
/// (a backup there is lost with the data, and could overwrite the store's own files, such
/// as `store.key`). Returns what was wrong and what to do.
pub fn check_backup_target(data_dir: &Path, dest: &Path) -> Result<(), String> {
    if !dest.is_absolute() {
        return Err(format!(
            "the backup path {} must be absolute (the daemon may run in another directory)",
            dest.display()
        ));
    }
    let Some(name) = dest.file_name() else {
        return Err(format!(
            "{} does not name a file; give a file name for the backup, e.g. {}",
            dest.display(),
            Path::new("/media/usb/chartmesh-2026-12-01.db").display()
        ));
    };
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(format!(
            "{} already exists; a backup never replaces a file: choose a new file name",
            dest.display()
        ));
    }
    let parent = dest.parent().unwrap_or(Path::new("/"));
    let parent = std::fs::canonicalize(parent).map_err(|_| {
        format!(
            "the directory {} does not exist; create it first (mkdir -p {}) or choose another place",
            parent.display(),
            parent.display()
        )
    })?;
    if !parent.is_dir() {
        return Err(format!("{} is not a directory", parent.display()));
    }
    if let Ok(data) = std::fs::canonicalize(data_dir)
        && parent.join(name).starts_with(&data)
    {
        return Err(format!(
            "{} is inside the data directory {}; write backups to another directory, ideally another disk (a USB stick, a network share)",
            dest.display(),
            data.display()
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "a chartmeshd is running on {0}; stop it first (restore replaces the store it has open)"
    )]
    Running(String),
    #[error("{file} is not a usable backup of this practice: {reason}")]
    BadBackup { file: String, reason: String },
    #[error("key rotation stopped before anything was changed: {0}")]
    Rotate(String),
    #[error("restoring into {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// What a restore did.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Restored {
    pub charts: u64,
    pub audit_entries: usize,
    /// Where the store that was replaced was kept (nothing is deleted).
    pub previous: Option<String>,
}

/// What restoring a backup would drop, compared with the store it replaces: the paired
/// practices, consent grants and charts written since the backup, and the audit entries
/// after it (all kept in the replaced store file, which a restore never deletes).
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestorePlan {
    pub backup_charts: u64,
    pub backup_audit_entries: usize,
    /// The store now: charts held (None if it could not be read; see `current_unreadable`).
    pub current_charts: Option<u64>,
    pub current_unreadable: Option<String>,
    /// Practices paired now that the backup does not have: (id, name).
    pub peers_dropped: Vec<(String, String)>,
    /// Grants as they are now that the backup does not have in this state (recorded,
    /// changed or revoked since); each goes back to the backup's state, or away.
    pub grants_changed: Vec<chartmesh_store::GrantState>,
    /// Charts created here or received since the backup: gone after the restore.
    pub charts_created: Vec<String>,
    /// Charts written since the backup: back to their state in the backup.
    pub charts_changed: Vec<String>,
    /// Audit entries written since the backup (kept in the replaced store file).
    pub audit_entries_since: i64,
}

impl RestorePlan {
    /// Whether the restore drops anything at all.
    pub fn drops_anything(&self) -> bool {
        self.current_unreadable.is_some()
            || !self.peers_dropped.is_empty()
            || !self.grants_changed.is_empty()
            || !self.charts_created.is_empty()
            || !self.charts_changed.is_empty()
            || self.audit_entries_since > 0
    }
}

/// Checks a backup (as [`restore`] does) and compares it with the current store, without
/// changing anything: what a restore would drop.
pub fn restore_plan(dir: &Path, backup: &Path) -> Result<RestorePlan, RestoreError> {
    let bad = |reason: String| RestoreError::BadBackup {
        file: backup.display().to_string(),
        reason,
    };
    let key = store_key(dir).map_err(|e| bad(e.to_string()))?;
    let (backup_charts, backup_audit_entries) = verify_store_file(backup, &key).map_err(bad)?;
    let then = chartmesh_store::Store::open_to_check(backup, &key)
        .and_then(|s| {
            let o = s.overview();
            s.close();
            o
        })
        .map_err(|e| bad(e.to_string()))?;
    let mut plan = RestorePlan {
        backup_charts,
        backup_audit_entries,
        ..Default::default()
    };
    let store = store_path(dir);
    if !store.exists() {
        return Ok(plan);
    }
    let now = match chartmesh_store::Store::open_to_check(&store, &key).and_then(|s| {
        let o = s.overview();
        s.close();
        o
    }) {
        Ok(o) => o,
        Err(e) => {
            plan.current_unreadable = Some(e.to_string());
            return Ok(plan);
        }
    };
    plan.current_charts = Some(now.charts.len() as u64);
    let then_peers: std::collections::HashSet<&str> =
        then.peers.iter().map(|(id, _)| id.as_str()).collect();
    plan.peers_dropped = now
        .peers
        .iter()
        .filter(|(id, _)| !then_peers.contains(id.as_str()))
        .cloned()
        .collect();
    plan.grants_changed = now
        .grants
        .iter()
        .filter(|g| !then.grants.contains(g))
        .cloned()
        .collect();
    let then_charts: std::collections::HashMap<&str, i64> = then
        .charts
        .iter()
        .map(|(id, t)| (id.as_str(), *t))
        .collect();
    for (id, t) in &now.charts {
        match then_charts.get(id.as_str()) {
            None => plan.charts_created.push(id.clone()),
            Some(before) if t > before => plan.charts_changed.push(id.clone()),
            Some(_) => {}
        }
    }
    plan.audit_entries_since = (now.audit_entries - then.audit_entries).max(0);
    Ok(plan)
}

/// Replaces the store with a backup, with the daemon stopped. The backup is checked first
/// (it opens with this practice's key, has a known schema and its audit chain verifies);
/// the store it replaces is kept beside it, with its WAL, under a `.before-restore-<time>`
/// name, so a restore never loses data.
pub fn restore(dir: &Path, backup: &Path) -> Result<Restored, RestoreError> {
    if daemon_running(dir) {
        return Err(RestoreError::Running(dir.display().to_string()));
    }
    let bad = |reason: String| RestoreError::BadBackup {
        file: backup.display().to_string(),
        reason,
    };
    let key = store_key(dir).map_err(|e| bad(e.to_string()))?;
    let (charts, audit_entries) = verify_store_file(backup, &key).map_err(bad)?;
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e| RestoreError::Io {
            path: p.clone(),
            source: e,
        }
    };
    let store = store_path(dir);
    let incoming = dir.join("store.db.restoring");
    std::fs::copy(backup, &incoming).map_err(io(&incoming))?;
    // The restored store is a new incarnation: peers' checkpoints of this store were taken
    // of writes the backup may not hold, so they must pull everything again (unchanged
    // charts compare equal and cost nothing) instead of skipping what is written from now.
    chartmesh_store::rotate_incarnation(&incoming, &key).map_err(|e| bad(e.to_string()))?;
    std::fs::File::open(&incoming)
        .and_then(|f| f.sync_all())
        .map_err(io(&incoming))?;
    let mut previous = None;
    if store.exists() {
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let kept = dir.join(format!("store.db.before-restore-{stamp}"));
        for suffix in ["-wal", "-shm"] {
            let from = PathBuf::from(format!("{}{suffix}", store.display()));
            if from.exists() {
                let to = PathBuf::from(format!("{}{suffix}", kept.display()));
                std::fs::rename(&from, &to).map_err(io(&from))?;
            }
        }
        std::fs::rename(&store, &kept).map_err(io(&store))?;
        previous = Some(kept.display().to_string());
    }
    std::fs::rename(&incoming, &store).map_err(io(&store))?;
    let _ = std::fs::File::open(dir).and_then(|f| f.sync_all());
    Ok(Restored {
        charts,
        audit_entries,
        previous,
    })
}

/// What a key rotation did.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotated {
    pub charts: u64,
    pub audit_entries: usize,
    /// Where the old store and its key were moved (delete it once backups under the new key exist).
    pub previous: String,
}

/// Re-encrypts the store under a new random key, with the daemon stopped. The re-keyed copy
/// is made and verified first; then the old store and key move, together, into
/// `rotated-<unix time>/` (never deleted here), and the new pair takes their place.
pub fn rotate_key(dir: &Path) -> Result<Rotated, RestoreError> {
    if daemon_running(dir) {
        return Err(RestoreError::Running(dir.display().to_string()));
    }
    let fail = RestoreError::Rotate;
    let old = store_key(dir).map_err(|e| fail(e.to_string()))?;
    let store = store_path(dir);
    if !store.exists() {
        return Err(fail("there is no store yet: start chartmeshd once".into()));
    }
    // A clean state first: the WAL folded into the file, so the copy misses nothing.
    {
        let s =
            chartmesh_store::Store::open(&store, &old, chartmesh_store::StoreOptions::default())
                .map_err(|e| fail(e.to_string()))?;
        s.close();
    }
    let new = chartmesh_store::StoreKey::from_bytes(rand::random());
    let staged = dir.join("store.db.rekeyed");
    chartmesh_store::rekey_copy(&store, Some(&old), &staged, &new)
        .map_err(|e| fail(e.to_string()))?;
    let (charts, audit_entries) = verify_store_file(&staged, &new)
        .map_err(|e| fail(format!("the re-keyed copy is not right: {e}")))?;
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e| RestoreError::Io {
            path: p.clone(),
            source: e,
        }
    };
    let new_key_file = dir.join("store.key.new");
    write_private(&new_key_file, new.to_hex().as_bytes()).map_err(io(&new_key_file))?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let kept = dir.join(format!("rotated-{stamp}"));
    create_private_dir(&kept).map_err(io(&kept))?;
    for name in [STORE, "store.db-wal", "store.db-shm", STORE_KEY] {
        let from = dir.join(name);
        if from.exists() {
            std::fs::rename(&from, kept.join(name)).map_err(io(&from))?;
        }
    }
    std::fs::rename(&new_key_file, dir.join(STORE_KEY)).map_err(io(&new_key_file))?;
    std::fs::rename(&staged, &store).map_err(io(&staged))?;
    let _ = std::fs::File::open(dir).and_then(|f| f.sync_all());
    Ok(Rotated {
        charts,
        audit_entries,
        previous: kept.display().to_string(),
    })
}
