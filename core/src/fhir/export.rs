//! A chart as a FHIR R4 Bundle (type `collection`).
//!
//! Every entry has a `urn:uuid:` fullUrl derived from the chart id and the entry's place (the
//! same chart always gives the same ids), and every reference inside the Bundle is one of
//! those fullUrls, so it resolves inside the Bundle. Statuses are always R4 codes; a chart
//! value that is not one travels in an extension and the element says `unknown`. A unit is
//! given a UCUM system and code only when it is UCUM (as recorded, or a known UCUM code).

use serde_json::{Map, Value, json};

use super::json::number;
use super::{EXT, ext_str, patient_id, rfc3339_ms, system_uri};
use crate::chart::{
    Chart, Coding, Component, Condition, Decimal, Encounter, Immunization, Medication, Note,
    Observation, Procedure, Quantity, Timing,
};
use crate::doc::HistoryEntry;

pub(super) const CHART_ID_SYSTEM: &str = "https://chartmesh.org/fhir/chart-id";
pub(super) const MRN_SYSTEM: &str = "https://chartmesh.org/fhir/mrn";
pub(super) const NOTE_ID_SYSTEM: &str = "https://chartmesh.org/fhir/note-id";
pub(super) const SOURCE_ID_SYSTEM: &str = "https://chartmesh.org/fhir/source-id";
pub(super) const DATA_ABSENT: &str = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";
pub(super) const OBS_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
pub(super) const CONDITION_CLINICAL: &str =
    "http://terminology.hl7.org/CodeSystem/condition-clinical";
pub(super) const CONDITION_VERIFICATION: &str =
    "http://terminology.hl7.org/CodeSystem/condition-ver-status";
pub(super) const CONDITION_CATEGORY: &str =
    "http://terminology.hl7.org/CodeSystem/condition-category";
pub(super) const ALLERGY_CLINICAL: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";
pub(super) const ALLERGY_VERIFICATION: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification";
pub(super) const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
pub(super) const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
pub(super) const INTERPRETATION: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";
pub(super) const UCUM: &str = "http://unitsofmeasure.org";
pub(super) const LANGUAGE: &str = "urn:ietf:bcp:47";

/// Units that are UCUM codes as written (case-sensitive). A unit not listed here is exported
/// as display text only, unless the chart recorded its UCUM code.
const UCUM_CODES: &[&str] = &[
    "%",
    "/min",
    "{beats}/min",
    "{breaths}/min",
    "1",
    "10*3/uL",
    "10*6/uL",
    "10*9/L",
    "10*12/L",
    "Cel",
    "[degF]",
    "[lb_av]",
    "[oz_av]",
    "[in_i]",
    "[ft_i]",
    "[IU]/L",
    "m[IU]/L",
    "[iU]/L",
    "U/L",
    "a",
    "cm",
    "d",
    "fL",
    "g",
    "g/dL",
    "g/L",
    "h",
    "kg",
    "kg/m2",
    "L",
    "m",
    "meq/L",
    "mg",
    "mg/dL",
    "mg/L",
    "min",
    "mL",
    "mL/min",
    "mL/min/{1.73_m2}",
    "mm",
    "mm[Hg]",
    "mmol/L",
    "mmol/mol",
    "mo",
    "ng/mL",
    "nmol/L",
    "pg",
    "pg/mL",
    "pmol/L",
    "s",
    "ug",
    "ug/L",
    "ug/dL",
    "umol/L",
    "wk",
    "{score}",
    "[pH]",
];

/// Whether `unit` is a UCUM code as written.
pub fn is_ucum(unit: &str) -> bool {
    UCUM_CODES.contains(&unit)
}

