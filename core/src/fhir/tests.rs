use super::*;
use crate::chart::Chart;
use serde_json::Value;

const CHART: &str = r#"{"id":"chart-000001","type":"chart","schemaVersion":1,"practiceId":"practice-002","patient":{"mrn":"MRN88680916","name":{"given":["Lovo","Ann"],"family":"Holhol"},"birthDate":"2010-12-11","sex":"male","address":{"line":["63 Lantern Lane"],"city":"Kelby","postalCode":"82879","country":"ZZ"},"phone":"+99-486-3976262","insurance":{"provider":"Civic Mutual Health","memberId":"M801743462","group":"G1754","validUntil":"2028-04-28"}},"conditions":[{"code":"I10","system":"ICD-10","display":"Essential (primary) hypertension","onset":"2000-06-24","status":"active"}],"allergies":[{"substance":"Codeine","reaction":"Nausea","severity":"moderate","recorded":"2024-02-04"},{"substance":"Latex"}],"medications":[{"name":"Ibuprofen","code":"310965","system":"RxNorm","dose":"400 mg","route":"oral","frequency":"every 8 hours as needed","start":"2024-02-08","status":"active"},{"name":"Salbutamol","dose":"1-2 puffs"}],"observations":[{"code":"2160-0","system":"LOINC","display":"Creatinine","value":0.59,"unit":"mg/dL","category":"laboratory","date":"2025-12-06T12:21:00Z"},{"code":"8480-6","value":131,"date":"2023-05-01T09:12:00Z"}],"notes":[{"id":"chart-000001-n1","author":"Dr. Vale","date":"2024-03-01T10:00:00Z","text":"Seen for follow-up. Ünïcode ok."}],"immunizations":[{"vaccine":"Influenza","code":"141","system":"CVX","date":"2024-10-01","lot":"L123"}],"referral":{"to":"Cardiology Clinic","reason":"chest pain","date":"2025-01-02","status":"sent"},"createdAt":"2021-07-03T11:45:00Z","updatedAt":"2025-02-14T16:05:00Z"}"#;

fn chart() -> Chart {
    Chart::from_json_slice(CHART.as_bytes()).unwrap()
}

#[test]
fn a_chart_round_trips_through_a_bundle_exactly() {
    let c = chart();
    let b = chart_to_bundle(&c, &[]);
    let bytes = serde_json::to_vec(&b).unwrap();
    let back = import(&bytes, "2026-01-01T00:00:00Z");
    assert!(back.fatal.is_none());
    assert!(
        back.resources.iter().all(|r| r.outcome == Outcome::Mapped),
        "{:?}",
        back.resources
    );
    assert_eq!(back.charts.len(), 1);
    assert_eq!(back.charts[0], c);
}

/// Every `reference` in a Bundle is the fullUrl of one of its entries.
fn assert_references_resolve(b: &Value) {
    let urls: std::collections::HashSet<&str> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["fullUrl"].as_str().unwrap())
        .collect();
    assert!(urls.iter().all(|u| u.starts_with("urn:uuid:")), "{urls:?}");
    fn walk<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("reference", Value::String(s)) => out.push(s),
                        _ => walk(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut refs = Vec::new();
    walk(b, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        assert!(
            urls.contains(r),
            "reference {r} does not resolve inside the bundle"
        );
    }
}

#[test]
fn export_uses_standard_systems_and_resolving_references() {
    let b = chart_to_bundle(&chart(), &[]);
    let entries = b["entry"].as_array().unwrap();
    let types: Vec<&str> = entries
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"Coverage") && types.contains(&"ServiceRequest"));
    let cond = entries
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Condition")
        .unwrap();
    assert_eq!(
        cond["resource"]["code"]["coding"][0]["system"],
        "http://hl7.org/fhir/sid/icd-10"
    );
    let med = entries
        .iter()
        .find(|e| e["resource"]["resourceType"] == "MedicationStatement")
        .unwrap();
    assert_eq!(
        med["resource"]["medicationCodeableConcept"]["coding"][0]["system"],
        "http://www.nlm.nih.gov/research/umls/rxnorm"
    );
    assert_references_resolve(&b);
    assert_references_resolve(&ips_bundle(&chart(), &[], "P", "2026-01-01T00:00:00Z"));
    // The same chart gives the same ids.
    assert_eq!(chart_to_bundle(&chart(), &[]), b);
}

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/fhir")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn resources_of<'a>(b: &'a Value, rt: &str) -> Vec<&'a Value> {
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == rt)
        .collect()
}

