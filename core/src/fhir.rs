//! FHIR R4 (4.0.1) in and out: a chart becomes one Bundle (Patient, Coverage, Condition,
//! AllergyIntolerance, MedicationStatement, Observation, Immunization, DocumentReference,
//! ServiceRequest, Provenance), and Bundles or single resources become charts.
//!
//! Owns: the mapping, both ways, and the per-resource account of an import (mapped, skipped
//! with a reason, or an error naming the entry). Must not touch: the store or files; the
//! daemon decides whether an imported chart is new, unchanged or adds to a stored one.
//!
//! The mapping works on `serde_json::Value` rather than a full typed FHIR model: chartmesh
//! reads a small, well-defined part of R4, and the export is checked by an independent R4
//! validator in the test suite. Fields of a chart that FHIR has no element for (the chart id,
//! its practice and timestamps, a referral's own status word) travel in extensions under
//! [`EXT`], so JSONL → FHIR → JSONL is exact.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::chart::{
    Address, Allergy, Chart, Condition, HumanName, Immunization, Insurance, Medication, Note,
    Observation, Patient, Referral,
};
use crate::doc::HistoryEntry;

/// Base URL of chartmesh's extensions and identifier systems.
pub const EXT: &str = "https://chartmesh.org/fhir";
const CHART_ID_SYSTEM: &str = "https://chartmesh.org/fhir/chart-id";
const MRN_SYSTEM: &str = "https://chartmesh.org/fhir/mrn";
const NOTE_ID_SYSTEM: &str = "https://chartmesh.org/fhir/note-id";
const DATA_ABSENT: &str = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";
const OBS_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const CONDITION_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
const UCUM: &str = "http://unitsofmeasure.org";

/// Code systems by the short names charts use, and their FHIR URIs.
const SYSTEMS: &[(&str, &str)] = &[
    ("ICD-10", "http://hl7.org/fhir/sid/icd-10"),
    ("ICD-10-CM", "http://hl7.org/fhir/sid/icd-10-cm"),
    ("SNOMED", "http://snomed.info/sct"),
    ("SNOMED-CT", "http://snomed.info/sct"),
    ("LOINC", "http://loinc.org"),
    ("RxNorm", "http://www.nlm.nih.gov/research/umls/rxnorm"),
    ("CVX", "http://hl7.org/fhir/sid/cvx"),
];

fn system_uri(short: &str) -> String {
    SYSTEMS
        .iter()
        .find(|(s, _)| *s == short)
        .map(|(_, u)| u.to_string())
        .unwrap_or_else(|| {
            if short.contains(':') {
                short.to_string()
            } else {
                format!("{EXT}/code-system/{short}")
            }
        })
}

fn system_short(uri: &str) -> String {
    if let Some(s) = uri.strip_prefix(&format!("{EXT}/code-system/")) {
        return s.to_string();
    }
    SYSTEMS
        .iter()
        .find(|(_, u)| *u == uri)
        .map(|(s, _)| s.to_string())
        .unwrap_or_else(|| uri.to_string())
}

// ---------------------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------------------

/// A FHIR id for the chart: the chart id when it is a valid FHIR id short enough to prefix
/// entry ids, else a digest of it. Stable: the same chart always gets the same ids.
pub fn patient_id(chart_id: &str) -> String {
    let ok = chart_id.len() <= 48
        && chart_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        chart_id.to_string()
    } else {
        use sha2::{Digest, Sha256};
        format!(
            "c-{}",
            &hex::encode(Sha256::digest(chart_id.as_bytes()))[..32]
        )
    }
}

fn ext_str(name: &str, v: &str) -> Value {
    json!({ "url": format!("{EXT}/{name}"), "valueString": v })
}

fn absent() -> Value {
    json!([{ "url": DATA_ABSENT, "valueCode": "unknown" }])
}

fn coding(system: &Option<String>, code: &str, display: &Option<String>) -> Value {
    let mut c = Map::new();
    if let Some(s) = system {
        c.insert("system".into(), system_uri(s).into());
    }
    c.insert("code".into(), code.into());
    if let Some(d) = display {
        c.insert("display".into(), d.clone().into());
    }
    Value::Object(c)
}

/// `"<number> <unit>"` when the number prints back exactly as written.
fn split_quantity(s: &str) -> Option<(serde_json::Number, &str)> {
    let (num, unit) = s.split_once(' ')?;
    let n: serde_json::Number = num.parse().ok()?;
    let mut printed = String::new();
    crate::canonical::write_canonical(&Value::Number(n.clone()), &mut printed);
    (printed == num && !unit.is_empty() && !unit.contains(' ')).then_some((n, unit))
}

