//! Workflows between two real daemons over QUIC: the referral round trip (refer → accept →
//! consult note → complete, each step seen by the referring practice; cancel revokes the
//! grant) and the clinical conflict inbox (risky concurrent edits made while the two
//! practices were disconnected are flagged on both sides after sync).

use chartmesh_tests::mesh::Mesh;
use chartmesh_tests::*;
use serde_json::Value;
use std::time::Duration;

fn referral(p: &Practice, id: &str) -> Value {
    let v = p.cli_json(&["referrals"]);
    v["referrals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["referral"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

fn wait_status(p: &Practice, id: &str, status: &str) {
    wait_until(
        &format!("referral {id} to be {status}"),
        Duration::from_secs(60),
        || referral(p, id)["status"] == status,
    );
}

#[test]
fn a_referral_round_trip_between_two_practices() {
    let [a, b] = Mesh::new(&["Valley Family Practice", "Cardiology Associates"])
        .paired()
        .into_array();
    let chart = a.new_chart("REF-1");

    // Refer: the referral is in the chart and the chart is shared read-write for it.
    let v = a.cli_json(&[
        "refer",
        &chart,
        "--to",
        &b.id(),
        "--reason",
        "exertional chest pain",
        "--specialty",
        "cardiology",
    ]);
    let rid = v["referral"]["id"].as_str().unwrap().to_string();
    let shares = a.get("/shares");
    assert!(
        shares["shares"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["chartId"] == chart
                && g["purpose"] == "referral"
                && g["access"] == "read-write"
                && g["active"] == true),
        "{shares}"
    );
    assert_eq!(referral(&a, &rid)["direction"], "outgoing");
    assert_eq!(referral(&a, &rid)["status"], "requested");

    // B sees it as incoming, and cannot cancel it (only the referrer can).
    wait_status(&b, &rid, "requested");
    let inc = b.cli_json(&["referrals", "--incoming"]);
    assert_eq!(inc["referrals"].as_array().unwrap().len(), 1, "{inc}");
    assert_eq!(inc["referrals"][0]["reason"], "exertional chest pain");
    assert_eq!(
        b.cli_json(&["referrals", "--outgoing"])["referrals"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let out = b.cli(&["referral", "cancel", &rid]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    // And A cannot accept its own referral.
    assert_eq!(a.cli(&["referral", "accept", &rid]).status.code(), Some(5));

    // Accept → A sees it.
    b.cli_ok(&["referral", "accept", &rid]);
    wait_status(&a, &rid, "accepted");

    // Consult note → A sees the note, in the referral and in the chart.
    let text = "Stress ECG normal; start low-dose aspirin, review in 6 months.";
    let said = b.cli_ok(&["referral", "note", &rid, "--text", text]);
    // A consult note says a note was added, not that the referral was accepted again.
    assert!(
        said.starts_with("Consult note added to referral") && said.contains("stays accepted"),
        "{said}"
    );
    wait_until(
        "A to receive the consult note",
        Duration::from_secs(60),
        || {
            referral(&a, &rid)["consultNotes"]
                .as_array()
                .is_some_and(|n| n.iter().any(|x| x["text"] == text))
        },
    );
    let c = a.cli_json(&["chart", "show", &chart]);
    assert!(
        c["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["text"] == text),
        "{c}"
    );

    // Complete → A sees it; nothing more can happen to it.
    b.cli_ok(&["referral", "complete", &rid]);
    wait_status(&a, &rid, "completed");
    let steps: Vec<String> = referral(&a, &rid)["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(steps, ["request", "accept", "consult-note", "complete"]);
    assert_eq!(a.cli(&["referral", "cancel", &rid]).status.code(), Some(5));

    // The audit trails hold each step on its own side.
    let actions = |p: &Practice| -> Vec<String> {
        p.get(&format!("/audit?chart={chart}"))["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(actions(&a).contains(&"refer".to_string()));
    assert_eq!(
        actions(&b).iter().filter(|x| *x == "referral").count(),
        3,
        "{:?}",
        actions(&b)
    );
}

#[test]
fn cancelling_a_referral_revokes_its_grant() {
    let [a, b] = Mesh::new(&["Referring Clinic", "Specialist Clinic"])
        .paired()
        .into_array();
    let chart = a.new_chart("REF-2");
    let v = a.cli_json(&["refer", &chart, "--to", &b.id(), "--reason", "rash"]);
    let rid = v["referral"]["id"].as_str().unwrap().to_string();
    wait_status(&b, &rid, "requested");

    a.cli_ok(&["referral", "cancel", &rid]);
    assert_eq!(referral(&a, &rid)["status"], "cancelled");
    let shares = a.get("/shares");
    let g = shares["shares"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["chartId"] == chart)
        .unwrap()
        .clone();
    assert_eq!(g["active"], false, "{g}");
    assert!(g["revokedMs"].is_number(), "{g}");

    // B learns the chart is no longer shared, and can no longer write into it.
    wait_until("B to see the revocation", Duration::from_secs(60), || {
        b.get(&format!("/charts/{chart}/custody"))["status"] == "revoked"
    });
    assert_eq!(referral(&b, &rid)["chartAccess"], "revoked");
    let out = b.cli(&["referral", "accept", &rid]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
}

/// Two paired practices holding one chart read-write, disconnected from each other.
fn disconnected_pair(mrn: &str) -> (Practice, Practice, String) {
    let [a, b] = Mesh::new(&["North Clinic", "South Clinic"])
        .paired()
        .into_array();
    let chart = a.new_chart(mrn);
    a.cli_ok(&["allergy", "add", &chart, "--substance", "Penicillin"]);
    a.cli_ok(&[
        "share",
        &chart,
        "--with",
        &b.id(),
        "--access",
        "read-write",
        "--purpose",
        "continuity",
    ]);
    wait_until("B to hold the chart", Duration::from_secs(60), || {
        b.try_get(&format!("/charts/{chart}"))
            .is_ok_and(|(s, _)| s == 200)
    });
    a.cli_ok(&["sync", "pause", "--peer", &b.id()]);
    b.cli_ok(&["sync", "pause", "--peer", &a.id()]);
    (a, b, chart)
}

fn med_add(p: &Practice, chart: &str, name: &str, dose: &str) {
    p.cli_ok(&["med", "add", chart, "--name", name, "--dose", dose]);
}

fn reconnect(a: &Practice, b: &Practice) {
    a.cli_ok(&["sync", "resume", "--peer", &b.id()]);
    b.cli_ok(&["sync", "resume", "--peer", &a.id()]);
    a.sync_wait(b, 60);
    b.sync_wait(a, 60);
}

fn inbox(p: &Practice) -> Vec<Value> {
    p.cli_json(&["conflicts"])["conflicts"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn risky_concurrent_edits_land_in_the_conflict_inbox_on_both_sides() {
    let (a, b, chart) = disconnected_pair("CONF-1");

    // While apart: the same drug at two doses; the allergy removed at A while B prescribes
    // a penicillin (B still sees the allergy, so it needs an override there).
    med_add(&a, &chart, "Metformin", "500 mg");
    med_add(&b, &chart, "Metformin", "1000 mg");
    a.cli_ok(&[
        "allergy",
        "remove",
        &chart,
        "--substance",
        "Penicillin",
        "--reason",
        "entered in error",
    ]);
    b.cli_ok(&[
        "med",
        "add",
        &chart,
        "--name",
        "Amoxicillin",
        "--dose",
        "500 mg",
        "--override",
        "no alternative",
    ]);
    assert!(inbox(&a).is_empty() && inbox(&b).is_empty());

    reconnect(&a, &b);
    wait_until("both inboxes to fill", Duration::from_secs(60), || {
        inbox(&a).len() >= 2 && inbox(&b).len() >= 2
    });
    for p in [&a, &b] {
        let items = inbox(p);
        let kinds: Vec<&str> = items.iter().map(|c| c["kind"].as_str().unwrap()).collect();
        assert!(kinds.contains(&"duplicate-dose"), "{items:?}");
        assert!(
            kinds.contains(&"allergy-removed-while-prescribed"),
            "{items:?}"
        );
        assert_eq!(items.len(), 2, "{items:?}");
        // Filed under the chart's local key: its id at the custodian, `id@custodian` at the
        // practice holding a copy.
        assert!(
            items
                .iter()
                .all(|c| c["chart"].as_str().unwrap().split('@').next() == Some(chart.as_str())),
            "{items:?}"
        );
        let dup = items
            .iter()
            .find(|c| c["kind"] == "duplicate-dose")
            .unwrap();
        let s = dup["summary"].as_str().unwrap();
        assert!(
            s.contains("Metformin") && s.contains("500 mg") && s.contains("1000 mg"),
            "{s}"
        );
    }
    // Both edits survived the merge (nothing lost), on both sides.
    for p in [&a, &b] {
        let c = p.cli_json(&["chart", "show", &chart]);
        let meds = c["medications"].as_array().unwrap();
        assert_eq!(meds.iter().filter(|m| m["name"] == "Metformin").count(), 2);
        assert!(c["allergies"].as_array().unwrap().is_empty());
    }

    // Resolving it empties the open inbox; the entry stays in the full list.
    let id = inbox(&a)[0]["id"].as_i64().unwrap().to_string();
    a.cli_ok(&[
        "conflicts",
        "resolve",
        &id,
        "--note",
        "stopped the 1000 mg order",
    ]);
    assert_eq!(inbox(&a).len(), 1);
    let all = a.cli_json(&["conflicts", "--all"]);
    assert_eq!(all["conflicts"].as_array().unwrap().len(), 2);
    let out = a.cli(&["conflicts", "resolve", &id, "--note", "again"]);
    assert!(!out.status.success());
}

#[test]
fn sequential_and_safe_concurrent_edits_do_not_raise_conflicts() {
    let (a, b, chart) = disconnected_pair("CONF-2");
    // Concurrent but safe: different drugs, nothing removed.
    med_add(&a, &chart, "Metformin", "500 mg");
    med_add(&b, &chart, "Levothyroxine", "50 mcg");
    reconnect(&a, &b);
    // Sequential: B changes its mind after seeing A's order (stops it, adds another dose).
    b.cli_ok(&[
        "med",
        "stop",
        &chart,
        "--name",
        "Metformin",
        "--reason",
        "dose review",
    ]);
    b.cli_ok(&[
        "med",
        "add",
        &chart,
        "--name",
        "Metformin",
        "--dose",
        "850 mg",
        "--override",
        "replaces the stopped order",
    ]);
    a.sync_wait(&b, 60);
    b.sync_wait(&a, 60);
    wait_until("A to see B's new order", Duration::from_secs(60), || {
        a.cli_json(&["chart", "show", &chart])["medications"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["dose"] == "850 mg")
    });
    assert!(inbox(&a).is_empty(), "{:?}", inbox(&a));
    assert!(inbox(&b).is_empty(), "{:?}", inbox(&b));
}