/// A stable `urn:uuid:` for an entry of a chart (a UUID in the RFC 9562 version 8 layout,
/// from SHA-256 of the chart id and the entry's key).
pub fn entry_uuid(chart_id: &str, key: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(chart_id.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

fn absent() -> Value {
    json!([{ "url": DATA_ABSENT, "valueCode": "unknown" }])
}

pub(super) fn coding(system: &Option<String>, code: &str, display: &Option<String>) -> Value {
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

/// A CodeableConcept from a chart [`Coding`].
fn concept(c: &Coding) -> Value {
    let mut out = Map::new();
    if c.code.is_some() || c.system.is_some() {
        let mut x = Map::new();
        if let Some(s) = &c.system {
            x.insert("system".into(), system_uri(s).into());
        }
        if let Some(code) = &c.code {
            x.insert("code".into(), code.clone().into());
        }
        if let Some(d) = &c.display {
            x.insert("display".into(), d.clone().into());
        }
        out.insert("coding".into(), json!([Value::Object(x)]));
    }
    if let Some(t) = c.text.as_ref().or(if c.code.is_none() {
        c.display.as_ref()
    } else {
        None
    }) {
        out.insert("text".into(), t.clone().into());
    }
    Value::Object(out)
}

/// A CodeableConcept for a reason: the coded reason and its text.
fn reason(text: &Option<String>, code: &Option<Coding>) -> Option<Value> {
    match (text, code) {
        (None, None) => None,
        (t, Some(c)) => {
            let mut v = concept(c);
            if let Some(t) = t {
                v["text"] = t.clone().into();
            }
            Some(json!([v]))
        }
        (Some(t), None) => Some(json!([{ "text": t }])),
    }
}

/// `"<number> <unit>"` when the number prints back exactly as written.
fn split_quantity(s: &str) -> Option<(Decimal, &str)> {
    let (num, unit) = s.split_once(' ')?;
    let n = Decimal::parse(num).ok()?;
    (!unit.is_empty() && !unit.contains(' ')).then_some((n, unit))
}

/// A Quantity's unit fields: the display, and a system and code only where known.
fn put_unit(
    q: &mut Map<String, Value>,
    unit: &Option<String>,
    code: &Option<String>,
    system: &Option<String>,
) {
    if let Some(u) = unit {
        q.insert("unit".into(), u.clone().into());
    }
    match (system, code) {
        (None, None) => {
            if let Some(u) = unit.as_deref().filter(|u| is_ucum(u)) {
                q.insert("system".into(), UCUM.into());
                q.insert("code".into(), u.into());
            }
        }
        (s, c) => {
            if let Some(s) = s {
                q.insert("system".into(), s.clone().into());
            }
            if let Some(c) = c {
                q.insert("code".into(), c.clone().into());
            }
        }
    }
}

fn quantity(q: &Quantity) -> Value {
    let mut m = Map::new();
    m.insert("value".into(), number(&q.value));
    put_unit(&mut m, &q.unit, &q.code, &q.system);
    Value::Object(m)
}

/// The status element of a resource: the chart's value when it is one of `allowed`, else
/// `fallback` with the chart's word in an extension (so it imports back).
fn status(r: &mut Value, value: Option<&str>, allowed: &[&str], fallback: &str, ext_name: &str) {
    match value {
        Some(v) if allowed.contains(&v) => r["status"] = v.into(),
        Some(v) => {
            r["status"] = fallback.into();
            push_ext(r, ext_str(ext_name, v));
        }
        None => r["status"] = fallback.into(),
    }
}

fn push_ext(r: &mut Value, e: Value) {
    match r.get_mut("extension").and_then(|x| x.as_array_mut()) {
        Some(a) => a.push(e),
        None => r["extension"] = json!([e]),
    }
}

/// Builds the entries of one chart's Bundle.
struct Builder<'a> {
    chart: &'a Chart,
    pid: String,
    patient_url: String,
    entries: Vec<Value>,
}

impl Builder<'_> {
    fn push(&mut self, key: &str, resource: Value) {
        let url = if key == "patient" {
            self.patient_url.clone()
        } else {
            entry_uuid(&self.chart.id, key)
        };
        self.entries
            .push(json!({ "fullUrl": url, "resource": resource }));
    }
    fn subject(&self) -> Value {
        json!({ "reference": self.patient_url })
    }
}

/// One chart as a FHIR R4 Bundle of type `collection`. `history` (from the chart's document)
/// becomes Provenance: who changed the chart, at which practice, when. Serialize it with
/// [`super::json::to_string`], which writes decimals as recorded.
pub fn chart_to_bundle(chart: &Chart, history: &[HistoryEntry]) -> Value {
    let pid = patient_id(&chart.id);
    let mut b = Builder {
        chart,
        patient_url: entry_uuid(&chart.id, "patient"),
        pid: pid.clone(),
        entries: Vec::new(),
    };
    b.push("patient", patient(chart, &pid));
    if let Some(ins) = &chart.patient.insurance {
        let mut cov = json!({
            "resourceType": "Coverage",
            "id": format!("{pid}-coverage"),
            "status": "active",
            "beneficiary": b.subject(),
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
        b.push("coverage", cov);
    }
    for (i, c) in chart.conditions.iter().enumerate() {
        let r = condition(&b, i, c);
        b.push(&format!("cond-{i}"), r);
    }
    for (i, a) in chart.allergies.iter().enumerate() {
        let r = allergy(&b, i, a);
        b.push(&format!("allergy-{i}"), r);
    }
    for (i, m) in chart.medications.iter().enumerate() {
        let r = medication(&b, i, m);
        b.push(&format!("med-{i}"), r);
    }
    for (i, o) in chart.observations.iter().enumerate() {
        let r = observation(&b, i, o);
        b.push(&format!("obs-{i}"), r);
    }
    for (i, n) in chart.notes.iter().enumerate() {
        let r = note(&b, i, n);
        b.push(&format!("note-{i}"), r);
    }
    for (i, im) in chart.immunizations.iter().enumerate() {
        let r = immunization(&b, i, im);
        b.push(&format!("imm-{i}"), r);
    }
    for (i, e) in chart.encounters.iter().enumerate() {
        let r = encounter(&b, i, e);
        b.push(&format!("enc-{i}"), r);
    }
    for (i, p) in chart.procedures.iter().enumerate() {
        let r = procedure(&b, i, p);
        b.push(&format!("proc-{i}"), r);
    }
    if let Some(rf) = &chart.referral {
        let mut r = json!({
            "resourceType": "ServiceRequest",
            "id": format!("{pid}-referral"),
            "status": referral_status_to_fhir(rf.status.as_deref()),
            "intent": "order",
            "category": [{ "coding": [{ "system": "http://snomed.info/sct", "code": "3457005", "display": "Patient referral" }] }],
            "subject": b.subject(),
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
        b.push("referral", r);
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
            "subject": b.subject(),
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
        b.push(&format!("ref-{rid}"), r);
    }
    // Provenance: one per change of the chart's history, naming the author and practice.
    for (i, h) in history.iter().enumerate() {
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
            "target": [b.subject()],
            "recorded": rfc3339_ms(h.time_ms),
            "agent": [agent],
        });
        if let Some(a) = &h.action {
            prov["activity"] = json!({ "text": a });
        }
        b.push(&format!("prov-{i}"), prov);
    }
    json!({
        "resourceType": "Bundle",
        "id": format!("{pid}-bundle"),
        "type": "collection",
        "entry": b.entries,
    })
}

fn patient(chart: &Chart, pid: &str) -> Value {
    let p = &chart.patient;
    let mut ids = vec![json!({ "system": CHART_ID_SYSTEM, "value": chart.id })];
    ids.push(json!({
        "use": "usual",
        "type": { "coding": [{ "system": V2_0203, "code": "MR" }] },
        "system": p.mrn_system.as_deref().unwrap_or(MRN_SYSTEM),
        "value": p.mrn,
    }));
    for i in &p.identifiers {
        let mut x = Map::new();
        if let Some(k) = &i.kind {
            x.insert(
                "type".into(),
                json!({ "coding": [{ "system": V2_0203, "code": k }] }),
            );
        }
        if let Some(s) = &i.system {
            x.insert("system".into(), s.clone().into());
        }
        x.insert("value".into(), i.value.clone().into());
        ids.push(Value::Object(x));
    }
    let mut r = json!({
        "resourceType": "Patient",
        "id": pid,
        "identifier": ids,
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
    r["extension"] = Value::Array(ext);
    if !p.name.given.is_empty() {
        r["name"][0]["given"] = json!(p.name.given);
    }
    if let Some(sex) = &p.sex {
        r["gender"] = sex.clone().into();
    }
    match (&p.deceased_date, p.deceased) {
        (Some(d), _) => r["deceasedDateTime"] = d.clone().into(),
        (None, true) => r["deceasedBoolean"] = true.into(),
        _ => {}
    }
    let mut telecom = Vec::new();
    if let Some(phone) = &p.phone {
        telecom.push(json!({ "system": "phone", "value": phone }));
    }
    for t in &p.telecom {
        let mut x = json!({ "system": t.system, "value": t.value });
        if let Some(u) = &t.use_ {
            x["use"] = u.clone().into();
        }
        telecom.push(x);
    }
    if !telecom.is_empty() {
        r["telecom"] = Value::Array(telecom);
    }
    if let Some(a) = &p.address {
        let mut addr = Map::new();
        if !a.line.is_empty() {
            addr.insert("line".into(), json!(a.line));
        }
        for (k, v) in [
            ("city", &a.city),
            ("state", &a.state),
            ("postalCode", &a.postal_code),
            ("country", &a.country),
        ] {
            if let Some(v) = v {
                addr.insert(k.into(), v.clone().into());
            }
        }
        r["address"] = json!([Value::Object(addr)]);
    }
    if let Some(l) = &p.language {
        r["communication"] =
            json!([{ "language": { "coding": [{ "system": LANGUAGE, "code": l }] } }]);
    }
    r
}

const CONDITION_CLINICAL_CODES: &[&str] = &[
    "active",
    "recurrence",
    "relapse",
    "inactive",
    "remission",
    "resolved",
];

fn condition(b: &Builder, i: usize, c: &Condition) -> Value {
    let mut r = json!({
        "resourceType": "Condition",
        "id": format!("{}-cond-{i}", b.pid),
        "subject": b.subject(),
        "code": { "coding": [coding(&c.system, &c.code, &c.display)] },
    });
    if let Some(d) = &c.display {
        r["code"]["text"] = d.clone().into();
    }
    if let Some(s) = &c.status {
        if CONDITION_CLINICAL_CODES.contains(&s.as_str()) && !c.is_error() {
            r["clinicalStatus"] =
                json!({ "coding": [{ "system": CONDITION_CLINICAL, "code": s }] });
        } else {
            push_ext(&mut r, ext_str("condition-status", s));
        }
    }
    if let Some(v) = &c.verification {
        r["verificationStatus"] =
            json!({ "coding": [{ "system": CONDITION_VERIFICATION, "code": v }] });
    }
    if let Some(cat) = &c.category {
        r["category"] = json!([{ "coding": [{ "system": CONDITION_CATEGORY, "code": cat }] }]);
    }
    if let Some(o) = &c.onset {
        r["onsetDateTime"] = o.clone().into();
    }
    if let Some(a) = &c.abatement {
        r["abatementDateTime"] = a.clone().into();
    }
    if let Some(d) = &c.recorded {
        r["recordedDate"] = d.clone().into();
    }
    r
}

fn allergy(b: &Builder, i: usize, a: &crate::chart::Allergy) -> Value {
    let mut code = match &a.code {
        Some(c) => concept(c),
        None => json!({}),
    };
    code["text"] = a.substance.clone().into();
    let mut r = json!({
        "resourceType": "AllergyIntolerance",
        "id": format!("{}-allergy-{i}", b.pid),
        "patient": b.subject(),
        "code": code,
    });
    if let Some(s) = &a.status {
        r["clinicalStatus"] = json!({ "coding": [{ "system": ALLERGY_CLINICAL, "code": s }] });
    }
    if let Some(v) = &a.verification {
        r["verificationStatus"] =
            json!({ "coding": [{ "system": ALLERGY_VERIFICATION, "code": v }] });
    }
    if let Some(k) = &a.kind {
        r["type"] = k.clone().into();
    }
    if !a.category.is_empty() {
        r["category"] = json!(a.category);
    }
    if let Some(c) = &a.criticality {
        r["criticality"] = c.clone().into();
    }
    if let Some(o) = &a.onset {
        r["onsetDateTime"] = o.clone().into();
    }
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
    r
}

const REQUEST_STATUS: &[&str] = &[
    "active",
    "on-hold",
    "cancelled",
    "completed",
    "entered-in-error",
    "stopped",
    "draft",
    "unknown",
];
const STATEMENT_STATUS: &[&str] = &[
    "active",
    "completed",
    "entered-in-error",
    "intended",
    "stopped",
    "on-hold",
    "unknown",
    "not-taken",
];

fn timing(t: &Timing, frequency: &Option<String>) -> Value {
    let mut repeat = Map::new();
    if let Some(f) = t.frequency {
        repeat.insert("frequency".into(), f.into());
    }
    if let Some(f) = t.frequency_max {
        repeat.insert("frequencyMax".into(), f.into());
    }
    if let Some(p) = &t.period {
        repeat.insert("period".into(), number(p));
    }
    if let Some(p) = &t.period_max {
        repeat.insert("periodMax".into(), number(p));
    }
    if let Some(u) = &t.period_unit {
        repeat.insert("periodUnit".into(), u.clone().into());
    }
    if let Some(c) = t.count {
        repeat.insert("count".into(), c.into());
    }
    if let Some(d) = &t.duration {
        repeat.insert("duration".into(), number(d));
    }
    if let Some(u) = &t.duration_unit {
        repeat.insert("durationUnit".into(), u.clone().into());
    }
    for (k, l) in [
        ("when", &t.when),
        ("timeOfDay", &t.time_of_day),
        ("dayOfWeek", &t.day_of_week),
    ] {
        if !l.is_empty() {
            repeat.insert(k.into(), json!(l));
        }
    }
    let mut out = Map::new();
    if !repeat.is_empty() {
        out.insert("repeat".into(), Value::Object(repeat));
    }
    let mut code = t.code.as_ref().map(concept);
    if let Some(f) = frequency {
        code.get_or_insert_with(|| json!({}))["text"] = f.clone().into();
    }
    if let Some(c) = code {
        out.insert("code".into(), c);
    }
    Value::Object(out)
}

fn medication(b: &Builder, i: usize, m: &Medication) -> Value {
    let mut med = json!({ "text": m.name });
    if let Some(code) = &m.code {
        med["coding"] = json!([coding(&m.system, code, &Some(m.name.clone()))]);
    }
    let request = m.source.as_deref() == Some("request");
    let mut r = json!({
        "resourceType": if request { "MedicationRequest" } else { "MedicationStatement" },
        "id": format!("{}-med-{i}", b.pid),
        "medicationCodeableConcept": med,
        "subject": b.subject(),
    });
    if request {
        status(
            &mut r,
            m.status.as_deref(),
            REQUEST_STATUS,
            "unknown",
            "medication-status",
        );
        r["intent"] = m.intent.clone().unwrap_or_else(|| "order".into()).into();
        if m.do_not_perform {
            r["doNotPerform"] = true.into();
        }
        if let Some(s) = &m.start {
            r["authoredOn"] = s.clone().into();
        }
    } else {
        status(
            &mut r,
            m.status.as_deref(),
            STATEMENT_STATUS,
            "unknown",
            "medication-status",
        );
        if m.status.is_none() {
            r["_status"] = json!({ "extension": absent() });
        }
        if m.start.is_some() || m.end.is_some() {
            let mut p = Map::new();
            if let Some(s) = &m.start {
                p.insert("start".into(), s.clone().into());
            }
            if let Some(e) = &m.end {
                p.insert("end".into(), e.clone().into());
            }
            r["effectivePeriod"] = Value::Object(p);
        }
        if m.intent.is_some() {
            push_ext(
                &mut r,
                ext_str("medication-intent", m.intent.as_deref().unwrap_or("")),
            );
        }
    }
    if let Some(s) = &m.status_reason {
        // One CodeableConcept on a request, a list on a statement.
        r["statusReason"] = if request {
            json!({ "text": s })
        } else {
            json!([{ "text": s }])
        };
    }
    if let Some(reasons) = reason(&m.reason, &m.reason_code) {
        r["reasonCode"] = reasons;
    }
    let mut dosage = Map::new();
    if let Some(t) = &m.dosage {
        dosage.insert("text".into(), t.clone().into());
    }
    match (&m.dose_quantity, &m.dose) {
        (Some(q), _) => {
            dosage.insert(
                "doseAndRate".into(),
                json!([{ "doseQuantity": quantity(q) }]),
            );
        }
        (None, Some(d)) => match split_quantity(d) {
            Some((value, unit)) => {
                dosage.insert(
                    "doseAndRate".into(),
                    json!([{ "doseQuantity": { "value": number(&value), "unit": unit } }]),
                );
            }
            None => {
                // The dose as written, when it is not "<number> <unit>".
                dosage.insert("extension".into(), json!([ext_str("dose-text", d)]));
            }
        },
        (None, None) => {}
    }
    if m.route.is_some() || m.route_code.is_some() {
        let mut route = m
            .route_code
            .as_ref()
            .map(concept)
            .unwrap_or_else(|| json!({}));
        if let Some(t) = &m.route {
            route["text"] = t.clone().into();
        }
        dosage.insert("route".into(), route);
    }
    if m.timing.is_some() || m.frequency.is_some() {
        dosage.insert(
            "timing".into(),
            timing(
                m.timing.as_ref().unwrap_or(&Timing::default()),
                &m.frequency,
            ),
        );
    }
    if let Some(a) = m.as_needed {
        dosage.insert("asNeededBoolean".into(), a.into());
    }
    if !dosage.is_empty() {
        let key = if request {
            "dosageInstruction"
        } else {
            "dosage"
        };
        r[key] = json!([Value::Object(dosage)]);
    }
    r
}

fn put_value(
    r: &mut Value,
    value: &Option<Decimal>,
    comparator: &Option<String>,
    unit: (&Option<String>, &Option<String>, &Option<String>),
    coded: &Option<Coding>,
    string: &Option<String>,
) -> bool {
    if let Some(v) = value {
        let mut q = Map::new();
        q.insert("value".into(), number(v));
        if let Some(c) = comparator {
            q.insert("comparator".into(), c.clone().into());
        }
        put_unit(&mut q, unit.0, unit.1, unit.2);
        r["valueQuantity"] = Value::Object(q);
        true
    } else if let Some(c) = coded {
        r["valueCodeableConcept"] = concept(c);
        true
    } else if let Some(s) = string {
        r["valueString"] = s.clone().into();
        true
    } else {
        false
    }
}

fn interpretation(c: &Coding) -> Value {
    let mut c = c.clone();
    if c.system.is_none() && c.code.is_some() {
        c.system = Some(INTERPRETATION.into());
    }
    json!([concept(&c)])
}

fn component(c: &Component) -> Value {
    let mut r = json!({ "code": { "coding": [coding(&c.system, &c.code, &c.display)] } });
    if let Some(d) = &c.display {
        r["code"]["text"] = d.clone().into();
    }
    let has = put_value(
        &mut r,
        &c.value,
        &c.comparator,
        (&c.unit, &c.unit_code, &c.unit_system),
        &c.value_coding,
        &c.value_string,
    );
    if !has {
        r["dataAbsentReason"] = json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown" }] });
    }
    if let Some(i) = &c.interpretation {
        r["interpretation"] = interpretation(i);
    }
    r
}

fn observation(b: &Builder, i: usize, o: &Observation) -> Value {
    let mut r = json!({
        "resourceType": "Observation",
        "id": format!("{}-obs-{i}", b.pid),
        "status": o.status.clone().unwrap_or_else(|| "final".into()),
        "code": { "coding": [coding(&o.system, &o.code, &o.display)] },
        "subject": b.subject(),
        "effectiveDateTime": o.date,
    });
    if let Some(d) = &o.display {
        r["code"]["text"] = d.clone().into();
    }
    if let Some(c) = &o.category {
        r["category"] = json!([{ "coding": [{ "system": OBS_CATEGORY, "code": c }] }]);
    }
    let mut has = put_value(
        &mut r,
        &o.value,
        &o.comparator,
        (&o.unit, &o.unit_code, &o.unit_system),
        &o.value_coding,
        &o.value_string,
    );
    if let Some(v) = o.value_boolean {
        r["valueBoolean"] = v.into();
        has = true;
    } else if let Some(v) = &o.value_date_time {
        r["valueDateTime"] = v.clone().into();
        has = true;
    }
    if !has && o.components.is_empty() {
        r["dataAbsentReason"] = json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown" }] });
    }
    if let Some(c) = &o.interpretation {
        r["interpretation"] = interpretation(c);
    }
    if let Some(rr) = &o.reference_range {
        let mut x = Map::new();
        for (k, v) in [("low", &rr.low), ("high", &rr.high)] {
            if let Some(v) = v {
                let mut q = Map::new();
                q.insert("value".into(), number(v));
                put_unit(&mut q, &rr.unit, &None, &None);
                x.insert(k.into(), Value::Object(q));
            }
        }
        if let Some(t) = &rr.text {
            x.insert("text".into(), t.clone().into());
        }
        r["referenceRange"] = json!([Value::Object(x)]);
    }
    if !o.components.is_empty() {
        r["component"] = Value::Array(o.components.iter().map(component).collect());
    }
    r
}

fn note(b: &Builder, i: usize, n: &Note) -> Value {
    use data_encoding::BASE64;
    let kind = n.kind.as_ref().map(concept).unwrap_or_else(|| {
        json!({ "coding": [{ "system": "http://loinc.org", "code": "11506-3", "display": "Progress note" }] })
    });
    let mut r = json!({
        "resourceType": "DocumentReference",
        "id": format!("{}-note-{i}", b.pid),
        "identifier": [{ "system": NOTE_ID_SYSTEM, "value": n.id }],
        "status": n.status.clone().unwrap_or_else(|| "current".into()),
        "type": kind,
        "subject": b.subject(),
        "author": [{ "display": n.author }],
        "content": [{ "attachment": {
            "contentType": "text/plain; charset=utf-8",
            "data": BASE64.encode(n.text.as_bytes()),
        } }],
    });
    if n.kind.is_none() {
        push_ext(&mut r, ext_str("note-type", "default"));
    }
    // DocumentReference.date is an instant; a date of less precision goes in the context.
    if super::is_instant(&n.date) {
        r["date"] = n.date.clone().into();
    } else {
        r["context"] = json!({ "period": { "start": n.date } });
    }
    r
}

fn immunization(b: &Builder, i: usize, im: &Immunization) -> Value {
    let mut code = json!({ "text": im.vaccine });
    if let Some(c) = &im.code {
        code["coding"] = json!([coding(&im.system, c, &Some(im.vaccine.clone()))]);
    }
    let mut r = json!({
        "resourceType": "Immunization",
        "id": format!("{}-imm-{i}", b.pid),
        "status": im.status.clone().unwrap_or_else(|| "completed".into()),
        "vaccineCode": code,
        "patient": b.subject(),
        "occurrenceDateTime": im.date,
    });
    if let Some(s) = &im.status_reason {
        r["statusReason"] = json!({ "text": s });
    }
    if let Some(l) = &im.lot {
        r["lotNumber"] = l.clone().into();
    }
    r
}

fn encounter(b: &Builder, i: usize, e: &Encounter) -> Value {
    let mut r = json!({
        "resourceType": "Encounter",
        "id": format!("{}-enc-{i}", b.pid),
        "status": e.status,
        "subject": b.subject(),
    });
    r["class"] = match &e.class {
        Some(c) => json!({ "system": ACT_CODE, "code": c }),
        None => json!({ "extension": absent() }),
    };
    if e.code.is_some() || e.display.is_some() {
        let mut t = match &e.code {
            Some(c) => json!({ "coding": [coding(&e.system, c, &e.display)] }),
            None => json!({}),
        };
        if let Some(d) = &e.display {
            t["text"] = d.clone().into();
        }
        r["type"] = json!([t]);
    }
    if e.start.is_some() || e.end.is_some() {
        let mut p = Map::new();
        if let Some(s) = &e.start {
            p.insert("start".into(), s.clone().into());
        }
        if let Some(x) = &e.end {
            p.insert("end".into(), x.clone().into());
        }
        r["period"] = Value::Object(p);
    }
    if let Some(reasons) = reason(&e.reason, &e.reason_code) {
        r["reasonCode"] = reasons;
    }
    if let Some(p) = &e.practitioner {
        r["participant"] = json!([{ "individual": { "display": p } }]);
    }
    if let Some(l) = &e.location {
        r["location"] = json!([{ "location": { "display": l } }]);
    }
    if let Some(s) = &e.source_id {
        r["identifier"] = json!([{ "system": SOURCE_ID_SYSTEM, "value": s }]);
    }
    r
}

fn procedure(b: &Builder, i: usize, p: &Procedure) -> Value {
    let mut r = json!({
        "resourceType": "Procedure",
        "id": format!("{}-proc-{i}", b.pid),
        "status": p.status,
        "code": { "coding": [coding(&p.system, &p.code, &p.display)] },
        "subject": b.subject(),
    });
    if let Some(d) = &p.display {
        r["code"]["text"] = d.clone().into();
    }
    match (&p.date, &p.end) {
        (Some(d), None) => r["performedDateTime"] = d.clone().into(),
        (d, Some(e)) => {
            let mut x = Map::new();
            if let Some(d) = d {
                x.insert("start".into(), d.clone().into());
            }
            x.insert("end".into(), e.clone().into());
            r["performedPeriod"] = Value::Object(x);
        }
        (None, None) => {}
    }
    if let Some(reasons) = reason(&p.reason, &p.reason_code) {
        r["reasonCode"] = reasons;
    }
    if let Some(s) = &p.body_site {
        r["bodySite"] = json!([{ "text": s }]);
    }
    r
}

pub(super) fn referral_status_to_fhir(s: Option<&str>) -> &'static str {
    match s {
        Some("pending") | Some("draft") => "draft",
        Some("sent") | Some("accepted") | Some("active") => "active",
        Some("completed") => "completed",
        Some("cancelled") | Some("declined") | Some("revoked") => "revoked",
        Some("on-hold") => "on-hold",
        _ => "unknown",
    }
}

/// The resources of a chart's Bundle with every reference made relative (`Type/id`), as a
/// FHIR server or a Bulk Data export presents them outside a Bundle.
pub fn bundle_resources(bundle: &Value) -> Vec<Value> {
    let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
    let map: std::collections::HashMap<String, String> = entries
        .iter()
        .filter_map(|e| {
            Some((
                e["fullUrl"].as_str()?.to_string(),
                format!(
                    "{}/{}",
                    e["resource"]["resourceType"].as_str()?,
                    e["resource"]["id"].as_str()?
                ),
            ))
        })
        .collect();
    fn walk(v: &mut Value, map: &std::collections::HashMap<String, String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    if k == "reference"
                        && let Some(r) = x.as_str().and_then(|s| map.get(s))
                    {
                        *x = Value::String(r.clone());
                    } else {
                        walk(x, map);
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, map)),
            _ => {}
        }
    }
    entries
        .into_iter()
        .map(|e| {
            let mut r = e["resource"].clone();
            walk(&mut r, &map);
            r
        })
        .collect()
}