/// One chart as a FHIR R4 Bundle of type `collection`. `history` (from the chart's document)
/// becomes Provenance: who changed the chart, at which practice, when.
pub fn chart_to_bundle(chart: &Chart, history: &[HistoryEntry]) -> Value {
    let pid = patient_id(&chart.id);
    let subject = json!({ "reference": format!("Patient/{pid}") });
    let mut entries: Vec<Value> = Vec::new();
    let mut push = |resource: Value| {
        let url = format!(
            "urn:chartmesh:{}/{}",
            resource["resourceType"].as_str().unwrap_or(""),
            resource["id"].as_str().unwrap_or("")
        );
        entries.push(json!({ "fullUrl": url, "resource": resource }));
    };

    // Patient, with the chart's own fields as extensions.
    let p = &chart.patient;
    let mut patient = json!({
        "resourceType": "Patient",
        "id": pid,
        "identifier": [
            { "system": CHART_ID_SYSTEM, "value": chart.id },
            { "use": "usual", "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR" }] },
              "system": MRN_SYSTEM, "value": p.mrn }
        ],
        "name": [ { "family": p.name.family } ],
        "birthDate": p.birth_date,
    });
    let mut ext = vec![
        ext_str("chart-created", &chart.created_at),
        ext_str("chart-updated", &chart.updated_at),
    ];
    if let Some(pr) = &chart.practice_id {
        ext.push(ext_str("chart-practice", pr));
    }
    patient["extension"] = Value::Array(ext);
    if !p.name.given.is_empty() {
        patient["name"][0]["given"] = json!(p.name.given);
    }
    if let Some(sex) = &p.sex {
        patient["gender"] = sex.clone().into();
    }
    if let Some(phone) = &p.phone {
        patient["telecom"] = json!([{ "system": "phone", "value": phone }]);
    }
    if let Some(a) = &p.address {
        let mut addr = Map::new();
        if !a.line.is_empty() {
            addr.insert("line".into(), json!(a.line));
        }
        for (k, v) in [
            ("city", &a.city),
            ("postalCode", &a.postal_code),
            ("country", &a.country),
        ] {
            if let Some(v) = v {
                addr.insert(k.into(), v.clone().into());
            }
        }
        patient["address"] = json!([Value::Object(addr)]);
    }
    push(patient);

    if let Some(ins) = &p.insurance {
        let mut cov = json!({
            "resourceType": "Coverage",
            "id": format!("{pid}-coverage"),
            "status": "active",
            "beneficiary": subject,
        });
        cov["payor"] = match &ins.provider {
            Some(name) => json!([{ "display": name }]),
            None => json!([{ "extension": absent() }]),
        };
        if let Some(m) = &ins.member_id {
            cov["subscriberId"] = m.clone().into();
        }
        if let Some(g) = &ins.group {
            cov["class"] = json!([{
                "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "group" }] },
                "value": g
            }]);
        }
        if let Some(v) = &ins.valid_until {
            cov["period"] = json!({ "end": v });
        }
        push(cov);
    }

    for (i, c) in chart.conditions.iter().enumerate() {
        let mut r = json!({
            "resourceType": "Condition",
            "id": format!("{pid}-cond-{i}"),
            "subject": subject,
            "code": { "coding": [coding(&c.system, &c.code, &c.display)] },
        });
        if let Some(d) = &c.display {
            r["code"]["text"] = d.clone().into();
        }
        if let Some(s) = &c.status {
            r["clinicalStatus"] =
                json!({ "coding": [{ "system": CONDITION_CLINICAL, "code": s }] });
        }
        if let Some(o) = &c.onset {
            r["onsetDateTime"] = o.clone().into();
        }
        push(r);
    }

    for (i, a) in chart.allergies.iter().enumerate() {
        let mut r = json!({
            "resourceType": "AllergyIntolerance",
            "id": format!("{pid}-allergy-{i}"),
            "patient": subject,
            "code": { "text": a.substance },
        });
        if a.reaction.is_some() || a.severity.is_some() {
            let mut reaction = match &a.reaction {
                Some(t) => json!({ "manifestation": [{ "text": t }] }),
                None => json!({ "manifestation": [{ "extension": absent() }] }),
            };
            if let Some(s) = &a.severity {
                reaction["severity"] = s.clone().into();
            }
            r["reaction"] = json!([reaction]);
        }
        if let Some(d) = &a.recorded {
            r["recordedDate"] = d.clone().into();
        }
        push(r);
    }

    for (i, m) in chart.medications.iter().enumerate() {
        let mut med = json!({ "text": m.name });
        if let Some(code) = &m.code {
            med["coding"] = json!([coding(&m.system, code, &Some(m.name.clone()))]);
        }
        let mut r = json!({
            "resourceType": "MedicationStatement",
            "id": format!("{pid}-med-{i}"),
            "status": m.status.clone().unwrap_or_else(|| "unknown".into()),
            "medicationCodeableConcept": med,
            "subject": subject,
        });
        if m.status.is_none() {
            r["_status"] = json!({ "extension": absent() });
        }
        let mut dosage = Map::new();
        if let Some(d) = &m.dose {
            match split_quantity(d) {
                Some((value, unit)) => {
                    dosage.insert(
                        "doseAndRate".into(),
                        json!([{ "doseQuantity": { "value": value, "unit": unit } }]),
                    );
                }
                None => {
                    dosage.insert("text".into(), d.clone().into());
                }
            }
        }
        if let Some(rt) = &m.route {
            dosage.insert("route".into(), json!({ "text": rt }));
        }
        if let Some(f) = &m.frequency {
            dosage.insert("timing".into(), json!({ "code": { "text": f } }));
        }
        if !dosage.is_empty() {
            r["dosage"] = json!([Value::Object(dosage)]);
        }
        if let Some(s) = &m.start {
            r["effectivePeriod"] = json!({ "start": s });
        }
        push(r);
    }

    for (i, o) in chart.observations.iter().enumerate() {
        let mut r = json!({
            "resourceType": "Observation",
            "id": format!("{pid}-obs-{i}"),
            "status": "final",
            "code": { "coding": [coding(&o.system, &o.code, &o.display)] },
            "subject": subject,
            "effectiveDateTime": o.date,
            "valueQuantity": { "value": o.value },
        });
        if let Some(d) = &o.display {
            r["code"]["text"] = d.clone().into();
        }
        if let Some(c) = &o.category {
            r["category"] = json!([{ "coding": [{ "system": OBS_CATEGORY, "code": c }] }]);
        }
        if let Some(u) = &o.unit {
            r["valueQuantity"]["unit"] = u.clone().into();
            r["valueQuantity"]["system"] = UCUM.into();
            r["valueQuantity"]["code"] = u.clone().into();
        }
        push(r);
    }

    for (i, n) in chart.notes.iter().enumerate() {
        use data_encoding::BASE64;
        push(json!({
            "resourceType": "DocumentReference",
            "id": format!("{pid}-note-{i}"),
            "identifier": [{ "system": NOTE_ID_SYSTEM, "value": n.id }],
            "status": "current",
            "type": { "coding": [{ "system": "http://loinc.org", "code": "11506-3", "display": "Progress note" }] },
            "subject": subject,
            "date": n.date,
            "author": [{ "display": n.author }],
            "content": [{ "attachment": {
                "contentType": "text/plain; charset=utf-8",
                "data": BASE64.encode(n.text.as_bytes()),
            } }],
        }));
    }

    for (i, im) in chart.immunizations.iter().enumerate() {
        let mut code = json!({ "text": im.vaccine });
        if let Some(c) = &im.code {
            code["coding"] = json!([coding(&im.system, c, &Some(im.vaccine.clone()))]);
        }
        let mut r = json!({
            "resourceType": "Immunization",
            "id": format!("{pid}-imm-{i}"),
            "status": "completed",
            "vaccineCode": code,
            "patient": subject,
            "occurrenceDateTime": im.date,
        });
        if let Some(l) = &im.lot {
            r["lotNumber"] = l.clone().into();
        }
        push(r);
    }

    if let Some(rf) = &chart.referral {
        let mut r = json!({
            "resourceType": "ServiceRequest",
            "id": format!("{pid}-referral"),
            "status": referral_status_to_fhir(rf.status.as_deref()),
            "intent": "order",
            "category": [{ "coding": [{ "system": "http://snomed.info/sct", "code": "3457005", "display": "Patient referral" }] }],
            "subject": subject,
            "performer": [{ "display": rf.to }],
        });
        if let Some(s) = &rf.status {
            r["extension"] = json!([ext_str("referral-status", s)]);
        }
        if let Some(reason) = &rf.reason {
            r["reasonCode"] = json!([{ "text": reason }]);
        }
        if let Some(d) = &rf.date {
            r["authoredOn"] = d.clone().into();
        }
        push(r);
    }

    // Referrals between practices (chartmesh refer): one ServiceRequest each, the practices as
    // identifiers, the whole record (with its steps) in an extension so it imports back whole.
    for (rid, rf) in &chart.referrals {
        let practice = |p: &str| json!({ "identifier": { "system": format!("{EXT}/practice-id"), "value": p } });
        let mut r = json!({
            "resourceType": "ServiceRequest",
            "id": format!("{pid}-{rid}"),
            "identifier": [{ "system": format!("{EXT}/referral-id"), "value": rid }],
            "status": match rf.status() {
                crate::referral::Status::Requested | crate::referral::Status::Accepted => "active",
                crate::referral::Status::Completed => "completed",
                crate::referral::Status::Declined | crate::referral::Status::Cancelled => "revoked",
            },
            "intent": "order",
            "category": [{ "coding": [{ "system": "http://snomed.info/sct", "code": "3457005", "display": "Patient referral" }] }],
            "subject": subject,
            "authoredOn": rf.requested,
            "requester": practice(&rf.from),
            "performer": [practice(&rf.to)],
            "reasonCode": [{ "text": rf.reason }],
            "extension": [
                ext_str("referral-status", rf.status().as_str()),
                ext_str("referral-record", &serde_json::to_string(rf).expect("referrals serialize")),
            ],
        });
        if let Some(sp) = &rf.specialty {
            r["performerType"] = json!({ "text": sp });
        }
        push(r);
    }

    // Provenance: one per change of the chart's history, naming the author and practice.
    let targets: Vec<Value> = vec![json!({ "reference": format!("Patient/{pid}") })];
    for (i, h) in history.iter().enumerate() {
        let recorded = rfc3339_ms(h.time_ms);
        let mut agent = json!({
            "who": { "display": h.author.clone().unwrap_or_else(|| "unknown".into()) },
        });
        if let Some(p) = &h.practice {
            agent["onBehalfOf"] =
                json!({ "identifier": { "system": format!("{EXT}/practice-id"), "value": p } });
        }
        let mut prov = json!({
            "resourceType": "Provenance",
            "id": format!("{pid}-prov-{i}"),
            "target": targets,
            "recorded": recorded,
            "agent": [agent],
        });
        if let Some(a) = &h.action {
            prov["activity"] = json!({ "text": a });
        }
        push(prov);
    }

    json!({
        "resourceType": "Bundle",
        "id": format!("{pid}-bundle"),
        "type": "collection",
        "entry": entries,
    })
}

