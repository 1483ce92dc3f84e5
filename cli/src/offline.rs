//! Reads of the data directory without the daemon (`--offline`): for an admin while the
//! daemon is stopped. They are audited like reads through the daemon: the command holds the
//! directory's daemon lock while it works (so no daemon starts meanwhile), opens the store
//! for writing and appends its audit entries before it shows or writes anything. With the
//! daemon running an offline read is refused: the daemon is what reads and audits then.

use anyhow::Result;
use chartmesh_core::audit::AuditEvent;
use chartmesh_datadir::datadir;
use chartmesh_store::{Store, StoreError};
use std::path::Path;

use crate::client::CliError;

/// The store, opened with the daemon's lock held.
pub struct Offline {
    pub store: Store,
    user: String,
    _lock: std::fs::File,
}

impl Offline {
    /// Takes the daemon's lock and opens the store; refuses while a daemon runs.
    pub fn open(dir: &Path, user: &str, what: &str) -> Result<Offline> {
        if let Some(problem) = datadir::unreadable(dir) {
            return Err(CliError::Failed(problem).into());
        }
        if !datadir::is_initialized(dir) {
            return Err(CliError::Failed(format!(
                "no chartmesh data directory at {}",
                dir.display()
            ))
            .into());
        }
        let running = || {
            CliError::Usage(format!(
                "chartmeshd is running on {}: drop --offline ({what} through the daemon is audited there)",
                dir.display()
            ))
        };
        let lock = datadir::try_lock(dir)
            .map_err(|e| {
                CliError::Failed(format!(
                    "cannot open {} ({e}); offline reads are audited, so they need write access to the data directory",
                    dir.join(datadir::LOCK).display()
                ))
            })?
            .ok_or_else(running)?;
        let path = datadir::store_path(dir);
        let key = datadir::store_key(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
        // A store of an older schema (or plaintext) is refused untouched: chartmeshd
        // upgrades it.
        let store = Store::open_existing(&path, &key).map_err(|e| match e {
            StoreError::Sqlite(_) => anyhow::anyhow!(
                "{e}; offline reads are audited, so they need write access to the store"
            ),
            e => anyhow::anyhow!("{e}"),
        })?;
        Ok(Offline {
            store,
            user: user.to_string(),
            _lock: lock,
        })
    }

    /// Appends audit entries (actor: the CLI user; detail marked offline), durably.
    pub fn audit(
        &self,
        events: impl IntoIterator<Item = (String, Option<String>, String)>,
    ) -> Result<()> {
        let now = chartmesh_datadir::now_ms();
        let events: Vec<AuditEvent> = events
            .into_iter()
            .map(|(action, chart, detail)| {
                let mut e =
                    AuditEvent::new(now, &self.user, action).detail(format!("{detail}; offline"));
                if let Some(c) = chart {
                    e = e.chart(c);
                }
                e
            })
            .collect();
        if events.is_empty() {
            return Ok(());
        }
        self.store
            .audit(events)?
            .blocking_recv()
            .map_err(|_| chartmesh_store::StoreError::Closed)??;
        Ok(())
    }
}

impl Drop for Offline {
    fn drop(&mut self) {
        self.store.close();
    }
}
