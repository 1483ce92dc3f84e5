//! Hardening between real daemons (issue 11): emergency expiry removes the whole copy so
//! the chart can be shared again; revoking one chart under a `share --all` grant stops it
//! syncing; `sync wait` waits for every paired peer; a restore says what it drops.

use chartmesh_tests::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Opens a practice's encrypted store directly (the key is in its directory).
fn open_raw(dir: &Path) -> rusqlite::Connection {
    let key = std::fs::read_to_string(dir.join("store.key")).unwrap();
    let c = rusqlite::Connection::open(dir.join("store.db")).unwrap();
    c.execute_batch(&format!("PRAGMA key = \"x'{}'\";", key.trim()))
        .unwrap();
    c
}

/// Rows left anywhere in the store for a chart id (or a received copy keyed `ID@…`).
fn rows_of(dir: &Path, chart: &str) -> Vec<(String, i64)> {
    let c = open_raw(dir);
    let like = format!("{chart}@%");
    let mut out = Vec::new();
    for (table, col, extra) in [
        ("charts", "id", ""),
        ("chart_docs", "chart_id", ""),
        ("chart_changes", "chart_id", ""),
        ("referral_index", "chart_id", ""),
        ("conflicts", "chart_id", " AND resolved_ms IS NULL"),
        ("emergency_access", "chart_id", ""),
    ] {
        let n: i64 = c
            .query_row(
                &format!("SELECT count(*) FROM {table} WHERE ({col} = ?1 OR {col} LIKE ?2){extra}"),
                rusqlite::params![chart, like],
                |r| r.get(0),
            )
            .unwrap();
        if n > 0 {
            out.push((table.to_string(), n));
        }
    }
    out
}

fn set_emergency_policy(p: &mut Practice, policy: &str, duration: &str) {
    let path = p.dir.join("config.toml");
    let mut v: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["emergency"]["policy"] = policy.into();
    v["emergency"]["duration"] = duration.into();
    std::fs::write(&path, toml::to_string(&v).unwrap()).unwrap();
    p.restart();
}

fn connected(a: &Practice, b: &Practice) {
    let id = b.id();
    wait_until("the practices to connect", Duration::from_secs(60), || {
        a.get("/sync")["peers"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["id"] == id && p["connected"] == true))
    });
}

/// Whether `p` holds a readable copy of `chart` (by its id as shown to users).
fn holds(p: &Practice, chart: &str) -> bool {
    p.try_get(&format!("/charts/{chart}"))
        .map(|(s, _)| s == 200)
        .unwrap_or(false)
}

fn actions(p: &Practice, action: &str) -> Vec<Value> {
    p.get("/audit")["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == action)
        .cloned()
        .collect()
}

/// Issue 11, item 2: emergency expiry removed the chart row but left the stored document,
/// so every later share of that chart failed (`UNIQUE constraint failed:
/// chart_docs.chart_id`) while `emergency request` said "granted". Now expiry removes every
/// row of the copy in one transaction, and the chart arrives again: by a second emergency
/// request and by a normal share.
#[test]
fn an_expired_emergency_copy_is_removed_whole_and_the_chart_can_come_again() {
    let mut a = Practice::new("Expiry Custodian");
    let b = Practice::new("Expiry ER");
    pair(&a, &b);
    a.import_first(10);
    set_emergency_policy(&mut a, "allow", "3s");
    let mrn = a.get("/charts/chart-000004")["patient"]["mrn"]
        .as_str()
        .unwrap()
        .to_string();
    connected(&b, &a);
    let request =
        |reason: &str| b.cli_json(&["emergency", "request", "--mrn", &mrn, "--reason", reason]);
    let v = request("collapsed in the waiting room");
    assert_eq!(v["answers"][0]["outcome"], "granted", "{v}");
    assert_eq!(
        v["answers"][0]["arrived"],
        serde_json::json!(["chart-000004"])
    );
    wait_until("the first copy to expire", Duration::from_secs(60), || {
        !holds(&b, "chart-000004")
    });
    // Nothing of the copy is left behind: no document, no changes, no index rows.
    wait_until(
        "the copy's rows to be gone",
        Duration::from_secs(10),
        || rows_of(&b.dir, "chart-000004").is_empty(),
    );

    // A second emergency request brings the chart again (it used to say "granted" while
    // nothing could arrive).
    let v = request("second admission, same night");
    assert_eq!(v["answers"][0]["outcome"], "granted", "{v}");
    assert_eq!(
        v["answers"][0]["arrived"],
        serde_json::json!(["chart-000004"]),
        "{v}\n--- log ---\n{}",
        b.log()
    );
    wait_until("the second copy to expire", Duration::from_secs(60), || {
        !holds(&b, "chart-000004")
    });
    assert_eq!(actions(&b, "emergency-expired").len(), 2);

    // A normal share of the same chart arrives and stays.
    a.cli_ok(&["share", "chart-000004", "--with", &b.id()]);
    wait_until(
        "the shared chart to arrive",
        Duration::from_secs(60),
        || holds(&b, "chart-000004"),
    );
    a.sync_wait(&b, 30);
    assert_eq!(
        b.get("/charts/chart-000004")["patient"]["mrn"],
        mrn.as_str()
    );
    // Nothing is left for the expiry task to remove: it is held under a lasting grant now.
    assert!(
        !rows_of(&b.dir, "chart-000004")
            .iter()
            .any(|(t, _)| t == "emergency_access")
    );
    assert!(!b.log().contains("UNIQUE constraint failed"), "{}", b.log());
    b.cli_ok(&["audit", "verify"]);
}
