//! Hardening between real daemons (issue 11): emergency expiry removes the whole copy so
//! the chart can be shared again; revoking one chart under a `share --all` grant stops it
//! syncing; `sync wait` waits for every paired peer; a restore says what it drops.

use chartmesh_tests::mesh::Mesh;
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
    let [mut a, b] = Mesh::new(&["Expiry Custodian", "Expiry ER"])
        .paired()
        .into_array();
    a.import_first(10);
    a.set_emergency_policy("allow", "3s");
    let mrn = a.get("/charts/chart-000004")["patient"]["mrn"]
        .as_str()
        .unwrap()
        .to_string();
    wait_connected(&b, &a);
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

/// Issue 11, item 7: revoking one chart shared under `share --all` printed "Revoked 0
/// grant(s)", exit 0, was audited as a revoke, and the chart kept syncing. Now the chart's
/// own revoked grant wins over `*`: the count is true, the audit says what happened, the
/// copy at the peer is marked revoked and later edits stop travelling while the rest sync.
#[test]
fn revoking_one_chart_under_an_all_charts_grant_stops_that_chart_only() {
    let [a, b] = Mesh::new(&["Revoke Custodian", "Revoke Peer"])
        .paired()
        .charts(0, 6)
        .share_all(0, 1)
        .synced()
        .into_array();
    let id_b = b.id();
    assert!(holds(&b, "chart-000006"));

    let out = a.cli_ok(&["revoke", "chart-000002", "--from", &id_b]);
    assert!(out.contains("Revoked 1 grant"), "{out}");
    // Revoking it again, or a chart never shared, revokes nothing and says so.
    let v = a.cli_json(&["revoke", "chart-000002", "--from", &id_b]);
    assert_eq!(v["revoked"], 0, "{v}");
    assert_eq!(v["notShared"], serde_json::json!(["chart-000002"]), "{v}");
    assert_eq!(
        a.cli(&["revoke", "no-such-chart", "--from", &id_b])
            .status
            .code(),
        Some(4)
    );
    // The shares list shows the exception beside the all-charts grant.
    let shares = a.get("/shares");
    let list = shares["shares"].as_array().unwrap();
    let one = list
        .iter()
        .find(|g| g["chartId"] == "chart-000002")
        .unwrap();
    assert_eq!(one["active"], false, "{one}");
    assert!(
        list.iter()
            .any(|g| g["chartId"] == "*" && g["active"] == true)
    );
    // Audited once, truthfully.
    let revokes = actions(&a, "revoke");
    assert_eq!(revokes.len(), 1, "{revokes:?}");
    assert_eq!(revokes[0]["chart_id"], "chart-000002");
    assert!(
        revokes[0]["detail"]
            .as_str()
            .unwrap()
            .contains("all-charts"),
        "{revokes:?}"
    );

    // The peer marks its copy revoked; later edits of that chart stay home, others travel.
    wait_until(
        "the copy to be marked revoked",
        Duration::from_secs(60),
        || b.get("/charts/chart-000002/custody")["status"] == "revoked",
    );
    a.cli_ok(&["note", "add", "chart-000002", "--text", "after revocation"]);
    a.cli_ok(&["note", "add", "chart-000003", "--text", "still shared"]);
    wait_until(
        "the edit of chart-000003 to arrive",
        Duration::from_secs(60),
        || {
            b.get("/charts/chart-000003")["notes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["text"] == "still shared")
        },
    );
    a.sync_wait(&b, 60);
    let copy = b.get("/charts/chart-000002");
    assert!(
        !copy["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["text"] == "after revocation"),
        "a revoked chart kept syncing"
    );
    assert_eq!(
        b.get("/charts/chart-000001/custody")["status"],
        "shared-with-us"
    );

    // Shared by name again, it travels again.
    a.cli_ok(&["share", "chart-000002", "--with", &id_b]);
    wait_until(
        "the re-shared chart to catch up",
        Duration::from_secs(60),
        || {
            b.get("/charts/chart-000002")["notes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["text"] == "after revocation")
        },
    );
}

/// Also found by hand: `sync wait` without `--peer` exited 0 "in sync" while the only
/// paired practice was offline. Now it waits for every paired practice that is not paused
/// and, on timeout, exits 1 naming who is offline.
#[test]
fn sync_wait_waits_for_every_paired_unpaused_peer_and_names_who_is_offline() {
    let [a, mut b] = Mesh::new(&["Waiting Clinic", "Sleepy Clinic"])
        .paired()
        .into_array();
    a.sync_wait(&b, 60);
    b.stop();
    let out = a.cli(&["sync", "wait", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Sleepy Clinic") && err.contains("offline"),
        "{err}"
    );
    // --connected waits only for the peers connected now.
    a.cli_ok(&["sync", "wait", "--connected", "--timeout", "5"]);
    // Back online: in sync again.
    b.start();
    a.cli_ok(&["sync", "wait", "--timeout", "60"]);
    // A paused peer is not waited for.
    a.cli_ok(&["sync", "pause", "--peer", &b.id()]);
    b.stop();
    a.cli_ok(&["sync", "wait", "--timeout", "5"]);
    // An unknown peer is a usage error at once, not a wait.
    let out = a.cli(&["sync", "wait", "--peer", "AAAA-BBBB", "--timeout", "30"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// Issue 11, item 12 (operator part): a restore of a backup taken before pairing dropped the
/// peers and grants recorded since without a word. Now it lists what it would drop and goes
/// on only when confirmed: asked on a terminal, `--yes` in scripts, refused otherwise.
#[test]
fn restore_says_what_it_drops_and_needs_confirmation() {
    let mut a = Practice::new("Restore Clinic");
    let b = Practice::new("Restore Partner");
    a.import_first(5);
    let backup = a.dir.parent().unwrap().join("before-pairing.db");
    a.cli_ok(&["backup", backup.to_str().unwrap()]);
    pair(&a, &b);
    a.cli_ok(&["share", "chart-000001", "--with", &b.id()]);
    a.cli_ok(&["note", "add", "chart-000002", "--text", "after the backup"]);
    a.cli_ok(&[
        "chart",
        "create",
        "--id",
        "chart-new",
        "--mrn",
        "NEW1",
        "--family",
        "Later",
        "--given",
        "Ana",
        "--birth-date",
        "1990-01-01",
    ]);
    a.stop();

    // Not a terminal, no --yes: the plan is shown, nothing is changed.
    let out = a.cli(&["restore", backup.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    for what in [
        "Restore Partner",
        "chart-000001 with",
        "charts created or received (1): chart-new",
        "charts changed, back to their state in the backup (1): chart-000002",
        "audit log entries",
    ] {
        assert!(said.contains(what), "{what:?} missing from:\n{said}");
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    let out = a.cli(&["--json", "restore", backup.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["restored"], false);
    assert_eq!(v["plan"]["peersDropped"][0][1], "Restore Partner", "{v}");
    assert_eq!(v["plan"]["chartsCreated"], serde_json::json!(["chart-new"]));

    // On a terminal it asks; "n" changes nothing. (`script` gives the CLI a terminal.)
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping the terminal prompt check: `script` (util-linux) is not installed");
    } else {
        answer_no_on_a_terminal(&a, &backup);
    }
    a.start();
    assert_eq!(a.get("/status")["charts"], 6);
    assert_eq!(a.get("/peers")["peers"].as_array().unwrap().len(), 1);
    a.stop();

    // --yes: restored; the replaced store is kept.
    let v = a.cli_json(&["restore", "--yes", backup.to_str().unwrap()]);
    assert_eq!(v["restored"], true);
    assert!(Path::new(v["previous"].as_str().unwrap()).exists());
    a.start();
    assert_eq!(a.get("/status")["charts"], 5);
    assert!(a.get("/peers")["peers"].as_array().unwrap().is_empty());
    a.cli_ok(&["audit", "verify"]);
}

/// Runs `chartmesh restore` on a terminal (`script`) and answers "n" to its question.
fn answer_no_on_a_terminal(a: &Practice, backup: &Path) {
    let mut child = KillOnDrop(
        std::process::Command::new("script")
            .args(["-q", "-e", "-c"])
            .arg(format!(
                "{} --data-dir {} restore {}",
                bin("chartmesh").display(),
                a.dir.display(),
                backup.display()
            ))
            .arg("/dev/null")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("script (util-linux) runs"),
    );
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"n\n").unwrap();
    drop(child.stdin.take());
    let mut said = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut said).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "{said}");
    assert!(
        said.contains("[y/N]") && said.contains("cancelled"),
        "{said}"
    );
}

/// Issue 11, item 9: emergency requests were not rate-limited. A custodian answers one
/// practice at most 20 times an hour; past that it denies without a lookup, and audits the
/// refusals once a minute with a count, not once per request.
#[test]
fn a_custodian_rate_limits_emergency_requests_per_practice() {
    let [a, b] = Mesh::new(&["Limit Custodian", "Limit ER"])
        .paired()
        .into_array();
    wait_connected(&b, &a);
    let mut whys = Vec::new();
    for i in 0..24 {
        // Four users, six requests each: within each user's own limit at B.
        let user = format!("dr-{}", i / 6);
        let out = std::process::Command::new(bin("chartmesh"))
            .args([
                "--data-dir",
                b.dir.to_str().unwrap(),
                "--user",
                &user,
                "--json",
            ])
            .args(["emergency", "request", "--mrn", "M1", "--reason", "test"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(5), "request {i}: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        whys.push(v["answers"][0]["why"].as_str().unwrap().to_string());
    }
    assert!(
        whys[..20].iter().all(|w| w.contains("does not allow")),
        "{whys:?}"
    );
    assert!(
        whys[20..]
            .iter()
            .all(|w| w.contains("too many emergency requests")),
        "{whys:?}"
    );
    let refused = actions(&a, "emergency-refused");
    assert_eq!(
        refused.len(),
        21,
        "20 answered, one entry for the refusals past the limit"
    );
    assert!(
        refused[20]["detail"]
            .as_str()
            .unwrap()
            .contains("over the limit of 20"),
        "{:?}",
        refused[20]
    );
}
