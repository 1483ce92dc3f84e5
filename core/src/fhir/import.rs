//! FHIR R4 in: a Bundle (any type), a single resource, or Bulk Data NDJSON (one resource per
//! line) becomes charts, with an account of every resource.
//!
//! Patients found in the input become draft charts; every clinical resource is filed under
//! the patient it names. A resource whose patient is not in the input (a lone Observation, a
//! Bulk Data file of one type) becomes an [`Orphan`]: the daemon files it under a stored
//! chart named by its subject reference or identifier, or reports it. Whether a draft chart
//! is new or the same patient as a stored chart is the daemon's decision (patient matching,
//! docs/CLINICAL.md); this module only says what the input holds.
//!
//! Status and negation are kept as data, never dropped: a refuted condition, a
//! `doNotPerform` order, a vaccine `not-done`, a result `entered-in-error` are filed with
//! their status, which every reader honours.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use serde_json::Value;

use super::export::{
    CHART_ID_SYSTEM, DATA_ABSENT, MRN_SYSTEM, NOTE_ID_SYSTEM, SOURCE_ID_SYSTEM, UCUM, is_ucum,
};
use super::json::{self, decimal};
use super::{EXT, is_r4_resource, system_short};
use crate::chart::{
    Address, Allergy, Chart, Coding, Component, Condition, Decimal, Encounter, Entry, HumanName,
    Identifier, Immunization, Insurance, Medication, Note, Observation, Patient, Procedure,
    Quantity, Range, Referral, Telecom, Timing,
};

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
    /// Where in the input: `entry[3]`, `line 12`, or `resource` for a single resource.
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

/// How a resource names its patient when the patient is not in the same input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatientRef {
    /// A reference: `Patient/ID`, an absolute URL ending in it, or `urn:uuid:…`.
    Reference(String),
    /// A logical reference by identifier.
    Identifier {
        system: Option<String>,
        value: String,
    },
}

/// An entry whose patient is not in the input: the daemon files it under the stored chart
/// `target` names, or turns `report` (an index into [`FhirImport::resources`]) into an error.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub target: PatientRef,
    pub entries: Vec<Entry>,
    pub report: usize,
}

/// Where a draft chart's patient came from, for matching it against stored charts.
#[derive(Debug, Clone, Default)]
pub struct PatientSource {
    /// The chart id came from chartmesh's own chart-id identifier (an export of a chart).
    pub chartmesh_id: bool,
    /// The Patient's logical id in the input, when it had one.
    pub resource_id: Option<String>,
}

/// A parsed FHIR input: the charts it describes and an account of every resource.
#[derive(Debug, Default)]
pub struct FhirImport {
    pub charts: Vec<Chart>,
    /// One per chart, in the same order.
    pub sources: Vec<PatientSource>,
    pub orphans: Vec<Orphan>,
    pub resources: Vec<ResourceReport>,
    /// An error that stopped the whole input from being read (not JSON, not FHIR).
    pub fatal: Option<String>,
}

impl FhirImport {
    pub fn summary(&self) -> std::collections::BTreeMap<String, TypeCounts> {
        let mut m: std::collections::BTreeMap<String, TypeCounts> = Default::default();
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
        "Practitioner" | "PractitionerRole" => {
            "directory entry: used only to name the authors of notes and visits"
        }
        "Organization" | "Location" => "directory entry, not patient data",
        "Claim" | "ExplanationOfBenefit" => "billing record, not part of the clinical chart",
        "DiagnosticReport" => "report wrapper: its results are imported from their Observations",
        "Provenance" => "chartmesh keeps its own change history and exports it as Provenance",
        "Medication" => "used when a MedicationRequest/Statement refers to it",
        "CarePlan" | "CareTeam" | "Goal" => "care planning is not part of the chart model",
        "Device" | "SupplyDelivery" | "ImagingStudy" | "MedicationAdministration" => {
            "not part of the chart model"
        }
        _ => return None,
    })
}

/// Parses a FHIR R4 Bundle (collection, transaction, batch, searchset, document), a single
/// resource, or NDJSON (one resource per line). Never fails as a whole for a bad entry: each
/// is reported and the rest imports.
pub fn import(bytes: &[u8], now_ts: &str) -> FhirImport {
    import_with_context(bytes, now_ts, 0)
}

/// [`import`], where the first `context` resources are context only: sent again with a later
/// part of a large input so that its references resolve (its patients, the medications it
/// names). They are used but not reported, having been reported with the first part.
pub fn import_with_context(bytes: &[u8], now_ts: &str, context: usize) -> FhirImport {
    let mut out = FhirImport::default();
    let items = match read_items(bytes, &mut out) {
        Some(items) => items,
        None => return out,
    };
    Importer { now_ts }.run(items, context, &mut out);
    out
}

/// One resource of the input: where it is, its fullUrl, the resource.
type Item = (String, Option<String>, Value);

fn read_items(bytes: &[u8], out: &mut FhirImport) -> Option<Vec<Item>> {
    let body = json::strip_bom(bytes);
    let v: Value = match json::parse(body) {
        Ok(v) => v,
        Err(e) => {
            // Bulk Data NDJSON: one resource per line.
            let first = body.iter().position(|b| !b.is_ascii_whitespace());
            if first.is_some_and(|i| body[i] == b'{') && e.to_string().contains("trailing") {
                return read_ndjson(body, out);
            }
            out.fatal = Some(format!(
                "not valid JSON (line {}, column {}): {e}; a FHIR file holds one JSON object (a Bundle or a single resource), or one resource per line (NDJSON)",
                e.line(),
                e.column()
            ));
            return None;
        }
    };
    let Some(obj) = v.as_object() else {
        out.fatal = Some(
            "the file is JSON but not an object; a FHIR file holds a Bundle or a single resource"
                .into(),
        );
        return None;
    };
    let Some(rt) = obj.get("resourceType") else {
        out.fatal = Some("no resourceType: this is not a FHIR resource (for chart JSONL, one chart per line, use --format jsonl)".into());
        return None;
    };
    let Some(rt) = rt.as_str() else {
        out.fatal = Some("resourceType must be a string".into());
        return None;
    };
    let mut items: Vec<Item> = Vec::new();
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
                return None;
            }
            None => {
                out.fatal = Some(
                    "Bundle has no type (collection, transaction, batch, searchset or document)"
                        .into(),
                );
                return None;
            }
        }
        let entries = match obj.get("entry") {
            None => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => {
                out.fatal = Some("Bundle.entry must be an array of entries".into());
                return None;
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
        items.push(("resource".into(), None, v));
    }
    Some(items)
}

