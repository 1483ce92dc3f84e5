//! The International Patient Summary: a FHIR R4 `document` Bundle whose first entry is a
//! Composition (LOINC 60591-5) with the IPS sections, built from the same resources as the
//! chart's export Bundle. The problems, allergies and medications sections are always
//! present; with nothing to list they carry an empty reason instead of entries.
//!
//! A summary lists only what is true of the patient, each with its status: problems and
//! allergies that are not refuted or entered in error, medications that were taken or
//! prescribed (never a "do not give" order, a draft, a cancelled order or one entered in
//! error; none for a patient who has died), vaccines given, results that count.

use serde_json::{Value, json};

use super::{chart_to_bundle, patient_id};
use crate::chart::Chart;
use crate::doc::HistoryEntry;

const LOINC: &str = "http://loinc.org";
const EMPTY_REASON: &str = "http://terminology.hl7.org/CodeSystem/list-empty-reason";

/// (resource type, LOINC code, LOINC display, section title, always present)
const SECTIONS: &[(&str, &str, &str, &str, bool)] = &[
    (
        "Condition",
        "11450-4",
        "Problem list - Reported",
        "Problems",
        true,
    ),
    (
        "AllergyIntolerance",
        "48765-2",
        "Allergies and adverse reactions Document",
        "Allergies and Intolerances",
        true,
    ),
    (
        "Medication",
        "10160-0",
        "History of Medication use Narrative",
        "Medication Summary",
        true,
    ),
    (
        "Immunization",
        "11369-6",
        "History of Immunization Narrative",
        "Immunizations",
        false,
    ),
    (
        "Observation",
        "30954-2",
        "Relevant diagnostic tests/laboratory data Narrative",
        "Results",
        false,
    ),
];

fn xhtml(text: &str) -> Value {
    json!({
        "status": "generated",
        "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{text}</div>"),
    })
}

/// The IPS document of a chart, authored by `practice` at `now_ts` (RFC 3339).
pub fn ips_bundle(chart: &Chart, history: &[HistoryEntry], practice: &str, now_ts: &str) -> Value {
    let deceased = chart.patient.is_deceased();
    let mut current = chart.clone();
    current.conditions.retain(|c| c.is_fact());
    current.allergies.retain(|a| {
        !matches!(
            a.verification.as_deref(),
            Some("refuted") | Some("entered-in-error")
        )
    });
    current.medications.retain(|m| m.is_fact() && !deceased);
    current.immunizations.retain(|i| i.was_given());
    current.observations.retain(|o| o.is_evidence());
    let full = chart_to_bundle(&current, history);
    let pid = patient_id(&chart.id);
    let entries: Vec<Value> = full["entry"].as_array().cloned().unwrap_or_default();
    fn section_of(t: &str) -> &str {
        if t == "MedicationStatement" || t == "MedicationRequest" {
            "Medication"
        } else {
            t
        }
    }
    let kept: Vec<Value> = entries
        .into_iter()
        .filter(|e| {
            let t = e["resource"]["resourceType"].as_str().unwrap_or("");
            t == "Patient" || SECTIONS.iter().any(|s| s.0 == section_of(t))
        })
        .collect();
    let patient_url = kept
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Patient")
        .and_then(|e| e["fullUrl"].as_str())
        .unwrap_or_default()
        .to_string();
    let mut sections = Vec::new();
    for (rt, code, display, title, always) in SECTIONS {
        let refs: Vec<Value> = kept
            .iter()
            .filter(|e| section_of(e["resource"]["resourceType"].as_str().unwrap_or("")) == *rt)
            .map(|e| json!({ "reference": e["fullUrl"] }))
            .collect();
        if refs.is_empty() && !always {
            continue;
        }
        let mut s = json!({
            "title": title,
            "code": { "coding": [{ "system": LOINC, "code": code, "display": display }] },
        });
        if refs.is_empty() {
            if *rt == "Medication" && deceased {
                s["text"] = xhtml("No current medications: the patient has died.");
                s["emptyReason"] = json!({ "coding": [{ "system": EMPTY_REASON, "code": "closed", "display": "Closed" }] });
            } else {
                s["text"] = xhtml(&format!("No {} known.", title.to_lowercase()));
                s["emptyReason"] = json!({ "coding": [{ "system": EMPTY_REASON, "code": "nilknown", "display": "Nil Known" }] });
            }
        } else {
            s["text"] = xhtml(&format!("{} entries.", refs.len()));
            s["entry"] = Value::Array(refs);
        }
        sections.push(s);
    }
    let composition = json!({
        "resourceType": "Composition",
        "id": format!("{pid}-ips"),
        "status": "final",
        "type": { "coding": [{ "system": LOINC, "code": "60591-5", "display": "Patient summary Document" }] },
        "subject": { "reference": patient_url },
        "date": now_ts,
        "author": [{ "display": practice }],
        "title": "International Patient Summary",
        "section": sections,
    });
    let mut out = vec![json!({
        "fullUrl": super::entry_uuid(&chart.id, "ips"),
        "resource": composition,
    })];
    out.extend(kept);
    json!({
        "resourceType": "Bundle",
        "id": format!("{pid}-ips"),
        "identifier": { "system": "https://chartmesh.org/fhir/ips", "value": format!("{}@{now_ts}", chart.id) },
        "type": "document",
        "timestamp": now_ts,
        "entry": out,
    })
}
