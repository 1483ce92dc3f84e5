//! Scheduled backups (`[backup]` in config.toml): every `interval`, a backup of the store into
//! `dir`, verified like every backup (`Node::backup`), then the oldest scheduled backups
//! beyond `keep` are deleted. Only files this schedule names (`chartmesh-<UTC time>.db`) are
//! ever deleted, and only after a newer one verified.
//!
//! Owns: the schedule and the retention. Must not touch: how a backup is written or checked
//! (that is `Node::backup` and `datadir::verify_backup`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::node::{Node, NodeError};

const PREFIX: &str = "chartmesh-";
const SUFFIX: &str = ".db";
/// The actor recorded in the audit log for scheduled backups.
pub const ACTOR: &str = "backup-schedule";

/// Runs the schedule until `shutdown`: the first backup one interval after start.
pub async fn run(
    node: std::sync::Arc<Node>,
    every_ms: i64,
    dir: PathBuf,
    keep: usize,
    shutdown: CancellationToken,
) {
    let every = Duration::from_millis(every_ms.max(1000) as u64);
    tracing::info!(dir = %dir.display(), every_s = every.as_secs(), keep, "scheduled backups on");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match once(&node, &dir, keep).await {
            Ok((path, removed)) => {
                tracing::info!(path = %path.display(), removed, "scheduled backup written and verified")
            }
            Err(e) => tracing::error!(error = %e, dir = %dir.display(), "scheduled backup failed"),
        }
    }
}

/// One scheduled backup and the retention after it: the new file and how many old ones
/// were deleted.
pub async fn once(node: &Node, dir: &Path, keep: usize) -> Result<(PathBuf, usize), NodeError> {
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    );
    let path = dir.join(format!("{PREFIX}{stamp}{SUFFIX}"));
    node.backup(path.clone(), ACTOR).await?;
    let removed = prune(dir, keep);
    Ok((path, removed))
}

/// Deletes the oldest scheduled backups in `dir` beyond the newest `keep`; returns how many.
fn prune(dir: &Path, keep: usize) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut ours: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_scheduled_name)
        })
        .collect();
    // The names hold the UTC time: their order is the order they were made.
    ours.sort();
    let extra = ours.len().saturating_sub(keep);
    let mut removed = 0;
    for p in ours.into_iter().take(extra) {
        match std::fs::remove_file(&p) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "could not delete an old backup")
            }
        }
    }
    removed
}

/// `chartmesh-20261130T090337.123Z.db`.
fn is_scheduled_name(n: &str) -> bool {
    n.strip_prefix(PREFIX)
        .and_then(|r| r.strip_suffix(SUFFIX))
        .is_some_and(|t| t.len() == 20 && t.as_bytes()[8] == b'T' && t.ends_with('Z'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_scheduled_names_are_pruned_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            "chartmesh-20261130T090001.000Z.db",
            "chartmesh-20261130T090003.000Z.db",
            "chartmesh-20261130T090002.000Z.db",
            "chartmesh-manual.db",
            "other.db",
        ] {
            std::fs::write(d.path().join(n), b"x").unwrap();
        }
        assert_eq!(prune(d.path(), 2), 1);
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "chartmesh-20261130T090002.000Z.db",
                "chartmesh-20261130T090003.000Z.db",
                "chartmesh-manual.db",
                "other.db"
            ]
        );
    }
}