fn referral_status_to_fhir(s: Option<&str>) -> &'static str {
    match s {
        Some("pending") | Some("draft") => "draft",
        Some("sent") | Some("accepted") | Some("active") => "active",
        Some("completed") => "completed",
        Some("cancelled") | Some("declined") | Some("revoked") => "revoked",
        Some("on-hold") => "on-hold",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------

/// What became of one resource of an import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Mapped into a chart.
    Mapped,
    /// Deliberately not mapped; `reason` says why.
    Skipped,
    /// Could not be read; `reason` says what was wrong. The rest still imports.
    Error,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceReport {
    /// Where in the input: `entry[3]`, or `resource` for a single resource.
    pub at: String,
    pub resource_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Counts per resource type.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TypeCounts {
    pub mapped: usize,
    pub skipped: usize,
    pub errors: usize,
}

/// A parsed FHIR input: the charts it describes and an account of every resource.
#[derive(Debug, Default)]
pub struct FhirImport {
    pub charts: Vec<Chart>,
    pub resources: Vec<ResourceReport>,
    /// An error that stopped the whole input from being read (not JSON, not FHIR).
    pub fatal: Option<String>,
}

impl FhirImport {
    pub fn summary(&self) -> BTreeMap<String, TypeCounts> {
        let mut m: BTreeMap<String, TypeCounts> = BTreeMap::new();
        for r in &self.resources {
            let c = m.entry(r.resource_type.clone()).or_default();
            match r.outcome {
                Outcome::Mapped => c.mapped += 1,
                Outcome::Skipped => c.skipped += 1,
                Outcome::Error => c.errors += 1,
            }
        }
        m
    }
}

/// Whether a JSON document looks like FHIR (an object with a `resourceType`).
pub fn looks_like_fhir(first_value: &Value) -> bool {
    first_value.get("resourceType").is_some()
}

/// Reasons for resource types that are read but not mapped into a chart.
fn skip_reason(rt: &str) -> Option<&'static str> {
    Some(match rt {
        "Encounter" => {
            "encounters are not part of the chart model; their dates travel on the entries that refer to them"
        }
        "Practitioner" | "PractitionerRole" => {
            "directory entry: used only to name the authors of notes"
        }
        "Organization" | "Location" => "directory entry, not patient data",
        "Claim" | "ExplanationOfBenefit" => "billing record, not part of the clinical chart",
        "DiagnosticReport" => "report wrapper: its results are imported from their Observations",
        "Provenance" => "chartmesh keeps its own change history and exports it as Provenance",
        "Medication" => "used only when a MedicationRequest/Statement refers to it",
        "CarePlan" | "CareTeam" | "Goal" => "care planning is not part of the chart model",
        "Procedure" => "procedures are not part of the chart model",
        "Device" | "SupplyDelivery" | "ImagingStudy" | "MedicationAdministration" => {
            "not part of the chart model"
        }
        _ => return None,
    })
}

/// Parses a FHIR R4 Bundle (collection, transaction, batch, searchset, document) or a single
/// resource. Never fails as a whole for a bad entry: each is reported and the rest imports.
pub fn import(bytes: &[u8], now_ts: &str) -> FhirImport {
    let mut out = FhirImport::default();
    let v: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            out.fatal = Some(format!(
                "not valid JSON (line {}, column {}): {e}; a FHIR file holds one JSON object, a Bundle or a single resource",
                e.line(),
                e.column()
            ));
            return out;
        }
    };
    let Some(obj) = v.as_object() else {
        out.fatal = Some(
            "the file is JSON but not an object; a FHIR file holds a Bundle or a single resource"
                .into(),
        );
        return out;
    };
    let Some(rt) = obj.get("resourceType") else {
        out.fatal = Some("no resourceType: this is not a FHIR resource (for chart JSONL, one chart per line, use --format jsonl)".into());
        return out;
    };
    let Some(rt) = rt.as_str() else {
        out.fatal = Some("resourceType must be a string".into());
        return out;
    };
    let mut items: Vec<(String, Option<String>, Value)> = Vec::new();
    if rt == "Bundle" {
        match obj.get("type").and_then(|t| t.as_str()) {
            Some(
                "collection"
                | "transaction"
                | "batch"
                | "searchset"
                | "document"
                | "transaction-response"
                | "batch-response"
                | "history"
                | "message",
            ) => {}
            Some(other) => {
                out.fatal = Some(format!(
                    "Bundle.type {other:?} is not an R4 bundle type (collection, transaction, batch, searchset, document, ...)"
                ));
                return out;
            }
            None => {
                out.fatal = Some(
                    "Bundle has no type (collection, transaction, batch, searchset or document)"
                        .into(),
                );
                return out;
            }
        }
        let entries = match obj.get("entry") {
            None => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => {
                out.fatal = Some("Bundle.entry must be an array of entries".into());
                return out;
            }
        };
        for (i, e) in entries.into_iter().enumerate() {
            let at = format!("entry[{i}]");
            let full_url = e
                .get("fullUrl")
                .and_then(|u| u.as_str())
                .map(str::to_string);
            match e.get("resource") {
                Some(r) if r.is_object() => items.push((at, full_url, r.clone())),
                Some(_) => {
                    out.resources
                        .push(err_report(&at, "?", None, "resource is not a JSON object"))
                }
                None => out
                    .resources
                    .push(err_report(&at, "?", None, "entry has no resource")),
            }
        }
    } else {
        items.push(("resource".into(), None, v.clone()));
    }
    Importer { now_ts }.run(items, &mut out);
    out
}

