use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(
        "the disk holding the store is full: nothing of this write was saved; free some space and try again"
    )]
    DiskFull,
    #[error(
        "the store is busy or locked by another process: is another chartmeshd using this data directory?"
    )]
    Locked,
    #[error("the store file is corrupt or not a chartmesh store ({0}); restore it from a backup")]
    Corrupt(String),
    /// Found by the start-up check (`integrity`): the message says what and what to do.
    #[error("{0}")]
    Damaged(String),
    #[error(
        "the store was written by a newer chartmesh (schema {found}, this one knows {known}); upgrade chartmesh"
    )]
    TooNew { found: u32, known: u32 },
    #[error(
        "no store at {0}: run `chartmesh init` and start chartmeshd once (it creates the store)"
    )]
    Missing(PathBuf),
    #[error(
        "the store key does not open {0}: the key file belongs to another store or was changed; restore the key file that goes with this store from your key backup"
    )]
    WrongKey(PathBuf),
    /// The store's files cannot be opened for reading and writing by this process (another
    /// user's files, a read-only file system): not damage, and nothing was changed.
    #[error(
        "{0}: the store is not damaged, but this process may not write it. Run chartmeshd (and offline chartmesh commands) as the user that owns the data directory, or give that user the files back (`chown -R USER DIR`); see docs/OPERATIONS.md, \"Running as a service\""
    )]
    NoAccess(String),
    /// A sync apply found a chart the pull had looked up here gone (removed meanwhile, as
    /// when an emergency access ends): nothing of the batch was written; pull again.
    #[error(
        "{0} was removed here while it was being pulled: nothing of this batch was saved, and the pull is redone from the last checkpoint"
    )]
    GoneDuringPull(String),
    #[error("{0}")]
    Io(String),
    #[error("bad store key: {0}")]
    BadKey(String),
    #[error("the store is open read-only")]
    ReadOnly,
    #[error("the store is shutting down")]
    Closed,
    #[error("chart {0} not found")]
    NotFound(String),
    #[error(
        "chart {chart} would be {bytes} bytes, over the limit of 8 MiB for one chart: nothing was saved; keep long documents outside the chart (e.g. a summary note) or ask your administrator"
    )]
    TooLarge { chart: String, bytes: i64 },
    #[error("{0:?} names several charts: {1}; give the full key (CHART@PRACTICE)")]
    Ambiguous(String, String),
    #[error(transparent)]
    Core(#[from] chartmesh_core::CoreError),
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::*;
        match e.sqlite_error_code() {
            Some(DiskFull) => StoreError::DiskFull,
            Some(DatabaseBusy) | Some(DatabaseLocked) => StoreError::Locked,
            Some(DatabaseCorrupt) | Some(NotADatabase) => StoreError::Corrupt(e.to_string()),
            _ => StoreError::Sqlite(e),
        }
    }
}
