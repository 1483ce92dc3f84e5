//! Emergency ("break-glass") access between two real daemons: the custodian's policy decides
//! (deny, or allow read-only for a while); allowed access brings the chart by sync, cannot
//! write, expires by itself (the copy is removed), and both audit trails record it.

use chartmesh_tests::mesh::Mesh;
use chartmesh_tests::*;
use serde_json::Value;
use std::time::Duration;

fn actions(entries: &Value) -> Vec<String> {
    entries["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn denied_by_default_and_audited_on_both_sides() {
    let [a, b] = Mesh::new(&["Custodian Clinic", "Night ER"])
        .paired()
        .into_array();
    a.import_first(20);
    let mrn = a.cli_json(&["chart", "show", "chart-000003"])["patient"]["mrn"]
        .as_str()
        .unwrap()
        .to_string();
    wait_connected(&b, &a);
    let out = b.cli(&[
        "--json",
        "emergency",
        "request",
        "--mrn",
        &mrn,
        "--reason",
        "unconscious, no history available",
    ]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["answers"][0]["outcome"], "denied", "{v}");
    // An unknown MRN gets exactly the same answer under deny: nothing is disclosed.
    let out = b.cli(&[
        "--json",
        "emergency",
        "request",
        "--mrn",
        "NO-SUCH",
        "--reason",
        "x",
    ]);
    let w: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(w["answers"][0]["why"], v["answers"][0]["why"]);
    assert!(b.try_get("/charts/chart-000003").unwrap().0 == 404);
    // Both trails.
    assert!(actions(&a.cli_json(&["emergency", "log"])).contains(&"emergency-refused".to_string()));
    let log_b = b.cli_json(&["emergency", "log"]);
    assert_eq!(
        actions(&log_b)
            .iter()
            .filter(|x| *x == "emergency-request")
            .count(),
        2,
        "{log_b}"
    );
    // A query broader than MRN or family + birth date is refused by the CLI before sending.
    let out = b.cli(&[
        "emergency",
        "request",
        "--family",
        "Holhol",
        "--reason",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn allowed_access_is_read_only_expires_and_is_audited_on_both_sides() {
    let [mut a, b] = Mesh::new(&["Valley Practice", "County ER"])
        .paired()
        .into_array();
    a.import_first(20);
    a.set_emergency_policy("allow", "10s");
    let chart = a.cli_json(&["chart", "show", "chart-000005"]);
    let (family, birth) = (
        chart["patient"]["name"]["family"]
            .as_str()
            .unwrap()
            .to_string(),
        chart["patient"]["birthDate"].as_str().unwrap().to_string(),
    );
    wait_connected(&b, &a);

    // By family name and birth date; the command returns once the chart is here.
    let v = b.cli_json(&[
        "emergency",
        "request",
        "--family",
        &family.to_lowercase(),
        "--birth-date",
        &birth,
        "--reason",
        "chest pain, patient confused",
    ]);
    let ans = &v["answers"][0];
    assert_eq!(ans["outcome"], "granted", "{v}");
    assert_eq!(ans["charts"], serde_json::json!(["chart-000005"]));
    assert_eq!(ans["arrived"], serde_json::json!(["chart-000005"]));
    let copy = b.cli_json(&["chart", "show", "chart-000005"]);
    assert_eq!(copy["patient"], chart["patient"]);
    // Read-only.
    let out = b.cli(&["note", "add", "chart-000005", "--text", "seen in ER"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    // Only the matching chart came: nothing else of A's is at B.
    assert_eq!(b.try_get("/charts/chart-000006").unwrap().0, 404);
    // The custodian's grant: read, emergency, expiring.
    let shares = a.get("/shares");
    let g = shares["shares"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["chartId"] == "chart-000005")
        .unwrap()
        .clone();
    assert_eq!(g["purpose"], "emergency");
    assert_eq!(g["access"], "read");
    assert!(g["expiresMs"].is_number());

    // It ends by itself: B's copy is removed and audited.
    wait_until(
        "the emergency copy to be removed",
        Duration::from_secs(60),
        || b.try_get("/charts/chart-000005").unwrap().0 == 404,
    );
    let log_a = a.cli_json(&["emergency", "log"]);
    let log_b = b.cli_json(&["emergency", "log"]);
    let access = log_a["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "emergency-access")
        .unwrap_or_else(|| panic!("{log_a}"));
    assert_eq!(access["chart_id"], "chart-000005");
    assert!(
        access["detail"].as_str().unwrap().contains("chest pain"),
        "{access}"
    );
    assert!(access["peer"].as_str().unwrap() == b.id());
    let acts = actions(&log_b);
    assert!(acts.contains(&"emergency-request".to_string()), "{acts:?}");
    assert!(acts.contains(&"emergency-expired".to_string()), "{acts:?}");
    // Both audit chains still verify.
    a.cli_ok(&["audit", "verify"]);
    b.cli_ok(&["audit", "verify"]);
    // Access ended: a second request is needed, and is granted again.
    let v = b.cli_json(&[
        "emergency",
        "request",
        "--mrn",
        chart["patient"]["mrn"].as_str().unwrap(),
        "--reason",
        "again",
    ]);
    assert_eq!(v["answers"][0]["outcome"], "granted", "{v}");
}