fn err_report(at: &str, rt: &str, id: Option<String>, reason: impl Into<String>) -> ResourceReport {
    ResourceReport {
        at: at.into(),
        resource_type: rt.into(),
        id,
        outcome: Outcome::Error,
        reason: Some(reason.into()),
    }
}

struct Importer<'a> {
    /// Stands in for a missing chart timestamp.
    now_ts: &'a str,
}

/// A chart under construction and the keys under which resources refer to its patient.
struct Draft {
    chart: Chart,
}

type EntryResult = Result<(), String>;

impl<'a> Importer<'a> {
    fn run(&self, items: Vec<(String, Option<String>, Value)>, out: &mut FhirImport) {
        // Pass 1: patients, and every resource's reference keys (for authors and dangling checks).
        let mut drafts: Vec<Draft> = Vec::new();
        let mut patient_keys: HashMap<String, usize> = HashMap::new();
        let mut practitioners: HashMap<String, String> = HashMap::new();
        let mut known_refs: std::collections::HashSet<String> = Default::default();
        for (_, full_url, r) in &items {
            let rt = r.get("resourceType").and_then(|x| x.as_str()).unwrap_or("");
            let id = r.get("id").and_then(|x| x.as_str());
            if let Some(u) = full_url {
                known_refs.insert(u.clone());
            }
            if let Some(id) = id {
                known_refs.insert(format!("{rt}/{id}"));
            }
            if rt == "Practitioner"
                && let Some(name) = human_name_text(r)
            {
                if let Some(u) = full_url {
                    practitioners.insert(u.clone(), name.clone());
                }
                if let Some(id) = id {
                    practitioners.insert(format!("Practitioner/{id}"), name.clone());
                }
                // Synthea refers to practitioners by identifier search.
                if let Some(ids) = r.get("identifier").and_then(|x| x.as_array()) {
                    for i in ids {
                        if let (Some(s), Some(v)) = (i["system"].as_str(), i["value"].as_str()) {
                            practitioners
                                .insert(format!("Practitioner?identifier={s}|{v}"), name.clone());
                        }
                    }
                }
            }
        }
        let mut pending: Vec<(usize, String, &Value)> = Vec::new();
        for (idx, (at, full_url, r)) in items.iter().enumerate() {
            let rt = match r.get("resourceType") {
                Some(Value::String(s)) => s.as_str(),
                Some(_) => {
                    out.resources
                        .push(err_report(at, "?", None, "resourceType must be a string"));
                    continue;
                }
                None => {
                    out.resources
                        .push(err_report(at, "?", None, "resource has no resourceType"));
                    continue;
                }
            };
            let id = r.get("id").and_then(|x| x.as_str()).map(str::to_string);
            if rt == "Patient" {
                match self.patient(r) {
                    Ok(chart) => {
                        let n = drafts.len();
                        if let Some(u) = full_url {
                            patient_keys.insert(u.clone(), n);
                        }
                        if let Some(id) = &id {
                            patient_keys.insert(format!("Patient/{id}"), n);
                        }
                        drafts.push(Draft { chart });
                        out.resources.push(ResourceReport {
                            at: at.clone(),
                            resource_type: rt.into(),
                            id,
                            outcome: Outcome::Mapped,
                            reason: None,
                        });
                    }
                    Err(e) => out.resources.push(err_report(at, rt, id, e)),
                }
            } else {
                pending.push((idx, rt.to_string(), r));
            }
        }
        // Pass 2: everything that belongs to a patient.
        for (idx, rt, r) in pending {
            let at = &items[idx].0;
            let id = r.get("id").and_then(|x| x.as_str()).map(str::to_string);
            let report = |outcome: Outcome, reason: Option<String>| ResourceReport {
                at: at.clone(),
                resource_type: rt.clone(),
                id: id.clone(),
                outcome,
                reason,
            };
            let clinical = matches!(
                rt.as_str(),
                "Condition"
                    | "AllergyIntolerance"
                    | "MedicationRequest"
                    | "MedicationStatement"
                    | "Observation"
                    | "Immunization"
                    | "ServiceRequest"
                    | "DocumentReference"
                    | "Composition"
                    | "Coverage"
            );
            if !clinical {
                let reason = match skip_reason(&rt) {
                    Some(r) => r.to_string(),
                    None if is_r4_resource(&rt) => format!("{rt} is not mapped by chartmesh"),
                    None => {
                        out.resources.push(report(
                            Outcome::Error,
                            Some(format!("unknown resourceType {rt:?}: not an R4 resource")),
                        ));
                        continue;
                    }
                };
                out.resources.push(report(Outcome::Skipped, Some(reason)));
                continue;
            }
            let subject_field = match rt.as_str() {
                "AllergyIntolerance" | "Immunization" => "patient",
                "Coverage" => "beneficiary",
                _ => "subject",
            };
            let target = match r.get(subject_field) {
                None => {
                    // A lone resource in a bundle with exactly one patient belongs to it.
                    if drafts.len() == 1 {
                        Ok(0)
                    } else {
                        Err(format!(
                            "{rt}.{subject_field} is missing: no patient to file it under"
                        ))
                    }
                }
                Some(s) => match s.get("reference").and_then(|x| x.as_str()) {
                    Some(reference) => match patient_keys.get(reference) {
                        Some(n) => Ok(*n),
                        None if known_refs.contains(reference) => Err(format!(
                            "{rt}.{subject_field} refers to {reference}, which is not a Patient"
                        )),
                        None => Err(format!(
                            "{rt}.{subject_field} refers to {reference}, which is not in this bundle (dangling reference)"
                        )),
                    },
                    None => Err(format!("{rt}.{subject_field} has no reference")),
                },
            };
            let n = match target {
                Ok(n) => n,
                Err(e) => {
                    out.resources.push(report(Outcome::Error, Some(e)));
                    continue;
                }
            };
            let chart = &mut drafts[n].chart;
            let res = match rt.as_str() {
                "Condition" => self.condition(r, chart),
                "AllergyIntolerance" => self.allergy(r, chart),
                "MedicationRequest" | "MedicationStatement" => self.medication(r, &rt, chart),
                "Observation" => self.observation(r, chart),
                "Immunization" => self.immunization(r, chart),
                "ServiceRequest" => self.referral(r, chart),
                "DocumentReference" => self.document(r, chart, &practitioners),
                "Composition" => self.composition(r, chart, &practitioners),
                "Coverage" => self.coverage(r, chart),
                _ => unreachable!("clinical types listed above"),
            };
            match res {
                Ok(()) => out.resources.push(report(Outcome::Mapped, None)),
                Err(e) if e.starts_with("skip: ") => out
                    .resources
                    .push(report(Outcome::Skipped, Some(e[6..].to_string()))),
                Err(e) => out.resources.push(report(Outcome::Error, Some(e))),
            }
        }
        for d in drafts {
            out.charts.push(d.chart);
        }
    }

