//! # chartmesh-daemon
//!
//! `chartmeshd`, the practice's background daemon, and the pieces the CLI shares with it:
//! the data directory layout (`datadir`), the configuration (`config`), the practice identity
//! (`identity`), the node that wires the store to the operations users perform (`node`), and
//! the local JSON API and console page (`api`), and the workflows across practices
//! (`workflow`: referrals, the conflict inbox, corrections).
//!
//! Owns: process wiring, configuration, the local API on 127.0.0.1 and its token.
//! Must not touch: SQL (that is `chartmesh-store`) or chart rules (that is `chartmesh-core`).

pub mod api;
pub mod config;
pub mod datadir;
pub mod emergency;
pub mod guard;
pub mod identity;
pub mod lan;
pub mod node;
pub mod patient_copy;
pub mod sync;
pub mod workflow;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An RFC 3339 timestamp (UTC, seconds) for a time in milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
