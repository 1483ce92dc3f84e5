//! FHIR that a clinic can migrate with safely (issue 13), end to end with real daemons and
//! the real CLI: patient matching that cannot merge two people, status and negation honoured
//! everywhere, the record kept whole (counted per resource type on the Synthea samples),
//! Bulk Data NDJSON in and out, large files in parts, and the FHIR REST API driven by an
//! independent client (fhirpy, from PyPI). Every export goes through the independent R4
//! validator (fhir.resources).

use chartmesh_tests::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/fhir")
        .join(name)
}

fn samples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fhir_samples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && !p
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .contains("Information")
        })
        .collect();
    v.sort();
    assert!(v.len() >= 3, "expected the Synthea patient samples: {v:?}");
    v
}

fn read_json(p: &Path) -> Value {
    let bytes = std::fs::read(p).unwrap();
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    serde_json::from_slice(bytes).unwrap()
}

/// Resources per type in a Bundle.
fn counts(b: &Value) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in b["entry"].as_array().unwrap() {
        *m.entry(e["resource"]["resourceType"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    m
}

fn resources<'a>(b: &'a Value, rt: &str) -> Vec<&'a Value> {
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == rt)
        .collect()
}

/// Exports every chart as FHIR into a fresh directory, validates it independently, and
/// returns the Bundles by chart id.
fn export_validated(p: &Practice, name: &str) -> BTreeMap<String, Value> {
    let dir = p.dir.parent().unwrap().join(name);
    p.cli_ok(&["export", "--format", "fhir", "-o", dir.to_str().unwrap()]);
    let (ok, report) = validate_fhir(&[&dir]);
    assert!(ok, "FHIR validation failed:\n{report}");
    files_under(&dir)
        .into_iter()
        .map(|f| {
            (
                f.file_stem().unwrap().to_string_lossy().to_string(),
                read_json(&f),
            )
        })
        .collect()
}

#[test]
fn a_synthea_patient_keeps_every_resource_through_import_and_export() {
    let a = Practice::new("Migration");
    for f in samples() {
        let input = read_json(&f);
        let v = a.cli_json(&["import", f.to_str().unwrap()]);
        assert_eq!(v["failed"], 0, "{}: {v}", f.display());
        let pid = input["entry"][0]["resource"]["id"].as_str().unwrap();
        let bundles = export_validated(&a, &format!("out-{pid}"));
        let (_, out) = bundles
            .iter()
            .find(|(_, b)| {
                resources(b, "Patient")[0]["identifier"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|i| i["value"] == pid)
            })
            .unwrap_or_else(|| panic!("no export for patient {pid}"));
        let (cin, cout) = (counts(&input), counts(out));
        for rt in [
            "Condition",
            "AllergyIntolerance",
            "Observation",
            "Immunization",
            "Encounter",
            "Procedure",
            "DocumentReference",
        ] {
            assert_eq!(
                cout.get(rt).copied().unwrap_or(0),
                cin.get(rt).copied().unwrap_or(0),
                "{}: {rt} in {cin:?} out {cout:?}",
                f.display()
            );
        }
        // Medications: every MedicationRequest/Statement, with its dosage.
        let meds_in: Vec<&Value> = resources(&input, "MedicationRequest")
            .into_iter()
            .chain(resources(&input, "MedicationStatement"))
            .collect();
        let meds_out: Vec<&Value> = resources(out, "MedicationRequest")
            .into_iter()
            .chain(resources(out, "MedicationStatement"))
            .collect();
        assert_eq!(meds_out.len(), meds_in.len(), "{}", f.display());
        let dosed = |v: &[&Value]| {
            v.iter()
                .filter(|m| !m["dosageInstruction"].is_null() || !m["dosage"].is_null())
                .count()
        };
        assert_eq!(
            dosed(&meds_out),
            dosed(&meds_in),
            "{}: dosage lost",
            f.display()
        );
        // Coded observations are kept as coded.
        let coded = |b: &Value| {
            resources(b, "Observation")
                .iter()
                .filter(|o| !o["valueCodeableConcept"].is_null())
                .count()
        };
        assert_eq!(coded(out), coded(&input), "{}", f.display());
        let numeric = |b: &Value| {
            resources(b, "Observation")
                .iter()
                .filter(|o| !o["valueQuantity"].is_null())
                .count()
        };
        assert_eq!(numeric(out), numeric(&input), "{}", f.display());
        // Allergies keep their code.
        for al in resources(&input, "AllergyIntolerance") {
            let code = &al["code"]["coding"][0]["code"];
            assert!(
                resources(out, "AllergyIntolerance")
                    .iter()
                    .any(|o| o["code"]["coding"][0]["code"] == *code),
                "allergy code {code} lost"
            );
        }
        // Every identifier, with its system, and the deceased date.
        let pin = &resources(&input, "Patient")[0];
        let pout = &resources(out, "Patient")[0];
        for i in pin["identifier"].as_array().unwrap() {
            assert!(
                pout["identifier"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|o| o["system"] == i["system"] && o["value"] == i["value"]),
                "identifier {i} lost"
            );
        }
        assert_eq!(pout["deceasedDateTime"], pin["deceasedDateTime"]);
        assert_eq!(pout["birthDate"], pin["birthDate"]);
    }
}

