//! Decision support with real daemons: a medication that conflicts with an allergy is not
//! added without an override, the override is recorded in the chart, standing alerts are
//! listed, and a medication that arrived by sync raises its alert at the receiving practice.

use chartmesh_tests::mesh::Mesh;
use chartmesh_tests::*;
use serde_json::Value;

/// The first of the first `n` bench charts with an allergy to `substance`.
fn chart_with_allergy(n: usize, substance: &str) -> Value {
    let all = std::fs::read_to_string(bench_data().join("charts-1000.jsonl")).unwrap();
    all.lines()
        .take(n)
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|c| {
            c["allergies"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["substance"] == substance)
        })
        .unwrap_or_else(|| panic!("no chart with a {substance} allergy in the first {n}"))
}

#[test]
fn a_conflicting_medication_needs_an_override_which_is_recorded() {
    let a = Practice::new("Alert Clinic");
    a.import_first(200);
    let c = chart_with_allergy(200, "Penicillin");
    let id = c["id"].as_str().unwrap();
    let meds_before = c["medications"].as_array().unwrap().len();

    // Refused with the reason, exit code 5, nothing added.
    let out = a.cli(&[
        "med",
        "add",
        id,
        "--name",
        "Amoxicillin",
        "--dose",
        "500 mg",
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("penicillin") && err.contains("--override"),
        "{err}"
    );
    let now = a.cli_json(&["chart", "show", id]);
    assert_eq!(now["medications"].as_array().unwrap().len(), meds_before);

    // A drug outside every table adds without a word.
    a.cli_ok(&["med", "add", id, "--name", "Paracetamol", "--dose", "1 g"]);

    // With an override: added, and the acknowledgement is a note in the chart.
    a.cli_ok(&[
        "med",
        "add",
        id,
        "--name",
        "Amoxicillin",
        "--dose",
        "500 mg",
        "--override",
        "desensitised in 2024, supervised",
    ]);
    let now = a.cli_json(&["chart", "show", id]);
    let meds = now["medications"].as_array().unwrap();
    assert_eq!(meds.len(), meds_before + 2);
    let note = now["notes"].as_array().unwrap().last().unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        note.contains("Amoxicillin") && note.contains("desensitised in 2024"),
        "{note}"
    );

    // Standing alerts list it; the audit log has the refusal and the override.
    let v = a.cli_json(&["alerts", id]);
    let alerts = v["charts"][0]["alerts"].as_array().unwrap();
    assert!(
        alerts.iter().any(|x| x["kind"] == "allergy"
            && x["medication"] == "Amoxicillin"
            && x["with"] == "Penicillin"),
        "{v}"
    );
    let audit = a.get(&format!("/audit?chart={id}"));
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"refuse") && actions.contains(&"alert-override"),
        "{actions:?}"
    );
}

#[test]
fn interactions_and_duplicates_are_checked_at_add_time() {
    let a = Practice::new("Interaction Clinic");
    a.import_first(50);
    let c = a.cli_json(&[
        "chart",
        "create",
        "--mrn",
        "INT-1",
        "--family",
        "Quill",
        "--given",
        "Ada",
        "--birth-date",
        "1950-05-05",
    ]);
    let id = c["id"].as_str().unwrap().to_string();
    a.cli_ok(&["med", "add", &id, "--name", "Warfarin", "--dose", "5 mg"]);
    let out = a.cli(&["med", "add", &id, "--name", "Ibuprofen", "--dose", "400 mg"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bleeding"));
    let out = a.cli(&["med", "add", &id, "--name", "Warfarin", "--dose", "3 mg"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already an active medication"));
    a.cli_ok(&[
        "med",
        "add",
        &id,
        "--name",
        "Levothyroxine",
        "--dose",
        "50 mcg",
    ]);
}

#[test]
fn a_medication_that_arrives_by_sync_raises_its_alert_at_the_receiver() {
    let [a, b] = Mesh::new(&["Sender", "Receiver"]).paired().into_array();
    a.import_first(200);
    let c = chart_with_allergy(200, "Aspirin");
    let id = c["id"].as_str().unwrap();
    a.cli_ok(&[
        "share",
        id,
        "--with",
        &b.id(),
        "--access",
        "read-write",
        "--purpose",
        "referral",
    ]);
    a.sync_wait(&b, 60);
    b.sync_wait(&a, 60);
    let before = b.cli_json(&["alerts", id]);
    let had = before["charts"].as_array().map_or(0, |c| c.len());
    // A prescribes an NSAID over the aspirin allergy (with an override); B gets the chart.
    a.cli_ok(&[
        "med",
        "add",
        id,
        "--name",
        "Naproxen",
        "--dose",
        "250 mg",
        "--override",
        "short course, monitored",
    ]);
    wait_until(
        "B to receive the new medication",
        std::time::Duration::from_secs(60),
        || {
            b.cli_json(&["chart", "show", id])["medications"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == "Naproxen")
        },
    );
    let v = b.cli_json(&["alerts", id]);
    let alerts = v["charts"][0]["alerts"].as_array().unwrap();
    assert!(
        alerts.iter().any(|x| x["kind"] == "allergy"
            && x["medication"] == "Naproxen"
            && x["with"] == "Aspirin"),
        "B does not show the alert for the synced medication (had {had} before): {v}"
    );
    // And B, holding it read-write, is stopped the same way when it adds a conflicting drug.
    let out = b.cli(&["med", "add", id, "--name", "Ibuprofen", "--dose", "200 mg"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn two_interacting_drugs_added_at_the_same_moment_are_not_both_added_without_an_override() {
    let a = Practice::new("Race Clinic");
    for round in 0..4 {
        let c = a.cli_json(&[
            "chart",
            "create",
            "--mrn",
            &format!("RACE-{round}"),
            "--family",
            "Quill",
            "--given",
            "Bo",
            "--birth-date",
            "1950-05-05",
        ]);
        let id = c["id"].as_str().unwrap().to_string();
        // Warfarin with ibuprofen is a listed interaction: whichever lands second must be
        // refused, even when both were checked against the chart before either was written.
        let outs: Vec<std::process::Output> = std::thread::scope(|s| {
            let h: Vec<_> = [("Warfarin", "5 mg"), ("Ibuprofen", "400 mg")]
                .into_iter()
                .map(|(name, dose)| {
                    let (a, id) = (&a, &id);
                    s.spawn(move || a.cli(&["med", "add", id, "--name", name, "--dose", dose]))
                })
                .collect();
            h.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let ok = outs.iter().filter(|o| o.status.success()).count();
        assert_eq!(ok, 1, "exactly one is added: {outs:?}");
        let refused = outs.iter().find(|o| !o.status.success()).unwrap();
        assert_eq!(refused.status.code(), Some(5), "{refused:?}");
        let meds = a.cli_json(&["chart", "show", &id])["medications"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(meds, 1);
    }
}