fn read_ndjson(body: &[u8], out: &mut FhirImport) -> Option<Vec<Item>> {
    let mut items = Vec::new();
    for (n, line) in body.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let at = format!("line {}", n + 1);
        match json::parse(line) {
            Ok(v) if v.is_object() => items.push((at, None, v)),
            Ok(_) => {
                out.resources
                    .push(err_report(&at, "?", None, "the line is not a JSON object"))
            }
            Err(e) => {
                out.resources
                    .push(err_report(&at, "?", None, format!("not valid JSON: {e}")))
            }
        }
    }
    Some(items)
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

type EntryResult = Result<(), String>;

/// Where a resource's entries go.
enum Target {
    Draft(usize),
    Orphan(PatientRef),
}

/// What the resources of the input say about each other: names of practitioners,
/// medications and conditions, by every key a reference may use.
#[derive(Default)]
struct Directory {
    practitioners: HashMap<String, String>,
    medications: HashMap<String, Value>,
    conditions: HashMap<String, String>,
    known: HashSet<String>,
}

impl Directory {
    fn keys(full_url: &Option<String>, rt: &str, r: &Value) -> Vec<String> {
        let mut k = Vec::new();
        if let Some(u) = full_url {
            k.push(u.clone());
        }
        if let Some(id) = r.get("id").and_then(|x| x.as_str()) {
            k.push(format!("{rt}/{id}"));
        }
        if let Some(ids) = r.get("identifier").and_then(|x| x.as_array()) {
            for i in ids {
                if let (Some(s), Some(v)) = (i["system"].as_str(), i["value"].as_str()) {
                    k.push(format!("{rt}?identifier={s}|{v}"));
                }
            }
        }
        k
    }
}

/// The part of a reference that names a resource in this input: `Patient/x` from
/// `http://server/fhir/Patient/x` or `Patient/x/_history/2`.
fn normal_ref(r: &str) -> String {
    if r.starts_with("urn:") || r.contains('?') {
        return r.to_string();
    }
    let parts: Vec<&str> = r.split('/').collect();
    let hist = parts.iter().position(|p| *p == "_history");
    let end = hist.unwrap_or(parts.len());
    if end >= 2 {
        format!("{}/{}", parts[end - 2], parts[end - 1])
    } else {
        r.to_string()
    }
}

