//! The chart model: typed structs for a patient chart in the shape of the benchmark charts
//! (`schemaVersion` 1), parsing with errors that name the offending field, and validation of
//! formats (dates, timestamps, enumerations).
//!
//! Lists that are missing in an input record are taken as empty; optional scalars that are
//! missing stay missing, so an exported chart has exactly the fields that were imported.

use serde::{Deserialize, Serialize};
use serde_json::Number;

use crate::MAX_CHART_JSON_BYTES;
use crate::error::ValidationError;
use crate::ids::ChartId;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Chart {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub practice_id: Option<String>,
    pub patient: Patient,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub allergies: Vec<Allergy>,
    #[serde(default)]
    pub medications: Vec<Medication>,
    #[serde(default)]
    pub observations: Vec<Observation>,
    #[serde(default)]
    pub notes: Vec<Note>,
    #[serde(default)]
    pub immunizations: Vec<Immunization>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referral: Option<Referral>,
    /// Referrals made between practices (`chartmesh refer`), by id: see [`crate::referral`].
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub referrals: crate::referral::Referrals,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Patient {
    pub mrn: String,
    pub name: HumanName,
    pub birth_date: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insurance: Option<Insurance>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HumanName {
    #[serde(default)]
    pub given: Vec<String>,
    pub family: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Address {
    #[serde(default)]
    pub line: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Insurance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Allergy {
    pub substance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reaction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Medication {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dose: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Observation {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    pub value: Number,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub date: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Note {
    pub id: String,
    pub author: String,
    pub date: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Immunization {
    pub vaccine: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub date: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lot: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Referral {
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// The sections of a chart that entries can be appended to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Conditions,
    Allergies,
    Medications,
    Observations,
    Notes,
    Immunizations,
}

impl Section {
    pub fn key(self) -> &'static str {
        match self {
            Section::Conditions => "conditions",
            Section::Allergies => "allergies",
            Section::Medications => "medications",
            Section::Observations => "observations",
            Section::Notes => "notes",
            Section::Immunizations => "immunizations",
        }
    }
}

/// An entry appended to a section, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Condition(Condition),
    Allergy(Allergy),
    Medication(Medication),
    Observation(Observation),
    Note(Note),
    Immunization(Immunization),
}

impl Entry {
    pub fn section(&self) -> Section {
        match self {
            Entry::Condition(_) => Section::Conditions,
            Entry::Allergy(_) => Section::Allergies,
            Entry::Medication(_) => Section::Medications,
            Entry::Observation(_) => Section::Observations,
            Entry::Note(_) => Section::Notes,
            Entry::Immunization(_) => Section::Immunizations,
        }
    }
    pub fn to_json(&self) -> serde_json::Value {
        let r = match self {
            Entry::Condition(x) => serde_json::to_value(x),
            Entry::Allergy(x) => serde_json::to_value(x),
            Entry::Medication(x) => serde_json::to_value(x),
            Entry::Observation(x) => serde_json::to_value(x),
            Entry::Note(x) => serde_json::to_value(x),
            Entry::Immunization(x) => serde_json::to_value(x),
        };
        r.expect("chart entries always serialize")
    }
    /// Checks the entry's formats; `path` prefixes field names in errors.
    pub fn validate(&self, path: &str) -> Result<(), ValidationError> {
        match self {
            Entry::Condition(c) => validate_condition(c, path),
            Entry::Allergy(a) => validate_allergy(a, path),
            Entry::Medication(m) => validate_medication(m, path),
            Entry::Observation(o) => validate_observation(o, path),
            Entry::Note(n) => validate_note(n, path),
            Entry::Immunization(i) => validate_immunization(i, path),
        }
    }
}

impl Chart {
    /// Parses one JSON record and validates it. Errors name the field at fault.
    pub fn from_json_slice(bytes: &[u8]) -> Result<Chart, ValidationError> {
        if bytes.len() > MAX_CHART_JSON_BYTES {
            return Err(ValidationError::new(
                "",
                format!(
                    "record is {} bytes, over the limit of {} bytes for one chart; split it or check that the file is JSONL (one chart per line)",
                    bytes.len(),
                    MAX_CHART_JSON_BYTES
                ),
            ));
        }
        let chart: Chart = match serde_json::from_slice(bytes) {
            Ok(c) => c,
            Err(first) => return Err(describe_parse_error(bytes, first)),
        };
        chart.validate()?;
        Ok(chart)
    }

    /// Validates a chart already in JSON form (e.g. read back from a received document).
    pub fn from_json_value(v: serde_json::Value) -> Result<Chart, ValidationError> {
        let chart: Chart = serde_json::from_value(v)
            .map_err(|e| ValidationError::new("", format!("not a valid chart: {e}")))?;
        chart.validate()?;
        Ok(chart)
    }

    pub fn chart_id(&self) -> ChartId {
        ChartId::parse(&self.id).expect("validated chart has a valid id")
    }

    pub fn to_json_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("charts always serialize")
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        ChartId::parse(&self.id)?;
        if self.kind != "chart" {
            return Err(ValidationError::new(
                "type",
                format!("expected \"chart\", got {:?}", self.kind),
            ));
        }
        if self.schema_version != 1 {
            return Err(ValidationError::new(
                "schemaVersion",
                format!(
                    "version {} is not supported; this chartmesh reads schemaVersion 1",
                    self.schema_version
                ),
            ));
        }
        let p = &self.patient;
        non_empty("patient.mrn", &p.mrn)?;
        non_empty("patient.name.family", &p.name.family)?;
        date("patient.birthDate", &p.birth_date)?;
        if let Some(sex) = &p.sex {
            one_of("patient.sex", sex, &["male", "female", "other", "unknown"])?;
        }
        if let Some(ins) = &p.insurance {
            opt_date("patient.insurance.validUntil", &ins.valid_until)?;
        }
        // Paths are only formatted when an entry is at fault (this is the import hot path).
        fn at(section: &'static str, i: usize) -> impl FnOnce(ValidationError) -> ValidationError {
            move |e| e.within(&format!("{section}[{i}]"))
        }
        for (i, c) in self.conditions.iter().enumerate() {
            validate_condition(c, "").map_err(at("conditions", i))?;
        }
        for (i, a) in self.allergies.iter().enumerate() {
            validate_allergy(a, "").map_err(at("allergies", i))?;
        }
        for (i, m) in self.medications.iter().enumerate() {
            validate_medication(m, "").map_err(at("medications", i))?;
        }
        for (i, o) in self.observations.iter().enumerate() {
            validate_observation(o, "").map_err(at("observations", i))?;
        }
        for (i, n) in self.notes.iter().enumerate() {
            validate_note(n, "").map_err(at("notes", i))?;
        }
        for (i, im) in self.immunizations.iter().enumerate() {
            validate_immunization(im, "").map_err(at("immunizations", i))?;
        }
        if let Some(r) = &self.referral {
            non_empty("referral.to", &r.to)?;
            opt_date("referral.date", &r.date)?;
        }
        timestamp("createdAt", &self.created_at)?;
        timestamp("updatedAt", &self.updated_at)?;
        Ok(())
    }
}

fn describe_parse_error(bytes: &[u8], first: serde_json::Error) -> ValidationError {
    if std::str::from_utf8(bytes).is_err() {
        return ValidationError::new(
            "",
            "record is not valid UTF-8; save the file as UTF-8 and import it again",
        );
    }
    if first.is_eof() {
        return ValidationError::new(
            "",
            format!("record is truncated (JSON ends early: {first})"),
        );
    }
    if first.is_syntax() {
        return ValidationError::new("", format!("not valid JSON: {first}"));
    }
    // A well-formed JSON value of the wrong shape: parse again, tracking the path, to name the field.
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, Chart>(de) {
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let msg = e.into_inner().to_string();
            let msg = match msg.find(" at line ") {
                Some(i) => msg[..i].to_string(),
                None => msg,
            };
            ValidationError::new(path, msg)
        }
        Ok(_) => ValidationError::new("", first.to_string()),
    }
}

fn prefixed(path: &str, r: Result<(), ValidationError>) -> Result<(), ValidationError> {
    match r {
        Err(e) if !path.is_empty() => Err(e.within(path)),
        other => other,
    }
}

fn validate_condition(c: &Condition, path: &str) -> Result<(), ValidationError> {
    prefixed(path, validate_condition_fields(c))
}

fn validate_allergy(a: &Allergy, path: &str) -> Result<(), ValidationError> {
    prefixed(path, validate_allergy_fields(a))
}

fn validate_medication(m: &Medication, path: &str) -> Result<(), ValidationError> {
    prefixed(path, validate_medication_fields(m))
}

fn validate_observation(o: &Observation, path: &str) -> Result<(), ValidationError> {
    prefixed(path, validate_observation_fields(o))
}

fn validate_note(n: &Note, path: &str) -> Result<(), ValidationError> {
    prefixed(path, validate_note_fields(n))
}

fn validate_immunization(i: &Immunization, path: &str) -> Result<(), ValidationError> {
    prefixed(path, validate_immunization_fields(i))
}

fn validate_condition_fields(c: &Condition) -> Result<(), ValidationError> {
    non_empty("code", &c.code)?;
    opt_date("onset", &c.onset)?;
    Ok(())
}

fn validate_allergy_fields(a: &Allergy) -> Result<(), ValidationError> {
    non_empty("substance", &a.substance)?;
    if let Some(s) = &a.severity {
        one_of("severity", s, &["mild", "moderate", "severe"])?;
    }
    opt_date("recorded", &a.recorded)?;
    Ok(())
}

fn validate_medication_fields(m: &Medication) -> Result<(), ValidationError> {
    non_empty("name", &m.name)?;
    opt_date("start", &m.start)?;
    Ok(())
}

fn validate_observation_fields(o: &Observation) -> Result<(), ValidationError> {
    non_empty("code", &o.code)?;
    timestamp("date", &o.date)?;
    Ok(())
}

fn validate_note_fields(n: &Note) -> Result<(), ValidationError> {
    non_empty("id", &n.id)?;
    non_empty("author", &n.author)?;
    timestamp("date", &n.date)?;
    Ok(())
}

fn validate_immunization_fields(i: &Immunization) -> Result<(), ValidationError> {
    non_empty("vaccine", &i.vaccine)?;
    date("date", &i.date)?;
    Ok(())
}

fn non_empty(field: &str, v: &str) -> Result<(), ValidationError> {
    if v.trim().is_empty() {
        Err(ValidationError::new(field, "must not be empty"))
    } else {
        Ok(())
    }
}

fn one_of(field: &str, v: &str, allowed: &[&str]) -> Result<(), ValidationError> {
    if allowed.contains(&v) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("{v:?} is not one of {}", allowed.join(", ")),
        ))
    }
}

/// `YYYY-MM-DD`, a real calendar date.
pub fn date(field: &str, v: &str) -> Result<(), ValidationError> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    if v.len() == 10 && time::Date::parse(v, &fmt).is_ok() {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("expected a date as YYYY-MM-DD, got {v:?}"),
        ))
    }
}

