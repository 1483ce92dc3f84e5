//! FHIR R4 in and out, with real daemons and the real CLI; exports are checked by an
//! independent R4 validator (Python fhir.resources 6.4.0), not by our own code.

use chartmesh_tests::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn sample_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fhir_samples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "expected the FHIR samples, found {v:?}");
    v
}

/// Entries per resource type, counted independently from the file.
fn entry_counts(path: &Path) -> std::collections::BTreeMap<String, u64> {
    let b: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut m = std::collections::BTreeMap::new();
    for e in b["entry"].as_array().unwrap() {
        *m.entry(e["resource"]["resourceType"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    m
}

fn chart_map(jsonl: &[u8]) -> std::collections::BTreeMap<String, Value> {
    jsonl
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_slice(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

#[test]
fn samples_import_with_a_full_account_reimport_changes_nothing_and_export_validates() {
    let a = Practice::new("Synthea Import");
    let files = sample_files();
    let mut patients = 0;
    for f in &files {
        let out = a.cli(&["--json", "import", f.to_str().unwrap()]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(out.status.success(), "{}: {v}", f.display());
        let report = &v["files"][0];
        // Every resource of the file is accounted for as mapped or skipped-with-reason.
        let expected = entry_counts(f);
        let summary = report["summary"].as_object().unwrap();
        for (rt, n) in &expected {
            let c = &summary[rt];
            assert_eq!(
                c["mapped"].as_u64().unwrap() + c["skipped"].as_u64().unwrap(),
                *n,
                "{}: {rt} {c}",
                f.display()
            );
            assert_eq!(c["errors"], 0, "{}: {rt}", f.display());
        }
        assert_eq!(summary.len(), expected.len());
        for r in report["resources"].as_array().unwrap() {
            assert_eq!(r["outcome"], "skipped");
            assert!(!r["reason"].as_str().unwrap().is_empty(), "{r}");
        }
        patients += expected.get("Patient").copied().unwrap_or(0);
        assert_eq!(
            report["created"],
            expected.get("Patient").copied().unwrap_or(0)
        );
    }
    assert!(patients >= 3);
    let first = a.export_all();
    let charts = chart_map(&first);
    assert_eq!(charts.len() as u64, patients);
    // Mapped content is there: the samples hold immunizations, notes and numeric observations.
    for c in charts.values() {
        assert!(!c["immunizations"].as_array().unwrap().is_empty());
        assert!(!c["notes"].as_array().unwrap().is_empty());
        assert!(!c["observations"].as_array().unwrap().is_empty());
    }
    // Importing the same files again changes nothing.
    for f in &files {
        let v = a.cli_json(&["import", f.to_str().unwrap()]);
        assert_eq!(v["files"][0]["created"], 0);
        assert_eq!(v["files"][0]["updated"], 0);
    }
    assert_eq!(a.export_all(), first, "a re-import changed the charts");

    // Export as FHIR: one Bundle per chart, valid R4 by the independent validator.
    let out_dir = a.dir.parent().unwrap().join("fhir-out");
    a.cli_ok(&[
        "export",
        "--format",
        "fhir",
        "-o",
        out_dir.to_str().unwrap(),
    ]);
    let exported: Vec<PathBuf> = files_under(&out_dir);
    assert_eq!(exported.len(), charts.len());
    for id in charts.keys() {
        assert!(
            out_dir.join(format!("{id}.json")).exists(),
            "{id}.json missing"
        );
    }
    let (ok, report) = validate_fhir(&[&out_dir]);
    assert!(ok, "FHIR validation failed:\n{report}");
    assert!(
        report.contains(&format!(
            "validated {} file(s), 0 with errors",
            charts.len()
        )),
        "{report}"
    );

    // Re-import of the export at another practice gives the same charts.
    let b = Practice::new("Second Practice");
    let paths: Vec<String> = exported.iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["import"];
    args.extend(paths.iter().map(String::as_str));
    b.cli_ok(&args);
    assert_eq!(chart_map(&b.export_all()), charts);
}

#[test]
fn a_thousand_charts_round_trip_through_fhir_with_the_same_checksum() {
    let a = Practice::new("Round Trip A");
    let file = bench_data().join("charts-1000.jsonl");
    a.cli_ok(&["import", file.to_str().unwrap()]);
    let out_dir = a.dir.parent().unwrap().join("fhir-1000");
    let v = a.cli_json(&[
        "export",
        "--format",
        "fhir",
        "-o",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(v["exported"], 1000);
    // A sample of the bundles through the independent validator (all 1000 take a while).
    let sample: Vec<PathBuf> = files_under(&out_dir).into_iter().step_by(50).collect();
    let refs: Vec<&Path> = sample.iter().map(|p| p.as_path()).collect();
    let (ok, report) = validate_fhir(&refs);
    assert!(ok, "FHIR validation failed:\n{report}");

    let b = Practice::new("Round Trip B");
    let paths: Vec<String> = files_under(&out_dir)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut args = vec!["import", "--format", "fhir"];
    args.extend(paths.iter().map(String::as_str));
    let r = b.cli_json(&args);
    assert_eq!(r["failed"], 0);
    let (n, sum) = set_checksum(&b.export_all());
    assert_eq!(n, 1000);
    assert_eq!(
        sum,
        manifest_checksum(1000),
        "JSONL → FHIR → charts changed the charts"
    );
}

/// A bundle holding one good patient, then `bad` entries.
fn bundle_with(bad: Vec<Value>) -> Value {
    let mut entries = vec![json!({ "fullUrl": "urn:uuid:good", "resource": {
        "resourceType": "Patient", "id": "good",
        "identifier": [{ "system": "urn:mrn", "value": "GOOD-1" }],
        "name": [{ "family": "Okafor", "given": ["Ada"] }], "birthDate": "1961-04-02" } })];
    entries.push(json!({ "resource": { "resourceType": "Condition", "subject": { "reference": "urn:uuid:good" },
        "code": { "coding": [{ "system": "http://hl7.org/fhir/sid/icd-10", "code": "I10", "display": "Hypertension" }] },
        "clinicalStatus": { "coding": [{ "code": "active" }] }, "onsetDateTime": "2001-01-01" } }));
    entries.extend(bad);
    json!({ "resourceType": "Bundle", "type": "collection", "entry": entries })
}

#[test]
fn twenty_malformed_inputs_each_get_a_clear_error_and_good_entries_still_import() {
    let a = Practice::new("Malformed");
    let subj = json!({ "reference": "urn:uuid:good" });
    // (name, file content, expected words in the error, whether the good patient still imports)
    let cases: Vec<(&str, Vec<u8>, &str, bool)> = vec![
        ("not-json", b"{ this is not json".to_vec(), "not valid JSON", false),
        ("empty", b"".to_vec(), "not valid JSON", false),
        ("array", b"[1, 2, 3]".to_vec(), "not an object", false),
        ("no-resource-type", br#"{"type":"collection"}"#.to_vec(), "no resourceType", false),
        ("resource-type-number", br#"{"resourceType": 7}"#.to_vec(), "resourceType must be a string", false),
        ("bad-bundle-type", br#"{"resourceType":"Bundle","type":"pile","entry":[]}"#.to_vec(), "not an R4 bundle type", false),
        ("entry-not-array", br#"{"resourceType":"Bundle","type":"batch","entry":{"a":1}}"#.to_vec(), "Bundle.entry must be an array", false),
        ("entry-without-resource", bundle_with(vec![json!({ "fullUrl": "urn:x" })]).to_string().into_bytes(), "entry has no resource", true),
        ("unknown-resource-type", bundle_with(vec![json!({ "resource": { "resourceType": "Spaceship", "subject": subj } })]).to_string().into_bytes(), "unknown resourceType \"Spaceship\"", true),
        ("dangling-reference", bundle_with(vec![json!({ "resource": { "resourceType": "Condition", "subject": { "reference": "urn:uuid:ghost" }, "code": { "coding": [{ "code": "E11.9" }] } } })]).to_string().into_bytes(), "dangling reference", true),
        ("condition-without-code", bundle_with(vec![json!({ "resource": { "resourceType": "Condition", "subject": subj } })]).to_string().into_bytes(), "Condition.code is missing", true),
        ("observation-value-string", bundle_with(vec![json!({ "resource": { "resourceType": "Observation", "status": "final", "subject": subj, "code": { "coding": [{ "code": "8480-6" }] }, "effectiveDateTime": "2024-01-01T10:00:00Z", "valueQuantity": { "value": "high", "unit": "mm[Hg]" } } })]).to_string().into_bytes(), "value must be a number", true),
        ("observation-bad-time", bundle_with(vec![json!({ "resource": { "resourceType": "Observation", "status": "final", "subject": subj, "code": { "coding": [{ "code": "8480-6" }] }, "effectiveDateTime": "yesterday", "valueQuantity": { "value": 120 } } })]).to_string().into_bytes(), "Observation.effectiveDateTime", true),
        ("immunization-without-vaccine", bundle_with(vec![json!({ "resource": { "resourceType": "Immunization", "status": "completed", "patient": subj, "occurrenceDateTime": "2020-01-01" } })]).to_string().into_bytes(), "vaccineCode is missing", true),
        ("medication-without-drug", bundle_with(vec![json!({ "resource": { "resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": subj } })]).to_string().into_bytes(), "has no medication", true),
        ("allergy-without-substance", bundle_with(vec![json!({ "resource": { "resourceType": "AllergyIntolerance", "patient": subj } })]).to_string().into_bytes(), "no substance", true),
        ("note-bad-base64", bundle_with(vec![json!({ "resource": { "resourceType": "DocumentReference", "status": "current", "subject": subj, "content": [{ "attachment": { "contentType": "text/plain", "data": "@@not base64@@" } }] } })]).to_string().into_bytes(), "not valid base64", true),
        ("patient-name-wrong-type", bundle_with(vec![json!({ "resource": { "resourceType": "Patient", "id": "p2", "name": "Just A String", "birthDate": "1990-01-01" } })]).to_string().into_bytes(), "Patient.name must be an array", true),
        ("patient-bad-birth-date", bundle_with(vec![json!({ "resource": { "resourceType": "Patient", "id": "p3", "name": [{ "family": "Lee" }], "birthDate": "1990-13-45" } })]).to_string().into_bytes(), "Patient.birthDate", true),
        ("subject-not-a-patient", bundle_with(vec![json!({ "fullUrl": "urn:uuid:enc", "resource": { "resourceType": "Encounter", "status": "finished" } }), json!({ "resource": { "resourceType": "Condition", "subject": { "reference": "urn:uuid:enc" }, "code": { "coding": [{ "code": "J06.9" }] } } })]).to_string().into_bytes(), "which is not a Patient", true),
    ];
    assert_eq!(cases.len(), 20);
    let dir = a.dir.parent().unwrap().join("malformed");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, content, expect, good_imports) in cases {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, &content).unwrap();
        let out = a.cli(&["import", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{name}: a malformed input was accepted"
        );
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains(expect),
            "{name}: the error does not say {expect:?}:\n{stderr}"
        );
        if good_imports {
            // The error names the entry at fault.
            assert!(
                stderr.contains("entry["),
                "{name}: the error names no entry:\n{stderr}"
            );
            let chart = a.cli_json(&["chart", "show", "fhir-good"]);
            assert_eq!(chart["patient"]["name"]["family"], "Okafor", "{name}");
            assert_eq!(chart["conditions"][0]["code"], "I10", "{name}");
        }
    }
    // The good patient was imported once and is unchanged by the repeats.
    let c = a.cli_json(&["chart", "show", "fhir-good"]);
    assert_eq!(c["conditions"].as_array().unwrap().len(), 1);
}