impl Importer<'_> {
    fn run(&self, items: Vec<Item>, context: usize, out: &mut FhirImport) {
        // Pass 1: the directory (names and codes other resources refer to).
        let mut dir = Directory::default();
        for (_, full_url, r) in &items {
            let rt = r.get("resourceType").and_then(|x| x.as_str()).unwrap_or("");
            let keys = Directory::keys(full_url, rt, r);
            for k in &keys {
                dir.known.insert(k.clone());
            }
            match rt {
                "Practitioner" => {
                    if let Some(name) = human_name_text(r) {
                        for k in keys {
                            dir.practitioners.insert(k, name.clone());
                        }
                    }
                }
                "Medication" => {
                    for k in keys {
                        dir.medications.insert(k, r.clone());
                    }
                }
                "Condition" => {
                    let name = r["code"]["text"]
                        .as_str()
                        .or_else(|| r["code"]["coding"][0]["display"].as_str());
                    if let Some(name) = name {
                        for k in keys {
                            dir.conditions.insert(k, name.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        // Pass 2: patients.
        let mut patient_keys: HashMap<String, usize> = HashMap::new();
        let mut pending: Vec<(usize, String)> = Vec::new();
        let mut report_of: Vec<Option<usize>> = vec![None; items.len()];
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
                let res = self.patient(r);
                match res {
                    Ok((chart, source)) => {
                        let n = out.charts.len();
                        for k in Directory::keys(full_url, rt, r) {
                            patient_keys.insert(k, n);
                        }
                        out.charts.push(chart);
                        out.sources.push(source);
                        report_of[idx] = Some(out.resources.len());
                        out.resources.push(ResourceReport {
                            at: at.clone(),
                            resource_type: rt.into(),
                            id,
                            outcome: Outcome::Mapped,
                            reason: None,
                        });
                    }
                    Err(e) => {
                        report_of[idx] = Some(out.resources.len());
                        out.resources.push(err_report(at, rt, id, e));
                    }
                }
            } else {
                pending.push((idx, rt.to_string()));
            }
        }
        // Pass 3: everything that belongs to a patient.
        for (idx, rt) in pending {
            let (at, _, r) = &items[idx];
            let id = r.get("id").and_then(|x| x.as_str()).map(str::to_string);
            let report = |outcome: Outcome, reason: Option<String>| ResourceReport {
                at: at.clone(),
                resource_type: rt.clone(),
                id: id.clone(),
                outcome,
                reason,
            };
            report_of[idx] = Some(out.resources.len());
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
                    | "Encounter"
                    | "Procedure"
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
            let target = match self.target(&rt, r, out.charts.len(), &patient_keys, &dir) {
                Ok(t) => t,
                Err(e) => {
                    out.resources.push(report(Outcome::Error, Some(e)));
                    continue;
                }
            };
            let res = match target {
                Target::Draft(n) => self.map_into(&rt, r, &mut out.charts[n], &dir),
                Target::Orphan(p) => {
                    if matches!(rt.as_str(), "Coverage" | "ServiceRequest" | "Composition") {
                        Err(format!(
                            "{rt} needs its Patient in the same input (it refers to a patient that is not here)"
                        ))
                    } else {
                        let mut scratch = orphan_chart();
                        let r2 = self.map_into(&rt, r, &mut scratch, &dir);
                        if r2.is_ok() {
                            out.orphans.push(Orphan {
                                target: p,
                                entries: entries_of(scratch),
                                report: out.resources.len(),
                            });
                        }
                        r2
                    }
                }
            };
            match res {
                Ok(()) => out.resources.push(report(Outcome::Mapped, None)),
                Err(e) if e.starts_with("skip: ") => out
                    .resources
                    .push(report(Outcome::Skipped, Some(e[6..].to_string()))),
                Err(e) => out.resources.push(report(Outcome::Error, Some(e))),
            }
        }
        for c in &mut out.charts {
            c.schema_version = c.required_version();
        }
        // Context resources were reported with an earlier part of the input.
        if context > 0 {
            let hide: HashSet<usize> = report_of.iter().take(context).flatten().copied().collect();
            if !hide.is_empty() {
                let mut keep = Vec::with_capacity(out.resources.len());
                let mut renumber = HashMap::new();
                for (i, r) in std::mem::take(&mut out.resources).into_iter().enumerate() {
                    if !hide.contains(&i) {
                        renumber.insert(i, keep.len());
                        keep.push(r);
                    }
                }
                out.resources = keep;
                for o in &mut out.orphans {
                    o.report = renumber.get(&o.report).copied().unwrap_or(usize::MAX);
                }
            }
        }
    }

    /// Whom a resource belongs to: a patient of this input, or one named by reference or
    /// identifier that the daemon looks up.
    fn target(
        &self,
        rt: &str,
        r: &Value,
        drafts: usize,
        patient_keys: &HashMap<String, usize>,
        dir: &Directory,
    ) -> Result<Target, String> {
        let field = match rt {
            "AllergyIntolerance" | "Immunization" => "patient",
            "Coverage" => "beneficiary",
            _ => "subject",
        };
        let Some(s) = r.get(field) else {
            // A lone resource in an input with exactly one patient belongs to it.
            return if drafts == 1 {
                Ok(Target::Draft(0))
            } else {
                Err(format!(
                    "{rt}.{field} is missing: no patient to file it under"
                ))
            };
        };
        if let Some(reference) = s.get("reference").and_then(|x| x.as_str()) {
            if let Some(n) = patient_keys
                .get(reference)
                .or_else(|| patient_keys.get(&normal_ref(reference)))
            {
                return Ok(Target::Draft(*n));
            }
            if dir.known.contains(reference) || dir.known.contains(&normal_ref(reference)) {
                return Err(format!(
                    "{rt}.{field} refers to {reference}, which is not a Patient"
                ));
            }
            let norm = normal_ref(reference);
            // A urn:uuid: reference names an entry of the same input, so it is not
            // looked up in the store.
            if norm.starts_with("Patient/") {
                return Ok(Target::Orphan(PatientRef::Reference(norm)));
            }
            if let Some(q) = reference.strip_prefix("Patient?identifier=") {
                let (system, value) = match q.split_once('|') {
                    Some((s, v)) => (Some(s.to_string()).filter(|s| !s.is_empty()), v),
                    None => (None, q),
                };
                return Ok(Target::Orphan(PatientRef::Identifier {
                    system,
                    value: value.to_string(),
                }));
            }
            return Err(format!(
                "{rt}.{field} refers to {reference}, which is not in this input (dangling reference)"
            ));
        }
        if let Some(v) = s["identifier"]["value"].as_str() {
            return Ok(Target::Orphan(PatientRef::Identifier {
                system: s["identifier"]["system"].as_str().map(str::to_string),
                value: v.to_string(),
            }));
        }
        Err(format!(
            "{rt}.{field} has neither a reference nor an identifier"
        ))
    }

    fn map_into(&self, rt: &str, r: &Value, chart: &mut Chart, dir: &Directory) -> EntryResult {
        match rt {
            "Condition" => self.condition(r, chart),
            "AllergyIntolerance" => self.allergy(r, chart),
            "MedicationRequest" | "MedicationStatement" => self.medication(r, rt, chart, dir),
            "Observation" => self.observation(r, chart),
            "Immunization" => self.immunization(r, chart),
            "ServiceRequest" => self.referral(r, chart),
            "DocumentReference" => self.document(r, chart, dir),
            "Composition" => self.composition(r, chart, dir),
            "Coverage" => self.coverage(r, chart),
            "Encounter" => self.encounter(r, chart, dir),
            "Procedure" => self.procedure(r, chart, dir),
            _ => Err(format!("{rt} is not mapped")),
        }
    }

    fn patient(&self, r: &Value) -> Result<(Chart, PatientSource), String> {
        let ids = match r.get("identifier") {
            None => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err("Patient.identifier must be an array".into()),
        };
        let resource_id = r.get("id").and_then(|x| x.as_str()).map(str::to_string);
        let chart_id_ident = ids
            .iter()
            .find(|i| i["system"] == CHART_ID_SYSTEM)
            .and_then(|i| i["value"].as_str())
            .map(str::to_string);
        let is_mr = |i: &Value| {
            i["type"]["coding"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["code"] == "MR"))
        };
        let usable = |i: &&Value| {
            i["value"].as_str().is_some_and(|v| !v.trim().is_empty())
                && i["system"] != CHART_ID_SYSTEM
        };
        // The MRN: chartmesh's own, else the identifier typed MR, else the first identifier.
        let mrn_at = ids
            .iter()
            .position(|i| i["system"] == MRN_SYSTEM && usable(&i))
            .or_else(|| ids.iter().position(|i| is_mr(i) && usable(&i)))
            .or_else(|| ids.iter().position(|i| usable(&i)));
        let (mrn, mrn_system) = match mrn_at {
            Some(k) => (
                ids[k]["value"].as_str().unwrap_or_default().to_string(),
                ids[k]["system"]
                    .as_str()
                    .filter(|s| *s != MRN_SYSTEM)
                    .map(str::to_string),
            ),
            None => (
                resource_id
                    .clone()
                    .ok_or("Patient has neither an identifier nor an id to use as the MRN")?,
                None,
            ),
        };
        let mut identifiers = Vec::new();
        for (k, i) in ids.iter().enumerate() {
            if Some(k) == mrn_at || !usable(&i) {
                continue;
            }
            let kind = i["type"]["coding"]
                .as_array()
                .and_then(|c| c.iter().find_map(|c| c["code"].as_str()))
                .map(str::to_string);
            let id = Identifier {
                system: i["system"].as_str().map(str::to_string),
                value: i["value"].as_str().unwrap_or_default().to_string(),
                kind,
            };
            if !identifiers.contains(&id) {
                identifiers.push(id);
            }
        }
        let chartmesh_id = chart_id_ident.is_some();
        let chart_id = match chart_id_ident {
            Some(c) => c,
            None => {
                let base = resource_id.as_deref().unwrap_or(&mrn);
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
            .or_else(|| names.iter().find(|n| n["use"] == "usual"))
            .or_else(|| names.first())
            .ok_or("Patient.name is empty")?;
        let family = match name["family"].as_str() {
            Some(f) => f.to_string(),
            None => match &name["family"] {
                // DSTU2-style family as a list of parts.
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => return Err("Patient.name.family is missing or not a string".into()),
            },
        };
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
        crate::chart::fhir_date("Patient.birthDate", birth).map_err(|e| e.to_string())?;
        let sex = match r.get("gender").and_then(|x| x.as_str()) {
            Some(g @ ("male" | "female" | "other" | "unknown")) => Some(g.to_string()),
            Some(g) => {
                return Err(format!(
                    "Patient.gender {g:?} is not male, female, other or unknown"
                ));
            }
            None => None,
        };
        let (deceased, deceased_date) = match (&r["deceasedBoolean"], &r["deceasedDateTime"]) {
            (_, Value::String(d)) => {
                crate::chart::fhir_date("Patient.deceasedDateTime", d)
                    .map_err(|e| e.to_string())?;
                (false, Some(d.clone()))
            }
            (Value::Bool(b), _) => (*b, None),
            _ => (false, None),
        };
        // The phone: the first phone number for no particular use or at home; every other
        // contact is kept with its use.
        let mut phone = None;
        let mut telecom = Vec::new();
        for t in r["telecom"].as_array().into_iter().flatten() {
            let (Some(system), Some(value)) = (t["system"].as_str(), t["value"].as_str()) else {
                continue;
            };
            let use_ = t["use"].as_str();
            if system == "phone" && phone.is_none() && matches!(use_, None | Some("home")) {
                phone = Some(value.to_string());
                continue;
            }
            telecom.push(Telecom {
                system: system.to_string(),
                value: value.to_string(),
                use_: use_.map(str::to_string),
            });
        }
        let addresses = r["address"].as_array();
        let address = addresses
            .and_then(|a| a.iter().find(|x| x["use"] == "home").or_else(|| a.first()))
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
                state: a["state"].as_str().map(str::to_string),
                postal_code: a["postalCode"].as_str().map(str::to_string),
                country: a["country"].as_str().map(str::to_string),
            });
        let comms = r["communication"].as_array();
        let language = comms
            .and_then(|c| {
                c.iter()
                    .find(|x| x["preferred"] == true)
                    .or_else(|| c.first())
            })
            .and_then(|c| {
                c["language"]["coding"][0]["code"]
                    .as_str()
                    .or_else(|| c["language"]["text"].as_str())
            })
            .map(str::to_string);
        let ext = |name: &str| -> Option<String> {
            r["extension"].as_array().and_then(|e| {
                e.iter()
                    .find(|x| x["url"] == format!("{EXT}/{name}"))
                    .and_then(|x| x["valueString"].as_str())
                    .map(str::to_string)
            })
        };
        let mut chart = Chart::empty(
            chart_id,
            Patient {
                mrn,
                mrn_system,
                identifiers,
                name: HumanName { given, family },
                birth_date: birth.to_string(),
                sex,
                deceased: deceased && deceased_date.is_none(),
                deceased_date,
                address,
                phone,
                telecom,
                language,
                insurance: None,
            },
        );
        chart.practice_id = ext("chart-practice");
        chart.created_at = ext("chart-created").unwrap_or_else(|| self.now_ts.to_string());
        chart.updated_at = ext("chart-updated").unwrap_or_else(|| self.now_ts.to_string());
        crate::ids::ChartId::parse(&chart.id).map_err(|e| e.to_string())?;
        Ok((
            chart,
            PatientSource {
                chartmesh_id,
                resource_id,
            },
        ))
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
            .map(str::to_string)
            .or_else(|| ext_of(r, "condition-status"));
        let verification = r["verificationStatus"]["coding"][0]["code"]
            .as_str()
            .map(str::to_string);
        let onset = first_date(
            r,
            &[
                ("onsetDateTime", "Condition.onsetDateTime"),
                ("onsetPeriod.start", "Condition.onsetPeriod.start"),
            ],
        )?;
        let abatement = first_date(
            r,
            &[
                ("abatementDateTime", "Condition.abatementDateTime"),
                ("abatementPeriod.end", "Condition.abatementPeriod.end"),
            ],
        )?;
        let c = Condition {
            code,
            system,
            display,
            onset,
            status,
            verification,
            abatement,
            category: r["category"][0]["coding"][0]["code"]
                .as_str()
                .map(str::to_string),
            recorded: opt_date_of(&r["recordedDate"], "Condition.recordedDate")?,
        };
        keep(&mut chart.conditions, c, Entry::Condition, "Condition")
    }

    fn allergy(&self, r: &Value, chart: &mut Chart) -> EntryResult {
        let code = &r["code"];
        if code.is_null() {
            return Err("AllergyIntolerance.code is missing: no substance".into());
        }
        let substance = name_of(code, "AllergyIntolerance.code")?;
        let coded = coding_of(code)
            .map(|mut c| {
                // The text is the substance already.
                c.text = None;
                c
            })
            .filter(|c| c.code.is_some() || c.display.is_some());
        let reaction0 = &r["reaction"][0];
        let reaction = reaction0["manifestation"][0]["text"]
            .as_str()
            .or_else(|| reaction0["manifestation"][0]["coding"][0]["display"].as_str())
            .map(str::to_string);
        let severity = reaction0["severity"].as_str().map(str::to_string);
        let category = r["category"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let a = Allergy {
            substance,
            reaction,
            severity,
            recorded: opt_date_of(&r["recordedDate"], "AllergyIntolerance.recordedDate")?,
            code: coded,
            criticality: r["criticality"].as_str().map(str::to_string),
            category,
            kind: r["type"].as_str().map(str::to_string),
            status: r["clinicalStatus"]["coding"][0]["code"]
                .as_str()
                .map(str::to_string),
            verification: r["verificationStatus"]["coding"][0]["code"]
                .as_str()
                .map(str::to_string),
            onset: opt_date_of(&r["onsetDateTime"], "AllergyIntolerance.onsetDateTime")?,
        };
        keep(
            &mut chart.allergies,
            a,
            Entry::Allergy,
            "AllergyIntolerance",
        )
    }

    fn medication(&self, r: &Value, rt: &str, chart: &mut Chart, dir: &Directory) -> EntryResult {
        let mut concept = r["medicationCodeableConcept"].clone();
        if concept.is_null() {
            let Some(reference) = r["medicationReference"]["reference"].as_str() else {
                return Err(format!(
                    "{rt} has no medication (medicationCodeableConcept or medicationReference)"
                ));
            };
            let found = match reference.strip_prefix('#') {
                Some(local) => r["contained"]
                    .as_array()
                    .and_then(|c| c.iter().find(|x| x["id"] == local))
                    .cloned(),
                None => dir
                    .medications
                    .get(reference)
                    .or_else(|| dir.medications.get(&normal_ref(reference)))
                    .cloned(),
            };
            match found {
                Some(m) => concept = m["code"].clone(),
                None => match r["medicationReference"]["display"].as_str() {
                    Some(d) => concept = serde_json::json!({ "text": d }),
                    None => {
                        return Err(format!(
                            "{rt}.medicationReference refers to {reference}, which is not in this input"
                        ));
                    }
                },
            }
        }
        let name = name_of(&concept, &format!("{rt}: the medication"))?;
        let code = concept["coding"][0]["code"].as_str().map(str::to_string);
        let system = concept["coding"][0]["system"].as_str().map(system_short);
        let request = rt == "MedicationRequest";
        let status = if r.get("_status").is_some() {
            None
        } else {
            ext_of(r, "medication-status").or_else(|| r["status"].as_str().map(str::to_string))
        };
        let dosage = if request {
            &r["dosageInstruction"][0]
        } else {
            &r["dosage"][0]
        };
        let dq = &dosage["doseAndRate"][0]["doseQuantity"];
        let (mut dose, mut dose_quantity) = (None, None);
        if !dq.is_null() {
            let value = decimal(&dq["value"])
                .ok_or_else(|| format!("{rt} dose quantity has no numeric value"))?;
            let unit = dq["unit"].as_str().map(str::to_string);
            let (qs, qc) = (
                dq["system"].as_str().map(str::to_string),
                dq["code"].as_str().map(str::to_string),
            );
            match (&unit, &qs, &qc) {
                // "<number> <unit>" as the chart writes a dose.
                (Some(u), None, None) if !u.is_empty() && !u.contains(' ') => {
                    dose = Some(format!("{value} {u}"));
                }
                _ => {
                    dose_quantity = Some(Quantity {
                        value,
                        unit,
                        system: qs,
                        code: qc,
                    })
                }
            }
        }
        let dose_ext = dosage["extension"].as_array().and_then(|e| {
            e.iter()
                .find(|x| x["url"] == format!("{EXT}/dose-text"))
                .and_then(|x| x["valueString"].as_str())
        });
        if let Some(t) = dose_ext {
            dose = Some(t.to_string());
        }
        let dosage_text = dosage["text"].as_str().map(normalize_newlines);
        let route = dosage["route"]["text"]
            .as_str()
            .or_else(|| dosage["route"]["coding"][0]["display"].as_str())
            .map(str::to_string);
        let route_code = dosage["route"]["coding"][0]
            .is_object()
            .then(|| coding_of(&dosage["route"]))
            .flatten()
            .map(|mut c| {
                c.text = None;
                c
            });
        let (frequency, timing) = timing_of(&dosage["timing"])?;
        let start_v = if request {
            &r["authoredOn"]
        } else if !r["effectivePeriod"]["start"].is_null() {
            &r["effectivePeriod"]["start"]
        } else {
            &r["effectiveDateTime"]
        };
        let start = opt_date_of(start_v, &format!("{rt} start date"))?;
        let end = opt_date_of(
            &r["effectivePeriod"]["end"],
            &format!("{rt}.effectivePeriod.end"),
        )?;
        let (reason, reason_code) = reason_of(r, &dir.conditions);
        let m = Medication {
            name,
            code,
            system,
            dose,
            route,
            frequency,
            start,
            status,
            source: request.then(|| "request".to_string()),
            intent: if request {
                r["intent"].as_str().map(str::to_string)
            } else {
                ext_of(r, "medication-intent")
            },
            do_not_perform: r["doNotPerform"] == true,
            status_reason: concept_text(&r["statusReason"][0])
                .or_else(|| concept_text(&r["statusReason"])),
            dosage: dosage_text,
            dose_quantity,
            timing,
            as_needed: dosage["asNeededBoolean"].as_bool(),
            route_code,
            reason,
            reason_code,
            end,
        };
        keep(&mut chart.medications, m, Entry::Medication, rt)
    }

    fn observation(&self, r: &Value, chart: &mut Chart) -> EntryResult {
        let date = first_date(
            r,
            &[
                ("effectiveDateTime", "Observation.effectiveDateTime"),
                ("effectivePeriod.start", "Observation.effectivePeriod.start"),
                ("effectiveInstant", "Observation.effectiveInstant"),
                ("issued", "Observation.issued"),
            ],
        )?
        .ok_or(
            "Observation has no effective time (effectiveDateTime, effectivePeriod or issued)",
        )?;
        let (system, code, display) = code_of(&r["code"], "Observation.code")?;
        let status = r["status"]
            .as_str()
            .filter(|s| *s != "final")
            .map(str::to_string);
        let v = value_of(r, "Observation")?;
        let mut components = Vec::new();
        for (i, c) in r["component"].as_array().into_iter().flatten().enumerate() {
            let at = format!("Observation.component[{i}]");
            let (system, code, display) = code_of(&c["code"], &format!("{at}.code"))?;
            let cv = value_of(c, &at)?;
            components.push(Component {
                code,
                system,
                display,
                value: cv.value,
                comparator: cv.comparator,
                unit: cv.unit,
                unit_code: cv.unit_code,
                unit_system: cv.unit_system,
                value_coding: cv.coding,
                value_string: cv.string,
                interpretation: coding_of(&c["interpretation"][0]),
            });
        }
        let rr = &r["referenceRange"][0];
        let reference_range = rr.is_object().then(|| Range {
            low: decimal(&rr["low"]["value"]),
            high: decimal(&rr["high"]["value"]),
            unit: rr["low"]["unit"]
                .as_str()
                .or_else(|| rr["high"]["unit"].as_str())
                .map(str::to_string),
            text: rr["text"].as_str().map(str::to_string),
        });
        let o = Observation {
            code,
            system,
            display,
            value: v.value,
            comparator: v.comparator,
            unit: v.unit,
            unit_code: v.unit_code,
            unit_system: v.unit_system,
            value_coding: v.coding,
            value_string: v.string,
            value_boolean: v.boolean,
            value_date_time: v.date_time,
            category: r["category"][0]["coding"][0]["code"]
                .as_str()
                .map(str::to_string),
            date,
            status,
            interpretation: coding_of(&r["interpretation"][0]),
            reference_range,
            components,
        };
        keep(
            &mut chart.observations,
            o,
            Entry::Observation,
            "Observation",
        )
    }

    fn immunization(&self, r: &Value, chart: &mut Chart) -> EntryResult {
        let vc = &r["vaccineCode"];
        if vc.is_null() {
            return Err("Immunization.vaccineCode is missing".into());
        }
        let vaccine = name_of(vc, "Immunization.vaccineCode")?;
        let date = match (&r["occurrenceDateTime"], r["occurrenceString"].as_str()) {
            (Value::String(s), _) => date_of(s, "Immunization.occurrenceDateTime")?,
            (_, Some(_)) => {
                return Err(
                    "Immunization.occurrenceString is free text; chartmesh needs a date (occurrenceDateTime)"
                        .into(),
                );
            }
            _ => return Err("Immunization.occurrenceDateTime is missing".into()),
        };
        let i = Immunization {
            vaccine,
            code: vc["coding"][0]["code"].as_str().map(str::to_string),
            system: vc["coding"][0]["system"].as_str().map(system_short),
            date,
            lot: r["lotNumber"].as_str().map(str::to_string),
            status: r["status"]
                .as_str()
                .filter(|s| *s != "completed")
                .map(str::to_string),
            status_reason: concept_text(&r["statusReason"]),
        };
        keep(
            &mut chart.immunizations,
            i,
            Entry::Immunization,
            "Immunization",
        )
    }

    fn encounter(&self, r: &Value, chart: &mut Chart, dir: &Directory) -> EntryResult {
        let status = r["status"]
            .as_str()
            .ok_or("Encounter.status is missing")?
            .to_string();
        let class = r["class"]["code"].as_str().map(str::to_string);
        let t = &r["type"][0];
        let (reason, reason_code) = reason_of(r, &dir.conditions);
        let practitioner = r["participant"].as_array().and_then(|ps| {
            ps.iter().find_map(|p| {
                p["individual"]["display"]
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| {
                        p["individual"]["reference"]
                            .as_str()
                            .and_then(|x| dir.practitioners.get(x).cloned())
                    })
            })
        });
        let e = Encounter {
            status,
            class,
            code: t["coding"][0]["code"].as_str().map(str::to_string),
            system: t["coding"][0]["system"].as_str().map(system_short),
            display: t["text"]
                .as_str()
                .or_else(|| t["coding"][0]["display"].as_str())
                .map(str::to_string),
            start: opt_date_of(&r["period"]["start"], "Encounter.period.start")?,
            end: opt_date_of(&r["period"]["end"], "Encounter.period.end")?,
            reason,
            reason_code,
            practitioner,
            location: r["location"][0]["location"]["display"]
                .as_str()
                .map(str::to_string),
            source_id: r["identifier"]
                .as_array()
                .and_then(|i| i.iter().find(|i| i["system"] == SOURCE_ID_SYSTEM))
                .and_then(|i| i["value"].as_str())
                .or_else(|| r["id"].as_str())
                .map(str::to_string),
        };
        keep(&mut chart.encounters, e, Entry::Encounter, "Encounter")
    }

    fn procedure(&self, r: &Value, chart: &mut Chart, dir: &Directory) -> EntryResult {
        let (system, code, display) = code_of(&r["code"], "Procedure.code")?;
        let status = r["status"]
            .as_str()
            .ok_or("Procedure.status is missing")?
            .to_string();
        let (date, end) = match (&r["performedDateTime"], &r["performedPeriod"]) {
            (Value::String(d), _) => (Some(date_of(d, "Procedure.performedDateTime")?), None),
            (_, p) if p.is_object() => (
                opt_date_of(&p["start"], "Procedure.performedPeriod.start")?,
                opt_date_of(&p["end"], "Procedure.performedPeriod.end")?,
            ),
            _ => (None, None),
        };
        let (reason, reason_code) = reason_of(r, &dir.conditions);
        let p = Procedure {
            code,
            system,
            display,
            status,
            date,
            end,
            reason,
            reason_code,
            body_site: concept_text(&r["bodySite"][0]),
        };
        keep(&mut chart.procedures, p, Entry::Procedure, "Procedure")
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
        let status =
            ext_of(r, "referral-status").or_else(|| r["status"].as_str().map(str::to_string));
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

    fn document(&self, r: &Value, chart: &mut Chart, dir: &Directory) -> EntryResult {
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
        let date = match (r["date"].as_str(), r["context"]["period"]["start"].as_str()) {
            (Some(d), _) => timestamp_of(d, "DocumentReference.date")?,
            (None, Some(d)) => date_of(d, "DocumentReference.context.period.start")?,
            (None, None) => self.now_ts.to_string(),
        };
        let id = r["identifier"]
            .as_array()
            .and_then(|i| i.iter().find(|i| i["system"] == NOTE_ID_SYSTEM))
            .and_then(|i| i["value"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}-{}", chart.id, r["id"].as_str().unwrap_or("note")));
        let default_type = ext_of(r, "note-type").as_deref() == Some("default");
        let n = Note {
            id,
            author: author_of(&r["author"], &dir.practitioners),
            date,
            text: normalize_newlines(&text),
            kind: if default_type {
                None
            } else {
                coding_of(&r["type"])
            },
            status: r["status"]
                .as_str()
                .filter(|s| *s != "current")
                .map(str::to_string),
        };
        keep(&mut chart.notes, n, Entry::Note, "DocumentReference")
    }

    fn composition(&self, r: &Value, chart: &mut Chart, dir: &Directory) -> EntryResult {
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
            Some(d) => date_of(d, "Composition.date")?,
            None => return Err("Composition.date is missing".into()),
        };
        let n = Note {
            id: format!("{}-{}", chart.id, r["id"].as_str().unwrap_or("composition")),
            author: author_of(&r["author"], &dir.practitioners),
            date,
            text: normalize_newlines(&text),
            kind: coding_of(&r["type"]),
            status: r["status"]
                .as_str()
                .filter(|s| *s == "entered-in-error")
                .map(str::to_string),
        };
        keep(&mut chart.notes, n, Entry::Note, "Composition")
    }
}

/// A chart to collect the entries of a resource whose patient is not in the input.
fn orphan_chart() -> Chart {
    Chart::empty("orphan".into(), Patient::default())
}

/// Every entry of a chart, section by section.
pub fn entries_of(c: Chart) -> Vec<Entry> {
    let mut out = Vec::new();
    out.extend(c.conditions.into_iter().map(Entry::Condition));
    out.extend(c.allergies.into_iter().map(Entry::Allergy));
    out.extend(c.medications.into_iter().map(Entry::Medication));
    out.extend(c.observations.into_iter().map(Entry::Observation));
    out.extend(c.notes.into_iter().map(Entry::Note));
    out.extend(c.immunizations.into_iter().map(Entry::Immunization));
    out.extend(c.encounters.into_iter().map(Entry::Encounter));
    out.extend(c.procedures.into_iter().map(Entry::Procedure));
    out
}

/// Validates an entry as the chart model would, then adds it. Two resources of the input are
/// two entries even when they read the same (two identical readings are two readings); the
/// daemon compares with what a stored chart already holds, counting, so a second import of
/// the same input adds nothing.
fn keep<T: PartialEq + Clone>(
    list: &mut Vec<T>,
    x: T,
    wrap: fn(T) -> Entry,
    what: &str,
) -> EntryResult {
    wrap(x.clone()).validate(what).map_err(|e| e.to_string())?;
    list.push(x);
    Ok(())
}

fn ext_of(r: &Value, name: &str) -> Option<String> {
    r["extension"].as_array().and_then(|e| {
        e.iter()
            .find(|x| x["url"] == format!("{EXT}/{name}"))
            .and_then(|x| x["valueString"].as_str())
            .map(str::to_string)
    })
}

/// `\r\n` and lone `\r` as `\n` (a chart's text holds no carriage returns).
fn normalize_newlines(s: &str) -> String {
    if s.contains('\r') {
        s.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        s.to_string()
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
        Value::Null | Value::Array(_) if v["text"].is_string() => {
            return Err(format!(
                "skip: {field} has only text, no code; chartmesh keeps coded entries"
            ));
        }
        Value::Null | Value::Array(_) => return Err(format!("{field} has no coding")),
        _ => return Err(format!("{field}.coding must be an array")),
    };
    let c = codings
        .iter()
        .find(|c| c["code"].is_string())
        .unwrap_or(&codings[0]);
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

/// A CodeableConcept as a chart [`Coding`] (first coding, and the text when it differs
/// from the display).
fn coding_of(v: &Value) -> Option<Coding> {
    if !v.is_object() {
        return None;
    }
    let c = &v["coding"][0];
    let display = c["display"].as_str().map(str::to_string);
    let text = v["text"]
        .as_str()
        .filter(|t| Some(*t) != display.as_deref() || c["code"].is_null())
        .map(str::to_string);
    let out = Coding {
        system: c["system"].as_str().map(system_short),
        code: c["code"].as_str().map(str::to_string),
        display,
        text,
    };
    (out.code.is_some() || out.display.is_some() || out.text.is_some()).then_some(out)
}

/// What a CodeableConcept names, for an entry that needs a name: [`concept_text`], else an
/// error saying `what` has neither text nor a coding.
fn name_of(v: &Value, what: &str) -> Result<String, String> {
    concept_text(v).ok_or_else(|| format!("{what} has neither text nor a coding"))
}

/// A CodeableConcept's words: its text, else its first display, else its first code.
fn concept_text(v: &Value) -> Option<String> {
    v["text"]
        .as_str()
        .or_else(|| v["coding"][0]["display"].as_str())
        .or_else(|| v["coding"][0]["code"].as_str())
        .map(str::to_string)
}

/// Why: the reason's words and code (reasonCode), or the display of a reasonReference (or
/// the referenced condition's name).
fn reason_of(r: &Value, conditions: &HashMap<String, String>) -> (Option<String>, Option<Coding>) {
    let rc = &r["reasonCode"][0];
    if rc.is_object() {
        let mut c = coding_of(rc);
        let text = rc["text"]
            .as_str()
            .or_else(|| rc["coding"][0]["display"].as_str())
            .map(str::to_string);
        if let Some(c) = &mut c {
            c.text = None;
            if c.code.is_none() {
                return (text, None);
            }
        }
        return (text, c);
    }
    let rr = &r["reasonReference"][0];
    let text = rr["display"].as_str().map(str::to_string).or_else(|| {
        rr["reference"]
            .as_str()
            .and_then(|x| conditions.get(x).cloned())
    });
    (text, None)
}

/// A result: the value[x] of an Observation or one of its components.
#[derive(Default)]
struct ResultValue {
    value: Option<Decimal>,
    comparator: Option<String>,
    unit: Option<String>,
    unit_code: Option<String>,
    unit_system: Option<String>,
    coding: Option<Coding>,
    string: Option<String>,
    boolean: Option<bool>,
    date_time: Option<String>,
}

fn value_of(r: &Value, at: &str) -> Result<ResultValue, String> {
    let mut v = ResultValue::default();
    if let Some(q) = r.get("valueQuantity") {
        let value = match &q["value"] {
            Value::Null => return Err(format!("{at}.valueQuantity.value is missing")),
            x => decimal(x).ok_or_else(|| {
                format!(
                    "{at}.valueQuantity.value must be a number, got {}",
                    json::to_string(x)
                )
            })?,
        };
        v.value = Some(value);
        v.comparator = q["comparator"].as_str().map(str::to_string);
        v.unit = q["unit"].as_str().map(str::to_string);
        let (system, code) = (q["system"].as_str(), q["code"].as_str());
        // A UCUM code equal to the unit is implied by the unit (the chart writes it back).
        let implied = system == Some(UCUM)
            && code.is_some()
            && code == v.unit.as_deref()
            && v.unit.as_deref().is_some_and(is_ucum);
        if !implied {
            v.unit_system = system.map(str::to_string);
            v.unit_code = code.map(str::to_string);
            if v.unit.is_none() && system == Some(UCUM) && code.is_some_and(is_ucum) {
                // Only a UCUM code: it is the unit as shown too.
                v.unit = code.map(str::to_string);
                v.unit_code = None;
                v.unit_system = None;
            }
        }
    } else if let Some(c) = r.get("valueCodeableConcept") {
        v.coding =
            Some(coding_of(c).ok_or_else(|| {
                format!("{at}.valueCodeableConcept has neither a coding nor a text")
            })?);
    } else if let Some(s) = r.get("valueString") {
        v.string =
            Some(normalize_newlines(s.as_str().ok_or_else(|| {
                format!("{at}.valueString must be a string")
            })?));
    } else if let Some(b) = r.get("valueBoolean") {
        v.boolean = Some(
            b.as_bool()
                .ok_or_else(|| format!("{at}.valueBoolean must be true or false"))?,
        );
    } else if let Some(i) = r.get("valueInteger") {
        v.value = Some(decimal(i).ok_or_else(|| format!("{at}.valueInteger must be a number"))?);
    } else if let Some(d) = r.get("valueDateTime") {
        let d = d
            .as_str()
            .ok_or_else(|| format!("{at}.valueDateTime must be a string"))?;
        crate::chart::fhir_date(&format!("{at}.valueDateTime"), d).map_err(|e| e.to_string())?;
        v.date_time = Some(d.to_string());
    } else if let Some(k) = r
        .as_object()
        .and_then(|o| o.keys().find(|k| k.starts_with("value")))
        && r.get("component").is_none()
    {
        return Err(format!(
            "skip: a result of type {k} is not kept (chartmesh keeps quantities, codes, text, true/false and dates)"
        ));
    }
    Ok(v)
}

fn timing_of(t: &Value) -> Result<(Option<String>, Option<Timing>), String> {
    if !t.is_object() {
        return Ok((None, None));
    }
    let rep = &t["repeat"];
    let code = &t["code"];
    let coded = code["coding"][0].is_object();
    // The chart's plain frequency ("once daily"): a timing that is only words.
    if !rep.is_object() && !coded {
        return Ok((code["text"].as_str().map(str::to_string), None));
    }
    let strings = |k: &str| -> Vec<String> {
        rep[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let uint = |k: &str| -> Result<Option<u32>, String> {
        match &rep[k] {
            Value::Null => Ok(None),
            Value::Number(n) => n
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| format!("Timing.repeat.{k} must be a whole number")),
            _ => Err(format!("Timing.repeat.{k} must be a whole number")),
        }
    };
    let timing = Timing {
        frequency: uint("frequency")?,
        frequency_max: uint("frequencyMax")?,
        period: decimal(&rep["period"]),
        period_max: decimal(&rep["periodMax"]),
        period_unit: rep["periodUnit"].as_str().map(str::to_string),
        count: uint("count")?,
        duration: decimal(&rep["duration"]),
        duration_unit: rep["durationUnit"].as_str().map(str::to_string),
        when: strings("when"),
        time_of_day: strings("timeOfDay"),
        day_of_week: strings("dayOfWeek"),
        code: coded.then(|| coding_of(code)).flatten().map(|mut c| {
            c.text = None;
            c
        }),
    };
    Ok((code["text"].as_str().map(str::to_string), Some(timing)))
}

/// A FHIR date or dateTime, kept at its precision.
fn date_of(s: &str, field: &str) -> Result<String, String> {
    crate::chart::fhir_date(field, s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

fn opt_date_of(v: &Value, field: &str) -> Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => date_of(s, field).map(Some),
        _ => Err(format!("{field} must be a date string")),
    }
}

/// The first of several date fields (`a.b` paths) that is present.
fn first_date(r: &Value, paths: &[(&str, &str)]) -> Result<Option<String>, String> {
    for (path, field) in paths {
        let mut v = r;
        for part in path.split('.') {
            v = &v[part];
        }
        if !v.is_null() {
            return opt_date_of(v, field);
        }
    }
    Ok(None)
}

/// A FHIR dateTime for a note: a bare date is kept as it is (its precision).
fn timestamp_of(s: &str, field: &str) -> Result<String, String> {
    date_of(s, field)
}

#[allow(dead_code)]
fn absent_reason(v: &Value) -> bool {
    v["extension"]
        .as_array()
        .is_some_and(|e| e.iter().any(|x| x["url"] == DATA_ABSENT))
}
