//! Sync between real daemons over QUIC on 127.0.0.1: exactly the consented charts travel,
//! offline edits converge, revocation stops sync and marks the copy.

use chartmesh_tests::mesh::{Access, Mesh};
use chartmesh_tests::*;

fn notes(p: &Practice, chart: &str) -> Vec<String> {
    p.cli_json(&["chart", "show", chart])["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["text"].as_str().unwrap().to_string())
        .collect()
}

fn ids(p: &Practice) -> Vec<String> {
    let mut v: Vec<String> = chart_hashes(&p.export_all()).into_keys().collect();
    v.sort();
    v
}

#[test]
fn consented_charts_sync_converge_and_revocation_stops_them() {
    let read: Vec<String> = (1..=10).map(|i| format!("chart-{i:06}")).collect();
    let read_ids: Vec<&str> = read.iter().map(|s| s.as_str()).collect();
    // 1. B holds exactly the 11 shared charts, byte-identical; C holds nothing.
    let [mut a, mut b, c] = Mesh::new(&["Valley Clinic", "Ridge Cardiology", "Lake Clinic"])
        .charts(0, 20)
        .pair(0, 1)
        .pair(0, 2)
        .share(0, 1, &read_ids, Access::Read)
        .share_for(0, 1, &["chart-000011"], Access::ReadWrite, "referral")
        .synced()
        .into_array();
    let (id_a, id_b) = (a.id(), b.id());
    let a_hashes = chart_hashes(&a.export_all());
    let b_hashes = chart_hashes(&b.export_all());
    let mut expected: Vec<String> = read.clone();
    expected.push("chart-000011".into());
    let mut got: Vec<String> = b_hashes.keys().cloned().collect();
    got.sort();
    assert_eq!(got, expected, "B holds exactly the shared charts");
    for (id, h) in &b_hashes {
        assert_eq!(&a_hashes[id], h, "{id} differs between A and B");
    }
    assert!(ids(&c).is_empty(), "C received charts it was never granted");
    let custody = b.get("/charts/chart-000001/custody");
    assert_eq!(custody["status"], "shared-with-us");
    assert_eq!(custody["custodian"], id_a.as_str());
    // A read-only copy cannot be edited at B (exit 5, refused by consent).
    let out = b.cli(&[
        "note",
        "add",
        "chart-000001",
        "--text",
        "should not be allowed",
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // B's status shows A connected, with the counts.
    let st = b.get("/status");
    let pa = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id_a.as_str())
        .unwrap()
        .clone();
    assert_eq!(pa["connected"], true);
    assert_eq!(pa["sharedFrom"], 11);

    // 2. Concurrent offline edits of the read-write chart converge, with provenance.
    a.stop();
    b.cli_ok(&[
        "note",
        "add",
        "chart-000011",
        "--author",
        "Dr. Ridge",
        "--text",
        "Consult: echo normal, continue current therapy.",
    ]);
    b.stop();
    a.start();
    a.cli_ok(&[
        "note",
        "add",
        "chart-000011",
        "--author",
        "Dr. Valley",
        "--text",
        "Follow-up booked in 3 months.",
    ]);
    b.start();
    a.sync_wait(&b, 60);
    b.sync_wait(&a, 60);
    let na = notes(&a, "chart-000011");
    let nb = notes(&b, "chart-000011");
    assert_eq!(na, nb, "the two copies converged");
    assert!(na.iter().any(|t| t.starts_with("Consult: echo normal")));
    assert!(na.iter().any(|t| t.starts_with("Follow-up booked")));
    let hist = a.cli_json(&["history", "chart-000011"]);
    let changes = hist["changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|ch| ch["practice"] == id_b.as_str() && ch["author"] == "Dr. Ridge"),
        "history names B's practice and author: {hist}"
    );
    assert_eq!(
        chart_hashes(&a.export_all())["chart-000011"],
        chart_hashes(&b.export_all())["chart-000011"]
    );

    // 4. Revocation: B's copy is marked revoked, later edits at A no longer reach it.
    a.cli_ok(&["revoke", "chart-000003", "--from", &id_b]);
    a.sync_wait(&b, 60);
    b.sync_wait(&a, 60);
    wait_until(
        "B marks its copy revoked",
        std::time::Duration::from_secs(20),
        || b.get("/charts/chart-000003/custody")["status"] == "revoked",
    );
    a.cli_ok(&[
        "note",
        "add",
        "chart-000003",
        "--text",
        "After revocation: must stay at A.",
    ]);
    a.cli_ok(&[
        "note",
        "add",
        "chart-000004",
        "--text",
        "Still shared: reaches B.",
    ]);
    a.sync_wait(&b, 60);
    b.sync_wait(&a, 60);
    wait_until(
        "the still-shared edit reaches B",
        std::time::Duration::from_secs(20),
        || {
            notes(&b, "chart-000004")
                .iter()
                .any(|t| t.starts_with("Still shared"))
        },
    );
    assert!(
        !notes(&b, "chart-000003")
            .iter()
            .any(|t| t.starts_with("After revocation")),
        "an edit after revocation reached B"
    );
    // Hidden from default lists at B, still readable by id, and read-only.
    let mrn = b.cli_json(&["chart", "show", "chart-000003"])["patient"]["mrn"]
        .as_str()
        .unwrap()
        .to_string();
    let found = b.cli_json(&["chart", "search", &mrn]);
    assert!(
        !found.to_string().contains("chart-000003"),
        "revoked copy listed: {found}"
    );
    assert_eq!(
        b.cli(&["note", "add", "chart-000011", "--text", "x"])
            .status
            .code(),
        Some(0)
    );
    // Every send and receive is in the audit logs, and both chains verify.
    let audit_a = a.cli_json(&["audit"]).to_string();
    let audit_b = b.cli_json(&["audit"]).to_string();
    assert!(audit_a.contains("sync-send") && audit_a.contains("sync-receive"));
    assert!(audit_b.contains("sync-receive") && audit_b.contains("revoked"));
    a.cli_ok(&["audit", "verify"]);
    b.cli_ok(&["audit", "verify"]);
}

/// Either daemon is killed with SIGKILL at ten points of an initial sync of 10,000 charts
/// (chosen by how many charts B already holds) and restarted; the sync completes, B's export
/// matches the benchmark manifest, and no chart is duplicated.
#[test]
fn killing_either_side_during_an_initial_sync_of_10000_charts_loses_nothing() {
    let mut a = Practice::new("Valley Clinic");
    let mut b = Practice::new("Ridge Cardiology");
    let file = bench_data().join("charts-10000.jsonl");
    a.cli_ok(&["import", file.to_str().unwrap()]);
    pair(&a, &b);
    let id_b = b.id();
    a.cli_ok(&["share", "--all", "--with", &id_b, "--purpose", "replica"]);
    let mut points: Vec<u64> = (0..10).map(|_| rand::random_range(0..9_000)).collect();
    points.sort_unstable();
    let count = |p: &Practice| {
        p.try_get("/status")
            .ok()
            .and_then(|(_, v)| v["charts"].as_u64())
            .unwrap_or(0)
    };
    for (i, at) in points.iter().enumerate() {
        // Wait until B holds `at` charts (or the sync finished), then kill one side.
        wait_until(
            "B to reach the kill point",
            std::time::Duration::from_secs(300),
            || count(&b) >= *at || count(&b) >= 10_000,
        );
        let victim = if rand::random::<bool>() {
            &mut a
        } else {
            &mut b
        };
        victim.kill9();
        victim.start();
        let _ = i;
    }
    a.sync_wait(&b, 600);
    b.sync_wait(&a, 600);
    let exported = b.export_all();
    let lines = exported
        .split(|c| *c == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert_eq!(lines, 10_000, "B holds each chart exactly once");
    assert_eq!(set_checksum(&exported), (10_000, manifest_checksum(10_000)));
    b.cli_ok(&["audit", "verify"]);
    a.cli_ok(&["audit", "verify"]);
}
