//! # chartmesh-datadir
//!
//! What `chartmeshd` and the `chartmesh` CLI both need without a running daemon: the data
//! directory's layout and its operations (`datadir`: init, the store key, backup targets,
//! restore, key rotation), the configuration (`config`) and the practice identity
//! (`identity`), and the offline audit check. The CLI links this crate, not the daemon.
//!
//! Owns: files in the data directory other than the store's own.
//! Must not touch: SQL (that is `chartmesh-store`), the network, the local API.

pub mod config;
pub mod datadir;
pub mod identity;

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

/// The report of the audit log's check (`GET /audit/verify`, `chartmesh audit verify
/// --offline`): `{ok: true, entries}` or `{ok: false, firstBadSeq, reason}`.
pub fn audit_verify_report(
    store: &chartmesh_store::Store,
) -> Result<serde_json::Value, chartmesh_store::StoreError> {
    Ok(match store.verify_audit()? {
        Ok(n) => serde_json::json!({ "ok": true, "entries": n }),
        Err(b) => serde_json::json!({ "ok": false, "firstBadSeq": b.seq, "reason": b.reason }),
    })
}