    fn patient(&self, r: &Value) -> Result<Chart, String> {
        let ids = match r.get("identifier") {
            None => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err("Patient.identifier must be an array".into()),
        };
        let ident = |pred: &dyn Fn(&Value) -> bool| {
            ids.iter()
                .find(|i| pred(i))
                .and_then(|i| i["value"].as_str())
                .map(str::to_string)
        };
        let chart_id = ident(&|i| i["system"] == CHART_ID_SYSTEM);
        let mrn = ident(&|i| i["system"] == MRN_SYSTEM)
            .or_else(|| {
                ident(&|i| {
                    i["type"]["coding"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|c| c["code"] == "MR"))
                })
            })
            .or_else(|| ident(&|_| true))
            .or_else(|| r.get("id").and_then(|x| x.as_str()).map(str::to_string))
            .ok_or("Patient has neither an identifier nor an id to use as the MRN")?;
        let chart_id = match chart_id {
            Some(c) => c,
            None => {
                let base = r.get("id").and_then(|x| x.as_str()).unwrap_or(&mrn);
                let clean: String = base
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .take(100)
                    .collect();
                format!("fhir-{clean}")
            }
        };
        let names = match r.get("name") {
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err("Patient.name must be an array of HumanName".into()),
            None => {
                return Err(
                    "Patient.name is missing: a chart needs the patient's family name".into(),
                );
            }
        };
        let name = names
            .iter()
            .find(|n| n["use"] == "official")
            .or_else(|| names.first())
            .ok_or("Patient.name is empty")?;
        let family = name["family"]
            .as_str()
            .ok_or("Patient.name.family is missing or not a string")?
            .to_string();
        let given = match &name["given"] {
            Value::Null => Vec::new(),
            Value::Array(g) => g
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or("Patient.name.given must hold strings")
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err("Patient.name.given must be an array of strings".into()),
        };
        let birth = r
            .get("birthDate")
            .and_then(|x| x.as_str())
            .ok_or("Patient.birthDate is missing: a chart needs the birth date")?;
        crate::chart::date("Patient.birthDate", birth).map_err(|e| e.to_string())?;
        let sex = match r.get("gender").and_then(|x| x.as_str()) {
            Some(g @ ("male" | "female" | "other" | "unknown")) => Some(g.to_string()),
            Some(g) => {
                return Err(format!(
                    "Patient.gender {g:?} is not male, female, other or unknown"
                ));
            }
            None => None,
        };
        let phone = r["telecom"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["system"] == "phone"))
            .and_then(|t| t["value"].as_str())
            .map(str::to_string);
        let address = r["address"]
            .as_array()
            .and_then(|a| a.first())
            .map(|a| Address {
                line: a["line"]
                    .as_array()
                    .map(|l| {
                        l.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                city: a["city"].as_str().map(str::to_string),
                postal_code: a["postalCode"].as_str().map(str::to_string),
                country: a["country"].as_str().map(str::to_string),
            });
        let ext = |name: &str| -> Option<String> {
            r["extension"].as_array().and_then(|e| {
                e.iter()
                    .find(|x| x["url"] == format!("{EXT}/{name}"))
                    .and_then(|x| x["valueString"].as_str())
                    .map(str::to_string)
            })
        };
        let chart = Chart {
            id: chart_id,
            kind: "chart".into(),
            schema_version: 1,
            practice_id: ext("chart-practice"),
            patient: Patient {
                mrn,
                name: HumanName { given, family },
                birth_date: birth.to_string(),
                sex,
                address,
                phone,
                insurance: None,
            },
            conditions: Vec::new(),
            allergies: Vec::new(),
            medications: Vec::new(),
            observations: Vec::new(),
            notes: Vec::new(),
            immunizations: Vec::new(),
            referral: None,
            referrals: Default::default(),
            created_at: ext("chart-created").unwrap_or_else(|| self.now_ts.to_string()),
            updated_at: ext("chart-updated").unwrap_or_else(|| self.now_ts.to_string()),
        };
        crate::ids::ChartId::parse(&chart.id).map_err(|e| e.to_string())?;
        Ok(chart)
    }

    fn coverage(&self, r: &Value, chart: &mut Chart) -> EntryResult {
        let provider = r["payor"]
            .as_array()
            .and_then(|p| p.first())
            .and_then(|p| p["display"].as_str())
            .map(str::to_string);
        let group = r["class"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"]["coding"][0]["code"] == "group"))
            .and_then(|c| c["value"].as_str())
            .map(str::to_string);
        let valid_until = opt_date_of(&r["period"]["end"], "Coverage.period.end")?;
        chart.patient.insurance = Some(Insurance {
            provider,
            member_id: r["subscriberId"].as_str().map(str::to_string),
            group,
            valid_until,
        });
        Ok(())
    }

    fn condition(&self, r: &Value, chart: &mut Chart) -> EntryResult {
        let (system, code, display) = code_of(&r["code"], "Condition.code")?;
        let status = r["clinicalStatus"]["coding"][0]["code"]
            .as_str()
            .map(str::to_string);
        let onset = opt_date_of(&r["onsetDateTime"], "Condition.onsetDateTime")?;
        let c = Condition {
            code,
            system,
            display,
            onset,
            status,
        };
        keep(
            &mut chart.conditions,
            c,
            crate::chart::Entry::Condition,
            "Condition",
        )?;
        Ok(())
    }

    fn allergy(&self, r: &Value, chart: &mut Chart) -> EntryResult {
        let code = &r["code"];
        if code.is_null() {
            return Err("AllergyIntolerance.code is missing: no substance".into());
        }
        let substance = code["text"]
            .as_str()
            .or_else(|| code["coding"][0]["display"].as_str())
            .or_else(|| code["coding"][0]["code"].as_str())
            .ok_or("AllergyIntolerance.code has neither text nor a coding")?
            .to_string();
        let reaction0 = &r["reaction"][0];
        let reaction = reaction0["manifestation"][0]["text"]
            .as_str()
            .or_else(|| reaction0["manifestation"][0]["coding"][0]["display"].as_str())
            .map(str::to_string);
        let severity = reaction0["severity"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                // R4 criticality as a fallback when no reaction severity is given.
                match r["criticality"].as_str() {
                    Some("high") => Some("severe".into()),
                    _ => None,
                }
            });
        let recorded = opt_date_of(&r["recordedDate"], "AllergyIntolerance.recordedDate")?;
        let a = Allergy {
            substance,
            reaction,
            severity,
            recorded,
        };
        keep(
            &mut chart.allergies,
            a,
            crate::chart::Entry::Allergy,
            "AllergyIntolerance",
        )?;
        Ok(())
    }

    fn medication(&self, r: &Value, rt: &str, chart: &mut Chart) -> EntryResult {
        let concept = &r["medicationCodeableConcept"];
        if concept.is_null() {
            if r.get("medicationReference").is_some() {
                return Err(format!(
                    "skip: {rt}.medicationReference is not followed; only medicationCodeableConcept is mapped"
                ));
            }
            return Err(format!(
                "{rt} has no medication (medicationCodeableConcept)"
            ));
        }
        let name = concept["text"]
            .as_str()
            .or_else(|| concept["coding"][0]["display"].as_str())
            .ok_or_else(|| {
                format!("{rt}.medicationCodeableConcept has neither text nor a coding display")
            })?
            .to_string();
        let code = concept["coding"][0]["code"].as_str().map(str::to_string);
        let system = concept["coding"][0]["system"].as_str().map(system_short);
        let status = if r.get("_status").is_some() {
            None
        } else {
            r["status"].as_str().map(str::to_string)
        };
        let dosage = if rt == "MedicationRequest" {
            &r["dosageInstruction"][0]
        } else {
            &r["dosage"][0]
        };
        let dq = &dosage["doseAndRate"][0]["doseQuantity"];
        let dose = match (&dq["value"], dq["unit"].as_str()) {
            (Value::Number(n), Some(u)) => {
                let mut s = String::new();
                crate::canonical::write_canonical(&Value::Number(n.clone()), &mut s);
                Some(format!("{s} {u}"))
            }
            (Value::Null, _) => dosage["text"].as_str().map(str::to_string),
            _ => return Err(format!("{rt} dose quantity must be a number with a unit")),
        };
        let route = dosage["route"]["text"]
            .as_str()
            .or_else(|| dosage["route"]["coding"][0]["display"].as_str())
            .map(str::to_string);
        let frequency = dosage["timing"]["code"]["text"]
            .as_str()
            .map(str::to_string);
        let start_v = if rt == "MedicationRequest" {
            &r["authoredOn"]
        } else if !r["effectivePeriod"]["start"].is_null() {
            &r["effectivePeriod"]["start"]
        } else {
            &r["effectiveDateTime"]
        };
        let start = opt_date_of(start_v, &format!("{rt} start date"))?;
        let m = Medication {
            name,
            code,
            system,
            dose,
            route,
            frequency,
            start,
            status,
        };
        keep(
            &mut chart.medications,
            m,
            crate::chart::Entry::Medication,
            rt,
        )?;
        Ok(())
    }

    fn observation(&self, r: &Value, chart: &mut Chart) -> EntryResult {
        let date = match &r["effectiveDateTime"] {
            Value::String(s) => timestamp_of(s, "Observation.effectiveDateTime")?,
            Value::Null => match r["effectivePeriod"]["start"].as_str() {
                Some(s) => timestamp_of(s, "Observation.effectivePeriod.start")?,
                None => match r["issued"].as_str() {
                    Some(s) => timestamp_of(s, "Observation.issued")?,
                    None => return Err("Observation has no effective time".into()),
                },
            },
            _ => return Err("Observation.effectiveDateTime must be a string".into()),
        };
        let category = r["category"][0]["coding"][0]["code"]
            .as_str()
            .map(str::to_string);
        // One observation from a resource or one of its components (`at` names it in errors).
        let one = |x: &Value, at: &str| -> Result<Observation, String> {
            let (system, code, display) = code_of(&x["code"], &format!("{at}.code"))?;
            let (value, unit) = quantity_of(&x["valueQuantity"], &format!("{at}.valueQuantity"))?;
            Ok(Observation {
                code,
                system,
                display,
                value,
                unit,
                category: category.clone(),
                date: date.clone(),
            })
        };
        let mut made = Vec::new();
        if !r["valueQuantity"].is_null() {
            made.push(one(r, "Observation")?);
        }
        if let Some(components) = r["component"].as_array() {
            for (i, c) in components.iter().enumerate() {
                if !c["valueQuantity"].is_null() {
                    made.push(one(c, &format!("Observation.component[{i}]"))?);
                }
            }
        }
        if made.is_empty() {
            let kind = r
                .as_object()
                .and_then(|o| o.keys().find(|k| k.starts_with("value")).cloned());
            return Err(format!(
                "skip: the value is not a quantity ({}); the chart keeps numeric results",
                kind.unwrap_or_else(|| "no value".into())
            ));
        }
        for o in made {
            keep(
                &mut chart.observations,
                o,
                crate::chart::Entry::Observation,
                "Observation",
            )?;
        }
        Ok(())
    }

    fn immunization(&self, r: &Value, chart: &mut Chart) -> EntryResult {
        let vc = &r["vaccineCode"];
        if vc.is_null() {
            return Err("Immunization.vaccineCode is missing".into());
        }
        let vaccine = vc["text"]
            .as_str()
            .or_else(|| vc["coding"][0]["display"].as_str())
            .ok_or("Immunization.vaccineCode has neither text nor a coding display")?
            .to_string();
        let date = match r["occurrenceDateTime"].as_str() {
            Some(s) => date_of(s, "Immunization.occurrenceDateTime")?,
            None => return Err("Immunization.occurrenceDateTime is missing".into()),
        };
        let i = Immunization {
            vaccine,
            code: vc["coding"][0]["code"].as_str().map(str::to_string),
            system: vc["coding"][0]["system"].as_str().map(system_short),
            date,
            lot: r["lotNumber"].as_str().map(str::to_string),
        };
        keep(
            &mut chart.immunizations,
            i,
            crate::chart::Entry::Immunization,
            "Immunization",
        )?;
        Ok(())
    }

    fn referral(&self, r: &Value, chart: &mut Chart) -> EntryResult {
        // A referral between practices made with chartmesh: its record comes back whole.
        let record = r["extension"].as_array().and_then(|e| {
            e.iter()
                .find(|x| x["url"] == format!("{EXT}/referral-record"))
                .and_then(|x| x["valueString"].as_str())
        });
        if let Some(record) = record {
            let rf: crate::referral::Referral = serde_json::from_str(record).map_err(|e| {
                format!("ServiceRequest: the chartmesh referral record is not valid: {e}")
            })?;
            if chart.referrals.get(&rf.id).is_some_and(|x| x != &rf) {
                return Err(format!(
                    "skip: the chart already holds referral {} with other steps",
                    rf.id
                ));
            }
            chart.referrals.insert(rf.id.clone(), rf);
            return Ok(());
        }
        let is_referral = r["category"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["coding"][0]["code"] == "3457005"))
            || r.get("performer").is_some();
        if !is_referral {
            return Err("skip: a ServiceRequest that is not a referral (no referral category, no performer)".into());
        }
        let to = r["performer"][0]["display"]
            .as_str()
            .or_else(|| r["performer"][0]["reference"].as_str())
            .ok_or("ServiceRequest.performer has no display or reference: whom is the patient referred to?")?
            .to_string();
        let status = r["extension"]
            .as_array()
            .and_then(|e| {
                e.iter()
                    .find(|x| x["url"] == format!("{EXT}/referral-status"))
            })
            .and_then(|x| x["valueString"].as_str())
            .map(str::to_string)
            .or_else(|| r["status"].as_str().map(str::to_string));
        let rf = Referral {
            to,
            reason: r["reasonCode"][0]["text"]
                .as_str()
                .or_else(|| r["reasonCode"][0]["coding"][0]["display"].as_str())
                .map(str::to_string),
            date: opt_date_of(&r["authoredOn"], "ServiceRequest.authoredOn")?,
            status,
        };
        if chart.referral.as_ref().is_some_and(|x| x != &rf) {
            return Err(
                "skip: the chart already holds a referral from this bundle; a chart keeps one"
                    .into(),
            );
        }
        chart.referral = Some(rf);
        Ok(())
    }

    fn document(
        &self,
        r: &Value,
        chart: &mut Chart,
        practitioners: &HashMap<String, String>,
    ) -> EntryResult {
        use data_encoding::BASE64;
        let att = &r["content"][0]["attachment"];
        if att.is_null() {
            return Err("DocumentReference.content[0].attachment is missing".into());
        }
        let ct = att["contentType"].as_str().unwrap_or("text/plain");
        if !ct.starts_with("text/") {
            return Err(format!("skip: attachment of type {ct} is not text"));
        }
        let data = att["data"]
            .as_str()
            .ok_or("skip: the attachment has no inline data (a URL is not fetched)")?;
        let bytes = BASE64
            .decode(data.as_bytes())
            .map_err(|e| format!("DocumentReference attachment data is not valid base64: {e}"))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| "DocumentReference attachment is not UTF-8 text".to_string())?;
        let date = match r["date"].as_str() {
            Some(d) => timestamp_of(d, "DocumentReference.date")?,
            None => self.now_ts.to_string(),
        };
        let id = r["identifier"]
            .as_array()
            .and_then(|i| i.iter().find(|i| i["system"] == NOTE_ID_SYSTEM))
            .and_then(|i| i["value"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}-{}", chart.id, r["id"].as_str().unwrap_or("note")));
        let author = author_of(&r["author"], practitioners);
        let n = Note {
            id,
            author,
            date,
            text,
        };
        keep(
            &mut chart.notes,
            n,
            crate::chart::Entry::Note,
            "DocumentReference",
        )?;
        Ok(())
    }

    fn composition(
        &self,
        r: &Value,
        chart: &mut Chart,
        practitioners: &HashMap<String, String>,
    ) -> EntryResult {
        let mut text = String::new();
        if let Some(t) = r["title"].as_str() {
            text.push_str(t);
        }
        for s in r["section"].as_array().into_iter().flatten() {
            if let Some(t) = s["title"].as_str() {
                text.push_str("\n\n");
                text.push_str(t);
            }
            if let Some(div) = s["text"]["div"].as_str() {
                text.push('\n');
                text.push_str(&strip_tags(div));
            }
        }
        if text.trim().is_empty() {
            return Err("skip: the Composition has no title or section text".into());
        }
        let date = match r["date"].as_str() {
            Some(d) => timestamp_of(d, "Composition.date")?,
            None => return Err("Composition.date is missing".into()),
        };
        let n = Note {
            id: format!("{}-{}", chart.id, r["id"].as_str().unwrap_or("composition")),
            author: author_of(&r["author"], practitioners),
            date,
            text,
        };
        push_unique(&mut chart.notes, n);
        Ok(())
    }
}

