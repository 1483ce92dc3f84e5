use super::*;

fn chart(allergies: &[&str], meds: &[&str]) -> Chart {
    let a: Vec<String> = allergies
        .iter()
        .map(|s| format!(r#"{{"substance":"{s}","reaction":"Rash","severity":"moderate"}}"#))
        .collect();
    let m: Vec<String> = meds
        .iter()
        .map(|s| format!(r#"{{"name":"{s}","dose":"10 mg","status":"active"}}"#))
        .collect();
    let j = format!(
        r#"{{"id":"c1","type":"chart","schemaVersion":1,"patient":{{"mrn":"M","name":{{"family":"F"}},"birthDate":"1970-01-01"}},"allergies":[{}],"medications":[{}],"createdAt":"2020-01-01T00:00:00Z","updatedAt":"2020-01-01T00:00:00Z"}}"#,
        a.join(","),
        m.join(",")
    );
    Chart::from_json_slice(j.as_bytes()).unwrap()
}

fn med(name: &str) -> Medication {
    Medication {
        name: name.into(),
        code: None,
        system: None,
        dose: Some("5 mg".into()),
        route: None,
        frequency: None,
        start: None,
        status: Some("active".into()),
        ..Default::default()
    }
}

fn kinds(allergies: &[&str], meds: &[&str], new: &str) -> Vec<(AlertKind, String)> {
    check_new_medication(&chart(allergies, meds), &med(new))
        .into_iter()
        .map(|a| (a.kind, a.with))
        .collect()
}

#[test]
fn allergy_classes_fire_and_safe_combinations_do_not() {
    // (allergy, new drug) that must alert.
    for (allergy, drug) in [
        ("Penicillin", "Amoxicillin"),
        ("Penicillin", "Amoxicillin 500 mg capsule"),
        ("Amoxicillin", "Ampicillin"),
        ("Sulfonamides", "Sulfamethoxazole"),
        ("Sulfa", "Bactrim"),
        ("Aspirin", "Ibuprofen"),
        ("NSAIDs", "Naproxen"),
        ("Ibuprofen", "Diclofenac"),
        ("Codeine", "Oxycodone"),
        ("Codeine", "Codeine"),
        ("Morphine", "Tramadol"),
        ("Penicillin", "Cephalexin"),
    ] {
        let k = kinds(&[allergy], &[], drug);
        assert!(
            k.iter()
                .any(|(kind, with)| *kind == AlertKind::Allergy && with == allergy),
            "{allergy} allergy and {drug}: expected an alert, got {k:?}"
        );
    }
    // (allergy, new drug) that must not alert.
    for (allergy, drug) in [
        ("Sulfonamides", "Ferrous sulfate"),
        ("Penicillin", "Azithromycin"),
        ("Aspirin", "Paracetamol"),
        ("Codeine", "Ibuprofen"),
        ("Peanuts", "Amoxicillin"),
        ("Latex", "Lisinopril"),
        ("Shellfish", "Levothyroxine"),
        ("Eggs", "Metformin"),
    ] {
        let k = kinds(&[allergy], &[], drug);
        assert!(
            k.is_empty(),
            "{allergy} allergy and {drug}: expected no alert, got {k:?}"
        );
    }
}

#[test]
fn interactions_fire_both_ways_and_unrelated_drugs_do_not() {
    for (a, b) in [
        ("Warfarin", "Ibuprofen"),
        ("Warfarin", "Clarithromycin"),
        ("Sertraline", "Ibuprofen"),
        ("Sertraline", "Sumatriptan"),
        ("Lisinopril", "Spironolactone"),
        ("Nitroglycerin", "Sildenafil"),
        ("Oxycodone", "Diazepam"),
        ("Simvastatin", "Clarithromycin"),
        ("Lisinopril", "Naproxen"),
    ] {
        for (have, new) in [(a, b), (b, a)] {
            let k = kinds(&[], &[have], new);
            assert!(
                k.iter()
                    .any(|(kind, with)| *kind == AlertKind::Interaction && with == have),
                "{have} then {new}: expected an interaction, got {k:?}"
            );
        }
    }
    for (have, new) in [
        ("Levothyroxine", "Atorvastatin"),
        ("Metformin", "Lisinopril"),
        ("Amlodipine", "Omeprazole"),
        ("Sertraline", "Amoxicillin"),
        ("Warfarin", "Paracetamol"),
    ] {
        let k = kinds(&[], &[have], new);
        assert!(
            k.is_empty(),
            "{have} then {new}: expected nothing, got {k:?}"
        );
    }
}

#[test]
fn duplicate_therapy_by_drug_and_by_class() {
    let k = kinds(&[], &["Ibuprofen"], "Naproxen");
    assert!(
        k.contains(&(AlertKind::DuplicateTherapy, "Ibuprofen".into())),
        "{k:?}"
    );
    let k = kinds(&[], &["Atorvastatin"], "Atorvastatin");
    assert!(
        k.contains(&(AlertKind::DuplicateTherapy, "Atorvastatin".into())),
        "{k:?}"
    );
    // A stopped medication is not active: no duplicate.
    let mut c = chart(&[], &["Atorvastatin"]);
    c.medications[0].status = Some("stopped".into());
    assert!(check_new_medication(&c, &med("Simvastatin")).is_empty());
}

#[test]
fn standing_alerts_cover_every_active_medication_once() {
    let c = chart(&["Penicillin"], &["Amoxicillin", "Warfarin", "Ibuprofen"]);
    let all = chart_alerts(&c);
    assert_eq!(
        all.iter().filter(|a| a.kind == AlertKind::Allergy).count(),
        1
    );
    assert_eq!(
        all.iter()
            .filter(|a| a.kind == AlertKind::Interaction)
            .count(),
        1
    );
    let mut keys: Vec<&str> = all.iter().map(|a| a.key.as_str()).collect();
    keys.dedup();
    assert_eq!(keys.len(), all.len(), "each alert once: {all:?}");
}

#[test]
fn negated_allergies_and_do_not_perform_orders_raise_no_alerts() {
    let chart = |allergy: &str, meds: &str| -> Chart {
        let j = format!(
            r#"{{"id":"c1","type":"chart","schemaVersion":2,"patient":{{"mrn":"M","name":{{"family":"F"}},"birthDate":"1970-01-01"}},"allergies":[{allergy}],"medications":[{meds}],"createdAt":"2020-01-01T00:00:00Z","updatedAt":"2020-01-01T00:00:00Z"}}"#
        );
        Chart::from_json_slice(j.as_bytes()).unwrap()
    };
    let amox = med("Amoxicillin");
    for v in [
        r#""verification":"refuted""#,
        r#""verification":"entered-in-error""#,
        r#""status":"resolved""#,
    ] {
        let c = chart(&format!(r#"{{"substance":"Penicillin",{v}}}"#), "");
        assert!(check_new_medication(&c, &amox).is_empty(), "{v}");
    }
    let c = chart(
        r#"{"substance":"Penicillin","verification":"confirmed"}"#,
        "",
    );
    assert!(!check_new_medication(&c, &amox).is_empty());
    // Warfarin recorded as "do not give" is not an active anticoagulant.
    let c = chart(
        "",
        r#"{"name":"Warfarin","status":"active","doNotPerform":true},{"name":"Ibuprofen","status":"active"}"#,
    );
    assert!(chart_alerts(&c).is_empty(), "{:?}", chart_alerts(&c));
    let c = chart(
        "",
        r#"{"name":"Warfarin","status":"active"},{"name":"Ibuprofen","status":"active"}"#,
    );
    assert!(!chart_alerts(&c).is_empty());
}