#[test]
fn status_and_negation_are_kept_and_exported_as_they_were() {
    let r = import(&fixture("negation.json"), "2026-01-01T00:00:00Z");
    assert!(r.fatal.is_none());
    assert!(
        r.resources.iter().all(|x| x.outcome == Outcome::Mapped),
        "{:?}",
        r.resources
    );
    let c = &r.charts[0];
    assert_eq!(c.schema_version, 2);
    // Identifiers with their systems.
    assert_eq!(c.patient.mrn, "MRN-40117");
    assert_eq!(
        c.patient.mrn_system.as_deref(),
        Some("urn:oid:2.16.840.1.113883.19.5")
    );
    assert_eq!(
        c.patient.identifiers[0].system.as_deref(),
        Some("http://hl7.org/fhir/sid/us-ssn")
    );
    assert_eq!(c.patient.language.as_deref(), Some("en-US"));
    assert_eq!(
        c.patient.address.as_ref().unwrap().state.as_deref(),
        Some("PA")
    );
    // Negation is data.
    let cond = |code: &str| c.conditions.iter().find(|x| x.code == code).unwrap();
    assert!(cond("59621000").is_active());
    assert!(!cond("E11.9").is_active() && !cond("E11.9").is_fact());
    assert!(cond("195967001").is_error());
    assert_eq!(cond("59621000").onset.as_deref(), Some("2011"));
    assert_eq!(cond("E03.9").abatement.as_deref(), Some("2004-06"));
    let med = |name: &str| {
        c.medications
            .iter()
            .find(|m| m.name.starts_with(name))
            .unwrap()
    };
    assert!(med("Warfarin").do_not_perform && !med("Warfarin").is_active());
    let meto = med("Metoprolol");
    assert!(meto.is_active());
    assert_eq!(meto.dose_quantity.as_ref().unwrap().value.as_str(), "1");
    assert_eq!(meto.timing.as_ref().unwrap().frequency, Some(2));
    assert_eq!(meto.reason.as_deref(), Some("Essential hypertension"));
    assert_eq!(
        meto.dosage.as_deref(),
        Some("Take one tablet by mouth twice a day")
    );
    assert!(!med("Ibuprofen").is_active() && !med("Ibuprofen").is_fact());
    assert!(!med("Lisinopril").is_active());
    let imm = |code: &str| {
        c.immunizations
            .iter()
            .find(|i| i.code.as_deref() == Some(code))
            .unwrap()
    };
    assert!(!imm("141").was_given());
    assert_eq!(
        imm("141").status_reason.as_deref(),
        Some("patient objection")
    );
    assert!(!imm("133").was_given());
    assert!(imm("113").was_given());
    let glucose: Vec<_> = c
        .observations
        .iter()
        .filter(|o| o.code == "2339-0")
        .collect();
    assert_eq!(glucose.len(), 2);
    assert!(
        glucose
            .iter()
            .any(|o| !o.is_evidence() && o.value.as_ref().unwrap().as_str() == "400")
    );
    assert!(
        glucose
            .iter()
            .any(|o| o.value.as_ref().unwrap().as_str() == "95.40")
    );
    let creat = c.observations.iter().find(|o| o.code == "2160-0").unwrap();
    assert_eq!(creat.comparator.as_deref(), Some(">"));
    let smoking = c.observations.iter().find(|o| o.code == "72166-2").unwrap();
    assert_eq!(
        smoking.value_coding.as_ref().unwrap().code.as_deref(),
        Some("8517006")
    );
    let bp = c.observations.iter().find(|o| o.code == "85354-9").unwrap();
    assert_eq!(bp.components.len(), 2);
    let peanut = c
        .allergies
        .iter()
        .find(|a| a.substance == "Allergy to peanut")
        .unwrap();
    assert_eq!(peanut.criticality.as_deref(), Some("high"));
    assert_eq!(
        peanut.code.as_ref().unwrap().code.as_deref(),
        Some("91935009")
    );
    assert!(
        !c.allergies
            .iter()
            .find(|a| a.substance == "Penicillin")
            .unwrap()
            .is_active()
    );
    assert_eq!(c.encounters.len(), 2);
    assert_eq!(c.procedures.len(), 2);
    // A carriage return in a note's text becomes a newline.
    assert!(c.notes[0].text.contains("warfarin.\nReview"));

    // Exported with the same statuses, R4 codes only, and back exactly.
    let b = chart_to_bundle(c, &[]);
    assert_references_resolve(&b);
    let text = json::to_string(&b);
    assert!(text.contains("\"value\":95.40"), "decimal text lost");
    let reqs = resources_of(&b, "MedicationRequest");
    assert_eq!(reqs.len(), 5);
    for m in &reqs {
        let s = m["status"].as_str().unwrap();
        assert!(
            [
                "active",
                "on-hold",
                "cancelled",
                "completed",
                "entered-in-error",
                "stopped",
                "draft",
                "unknown"
            ]
            .contains(&s),
            "{s}"
        );
    }
    assert!(reqs.iter().any(|m| m["doNotPerform"] == true));
    let imms = resources_of(&b, "Immunization");
    assert!(imms.iter().any(|i| i["status"] == "not-done"));
    assert!(imms.iter().any(|i| i["status"] == "entered-in-error"));
    let obs = resources_of(&b, "Observation");
    assert!(
        obs.iter()
            .any(|o| o["status"] == "entered-in-error" && o["valueQuantity"]["value"] == 400)
    );
    let weight = obs
        .iter()
        .find(|o| o["code"]["coding"][0]["code"] == "29463-7")
        .unwrap();
    assert_eq!(weight["valueQuantity"]["unit"], "lbs");
    assert_eq!(weight["valueQuantity"]["code"], "[lb_av]");
    let back = import(text.as_bytes(), "2026-02-02T00:00:00Z");
    assert_eq!(back.charts.len(), 1);
    assert_eq!(&back.charts[0], c);

    // The IPS lists no negated or erroneous fact.
    let ips = ips_bundle(c, &[], "P", "2026-01-01T00:00:00Z");
    assert_references_resolve(&ips);
    let t = ips.to_string();
    for absent in [
        "E11.9",
        "195967001",
        "Warfarin",
        "Ibuprofen",
        "Lisinopril",
        "\"141\"",
        "\"133\"",
        ":400",
    ] {
        assert!(!t.contains(absent), "the IPS shows {absent}");
    }
    assert!(t.contains("Metoprolol") && t.contains("59621000"));
    // Nor does the patient copy.
    let html = crate::patient_copy::html(c, &[], "P", "2026-01-01T00:00:00Z");
    for absent in [
        "Type 2 diabetes",
        "Asthma",
        "Warfarin",
        "Ibuprofen",
        "Lisinopril",
        "Influenza",
        "Pneumococcal",
        ">400 ",
        "Appendectomy",
    ] {
        assert!(!html.contains(absent), "the patient copy shows {absent}");
    }
    assert!(
        html.contains("Metoprolol") && html.contains("Colonoscopy") && html.contains("&gt; 1.2")
    );
}

