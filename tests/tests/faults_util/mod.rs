//! Helpers shared by the fault tests (`faults_*.rs`): bench records, HTTP calls that
//! tolerate a daemon that just died, and an offline look at the store file.
#![allow(dead_code)]

use chartmesh_tests::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// The non-empty lines of the 1,000-chart bench file.
pub fn bench_lines() -> Vec<String> {
    std::fs::read_to_string(bench_data().join("charts-1000.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

pub fn id_of(line: &str) -> String {
    serde_json::from_str::<Value>(line).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// POSTs to the daemon at `base` (read from its api.addr at call time); Err when the
/// daemon is not there or died before answering.
pub fn post(
    agent: &ureq::Agent,
    base: &str,
    token: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Value), String> {
    let mut r = agent
        .post(format!("{base}{path}"))
        .header("Authorization", format!("Bearer {token}"))
        .header("X-Chartmesh-User", "fault-test")
        .header("Content-Type", "application/json")
        .send(body)
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let v = r
        .body_mut()
        .with_config()
        .limit(1 << 28)
        .read_json()
        .map_err(|e| e.to_string())?;
    Ok((status, v))
}

/// The body of a note POST.
pub fn note_body(note_id: &str) -> Vec<u8> {
    json!({ "entry": { "text": format!("fault test {note_id}") }, "author": "Dr Fault" })
        .to_string()
        .into_bytes()
}

/// Whether the chart (as JSON) holds the note.
pub fn has_note(chart: &Value, note_id: &str) -> bool {
    chart["notes"].as_array().is_some_and(|n| {
        let text = format!("fault test {note_id}");
        n.iter().any(|n| n["text"] == text.as_str())
    })
}

/// Opens the practice's store file directly (keyed, read-only), as it lies on disk.
pub fn open_store(dir: &Path) -> rusqlite::Connection {
    let key = std::fs::read_to_string(dir.join("store.key")).unwrap();
    let c = rusqlite::Connection::open_with_flags(
        dir.join("store.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
    )
    .unwrap();
    c.execute_batch(&format!(
        "PRAGMA key = \"x'{}'\"; PRAGMA query_only = 1;",
        key.trim()
    ))
    .unwrap();
    c
}

/// The store on disk is whole: the file checks, every chart row has its document and every
/// document its row, every chart has its `create` or `sync-receive` audit entry.
/// Returns the number of charts.
pub fn assert_store_consistent(dir: &Path, what: &str) -> i64 {
    let c = open_store(dir);
    let check: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok", "{what}: quick_check");
    let q = |sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
    let charts = q("SELECT count(*) FROM charts");
    assert_eq!(
        q(
            "SELECT count(*) FROM charts c LEFT JOIN chart_docs d ON d.chart_id = c.id WHERE d.chart_id IS NULL"
        ),
        0,
        "{what}: a chart row without its document"
    );
    assert_eq!(
        q(
            "SELECT count(*) FROM chart_docs d LEFT JOIN charts c ON c.id = d.chart_id WHERE c.id IS NULL"
        ),
        0,
        "{what}: a document without its chart row"
    );
    assert_eq!(
        q(
            "SELECT count(*) FROM charts c WHERE NOT EXISTS (SELECT 1 FROM audit a WHERE a.chart_id = c.id AND a.action IN ('create', 'sync-receive'))"
        ),
        0,
        "{what}: a chart without the audit entry of its arrival"
    );
    charts
}

/// SIGKILL-free check that this chartmeshd has failpoints compiled in: its log says so
/// when armed.
pub fn assert_armed(p: &Practice, point: &str) {
    let log = p.log();
    assert!(
        log.contains("failpoint armed") && log.contains(point),
        "chartmeshd did not arm failpoint {point}: it was built without the `failpoints` feature. Run the tests with `cargo test --workspace` (the tests crate enables it). Log:\n{log}"
    );
}