#[test]
fn a_deceased_patient_and_decimal_text_survive_a_round_trip() {
    let a = Practice::new("Decimals");
    // Synthea's record of a patient who died, with numbers written in many ways.
    let path = a.dir.parent().unwrap().join("died.json");
    let text = r#"{"resourceType":"Bundle","type":"transaction","entry":[
      {"fullUrl":"urn:uuid:11111111-2222-4333-8444-555555555555","resource":{"resourceType":"Patient","id":"11111111-2222-4333-8444-555555555555",
        "identifier":[{"system":"https://github.com/synthetichealth/synthea","value":"11111111-2222-4333-8444-555555555555"},
                      {"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"MR"}]},"system":"http://hospital.smarthealthit.org","value":"11111111-2222-4333-8444-555555555555"},
                      {"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"SS"}]},"system":"http://hl7.org/fhir/sid/us-ssn","value":"999-12-3456"}],
        "name":[{"use":"official","family":"Kunde533","given":["Elmo123"]}],"gender":"male","birthDate":"1931-03-02","deceasedDateTime":"2008-05-30T12:16:30-04:00"}},
      {"resource":{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"29463-7","display":"Body Weight"}]},"subject":{"reference":"urn:uuid:11111111-2222-4333-8444-555555555555"},"effectiveDateTime":"2007-01-01T10:00:00-04:00","valueQuantity":{"value":97.45878396789013,"unit":"kg","system":"http://unitsofmeasure.org","code":"kg"}}},
      {"resource":{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"2160-0","display":"Creatinine"}]},"subject":{"reference":"urn:uuid:11111111-2222-4333-8444-555555555555"},"effectiveDateTime":"2007-01-01T10:00:00-04:00","valueQuantity":{"value":1.20,"unit":"mg/dL","system":"http://unitsofmeasure.org","code":"mg/dL"}}},
      {"resource":{"resourceType":"MedicationRequest","status":"active","intent":"order","medicationCodeableConcept":{"coding":[{"system":"http://www.nlm.nih.gov/research/umls/rxnorm","code":"866414","display":"Metoprolol succinate"}]},"subject":{"reference":"urn:uuid:11111111-2222-4333-8444-555555555555"},"authoredOn":"2006-02-01T10:00:00-04:00",
        "dosageInstruction":[{"sequence":1,"timing":{"repeat":{"frequency":1,"period":1.0,"periodUnit":"d"}},"asNeededBoolean":false,"doseAndRate":[{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/dose-rate-type","code":"ordered"}]},"doseQuantity":{"value":1}}]}]}}
    ]}"#;
    std::fs::write(&path, text).unwrap();
    let v = a.cli_json(&["import", path.to_str().unwrap()]);
    assert_eq!(v["failed"], 0, "{v}");
    let bundles = export_validated(&a, "out");
    let raw = std::fs::read_to_string(
        a.dir
            .parent()
            .unwrap()
            .join("out")
            .join(format!("{}.json", bundles.keys().next().unwrap())),
    )
    .unwrap();
    assert!(raw.contains("97.45878396789013"), "a long value changed");
    assert!(raw.contains("\"value\": 1.20"), "1.20 lost its precision");
    assert!(raw.contains("\"period\": 1.0"), "1.0 lost its precision");
    let b = bundles.values().next().unwrap();
    let p = resources(b, "Patient")[0];
    assert_eq!(p["deceasedDateTime"], "2008-05-30T12:16:30-04:00");
    let m = resources(b, "MedicationRequest")[0];
    assert_eq!(
        m["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"],
        1
    );
    // The IPS of a patient who died lists no current medication.
    let chart = bundles.keys().next().unwrap().clone();
    let copy = a.dir.parent().unwrap().join("copy");
    a.cli_ok(&[
        "export",
        "--patient-copy",
        &chart,
        "-o",
        copy.to_str().unwrap(),
    ]);
    let ips = read_json(&copy.join("ips.json"));
    assert!(resources(&ips, "MedicationRequest").is_empty());
    assert!(resources(&ips, "MedicationStatement").is_empty());
    // Nothing is due for him.
    let due = a.cli_json(&["due", "--within", "3650"]);
    assert!(
        due["patients"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["chart"] != chart.as_str()),
        "{due}"
    );
}

#[test]
fn negated_or_erroneous_inputs_never_become_positive_facts() {
    let a = Practice::new("Negation");
    let v = a.cli_json(&["import", fixture("negation.json").to_str().unwrap()]);
    assert_eq!(v["failed"], 0, "{v}");
    let chart = "fhir-5b0c9a52-1c1e-4d55-9a36-3f7f2b9c0001";
    let c = a.cli_json(&["chart", "show", chart]);
    assert_eq!(c["schemaVersion"], 2);
    // Kept as data.
    let cond = |code: &str| {
        c["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["code"] == code)
            .unwrap()
            .clone()
    };
    assert_eq!(cond("E11.9")["verification"], "refuted");
    assert_eq!(cond("195967001")["verification"], "entered-in-error");
    // Alerts: warfarin recorded as "do not give" is no anticoagulant; a refuted penicillin
    // allergy raises nothing.
    let alerts = a.cli_json(&["alerts", chart]);
    let text = alerts.to_string();
    assert!(
        !text.contains("Warfarin") && !text.contains("Penicillin"),
        "{text}"
    );
    let out = a.cli(&[
        "med",
        "add",
        chart,
        "--name",
        "Amoxicillin",
        "--dose",
        "500 mg",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Due list: the refuted diabetes asks for no HbA1c; the glucose entered in error is no
    // evidence of anything.
    let due = a.cli_json(&["due", "--within", "3650", "--today", "2026-01-01"]);
    let mine: Vec<&Value> = due["patients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["chart"] == chart)
        .collect();
    let rules: Vec<&str> = mine
        .iter()
        .flat_map(|p| p["items"].as_array().unwrap())
        .map(|i| i["rule"].as_str().unwrap())
        .collect();
    assert!(!rules.contains(&"hba1c-diabetes"), "{rules:?}");
    assert!(
        rules.contains(&"influenza-65"),
        "a flu vaccine not given counts: {rules:?}"
    );
    assert!(
        !rules.contains(&"tsh-hypothyroidism"),
        "resolved: {rules:?}"
    );
    // Population report: only problems the patient has.
    let conditions = due["conditions"].as_object().unwrap();
    assert!(conditions.keys().any(|k| k.starts_with("59621000")));
    assert!(
        !conditions
            .keys()
            .any(|k| k.starts_with("E11.9") || k.starts_with("195967001")),
        "{conditions:?}"
    );
    // The patient copy and the IPS show no negated fact.
    let copy = a.dir.parent().unwrap().join("copy");
    a.cli_ok(&[
        "export",
        "--patient-copy",
        chart,
        "-o",
        copy.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(copy.join("summary.html")).unwrap();
    for absent in [
        "Type 2 diabetes",
        "Asthma",
        "Warfarin",
        "Ibuprofen",
        "Lisinopril",
        "Influenza",
        "Pneumococcal",
        "Appendectomy",
    ] {
        assert!(!html.contains(absent), "the patient copy shows {absent}");
    }
    let (ok, report) = validate_fhir(&[&copy.join("ips.json")]);
    assert!(ok, "{report}");
    let ips = std::fs::read_to_string(copy.join("ips.json")).unwrap();
    for absent in [
        "E11.9",
        "195967001",
        "Warfarin",
        "Ibuprofen",
        "Lisinopril",
        "\"141\"",
        "\"133\"",
    ] {
        assert!(!ips.contains(absent), "the IPS shows {absent}");
    }
    // The export keeps the negation, with R4 statuses, and validates.
    let bundles = export_validated(&a, "out");
    let b = &bundles[chart];
    let imms = resources(b, "Immunization");
    assert!(
        imms.iter()
            .any(|i| i["status"] == "not-done" && i["vaccineCode"]["coding"][0]["code"] == "141")
    );
    assert!(imms.iter().any(|i| i["status"] == "entered-in-error"));
    let meds = resources(b, "MedicationRequest");
    assert!(meds.iter().any(|m| m["doNotPerform"] == true));
    assert!(
        meds.iter().any(|m| m["status"] == "cancelled")
            && meds.iter().any(|m| m["status"] == "draft")
    );
    let glucose_eie = resources(b, "Observation")
        .into_iter()
        .find(|o| o["valueQuantity"]["value"] == 400)
        .unwrap();
    assert_eq!(glucose_eie["status"], "entered-in-error");
    let conds = resources(b, "Condition");
    assert!(
        conds
            .iter()
            .any(|c| c["verificationStatus"]["coding"][0]["code"] == "refuted")
    );
    // UCUM only where UCUM: "lbs" is shown as written, coded [lb_av].
    let w = resources(b, "Observation")
        .into_iter()
        .find(|o| o["code"]["coding"][0]["code"] == "29463-7")
        .unwrap();
    assert_eq!(w["valueQuantity"]["unit"], "lbs");
    assert_eq!(w["valueQuantity"]["code"], "[lb_av]");
    // Importing the export elsewhere gives the same chart.
    let b2 = Practice::new("Negation B");
    let f = a
        .dir
        .parent()
        .unwrap()
        .join("out")
        .join(format!("{chart}.json"));
    b2.cli_ok(&["import", f.to_str().unwrap()]);
    let mut c2 = b2.cli_json(&["chart", "show", chart]);
    let mut c1 = a.cli_json(&["chart", "show", chart]);
    for c in [&mut c1, &mut c2] {
        c.as_object_mut().unwrap().remove("updatedAt");
    }
    assert_eq!(c1, c2);
}

#[test]
fn the_same_mrn_under_two_systems_stays_two_charts_and_a_near_match_is_held_for_review() {
    let a = Practice::new("Matching");
    let ra = a.cli_json(&["import", fixture("mrn-a.json").to_str().unwrap()]);
    let rb = a.cli_json(&["import", fixture("mrn-b.json").to_str().unwrap()]);
    assert_eq!(ra["files"][0]["created"], 1, "{ra}");
    assert_eq!(rb["files"][0]["created"], 1, "{rb}");
    let charts: BTreeMap<String, Value> = a
        .export_all()
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_slice(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect();
    assert_eq!(charts.len(), 2, "{charts:?}");
    for c in charts.values() {
        assert_eq!(c["patient"]["mrn"], "12345");
        assert_eq!(
            c["notes"].as_array().unwrap().len(),
            1,
            "a note went to the wrong chart"
        );
        let note = c["notes"][0]["text"].as_str().unwrap();
        let family = c["patient"]["name"]["family"].as_str().unwrap();
        assert!(
            note.contains(family),
            "{family}'s chart holds another patient's note: {note}"
        );
    }
    // The export keeps each MRN's system, so the two stay apart anywhere.
    let bundles = export_validated(&a, "out");
    let systems: Vec<String> = bundles
        .values()
        .map(|b| {
            resources(b, "Patient")[0]["identifier"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["value"] == "12345")
                .unwrap()["system"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(systems.contains(&"http://northside-hospital.example.org/mrn".to_string()));
    assert!(systems.contains(&"http://southgate-clinic.example.org/patients".to_string()));
    let b = Practice::new("Matching B");
    let paths: Vec<String> = files_under(&a.dir.parent().unwrap().join("out"))
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut args = vec!["import"];
    args.extend(paths.iter().map(String::as_str));
    b.cli_ok(&args);
    assert_eq!(b.cli_json(&["status"])["charts"], 2);

    // A lone result is added to the chart its subject identifier (system and value) names.
    let v = a.cli_json(&["import", fixture("lone-observation.json").to_str().unwrap()]);
    assert_eq!(v["files"][0]["updated"], 1, "{v}");
    let maja = a.cli_json(&["chart", "show", "fhir-pat-a"]);
    assert_eq!(maja["observations"][0]["value"], 6.8);
    assert_eq!(maja["observations"][0]["code"], "4548-4");
    let chidi = a.cli_json(&["chart", "show", "fhir-pat-b"]);
    assert!(chidi["observations"].as_array().unwrap().is_empty());
    // The same MRN and system with another birth date: not merged, held for review.
    let out = a.cli(&["import", fixture("mrn-a-typo.json").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("held for review"), "{stdout}");
    let review = a.get("/import/review");
    let items = review["review"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{review}");
    assert_eq!(items[0]["candidates"][0], "fhir-pat-a");
    assert_eq!(a.cli_json(&["status"])["charts"], 3);
    let maja = a.cli_json(&["chart", "show", "fhir-pat-a"]);
    assert!(
        maja["conditions"].as_array().unwrap().is_empty(),
        "merged into the wrong chart"
    );
    // Importing the same files again changes nothing and files no new review item.
    for f in ["mrn-a.json", "mrn-b.json", "mrn-a-typo.json"] {
        let v = a.cli_json(&["import", fixture(f).to_str().unwrap()]);
        assert_eq!(v["files"][0]["created"], 0, "{f}: {v}");
        assert_eq!(v["files"][0]["updated"], 0, "{f}: {v}");
    }
    assert_eq!(
        a.get("/import/review")["review"].as_array().unwrap().len(),
        1
    );
    assert_eq!(a.cli_json(&["status"])["charts"], 3);
    // Now two charts carry that identifier: a lone result naming it is not filed under either.
    let out = a.cli(&[
        "--json",
        "import",
        fixture("lone-observation.json").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["files"][0]["resources"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("2 charts"),
        "{v}"
    );
    // The review, the imports and the reads are audited.
    let audit = a.cli_json(&["audit"]);
    assert!(audit.to_string().contains("import-review"), "{audit}");
}

#[test]
fn bulk_data_ndjson_directories_import_and_export() {
    let a = Practice::new("Bulk");
    let v = a.cli_json(&["import", fixture("bulk").to_str().unwrap()]);
    assert_eq!(v["failed"], 0, "{v}");
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 3);
    assert!(
        files[0]["file"]
            .as_str()
            .unwrap()
            .ends_with("Patient.ndjson")
    );
    let p1 = a.cli_json(&["chart", "show", "fhir-bulk-p1"]);
    assert_eq!(p1["conditions"].as_array().unwrap().len(), 1);
    assert_eq!(p1["observations"][0]["value"], 131.0);
    let p2 = a.cli_json(&["chart", "show", "fhir-bulk-p2"]);
    assert_eq!(p2["patient"]["deceased"], true);
    assert_eq!(p2["observations"][0]["valueCoding"]["code"], "266919005");
    // Out as NDJSON: one Type.ndjson per resource type, valid R4 line by line.
    let out = a.dir.parent().unwrap().join("bulk-out");
    a.cli_ok(&["export", "--format", "ndjson", "-o", out.to_str().unwrap()]);
    for t in ["Patient", "Condition", "Observation"] {
        assert!(
            out.join(format!("{t}.ndjson")).exists(),
            "{t}.ndjson missing"
        );
    }
    let (ok, report) = validate_fhir(&[&out]);
    assert!(ok, "{report}");
    let obs = std::fs::read_to_string(out.join("Observation.ndjson")).unwrap();
    assert!(obs.contains("\"value\":131.0"), "{obs}");
    assert!(
        obs.contains("\"reference\":\"Patient/fhir-bulk-p1\""),
        "{obs}"
    );
    // And back in at another practice: the same charts.
    let b = Practice::new("Bulk B");
    b.cli_ok(&["import", out.to_str().unwrap()]);
    for id in ["fhir-bulk-p1", "fhir-bulk-p2"] {
        let mut x = a.cli_json(&["chart", "show", id]);
        let mut y = b.cli_json(&["chart", "show", id]);
        for c in [&mut x, &mut y] {
            c.as_object_mut().unwrap().remove("updatedAt");
        }
        assert_eq!(x, y, "{id}");
    }
    // A lone resource file whose patient is only named by reference is filed under it.
    let lone = a.dir.parent().unwrap().join("lone.ndjson");
    std::fs::write(&lone, r#"{"resourceType":"Immunization","status":"completed","vaccineCode":{"coding":[{"system":"http://hl7.org/fhir/sid/cvx","code":"141","display":"Influenza"}]},"patient":{"reference":"Patient/bulk-p1"},"occurrenceDateTime":"2025-10-10"}
{"resourceType":"Immunization","status":"completed","vaccineCode":{"coding":[{"system":"http://hl7.org/fhir/sid/cvx","code":"141","display":"Influenza"}]},"patient":{"reference":"Patient/nobody-here"},"occurrenceDateTime":"2025-10-10"}
"#).unwrap();
    let out = a.cli(&["--json", "import", lone.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["failed"], 1, "{v}");
    let err = &v["files"][0]["resources"][0];
    assert_eq!(err["at"], "line 2");
    assert!(
        err["reason"]
            .as_str()
            .unwrap()
            .contains("Patient/nobody-here"),
        "{err}"
    );
    let p1 = a.cli_json(&["chart", "show", "fhir-bulk-p1"]);
    assert_eq!(p1["immunizations"].as_array().unwrap().len(), 1);
}

#[test]
fn a_file_over_64_mib_is_imported_in_parts() {
    let a = Practice::new("Large");
    // 700 patients, each with a long note: about 70 MiB, more than one request may carry.
    let path = a.dir.parent().unwrap().join("large.json");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    use std::io::Write;
    let n = 700;
    let text = "Follow-up visit. ".repeat(4400);
    let data = data_encoding::BASE64.encode(text.as_bytes());
    write!(
        f,
        "{{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":["
    )
    .unwrap();
    for i in 0..n {
        if i > 0 {
            write!(f, ",").unwrap();
        }
        write!(f, r#"{{"fullUrl":"urn:uuid:00000000-0000-4000-8000-{i:012}","resource":{{"resourceType":"Patient","id":"big-{i}","identifier":[{{"system":"urn:oid:1.2.3.999","value":"L-{i}"}}],"name":[{{"family":"Large{i}","given":["Pat"]}}],"birthDate":"1970-01-01"}}}},"#).unwrap();
        write!(f, r#"{{"resource":{{"resourceType":"DocumentReference","status":"current","subject":{{"reference":"urn:uuid:00000000-0000-4000-8000-{i:012}"}},"date":"2025-01-01T00:00:00Z","author":[{{"display":"Dr. Big"}}],"content":[{{"attachment":{{"contentType":"text/plain","data":"{data}"}}}}]}}}},"#).unwrap();
        write!(f, r#"{{"resource":{{"resourceType":"Observation","status":"final","code":{{"coding":[{{"system":"http://loinc.org","code":"8480-6"}}]}},"subject":{{"reference":"urn:uuid:00000000-0000-4000-8000-{i:012}"}},"effectiveDateTime":"2025-01-01T00:00:00Z","valueQuantity":{{"value":120.50,"unit":"mm[Hg]"}}}}}}"#).unwrap();
    }
    write!(f, "]}}").unwrap();
    drop(f);
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size > 64 * 1024 * 1024, "{size}");
    let v = a.cli_json(&["import", path.to_str().unwrap()]);
    assert_eq!(
        v["failed"],
        0,
        "{}",
        &v.to_string()[..500.min(v.to_string().len())]
    );
    let r = &v["files"][0];
    assert_eq!(r["created"], n, "{}", r["summary"]);
    assert_eq!(r["summary"]["DocumentReference"]["mapped"], n);
    assert_eq!(r["summary"]["Observation"]["mapped"], n);
    assert_eq!(r["summary"]["Patient"]["mapped"], n);
    let c = a.cli_json(&["chart", "show", "fhir-big-699"]);
    assert_eq!(c["notes"][0]["text"].as_str().unwrap().len(), text.len());
    assert_eq!(c["observations"][0]["value"], 120.5);
    // Again: nothing changes.
    let v = a.cli_json(&["import", path.to_str().unwrap()]);
    assert_eq!(v["files"][0]["created"], 0);
    assert_eq!(v["files"][0]["updated"], 0);
    assert_eq!(a.cli_json(&["status"])["charts"], n);
}

#[test]
fn import_errors_are_listed_up_to_a_limit_and_counted_beyond_it() {
    let a = Practice::new("Many errors");
    let mut entries = vec![
        json!({ "fullUrl": "urn:uuid:p", "resource": { "resourceType": "Patient", "id": "p", "name": [{ "family": "Err" }], "birthDate": "1990-01-01" } }),
    ];
    for _ in 0..1500 {
        entries.push(json!({ "resource": { "resourceType": "Condition", "subject": { "reference": "urn:uuid:p" } } }));
    }
    let body = json!({ "resourceType": "Bundle", "type": "collection", "entry": entries });
    let (status, v) = a
        .post("/import/fhir", body.to_string().as_bytes(), "tester")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["summary"]["Condition"]["errors"], 1500);
    assert_eq!(v["resources"].as_array().unwrap().len(), 1000);
    assert_eq!(v["resourcesOmitted"], 500);
    // The CLI prints the first few and says how many more.
    let path = a.dir.parent().unwrap().join("errors.json");
    std::fs::write(&path, body.to_string()).unwrap();
    let out = a.cli(&["import", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("and 1450 more problem(s)"), "{stderr}");
    assert!(stderr.lines().count() < 60, "{stderr}");
}

#[test]
fn chart_fields_are_bounded_and_control_characters_refused_with_the_field_named() {
    let a = Practice::new("Limits");
    a.cli_ok(&[
        "chart",
        "create",
        "--mrn",
        "M1",
        "--family",
        "Lim",
        "--birth-date",
        "1970-01-01",
    ]);
    let id = a.cli_json(&["chart", "search", "M1"])["charts"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let note = |text: &str| {
        a.post(
            &format!("/charts/{id}/notes"),
            json!({ "entry": { "text": text } }).to_string().as_bytes(),
            "tester",
        )
        .unwrap()
    };
    let (s, v) = note(&"x".repeat(100 * 1024 + 1));
    assert_eq!(s, 422, "{v}");
    assert!(v.to_string().contains("notes.text"), "{v}");
    let (s, v) = note("ok\u{1b}[2Jcleared");
    assert_eq!(s, 422, "{v}");
    assert!(v.to_string().contains("escape character"), "{v}");
    let (s, _) = note("fine\nmulti-line\ttext");
    assert_eq!(s, 201);
    let (s, v) = a
        .post(
            &format!("/charts/{id}/medications"),
            json!({ "entry": { "name": "Aspirin\u{202e}nip" } })
                .to_string()
                .as_bytes(),
            "tester",
        )
        .unwrap();
    assert_eq!(s, 422, "{v}");
    assert!(v.to_string().contains("medications.name"), "{v}");
    // JSONL import: the record is refused and named, the others are kept.
    let path = a.dir.parent().unwrap().join("bad.jsonl");
    let good = r#"{"id":"c-ok","type":"chart","schemaVersion":1,"patient":{"mrn":"M2","name":{"family":"Fine"},"birthDate":"1980-01-01"},"createdAt":"2021-07-03T11:45:00Z","updatedAt":"2021-07-03T11:45:00Z"}"#;
    let bad = good.replace("c-ok", "c-bad").replace("Fine", "Fi\\u0000ne");
    std::fs::write(&path, format!("{good}\n{bad}\n")).unwrap();
    let out = a.cli(&["import", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(":2") && stderr.contains("patient.name.family") && stderr.contains("NUL"),
        "{stderr}"
    );
    a.cli_ok(&["chart", "show", "c-ok"]);
}

/// A Python with fhirpy 2.3.1 (from PyPI) in `target/fhir-client-venv`, made on first use;
/// or `$CHARTMESH_FHIR_CLIENT_PYTHON`.
fn fhir_client_python() -> PathBuf {
    if let Some(p) = std::env::var_os("CHARTMESH_FHIR_CLIENT_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fhir-client-venv");
    let python = venv.join("bin/python");
    if !venv.join(".ready").exists() {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(venv.with_extension("lock"))
            .unwrap();
        lock.lock().unwrap();
        if !venv.join(".ready").exists() {
            for (cmd, what) in [
                (
                    Command::new("python3")
                        .args(["-m", "venv"])
                        .arg(&venv)
                        .output(),
                    "creating the FHIR client venv",
                ),
                (
                    Command::new(&python)
                        .args(["-m", "pip", "install", "-q", "fhirpy==2.3.1"])
                        .output(),
                    "installing fhirpy from PyPI",
                ),
            ] {
                let out = cmd.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(
                    out.status.success(),
                    "{what} failed (set CHARTMESH_FHIR_CLIENT_PYTHON to a python with fhirpy):\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::fs::write(venv.join(".ready"), "").unwrap();
        }
        let _ = lock.unlock();
    }
    python
}

#[test]
fn the_fhir_rest_api_serves_an_independent_client() {
    let a = Practice::new("REST");
    a.cli_ok(&["import", fixture("negation.json").to_str().unwrap()]);
    let base = a.base().replace("/api/v1", "/fhir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fhir/rest_client.py");
    let out = Command::new(fhir_client_python())
        .arg(&script)
        .arg(&base)
        .arg(a.token())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the FHIR client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let pid = last["patient"].as_str().unwrap();
    // Reads and writes through the FHIR API are audited like the JSON API's.
    let audit = a.cli_json(&["audit", "--chart", pid]);
    let text = audit.to_string();
    for what in [
        "fhir Patient read",
        "fhir Condition search",
        "fhir Patient $everything",
        "fhir-import",
    ] {
        assert!(text.contains(what), "no audit entry for {what}: {text}");
    }
    // Resources served validate as R4.
    let dir = a.dir.parent().unwrap().join("served");
    std::fs::create_dir_all(&dir).unwrap();
    let chart = "fhir-5b0c9a52-1c1e-4d55-9a36-3f7f2b9c0001";
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .get(format!("{base}/Patient/{chart}/$everything"))
        .header("Authorization", format!("Bearer {}", a.token()))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body = r.body_mut().read_to_string().unwrap();
    std::fs::write(dir.join("everything.json"), &body).unwrap();
    let (ok, report) = validate_fhir(&[&dir]);
    assert!(ok, "{report}");
    // Every error is an OperationOutcome, even a wrong method or an unknown path.
    for (method, path) in [
        ("DELETE", "/Patient/x"),
        ("GET", "/Spaceship/1"),
        ("GET", "/Patient/x/y/z"),
    ] {
        let req = match method {
            "DELETE" => agent.delete(format!("{base}{path}")),
            _ => agent.get(format!("{base}{path}")),
        };
        let mut r = req
            .header("Authorization", format!("Bearer {}", a.token()))
            .call()
            .unwrap();
        assert!(r.status().as_u16() >= 400);
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(
            v["resourceType"], "OperationOutcome",
            "{method} {path}: {v}"
        );
    }
}

#[test]
fn charts_stored_by_the_previous_version_are_read_exported_and_extended() {
    // A store written by the version before schemaVersion 2 (21 charts: 20 bench charts and
    // one Synthea patient imported from FHIR, a note and a medication added afterwards).
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/store-v1");
    let mut a = Practice::new("Upgraded");
    a.stop();
    for f in ["store.db-wal", "store.db-shm"] {
        let _ = std::fs::remove_file(a.dir.join(f));
    }
    for f in ["store.db", "store.key"] {
        std::fs::copy(fx.join(f), a.dir.join(f)).unwrap();
    }
    a.start();
    // Read as they are: the JSONL export is what the previous version exported.
    let before = std::fs::read(fx.join("export.jsonl")).unwrap();
    assert_eq!(
        a.export_all(),
        before,
        "the previous version's charts read differently"
    );
    a.cli_ok(&["audit", "verify"]);
    let bundles = export_validated(&a, "v1-out");
    assert_eq!(bundles.len(), 21);
    // Extended with version 2 data: the chart becomes schemaVersion 2, the others stay 1.
    let enc = a.dir.parent().unwrap().join("enc.json");
    std::fs::write(&enc, r#"{"resourceType":"Encounter","status":"finished","class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"AMB"},"subject":{"reference":"Patient/chart-000001"},"period":{"start":"2026-01-05T09:00:00Z"}}"#).unwrap();
    let v = a.cli_json(&["import", enc.to_str().unwrap()]);
    assert_eq!(v["files"][0]["updated"], 1, "{v}");
    let c = a.cli_json(&["chart", "show", "chart-000001"]);
    assert_eq!(c["schemaVersion"], 2);
    assert_eq!(c["encounters"].as_array().unwrap().len(), 1);
    assert_eq!(
        c["notes"].as_array().unwrap().last().unwrap()["text"],
        "Written by the previous version."
    );
    assert_eq!(
        a.cli_json(&["chart", "show", "chart-000002"])["schemaVersion"],
        1
    );
    // A version 1 note appended to a version 1 chart keeps it at version 1.
    a.cli_ok(&[
        "note",
        "add",
        "chart-000003",
        "--author",
        "Dr New",
        "--text",
        "still v1",
    ]);
    assert_eq!(
        a.cli_json(&["chart", "show", "chart-000003"])["schemaVersion"],
        1
    );
    // The due list reads the old charts' facts.
    let due = a.cli_json(&["due", "--within", "30"]);
    assert_eq!(due["charts"], 21);
    export_validated(&a, "v2-out");
}

#[test]
fn version_2_charts_sync_whole_and_matching_never_uses_a_received_copy() {
    let a = Practice::new("Hobbs Home Practice");
    let b = Practice::new("Hobbs Specialist");
    a.cli_ok(&["import", fixture("negation.json").to_str().unwrap()]);
    let chart = "fhir-5b0c9a52-1c1e-4d55-9a36-3f7f2b9c0001";
    pair(&a, &b);
    a.cli_ok(&[
        "share",
        chart,
        "--with",
        &b.id(),
        "--access",
        "read-write",
        "--purpose",
        "referral",
    ]);
    a.sync_wait(&b, 60);
    b.sync_wait(&a, 60);
    // Every version 2 field arrives.
    let at_a = a.cli_json(&["chart", "show", chart]);
    assert_eq!(b.cli_json(&["chart", "show", chart]), at_a);
    // An edit at B comes back to A.
    b.cli_ok(&[
        "note",
        "add",
        chart,
        "--author",
        "Dr Spec",
        "--text",
        "Seen in clinic.",
    ]);
    b.sync_wait(&a, 60);
    a.sync_wait(&b, 60);
    wait_until(
        "the note reaches A",
        std::time::Duration::from_secs(30),
        || {
            a.cli_json(&["chart", "show", chart])["notes"]
                .as_array()
                .unwrap()
                .len()
                == 2
        },
    );
    // B imports the same patient from its own EHR: it becomes B's own chart, never merged
    // into the copy B holds for A.
    let v = b.cli_json(&["import", fixture("negation.json").to_str().unwrap()]);
    assert_eq!(v["files"][0]["created"], 1, "{v}");
    // The two are told apart by the copy's key (chart id @ custodian); the bare id now names
    // B's own chart.
    let copy = format!("{chart}@{}", a.id());
    let held = b.cli_json(&["chart", "show", &copy]);
    assert_eq!(
        held["notes"].as_array().unwrap().len(),
        2,
        "the received copy changed"
    );
    assert_eq!(
        b.get(&format!("/charts/{copy}/custody"))["status"],
        "shared-with-us"
    );
    let own = b.cli_json(&["chart", "show", chart]);
    assert_eq!(own["notes"].as_array().unwrap().len(), 1, "{own}");
    assert_eq!(b.get(&format!("/charts/{chart}/custody"))["status"], "own");
    assert_eq!(b.cli_json(&["status"])["charts"], 2);
}