#[test]
fn a_deceased_patient_is_exported_deceased_and_has_no_current_medications() {
    let r = import(&fixture("deceased.json"), "2026-01-01T00:00:00Z");
    let c = &r.charts[0];
    assert_eq!(
        c.patient.deceased_date.as_deref(),
        Some("2008-11-23T04:10:00+01:00")
    );
    assert_eq!(c.patient.birth_date, "1931-02");
    assert_eq!(c.medications.len(), 2);
    let b = chart_to_bundle(c, &[]);
    assert_eq!(
        resources_of(&b, "Patient")[0]["deceasedDateTime"],
        "2008-11-23T04:10:00+01:00"
    );
    let ips = ips_bundle(c, &[], "P", "2026-01-01T00:00:00Z");
    assert!(resources_of(&ips, "MedicationStatement").is_empty());
    assert!(ips.to_string().contains("the patient has died"));
}

#[test]
fn a_byte_order_mark_partial_dates_and_ndjson_are_read() {
    let r = import(&fixture("bom-partial-dates.json"), "2026-01-01T00:00:00Z");
    assert!(r.fatal.is_none(), "{:?}", r.fatal);
    let c = &r.charts[0];
    assert_eq!(c.patient.birth_date, "1975");
    assert_eq!(c.conditions[0].onset.as_deref(), Some("2011"));
    assert_eq!(c.immunizations[0].date, "2011-05");
    let mut nd = fixture("bulk/Patient.ndjson");
    nd.extend(fixture("bulk/Condition.ndjson"));
    let r = import(&nd, "2026-01-01T00:00:00Z");
    assert!(r.fatal.is_none(), "{:?}", r.fatal);
    assert_eq!(r.charts.len(), 2);
    assert_eq!(r.charts[0].conditions.len(), 1);
    assert!(r.charts[1].patient.deceased);
    assert_eq!(r.resources[2].at, "line 3");
    // Lines whose patient is elsewhere become orphans, named by reference.
    let r = import(&fixture("bulk/Observation.ndjson"), "2026-01-01T00:00:00Z");
    assert_eq!(r.orphans.len(), 2);
    assert_eq!(
        r.orphans[0].target,
        PatientRef::Reference("Patient/bulk-p1".into())
    );
    let r = import(&fixture("lone-observation.json"), "2026-01-01T00:00:00Z");
    assert_eq!(
        r.orphans[0].target,
        PatientRef::Identifier {
            system: Some("http://northside-hospital.example.org/mrn".into()),
            value: "12345".into()
        }
    );
}

#[test]
fn context_resources_are_used_but_not_reported() {
    let r = import_with_context(&fixture("negation.json"), "2026-01-01T00:00:00Z", 1);
    assert_eq!(r.charts.len(), 1);
    assert!(r.resources.iter().all(|x| x.resource_type != "Patient"));
    assert_eq!(r.resources.len(), 26);
}