fn opt_date(field: &str, v: &Option<String>) -> Result<(), ValidationError> {
    match v {
        Some(v) => date(field, v),
        None => Ok(()),
    }
}

/// An RFC 3339 timestamp, e.g. `2023-05-01T09:12:00Z`.
pub fn timestamp(field: &str, v: &str) -> Result<(), ValidationError> {
    if time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).is_ok() {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("expected an ISO-8601 timestamp such as 2024-05-01T09:12:00Z, got {v:?}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"id":"chart-1","type":"chart","schemaVersion":1,"practiceId":"p","patient":{"mrn":"M1","name":{"given":["A"],"family":"B"},"birthDate":"2010-12-11","sex":"male"},"conditions":[],"allergies":[],"medications":[],"observations":[{"code":"8480-6","value":131,"date":"2023-05-01T09:12:00Z"}],"notes":[],"immunizations":[],"createdAt":"2021-07-03T11:45:00Z","updatedAt":"2025-02-14T16:05:00Z"}"#;

    fn err(s: &str) -> ValidationError {
        Chart::from_json_slice(s.as_bytes()).unwrap_err()
    }

    #[test]
    fn a_good_chart_parses() {
        let c = Chart::from_json_slice(GOOD.as_bytes()).unwrap();
        assert_eq!(c.id, "chart-1");
        assert_eq!(c.observations[0].value.as_i64(), Some(131));
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(&GOOD.replace("\"2010-12-11\"", "\"2010-13-11\""));
        assert_eq!(e.field, "patient.birthDate");
        let e = err(&GOOD.replace("\"value\":131", "\"value\":\"high\""));
        assert_eq!(e.field, "observations[0].value", "{e}");
        let e = err(&GOOD.replace("\"mrn\":\"M1\",", ""));
        assert!(e.to_string().contains("mrn"), "{e}");
        let e = err(&GOOD.replace("\"id\":\"chart-1\",", ""));
        assert!(e.to_string().contains("`id`"), "{e}");
        let e = err(&GOOD[..GOOD.len() - 20]);
        assert!(e.message.contains("truncated"), "{e}");
        let e = err(&GOOD.replace("\"sex\":\"male\"", "\"sex\":\"m\""));
        assert_eq!(e.field, "patient.sex");
        let e = err(&GOOD.replace("\"schemaVersion\":1", "\"schemaVersion\":2"));
        assert_eq!(e.field, "schemaVersion");
        let e = err(&GOOD.replace("\"practiceId\"", "\"practiceID\""));
        assert!(e.message.contains("unknown field"), "{e}");
        let mut bad = GOOD.as_bytes().to_vec();
        bad[30] = 0xff;
        assert!(
            !err(std::str::from_utf8(&bad).unwrap_or("\u{fffd}"))
                .message
                .is_empty()
        );
        assert!(
            Chart::from_json_slice(&bad)
                .unwrap_err()
                .message
                .contains("UTF-8")
        );
    }
}
