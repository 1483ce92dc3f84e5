use super::*;

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

#[test]
fn export_uses_standard_systems_and_resolving_references() {
    let b = chart_to_bundle(&chart(), &[]);
    let entries = b["entry"].as_array().unwrap();
    let urls: Vec<&str> = entries
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().unwrap())
        .collect();
    assert!(urls.contains(&"Coverage") && urls.contains(&"ServiceRequest"));
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
    let ids: std::collections::HashSet<String> = entries
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap(),
                e["resource"]["id"].as_str().unwrap()
            )
        })
        .collect();
    let text = serde_json::to_string(&b).unwrap();
    for part in text.split("\"reference\":\"").skip(1) {
        let r = &part[..part.find('"').unwrap()];
        assert!(
            ids.contains(r),
            "reference {r} does not resolve inside the bundle"
        );
    }
}

#[test]
fn blood_pressure_components_become_two_observations() {
    let bundle = serde_json::json!({"resourceType":"Bundle","type":"collection","entry":[
        {"fullUrl":"urn:uuid:p1","resource":{"resourceType":"Patient","id":"p1","name":[{"family":"Ng"}],"birthDate":"1970-01-01"}},
        {"resource":{"resourceType":"Observation","status":"final","subject":{"reference":"urn:uuid:p1"},
          "code":{"coding":[{"system":"http://loinc.org","code":"85354-9"}]},"effectiveDateTime":"2024-01-01T10:00:00+02:00",
          "component":[{"code":{"coding":[{"system":"http://loinc.org","code":"8480-6"}]},"valueQuantity":{"value":120,"unit":"mm[Hg]"}},
                       {"code":{"coding":[{"system":"http://loinc.org","code":"8462-4"}]},"valueQuantity":{"value":80,"unit":"mm[Hg]"}}]}}]});
    let r = import(
        &serde_json::to_vec(&bundle).unwrap(),
        "2026-01-01T00:00:00Z",
    );
    let obs = &r.charts[0].observations;
    assert_eq!(obs.len(), 2);
    assert_eq!(obs[0].code, "8480-6");
    assert_eq!(obs[1].code, "8462-4");
    assert_eq!(obs[1].system.as_deref(), Some("LOINC"));
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