#[test]
fn bad_entries_are_reported_and_the_rest_imports() {
    let bundle = serde_json::json!({"resourceType":"Bundle","type":"transaction","entry":[
        {"fullUrl":"urn:uuid:p1","resource":{"resourceType":"Patient","id":"p1","name":[{"family":"Ng"}],"birthDate":"1970-01-01"}},
        {"resource":{"resourceType":"Condition","subject":{"reference":"urn:uuid:nobody"},"code":{"coding":[{"code":"I10"}]}}},
        {"resource":{"resourceType":"Frobnicator","subject":{"reference":"urn:uuid:p1"}}},
        {"resource":{"resourceType":"Claim"}},
        {"resource":{"resourceType":"Condition","subject":{"reference":"urn:uuid:p1"},"code":{"coding":[{"code":"E11.9","system":"http://hl7.org/fhir/sid/icd-10"}]}}}]});
    let r = import(
        &serde_json::to_vec(&bundle).unwrap(),
        "2026-01-01T00:00:00Z",
    );
    let s = r.summary();
    assert_eq!(
        s["Condition"],
        TypeCounts {
            mapped: 1,
            skipped: 0,
            errors: 1
        }
    );
    assert_eq!(s["Frobnicator"].errors, 1);
    assert_eq!(s["Claim"].skipped, 1);
    assert_eq!(r.charts[0].conditions.len(), 1);
    let dangling = r.resources.iter().find(|x| x.at == "entry[1]").unwrap();
    assert!(
        dangling.reason.as_ref().unwrap().contains("dangling"),
        "{dangling:?}"
    );
}

#[test]
fn not_json_and_not_fhir_are_fatal_with_a_reason() {
    assert!(
        import(b"{not json", "2026-01-01T00:00:00Z")
            .fatal
            .unwrap()
            .contains("not valid JSON")
    );
    assert!(
        import(b"[1,2]", "2026-01-01T00:00:00Z")
            .fatal
            .unwrap()
            .contains("not an object")
    );
    assert!(
        import(b"{\"a\":1}", "2026-01-01T00:00:00Z")
            .fatal
            .unwrap()
            .contains("resourceType")
    );
}

#[test]
fn referrals_between_practices_round_trip_through_a_bundle() {
    use crate::referral::{Event, Referral, Step};
    let mut c = chart();
    let ev = |step, at: &str, p: &str| Event {
        step,
        at: at.into(),
        by: "x".into(),
        practice: p.into(),
        note_id: None,
    };
    c.referrals.insert(
        "ref-1".into(),
        Referral {
            id: "ref-1".into(),
            from: "AAAA".into(),
            to: "BBBB".into(),
            reason: "murmur".into(),
            specialty: Some("cardiology".into()),
            requested: "2026-01-01T00:00:00.000Z".into(),
            requested_by: "Dr A".into(),
            events: vec![
                ev(Step::Request, "2026-01-01T00:00:00.000Z", "AAAA"),
                ev(Step::Accept, "2026-01-02T00:00:00.000Z", "BBBB"),
            ],
        },
    );
    let b = chart_to_bundle(&c, &[]);
    let sr = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["id"] == "chart-000001-ref-1")
        .unwrap();
    assert_eq!(sr["resource"]["status"], "active");
    assert_eq!(sr["resource"]["performerType"]["text"], "cardiology");
    let back = import(&serde_json::to_vec(&b).unwrap(), "2026-01-01T00:00:00Z");
    assert!(back.fatal.is_none());
    assert_eq!(back.charts[0].referrals, c.referrals);
    assert_eq!(back.charts[0], c);
}

#[test]
fn two_identical_resources_are_two_entries() {
    let bundle = serde_json::json!({"resourceType":"Bundle","type":"collection","entry":[
        {"fullUrl":"urn:uuid:p1","resource":{"resourceType":"Patient","id":"p1","name":[{"family":"Ng"}],"birthDate":"1970-01-01"}},
        {"resource":{"resourceType":"Observation","status":"final","subject":{"reference":"urn:uuid:p1"},"code":{"coding":[{"system":"http://loinc.org","code":"72514-3"}]},"effectiveDateTime":"2024-01-01T10:00:00Z","valueQuantity":{"value":2,"unit":"{score}"}}},
        {"resource":{"resourceType":"Observation","status":"final","subject":{"reference":"urn:uuid:p1"},"code":{"coding":[{"system":"http://loinc.org","code":"72514-3"}]},"effectiveDateTime":"2024-01-01T10:00:00Z","valueQuantity":{"value":2,"unit":"{score}"}}}]});
    let r = import(
        &serde_json::to_vec(&bundle).unwrap(),
        "2026-01-01T00:00:00Z",
    );
    assert_eq!(r.charts[0].observations.len(), 2);
}