fn rfc3339_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Validates an entry as the chart model would, then adds it unless the chart already has it.
fn keep<T: PartialEq + Clone>(
    list: &mut Vec<T>,
    x: T,
    wrap: fn(T) -> crate::chart::Entry,
    what: &str,
) -> EntryResult {
    wrap(x.clone()).validate(what).map_err(|e| e.to_string())?;
    push_unique(list, x);
    Ok(())
}

fn push_unique<T: PartialEq>(list: &mut Vec<T>, x: T) {
    if !list.contains(&x) {
        list.push(x);
    }
}

fn author_of(v: &Value, practitioners: &HashMap<String, String>) -> String {
    let a = &v[0];
    a["display"]
        .as_str()
        .map(str::to_string)
        .or_else(|| {
            a["reference"]
                .as_str()
                .and_then(|r| practitioners.get(r).cloned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn human_name_text(r: &Value) -> Option<String> {
    let n = &r["name"][0];
    let family = n["family"].as_str()?;
    let given: Vec<&str> = n["given"]
        .as_array()
        .map(|g| g.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let prefix: Vec<&str> = n["prefix"]
        .as_array()
        .map(|g| g.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    Some(
        prefix
            .into_iter()
            .chain(given)
            .chain(std::iter::once(family))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

fn strip_tags(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
        .trim()
        .to_string()
}

fn code_of(v: &Value, field: &str) -> Result<(Option<String>, String, Option<String>), String> {
    if v.is_null() {
        return Err(format!("{field} is missing"));
    }
    let codings = match &v["coding"] {
        Value::Array(a) if !a.is_empty() => a,
        Value::Null | Value::Array(_) => return Err(format!("{field} has no coding")),
        _ => return Err(format!("{field}.coding must be an array")),
    };
    let c = &codings[0];
    let code = c["code"]
        .as_str()
        .ok_or_else(|| format!("{field}.coding[0].code is missing or not a string"))?;
    Ok((
        c["system"].as_str().map(system_short),
        code.to_string(),
        c["display"]
            .as_str()
            .or_else(|| v["text"].as_str())
            .map(str::to_string),
    ))
}

fn quantity_of(q: &Value, field: &str) -> Result<(serde_json::Number, Option<String>), String> {
    let value = match &q["value"] {
        Value::Number(n) => n.clone(),
        Value::Null => return Err(format!("{field}.value is missing")),
        other => return Err(format!("{field}.value must be a number, got {other}")),
    };
    let unit = q["unit"]
        .as_str()
        .or_else(|| q["code"].as_str())
        .map(str::to_string);
    Ok((value, unit))
}

/// A FHIR date or dateTime reduced to the chart's `YYYY-MM-DD`.
fn date_of(s: &str, field: &str) -> Result<String, String> {
    let d = s.get(..10).unwrap_or(s);
    crate::chart::date(field, d).map_err(|e| e.to_string())?;
    Ok(d.to_string())
}

fn opt_date_of(v: &Value, field: &str) -> Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => date_of(s, field).map(Some),
        _ => Err(format!("{field} must be a date string")),
    }
}

/// A FHIR dateTime as an RFC 3339 timestamp (a bare date becomes midnight UTC).
fn timestamp_of(s: &str, field: &str) -> Result<String, String> {
    if s.len() == 10 {
        crate::chart::date(field, s).map_err(|e| e.to_string())?;
        return Ok(format!("{s}T00:00:00Z"));
    }
    crate::chart::timestamp(field, s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// The resource types of FHIR R4 (4.0.1).
fn is_r4_resource(rt: &str) -> bool {
    const R4: &[&str] = &[
        "Account",
        "ActivityDefinition",
        "AdverseEvent",
        "AllergyIntolerance",
        "Appointment",
        "AppointmentResponse",
        "AuditEvent",
        "Basic",
        "Binary",
        "BiologicallyDerivedProduct",
        "BodyStructure",
        "Bundle",
        "CapabilityStatement",
        "CarePlan",
        "CareTeam",
        "CatalogEntry",
        "ChargeItem",
        "ChargeItemDefinition",
        "Claim",
        "ClaimResponse",
        "ClinicalImpression",
        "CodeSystem",
        "Communication",
        "CommunicationRequest",
        "CompartmentDefinition",
        "Composition",
        "ConceptMap",
        "Condition",
        "Consent",
        "Contract",
        "Coverage",
        "CoverageEligibilityRequest",
        "CoverageEligibilityResponse",
        "DetectedIssue",
        "Device",
        "DeviceDefinition",
        "DeviceMetric",
        "DeviceRequest",
        "DeviceUseStatement",
        "DiagnosticReport",
        "DocumentManifest",
        "DocumentReference",
        "EffectEvidenceSynthesis",
        "Encounter",
        "Endpoint",
        "EnrollmentRequest",
        "EnrollmentResponse",
        "EpisodeOfCare",
        "EventDefinition",
        "Evidence",
        "EvidenceVariable",
        "ExampleScenario",
        "ExplanationOfBenefit",
        "FamilyMemberHistory",
        "Flag",
        "Goal",
        "GraphDefinition",
        "Group",
        "GuidanceResponse",
        "HealthcareService",
        "ImagingStudy",
        "Immunization",
        "ImmunizationEvaluation",
        "ImmunizationRecommendation",
        "ImplementationGuide",
        "InsurancePlan",
        "Invoice",
        "Library",
        "Linkage",
        "List",
        "Location",
        "Measure",
        "MeasureReport",
        "Media",
        "Medication",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationKnowledge",
        "MedicationRequest",
        "MedicationStatement",
        "MedicinalProduct",
        "MedicinalProductAuthorization",
        "MedicinalProductContraindication",
        "MedicinalProductIndication",
        "MedicinalProductIngredient",
        "MedicinalProductInteraction",
        "MedicinalProductManufactured",
        "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical",
        "MedicinalProductUndesirableEffect",
        "MessageDefinition",
        "MessageHeader",
        "MolecularSequence",
        "NamingSystem",
        "NutritionOrder",
        "Observation",
        "ObservationDefinition",
        "OperationDefinition",
        "OperationOutcome",
        "Organization",
        "OrganizationAffiliation",
        "Parameters",
        "Patient",
        "PaymentNotice",
        "PaymentReconciliation",
        "Person",
        "PlanDefinition",
        "Practitioner",
        "PractitionerRole",
        "Procedure",
        "Provenance",
        "Questionnaire",
        "QuestionnaireResponse",
        "RelatedPerson",
        "RequestGroup",
        "ResearchDefinition",
        "ResearchElementDefinition",
        "ResearchStudy",
        "ResearchSubject",
        "RiskAssessment",
        "RiskEvidenceSynthesis",
        "Schedule",
        "SearchParameter",
        "ServiceRequest",
        "Slot",
        "Specimen",
        "SpecimenDefinition",
        "StructureDefinition",
        "StructureMap",
        "Subscription",
        "Substance",
        "SubstanceNucleicAcid",
        "SubstancePolymer",
        "SubstanceProtein",
        "SubstanceReferenceInformation",
        "SubstanceSourceMaterial",
        "SubstanceSpecification",
        "SupplyDelivery",
        "SupplyRequest",
        "Task",
        "TerminologyCapabilities",
        "TestReport",
        "TestScript",
        "ValueSet",
        "VerificationResult",
        "VisionPrescription",
    ];
    R4.contains(&rt)
}

/// Audit entries as FHIR AuditEvent resources in a collection Bundle.
pub fn audit_bundle(entries: &[crate::audit::AuditEntry], practice: &str) -> Value {
    let items: Vec<Value> = entries
        .iter()
        .map(|e| {
            let ev = &e.event;
            // R4 action codes: C create, R read, U update, D delete, E execute.
            let action = match ev.action.as_str() {
                "create" | "import" | "sync-receive" => "C",
                "read" | "search" | "export" | "sync-send" | "history" => "R",
                "update" | "share" | "revoke" | "edit" => "U",
                _ => "E",
            };
            let refused = ev.action.starts_with("refuse") || ev.action.contains("refus");
            let mut r = json!({
                "resourceType": "AuditEvent",
                "id": format!("audit-{}", e.seq),
                "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation" },
                "subtype": [{ "system": format!("{EXT}/audit-action"), "code": ev.action }],
                "action": action,
                "recorded": rfc3339_ms(ev.time_ms),
                "outcome": if refused { "4" } else { "0" },
                "agent": [{ "who": { "display": ev.actor }, "requestor": true }],
                "source": { "observer": { "identifier": { "system": format!("{EXT}/practice-id"), "value": practice } } },
                "extension": [ext_str("audit-hash", &e.hash), ext_str("audit-prev-hash", &e.prev_hash)],
            });
            let mut entities = Vec::new();
            if let Some(c) = &ev.chart_id {
                entities.push(json!({ "what": { "reference": format!("Patient/{}", patient_id(c)) } }));
            }
            if let Some(p) = &ev.peer {
                entities.push(json!({ "what": { "identifier": { "system": format!("{EXT}/practice-id"), "value": p } }, "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "3", "display": "Report" } }));
            }
            if let Some(d) = &ev.detail {
                r["outcomeDesc"] = d.clone().into();
            }
            if !entities.is_empty() {
                r["entity"] = Value::Array(entities);
            }
            json!({ "fullUrl": format!("urn:chartmesh:AuditEvent/{}", e.seq), "resource": r })
        })
        .collect();
    json!({ "resourceType": "Bundle", "type": "collection", "entry": items })
}

mod ips;
pub use ips::ips_bundle;

#[cfg(test)]
mod tests;
