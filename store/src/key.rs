//! The store's encryption key: 32 random bytes handed to SQLCipher as a raw key, so opening
//! the store costs no password derivation. Every page of the database, its WAL and its
//! temporary files are encrypted with it (AES-256, with a per-page HMAC).
//!
//! Owns: the key's form (64 hex characters in a file) and how a connection is keyed.
//! Must not touch: where the key file lives or how it is created; the daemon decides that.

use std::path::Path;

use rusqlite::Connection;

use crate::StoreError;

/// A raw 256-bit store key. Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreKey([u8; 32]);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(…)")
    }
}

impl StoreKey {
    pub fn from_bytes(bytes: [u8; 32]) -> StoreKey {
        StoreKey(bytes)
    }

    /// Parses the key file's content: 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<StoreKey, StoreError> {
        let s = s.trim();
        let mut out = [0u8; 32];
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::BadKey(
                "a store key is 64 hexadecimal characters".into(),
            ));
        }
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(StoreKey(out))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads a key file.
    pub fn read(path: &Path) -> Result<StoreKey, StoreError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            StoreError::BadKey(format!(
                "cannot read the store key {}: {e}; restore it from your key backup",
                path.display()
            ))
        })?;
        StoreKey::from_hex(&text).map_err(|e| match e {
            StoreError::BadKey(m) => StoreError::BadKey(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Keys a freshly opened connection and proves the key opens the file.
    pub(crate) fn apply(&self, conn: &Connection, path: &Path) -> Result<(), StoreError> {
        // A wrong key is reported by our own error (WrongKey), not by SQLCipher's log on stderr.
        conn.execute_batch("PRAGMA cipher_log_level = NONE;")?;
        conn.execute_batch(&format!("PRAGMA key = \"x'{}'\";", self.to_hex()))?;
        // Plaintext temporary tables and sort files never reach the disk.
        conn.execute_batch("PRAGMA temp_store = MEMORY;")?;
        match conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        }) {
            Ok(_) => Ok(()),
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) => {
                Err(StoreError::WrongKey(path.to_path_buf()))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Whether the file at `path` is a plaintext SQLite database (its header is readable).
pub fn is_plaintext(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 16];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == b"SQLite format 3\0"
}

/// Writes a copy of the store at `src` (opened with `old`, or plaintext when `None`) to
/// `dest`, encrypted with `new`:
/// SQLCipher's export into an attached database keyed with the new key, then the schema
/// version. The copy is checked to open with the new key before this returns.
pub fn rekey_copy(
    src: &Path,
    old: Option<&StoreKey>,
    dest: &Path,
    new: &StoreKey,
) -> Result<(), StoreError> {
    let _ = std::fs::remove_file(dest);
    let conn = Connection::open(src)?;
    match old {
        Some(k) => k.apply(&conn, src)?,
        // A plaintext store (written before encryption at rest): fold its WAL in first.
        None => conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?,
    }
    let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let dest_str = dest
        .to_str()
        .ok_or_else(|| StoreError::Io(format!("{} is not a UTF-8 path", dest.display())))?;
    conn.execute(
        &format!("ATTACH DATABASE ?1 AS rekeyed KEY \"x'{}'\"", new.to_hex()),
        [dest_str],
    )?;
    conn.query_row("SELECT sqlcipher_export('rekeyed')", [], |_| Ok(()))?;
    conn.execute_batch(&format!(
        "PRAGMA rekeyed.user_version = {version}; DETACH DATABASE rekeyed;"
    ))?;
    drop(conn);
    let check = Connection::open(dest)?;
    new.apply(&check, dest)?;
    let v2: u32 = check.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if v2 != version {
        return Err(StoreError::Corrupt(format!(
            "the re-keyed copy has schema {v2}, expected {version}"
        )));
    }
    drop(check);
    std::fs::File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::Io(format!("syncing {}: {e}", dest.display())))?;
    Ok(())
}

/// How many charts a plaintext store holds (for checking its encrypted copy).
pub fn plaintext_count(path: &Path) -> Result<u64, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(conn.query_row("SELECT count(*) FROM charts", [], |r| r.get::<_, i64>(0))? as u64)
}
