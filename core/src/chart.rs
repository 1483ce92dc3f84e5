//! The chart model: typed structs for a patient chart in the shape of the benchmark charts,
//! parsing with errors that name the offending field, and validation of formats (dates,
//! timestamps, enumerations), sizes and characters.
//!
//! Lists that are missing in an input record are taken as empty; optional scalars that are
//! missing stay missing, so an exported chart has exactly the fields that were imported.
//!
//! ## Versions
//!
//! `schemaVersion` 1 is the shape of the benchmark charts. Version 2 ([`CURRENT_VERSION`])
//! adds optional fields only (encounters and procedures; the patient's identifiers with their
//! systems, deceased status, other contacts and language; statuses, negation, codes, dosage,
//! structured values and dates of any FHIR precision on the entries; docs/CLINICAL.md has the
//! table). A version 1 chart is a valid version 2 chart and is read as it is: nothing in the
//! store is rewritten. A chart keeps version 1 while it holds nothing of version 2, so a
//! version 1 chart is exported exactly as it came in; the change that first adds a version 2
//! field also sets `schemaVersion` to 2 ([`Chart::required_version`]). A version 1 record that
//! holds a version 2 field is refused, naming the field.
//!
//! ## Limits
//!
//! Every free-text field is bounded and may not hold control characters (docs/CLINICAL.md,
//! "Limits of a chart"): single-line fields at most [`MAX_LINE_CHARS`] characters with no
//! control character at all; multi-line text (dosage instructions, reasons, string results)
//! at most [`MAX_TEXT_CHARS`] characters and a note's text at most [`MAX_NOTE_BYTES`] bytes,
//! where newline and tab are allowed. Refused everywhere: the other C0 controls (NUL, ESC,
//! carriage return, ...), DEL, the C1 controls and the Unicode bidirectional overrides,
//! embeddings and isolates (U+202A–U+202E, U+2066–U+2069), which can make a chart read
//! differently from what it holds.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::MAX_CHART_JSON_BYTES;
use crate::error::ValidationError;
use crate::ids::ChartId;

/// The newest `schemaVersion` this chartmesh reads and writes.
pub const CURRENT_VERSION: u32 = 2;
/// The longest single-line field (a name, a code, a display text), in characters.
pub const MAX_LINE_CHARS: usize = 500;
/// The longest multi-line field other than a note (dosage instructions, a reason, a string
/// result), in characters.
pub const MAX_TEXT_CHARS: usize = 4000;
/// The longest note text, in bytes (UTF-8).
pub const MAX_NOTE_BYTES: usize = 100 * 1024;
/// The most items in a small list of a chart (given names, address lines, identifiers,
/// contacts, categories, an observation's components).
pub const MAX_LIST_ITEMS: usize = 50;

fn is_false(b: &bool) -> bool {
    !*b
}

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
    /// Visits (version 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub encounters: Vec<Encounter>,
    /// Procedures performed (version 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub procedures: Vec<Procedure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referral: Option<Referral>,
    /// Referrals made between practices (`chartmesh refer`), by id: see [`crate::referral`].
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub referrals: crate::referral::Referrals,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Patient {
    pub mrn: String,
    /// The identifier system of the MRN (a URI), when known (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrn_system: Option<String>,
    /// The patient's other identifiers (version 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identifiers: Vec<Identifier>,
    pub name: HumanName,
    pub birth_date: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sex: Option<String>,
    /// The patient has died (version 2); `deceasedDate` when the date is known.
    #[serde(default, skip_serializing_if = "is_false")]
    pub deceased: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deceased_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// Contacts other than `phone` (version 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub telecom: Vec<Telecom>,
    /// Preferred language, a BCP-47 code such as `en-US` (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insurance: Option<Insurance>,
}

/// One identifier of the patient: a value within a system (a URI naming who issued it).
/// Two identifiers are the same only when both the system and the value are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Identifier {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub value: String,
    /// The kind, as a v2-0203 code (`MR`, `SS`, `DL`, `PPN`, ...).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Telecom {
    /// `phone`, `fax`, `email`, `pager`, `url`, `sms` or `other`.
    pub system: String,
    pub value: String,
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HumanName {
    #[serde(default)]
    pub given: Vec<String>,
    pub family: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Address {
    #[serde(default)]
    pub line: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    /// State or province (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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

/// A code from a code system, with its display text; `text` is the source's own wording
/// when it differs from the display (FHIR `CodeableConcept.text`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Coding {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// A decimal number kept as the text it was written with (`1.20` stays `1.20`, a long value
/// keeps every digit), so values round-trip exactly. In JSON it is a number.
#[derive(Debug, Clone)]
pub struct Decimal(Box<RawValue>);

impl Decimal {
    /// Parses the text of a JSON number (at most 40 characters, finite).
    pub fn parse(text: &str) -> Result<Decimal, String> {
        let ok = !text.is_empty() && text.len() <= 40 && is_json_number(text.as_bytes());
        if !ok {
            return Err(format!("{text:?} is not a decimal number"));
        }
        if !text.parse::<f64>().is_ok_and(f64::is_finite) {
            return Err(format!("{text} is out of range"));
        }
        RawValue::from_string(text.to_string())
            .map(Decimal)
            .map_err(|e| e.to_string())
    }
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
    pub fn as_f64(&self) -> Option<f64> {
        self.0.get().parse().ok()
    }
    pub fn as_i64(&self) -> Option<i64> {
        self.0.get().parse().ok()
    }
}

impl From<i64> for Decimal {
    fn from(v: i64) -> Self {
        Decimal(RawValue::from_string(v.to_string()).expect("an integer is JSON"))
    }
}

impl std::fmt::Display for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for Decimal {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Serialize for Decimal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Decimal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        let t = raw.get().trim();
        if !is_json_number(t.as_bytes()) {
            return Err(serde::de::Error::custom(format!(
                "expected a number, got {}",
                crate::chart::clip(t, 40)
            )));
        }
        if t.len() != raw.get().len() {
            return Decimal::parse(t).map_err(serde::de::Error::custom);
        }
        Ok(Decimal(raw))
    }
}

/// Whether `b` is exactly one JSON number.
pub fn is_json_number(b: &[u8]) -> bool {
    let mut i = 0;
    if b.first() == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        let s = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == s {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let s = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == s {
            return false;
        }
    }
    i == b.len()
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// An amount: a value, optionally with a unit (a dose without a unit is fine).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quantity {
    pub value: Decimal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// When a medication is taken (FHIR `Timing.repeat`, the common part).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_max: Option<Decimal>,
    /// `s`, `min`, `h`, `d`, `wk`, `mo` or `a`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_unit: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub time_of_day: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub day_of_week: Vec<String>,
    /// A coded schedule (`BID`, `QD`, ...), FHIR `Timing.code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Coding>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onset: Option<String>,
    /// Clinical status: active, recurrence, relapse, inactive, remission, resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Verification status (version 2): unconfirmed, provisional, differential, confirmed,
    /// refuted, entered-in-error. A refuted condition is never active; one entered in error
    /// is never evidence of anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<String>,
    /// When it ended (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abatement: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Allergy {
    pub substance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reaction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<String>,
    /// The substance's code (SNOMED CT, RxNorm, ...) (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Coding>,
    /// low, high or unable-to-assess.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criticality: Option<String>,
    /// food, medication, environment, biologic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub category: Vec<String>,
    /// allergy or intolerance.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Clinical status: active, inactive, resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Verification status: unconfirmed, confirmed, refuted, entered-in-error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onset: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Medication {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The dose as written ("400 mg", "1-2 puffs").
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
    /// `request` for a prescription (FHIR MedicationRequest); absent: a statement of use
    /// (version 2 from here on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// For a request: proposal, plan, order, original-order, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    /// The drug must NOT be given (FHIR `doNotPerform`): never an active medication.
    #[serde(default, skip_serializing_if = "is_false")]
    pub do_not_perform: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// Dosage instructions as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dosage: Option<String>,
    /// The structured dose; a dose without a unit ("1" tablet) is fine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dose_quantity: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<Timing>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_needed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_code: Option<Coding>,
    /// Why it is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<Coding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

/// A reference range of a result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Range {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// One part of a multi-part result (the systolic and diastolic of a blood pressure).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Component {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_coding: Option<Coding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_string: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpretation: Option<Coding>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Observation {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// A numeric result, as written. Version 1 requires it; version 2 may give a coded,
    /// string, boolean or date-time result, or components, instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Decimal>,
    /// `<`, `<=`, `>=`, `>` or `ad`: the value is a bound, not the result (">1.2").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparator: Option<String>,
    /// The unit as shown to people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The unit's code and code system, when they are not simply the UCUM code `unit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_coding: Option<Coding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_string: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_boolean: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_date_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub date: String,
    /// registered, preliminary, final (absent), amended, corrected, cancelled,
    /// entered-in-error, unknown. Entered in error or cancelled: never evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpretation: Option<Coding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_range: Option<Range>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<Component>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Note {
    pub id: String,
    pub author: String,
    pub date: String,
    pub text: String,
    /// The kind of note (LOINC document type, e.g. 11506-3 progress note) (version 2).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<Coding>,
    /// current (absent), superseded, entered-in-error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// completed (absent), not-done, entered-in-error. Only a completed one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Why it was not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
}

/// A visit (version 2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Encounter {
    /// planned, arrived, triaged, in-progress, onleave, finished, cancelled,
    /// entered-in-error, unknown.
    pub status: String,
    /// The setting, a v3 ActCode (`AMB`, `EMER`, `IMP`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<Coding>,
    /// Who saw the patient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub practitioner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The source system's id of the visit, so entries can name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_id: Option<String>,
}

/// A procedure (version 2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Procedure {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// preparation, in-progress, not-done, on-hold, stopped, completed, entered-in-error,
    /// unknown. Not done or entered in error: it did not happen.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<Coding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_site: Option<String>,
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

// ---------------------------------------------------------------------------------------
// What an entry means: status and negation, in one place for every reader (alerts, due
// lists, the population report, the patient copy, the IPS).
// ---------------------------------------------------------------------------------------

impl Condition {
    /// Entered in error: it never happened and is evidence of nothing.
    pub fn is_error(&self) -> bool {
        self.verification.as_deref() == Some("entered-in-error")
    }
    /// A problem the patient has now: clinically active (or no status given) and neither
    /// refuted nor entered in error.
    pub fn is_active(&self) -> bool {
        matches!(
            self.status.as_deref(),
            None | Some("active") | Some("recurrence") | Some("relapse")
        ) && !matches!(
            self.verification.as_deref(),
            Some("refuted") | Some("entered-in-error")
        )
    }
    /// Whether the patient has or had it (not refuted, not an error).
    pub fn is_fact(&self) -> bool {
        !matches!(
            self.verification.as_deref(),
            Some("refuted") | Some("entered-in-error")
        )
    }
}

impl Allergy {
    /// Whether the allergy stands: not refuted, not entered in error, not inactive or resolved.
    pub fn is_active(&self) -> bool {
        !matches!(
            self.verification.as_deref(),
            Some("refuted") | Some("entered-in-error")
        ) && !matches!(self.status.as_deref(), Some("inactive") | Some("resolved"))
    }
}

impl Medication {
    /// Taken now: not a do-not-perform order, and a status that says it is in use.
    pub fn is_active(&self) -> bool {
        !self.do_not_perform
            && matches!(
                self.status.as_deref(),
                None | Some("active") | Some("intended") | Some("on-hold")
            )
    }
    /// Whether it is a record that the drug was (or is) taken or prescribed: not entered in
    /// error, not a do-not-perform order, not "not taken", not a draft or cancelled order.
    pub fn is_fact(&self) -> bool {
        !self.do_not_perform
            && !matches!(
                self.status.as_deref(),
                Some("entered-in-error") | Some("not-taken") | Some("cancelled") | Some("draft")
            )
    }
}

impl Observation {
    /// Whether the result counts: not entered in error, not cancelled, not merely registered.
    pub fn is_evidence(&self) -> bool {
        !matches!(
            self.status.as_deref(),
            Some("entered-in-error") | Some("cancelled") | Some("registered")
        )
    }
}

impl Immunization {
    /// Whether the vaccine was given: completed (or no status given).
    pub fn was_given(&self) -> bool {
        matches!(self.status.as_deref(), None | Some("completed"))
    }
}

impl Note {
    pub fn is_error(&self) -> bool {
        self.status.as_deref() == Some("entered-in-error")
    }
}

impl Encounter {
    /// The visit took place (or is taking place).
    pub fn happened(&self) -> bool {
        !matches!(
            self.status.as_str(),
            "cancelled" | "entered-in-error" | "planned"
        )
    }
}

impl Procedure {
    pub fn happened(&self) -> bool {
        !matches!(
            self.status.as_str(),
            "not-done" | "entered-in-error" | "preparation"
        )
    }
}

impl Patient {
    /// Every identifier with its system: the MRN first, then the others.
    pub fn all_identifiers(&self) -> impl Iterator<Item = (Option<&str>, &str)> {
        std::iter::once((self.mrn_system.as_deref(), self.mrn.as_str())).chain(
            self.identifiers
                .iter()
                .map(|i| (i.system.as_deref(), i.value.as_str())),
        )
    }
    pub fn is_deceased(&self) -> bool {
        self.deceased || self.deceased_date.is_some()
    }
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
    Encounters,
    Procedures,
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
            Section::Encounters => "encounters",
            Section::Procedures => "procedures",
        }
    }
}

/// An entry appended to a section, typed. (Entries are built one at a time and moved into a
/// chart's lists, so the size difference between kinds does not matter.)
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Entry {
    Condition(Condition),
    Allergy(Allergy),
    Medication(Medication),
    Observation(Observation),
    Note(Note),
    Immunization(Immunization),
    Encounter(Encounter),
    Procedure(Procedure),
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
            Entry::Encounter(_) => Section::Encounters,
            Entry::Procedure(_) => Section::Procedures,
        }
    }
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.to_json_string()).expect("chart entries always serialize")
    }
    /// The entry's compact JSON, numbers exactly as written (how it is kept in the document).
    pub fn to_json_string(&self) -> String {
        let r = match self {
            Entry::Condition(x) => serde_json::to_string(x),
            Entry::Allergy(x) => serde_json::to_string(x),
            Entry::Medication(x) => serde_json::to_string(x),
            Entry::Observation(x) => serde_json::to_string(x),
            Entry::Note(x) => serde_json::to_string(x),
            Entry::Immunization(x) => serde_json::to_string(x),
            Entry::Encounter(x) => serde_json::to_string(x),
            Entry::Procedure(x) => serde_json::to_string(x),
        };
        r.expect("chart entries always serialize")
    }
    /// Checks the entry's formats, sizes and characters (version 2 rules); `path` prefixes
    /// field names in errors.
    pub fn validate(&self, path: &str) -> Result<(), ValidationError> {
        let r = match self {
            Entry::Condition(c) => validate_condition(c),
            Entry::Allergy(a) => validate_allergy(a),
            Entry::Medication(m) => validate_medication(m),
            Entry::Observation(o) => validate_observation(o),
            Entry::Note(n) => validate_note(n),
            Entry::Immunization(i) => validate_immunization(i),
            Entry::Encounter(e) => validate_encounter(e),
            Entry::Procedure(p) => validate_procedure(p),
        };
        prefixed(path, r)
    }
    /// The first field (a path) this entry uses that version 1 does not have.
    pub fn v2_field(&self) -> Option<&'static str> {
        match self {
            Entry::Condition(c) => condition_v2(c),
            Entry::Allergy(a) => allergy_v2(a),
            Entry::Medication(m) => medication_v2(m),
            Entry::Observation(o) => observation_v2(o),
            Entry::Note(n) => note_v2(n),
            Entry::Immunization(i) => immunization_v2(i),
            Entry::Encounter(_) => Some("encounters"),
            Entry::Procedure(_) => Some("procedures"),
        }
    }
}

impl Chart {
    /// A chart with no entries (version 2, no timestamps), for building one up.
    pub fn empty(id: String, patient: Patient) -> Chart {
        Chart {
            id,
            kind: "chart".into(),
            schema_version: CURRENT_VERSION,
            practice_id: None,
            patient,
            conditions: Vec::new(),
            allergies: Vec::new(),
            medications: Vec::new(),
            observations: Vec::new(),
            notes: Vec::new(),
            immunizations: Vec::new(),
            encounters: Vec::new(),
            procedures: Vec::new(),
            referral: None,
            referrals: Default::default(),
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

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

    /// The lowest `schemaVersion` that holds this chart's content.
    pub fn required_version(&self) -> u32 {
        if self.v2_field().is_some() { 2 } else { 1 }
    }

    /// The first field (a path) of the chart that version 1 does not have.
    pub fn v2_field(&self) -> Option<String> {
        if let Some(f) = patient_v2(&self.patient) {
            return Some(format!("patient.{f}"));
        }
        if !self.encounters.is_empty() {
            return Some("encounters".into());
        }
        if !self.procedures.is_empty() {
            return Some("procedures".into());
        }
        fn first<T>(
            section: &str,
            items: &[T],
            f: fn(&T) -> Option<&'static str>,
        ) -> Option<String> {
            items
                .iter()
                .enumerate()
                .find_map(|(i, x)| f(x).map(|field| format!("{section}[{i}].{field}")))
        }
        first("conditions", &self.conditions, condition_v2)
            .or_else(|| first("allergies", &self.allergies, allergy_v2))
            .or_else(|| first("medications", &self.medications, medication_v2))
            .or_else(|| first("observations", &self.observations, observation_v2))
            .or_else(|| first("notes", &self.notes, note_v2))
            .or_else(|| first("immunizations", &self.immunizations, immunization_v2))
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        ChartId::parse(&self.id)?;
        if self.kind != "chart" {
            return Err(ValidationError::new(
                "type",
                format!("expected \"chart\", got {:?}", self.kind),
            ));
        }
        if self.schema_version == 0 || self.schema_version > CURRENT_VERSION {
            return Err(ValidationError::new(
                "schemaVersion",
                format!(
                    "version {} is not supported; this chartmesh reads schemaVersion 1 to {CURRENT_VERSION}",
                    self.schema_version
                ),
            ));
        }
        if let Some(p) = &self.practice_id {
            line("practiceId", p)?;
        }
        validate_patient(&self.patient).map_err(|e| e.within("patient"))?;
        // Paths are only formatted when an entry is at fault (this is the import hot path).
        fn at(section: &'static str, i: usize) -> impl FnOnce(ValidationError) -> ValidationError {
            move |e| e.within(&format!("{section}[{i}]"))
        }
        for (i, c) in self.conditions.iter().enumerate() {
            validate_condition(c).map_err(at("conditions", i))?;
        }
        for (i, a) in self.allergies.iter().enumerate() {
            validate_allergy(a).map_err(at("allergies", i))?;
        }
        for (i, m) in self.medications.iter().enumerate() {
            validate_medication(m).map_err(at("medications", i))?;
        }
        for (i, o) in self.observations.iter().enumerate() {
            validate_observation(o).map_err(at("observations", i))?;
        }
        for (i, n) in self.notes.iter().enumerate() {
            validate_note(n).map_err(at("notes", i))?;
        }
        for (i, im) in self.immunizations.iter().enumerate() {
            validate_immunization(im).map_err(at("immunizations", i))?;
        }
        for (i, e) in self.encounters.iter().enumerate() {
            validate_encounter(e).map_err(at("encounters", i))?;
        }
        for (i, p) in self.procedures.iter().enumerate() {
            validate_procedure(p).map_err(at("procedures", i))?;
        }
        if let Some(r) = &self.referral {
            non_empty("referral.to", &r.to)?;
            line("referral.to", &r.to)?;
            opt_text("referral.reason", &r.reason)?;
            opt_date("referral.date", &r.date)?;
            opt_line("referral.status", &r.status)?;
        }
        for (id, r) in &self.referrals {
            let at = |f: &str| format!("referrals.{id}.{f}");
            line(&at("id"), &r.id)?;
            text(&at("reason"), &r.reason, MAX_TEXT_CHARS)?;
            opt_line(&at("specialty"), &r.specialty)?;
            line(&at("requestedBy"), &r.requested_by)?;
            for (i, e) in r.events.iter().enumerate() {
                line(&at(&format!("events[{i}].by")), &e.by)?;
            }
        }
        timestamp("createdAt", &self.created_at)?;
        timestamp("updatedAt", &self.updated_at)?;
        if self.schema_version == 1
            && let Some(f) = self.v2_field()
        {
            return Err(ValidationError::new(
                f,
                "this field needs schemaVersion 2; the record says schemaVersion 1 (set \"schemaVersion\": 2)",
            ));
        }
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

// ---------------------------------------------------------------------------------------
// Which fields are version 2
// ---------------------------------------------------------------------------------------

// These read a field already checked as a FHIR date (`fhir_date`) or entries checked by their
// own validation, so the length tells the precision without parsing the date again (this is
// on the JSONL import's hot path).

/// A version 1 date: `YYYY-MM-DD`.
fn v1_date(v: &Option<String>) -> bool {
    v.as_deref().is_none_or(|d| d.len() == 10)
}

/// A version 1 timestamp: a full date and time.
fn v1_timestamp(v: &str) -> bool {
    v.len() > 10
}

fn patient_v2(p: &Patient) -> Option<&'static str> {
    if p.mrn_system.is_some() {
        Some("mrnSystem")
    } else if !p.identifiers.is_empty() {
        Some("identifiers")
    } else if p.deceased || p.deceased_date.is_some() {
        Some("deceased")
    } else if !p.telecom.is_empty() {
        Some("telecom")
    } else if p.language.is_some() {
        Some("language")
    } else if p.address.as_ref().is_some_and(|a| a.state.is_some()) {
        Some("address.state")
    } else if p.birth_date.len() != 10 {
        Some("birthDate")
    } else {
        None
    }
}

fn condition_v2(c: &Condition) -> Option<&'static str> {
    if c.verification.is_some() {
        Some("verification")
    } else if c.abatement.is_some() {
        Some("abatement")
    } else if c.category.is_some() {
        Some("category")
    } else if c.recorded.is_some() {
        Some("recorded")
    } else if !v1_date(&c.onset) {
        Some("onset")
    } else {
        None
    }
}

fn allergy_v2(a: &Allergy) -> Option<&'static str> {
    if a.code.is_some() {
        Some("code")
    } else if a.criticality.is_some() {
        Some("criticality")
    } else if !a.category.is_empty() {
        Some("category")
    } else if a.kind.is_some() {
        Some("type")
    } else if a.status.is_some() {
        Some("status")
    } else if a.verification.is_some() {
        Some("verification")
    } else if a.onset.is_some() {
        Some("onset")
    } else if !v1_date(&a.recorded) {
        Some("recorded")
    } else {
        None
    }
}

fn medication_v2(m: &Medication) -> Option<&'static str> {
    if m.source.is_some() {
        Some("source")
    } else if m.intent.is_some() {
        Some("intent")
    } else if m.do_not_perform {
        Some("doNotPerform")
    } else if m.status_reason.is_some() {
        Some("statusReason")
    } else if m.dosage.is_some() {
        Some("dosage")
    } else if m.dose_quantity.is_some() {
        Some("doseQuantity")
    } else if m.timing.is_some() {
        Some("timing")
    } else if m.as_needed.is_some() {
        Some("asNeeded")
    } else if m.route_code.is_some() {
        Some("routeCode")
    } else if m.reason.is_some() {
        Some("reason")
    } else if m.reason_code.is_some() {
        Some("reasonCode")
    } else if m.end.is_some() {
        Some("end")
    } else if !v1_date(&m.start) {
        Some("start")
    } else {
        None
    }
}

fn observation_v2(o: &Observation) -> Option<&'static str> {
    if o.value.is_none() {
        Some("value")
    } else if o.comparator.is_some() {
        Some("comparator")
    } else if o.unit_code.is_some() || o.unit_system.is_some() {
        Some("unitCode")
    } else if o.value_coding.is_some()
        || o.value_string.is_some()
        || o.value_boolean.is_some()
        || o.value_date_time.is_some()
    {
        Some("valueCoding")
    } else if o.status.is_some() {
        Some("status")
    } else if o.interpretation.is_some() {
        Some("interpretation")
    } else if o.reference_range.is_some() {
        Some("referenceRange")
    } else if !o.components.is_empty() {
        Some("components")
    } else if !v1_timestamp(&o.date) {
        Some("date")
    } else {
        None
    }
}

fn note_v2(n: &Note) -> Option<&'static str> {
    if n.kind.is_some() {
        Some("type")
    } else if n.status.is_some() {
        Some("status")
    } else if !v1_timestamp(&n.date) {
        Some("date")
    } else {
        None
    }
}

fn immunization_v2(i: &Immunization) -> Option<&'static str> {
    if i.status.is_some() {
        Some("status")
    } else if i.status_reason.is_some() {
        Some("statusReason")
    } else if i.date.len() != 10 {
        Some("date")
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

fn validate_patient(p: &Patient) -> Result<(), ValidationError> {
    non_empty("mrn", &p.mrn)?;
    line("mrn", &p.mrn)?;
    opt_line("mrnSystem", &p.mrn_system)?;
    list_len("identifiers", p.identifiers.len())?;
    for (i, id) in p.identifiers.iter().enumerate() {
        let at = |f: &str| format!("identifiers[{i}].{f}");
        non_empty(&at("value"), &id.value)?;
        line(&at("value"), &id.value)?;
        opt_line(&at("system"), &id.system)?;
        opt_line(&at("type"), &id.kind)?;
    }
    non_empty("name.family", &p.name.family)?;
    line("name.family", &p.name.family)?;
    list_len("name.given", p.name.given.len())?;
    for (i, g) in p.name.given.iter().enumerate() {
        line(&format!("name.given[{i}]"), g)?;
    }
    fhir_date("birthDate", &p.birth_date)?;
    if let Some(sex) = &p.sex {
        one_of("sex", sex, &["male", "female", "other", "unknown"])?;
    }
    opt_date("deceasedDate", &p.deceased_date)?;
    if let Some(a) = &p.address {
        list_len("address.line", a.line.len())?;
        for (i, l) in a.line.iter().enumerate() {
            line(&format!("address.line[{i}]"), l)?;
        }
        opt_line("address.city", &a.city)?;
        opt_line("address.state", &a.state)?;
        opt_line("address.postalCode", &a.postal_code)?;
        opt_line("address.country", &a.country)?;
    }
    opt_line("phone", &p.phone)?;
    list_len("telecom", p.telecom.len())?;
    for (i, t) in p.telecom.iter().enumerate() {
        let at = |f: &str| format!("telecom[{i}].{f}");
        one_of(
            &at("system"),
            &t.system,
            &["phone", "fax", "email", "pager", "url", "sms", "other"],
        )?;
        non_empty(&at("value"), &t.value)?;
        line(&at("value"), &t.value)?;
        opt_line(&at("use"), &t.use_)?;
    }
    opt_line("language", &p.language)?;
    if let Some(ins) = &p.insurance {
        opt_line("insurance.provider", &ins.provider)?;
        opt_line("insurance.memberId", &ins.member_id)?;
        opt_line("insurance.group", &ins.group)?;
        opt_date("insurance.validUntil", &ins.valid_until)?;
    }
    Ok(())
}

fn coding(field: &str, c: &Option<Coding>) -> Result<(), ValidationError> {
    let Some(c) = c else { return Ok(()) };
    opt_line(&format!("{field}.system"), &c.system)?;
    opt_line(&format!("{field}.code"), &c.code)?;
    opt_line(&format!("{field}.display"), &c.display)?;
    opt_line(&format!("{field}.text"), &c.text)?;
    if c.code.is_none() && c.display.is_none() && c.text.is_none() {
        return Err(ValidationError::new(
            field,
            "needs a code, a display or a text",
        ));
    }
    Ok(())
}

fn code_fields(
    code: &str,
    system: &Option<String>,
    display: &Option<String>,
) -> Result<(), ValidationError> {
    non_empty("code", code)?;
    line("code", code)?;
    opt_line("system", system)?;
    opt_line("display", display)
}

fn validate_condition(c: &Condition) -> Result<(), ValidationError> {
    code_fields(&c.code, &c.system, &c.display)?;
    opt_date("onset", &c.onset)?;
    opt_line("status", &c.status)?;
    if let Some(v) = &c.verification {
        one_of(
            "verification",
            v,
            &[
                "unconfirmed",
                "provisional",
                "differential",
                "confirmed",
                "refuted",
                "entered-in-error",
            ],
        )?;
    }
    opt_date("abatement", &c.abatement)?;
    opt_line("category", &c.category)?;
    opt_date("recorded", &c.recorded)?;
    Ok(())
}

fn validate_allergy(a: &Allergy) -> Result<(), ValidationError> {
    non_empty("substance", &a.substance)?;
    line("substance", &a.substance)?;
    opt_line("reaction", &a.reaction)?;
    if let Some(s) = &a.severity {
        one_of("severity", s, &["mild", "moderate", "severe"])?;
    }
    opt_date("recorded", &a.recorded)?;
    coding("code", &a.code)?;
    if let Some(c) = &a.criticality {
        one_of("criticality", c, &["low", "high", "unable-to-assess"])?;
    }
    list_len("category", a.category.len())?;
    for (i, c) in a.category.iter().enumerate() {
        one_of(
            &format!("category[{i}]"),
            c,
            &["food", "medication", "environment", "biologic"],
        )?;
    }
    if let Some(k) = &a.kind {
        one_of("type", k, &["allergy", "intolerance"])?;
    }
    if let Some(s) = &a.status {
        one_of("status", s, &["active", "inactive", "resolved"])?;
    }
    if let Some(v) = &a.verification {
        one_of(
            "verification",
            v,
            &["unconfirmed", "confirmed", "refuted", "entered-in-error"],
        )?;
    }
    opt_date("onset", &a.onset)?;
    Ok(())
}

fn quantity(field: &str, q: &Option<Quantity>) -> Result<(), ValidationError> {
    let Some(q) = q else { return Ok(()) };
    opt_line(&format!("{field}.unit"), &q.unit)?;
    opt_line(&format!("{field}.system"), &q.system)?;
    opt_line(&format!("{field}.code"), &q.code)
}

fn validate_medication(m: &Medication) -> Result<(), ValidationError> {
    non_empty("name", &m.name)?;
    line("name", &m.name)?;
    opt_line("code", &m.code)?;
    opt_line("system", &m.system)?;
    opt_line("dose", &m.dose)?;
    opt_line("route", &m.route)?;
    opt_line("frequency", &m.frequency)?;
    opt_date("start", &m.start)?;
    opt_line("status", &m.status)?;
    if let Some(s) = &m.source {
        one_of("source", s, &["request"])?;
    }
    opt_line("intent", &m.intent)?;
    opt_text("statusReason", &m.status_reason)?;
    opt_text("dosage", &m.dosage)?;
    quantity("doseQuantity", &m.dose_quantity)?;
    if let Some(t) = &m.timing {
        opt_line("timing.periodUnit", &t.period_unit)?;
        opt_line("timing.durationUnit", &t.duration_unit)?;
        for (name, l) in [
            ("timing.when", &t.when),
            ("timing.timeOfDay", &t.time_of_day),
            ("timing.dayOfWeek", &t.day_of_week),
        ] {
            list_len(name, l.len())?;
            for (i, x) in l.iter().enumerate() {
                line(&format!("{name}[{i}]"), x)?;
            }
        }
        coding("timing.code", &t.code)?;
    }
    coding("routeCode", &m.route_code)?;
    opt_text("reason", &m.reason)?;
    coding("reasonCode", &m.reason_code)?;
    opt_date("end", &m.end)?;
    Ok(())
}

const COMPARATORS: &[&str] = &["<", "<=", ">=", ">", "ad"];

fn validate_observation(o: &Observation) -> Result<(), ValidationError> {
    code_fields(&o.code, &o.system, &o.display)?;
    if let Some(c) = &o.comparator {
        one_of("comparator", c, COMPARATORS)?;
    }
    opt_line("unit", &o.unit)?;
    opt_line("unitCode", &o.unit_code)?;
    opt_line("unitSystem", &o.unit_system)?;
    coding("valueCoding", &o.value_coding)?;
    opt_text("valueString", &o.value_string)?;
    opt_date("valueDateTime", &o.value_date_time)?;
    opt_line("category", &o.category)?;
    fhir_date("date", &o.date)?;
    if let Some(s) = &o.status {
        one_of(
            "status",
            s,
            &[
                "registered",
                "preliminary",
                "final",
                "amended",
                "corrected",
                "cancelled",
                "entered-in-error",
                "unknown",
            ],
        )?;
    }
    coding("interpretation", &o.interpretation)?;
    if let Some(r) = &o.reference_range {
        opt_line("referenceRange.unit", &r.unit)?;
        opt_text("referenceRange.text", &r.text)?;
    }
    list_len("components", o.components.len())?;
    for (i, c) in o.components.iter().enumerate() {
        let r = (|| {
            code_fields(&c.code, &c.system, &c.display)?;
            if let Some(x) = &c.comparator {
                one_of("comparator", x, COMPARATORS)?;
            }
            opt_line("unit", &c.unit)?;
            opt_line("unitCode", &c.unit_code)?;
            opt_line("unitSystem", &c.unit_system)?;
            coding("valueCoding", &c.value_coding)?;
            opt_text("valueString", &c.value_string)?;
            coding("interpretation", &c.interpretation)
        })();
        r.map_err(|e| e.within(&format!("components[{i}]")))?;
    }
    Ok(())
}

fn validate_note(n: &Note) -> Result<(), ValidationError> {
    non_empty("id", &n.id)?;
    line("id", &n.id)?;
    non_empty("author", &n.author)?;
    line("author", &n.author)?;
    fhir_date("date", &n.date)?;
    if n.text.len() > MAX_NOTE_BYTES {
        return Err(ValidationError::new(
            "text",
            format!(
                "is {} bytes, over the limit of {MAX_NOTE_BYTES} bytes for one note; split it into several notes",
                n.text.len()
            ),
        ));
    }
    clean("text", &n.text, true)?;
    coding("type", &n.kind)?;
    if let Some(s) = &n.status {
        one_of("status", s, &["current", "superseded", "entered-in-error"])?;
    }
    Ok(())
}

fn validate_immunization(i: &Immunization) -> Result<(), ValidationError> {
    non_empty("vaccine", &i.vaccine)?;
    line("vaccine", &i.vaccine)?;
    opt_line("code", &i.code)?;
    opt_line("system", &i.system)?;
    fhir_date("date", &i.date)?;
    opt_line("lot", &i.lot)?;
    if let Some(s) = &i.status {
        one_of("status", s, &["completed", "not-done", "entered-in-error"])?;
    }
    opt_text("statusReason", &i.status_reason)?;
    Ok(())
}

fn validate_encounter(e: &Encounter) -> Result<(), ValidationError> {
    one_of(
        "status",
        &e.status,
        &[
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        ],
    )?;
    opt_line("class", &e.class)?;
    opt_line("code", &e.code)?;
    opt_line("system", &e.system)?;
    opt_line("display", &e.display)?;
    opt_date("start", &e.start)?;
    opt_date("end", &e.end)?;
    opt_text("reason", &e.reason)?;
    coding("reasonCode", &e.reason_code)?;
    opt_line("practitioner", &e.practitioner)?;
    opt_line("location", &e.location)?;
    opt_line("sourceId", &e.source_id)?;
    Ok(())
}

fn validate_procedure(p: &Procedure) -> Result<(), ValidationError> {
    code_fields(&p.code, &p.system, &p.display)?;
    one_of(
        "status",
        &p.status,
        &[
            "preparation",
            "in-progress",
            "not-done",
            "on-hold",
            "stopped",
            "completed",
            "entered-in-error",
            "unknown",
        ],
    )?;
    opt_date("date", &p.date)?;
    opt_date("end", &p.end)?;
    opt_text("reason", &p.reason)?;
    coding("reasonCode", &p.reason_code)?;
    opt_line("bodySite", &p.body_site)?;
    Ok(())
}

fn list_len(field: &str, n: usize) -> Result<(), ValidationError> {
    if n > MAX_LIST_ITEMS {
        return Err(ValidationError::new(
            field,
            format!("has {n} items, more than the limit of {MAX_LIST_ITEMS}"),
        ));
    }
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
            format!("{:?} is not one of {}", clip(v, 60), allowed.join(", ")),
        ))
    }
}

/// A character a chart field may not hold: C0 controls (newline and tab only where
/// `multi_line`), DEL, C1 controls, and the bidirectional overrides, embeddings and isolates.
fn forbidden(c: char, multi_line: bool) -> bool {
    match c {
        '\n' | '\t' => !multi_line,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' => true,
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => true,
        _ => false,
    }
}

/// Refuses forbidden characters, naming the field and the character (never the content).
pub fn clean(field: &str, v: &str, multi_line: bool) -> Result<(), ValidationError> {
    // Fast path: printable ASCII (and newline/tab in text) needs no further look.
    let fast = v
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) || (multi_line && (b == b'\n' || b == b'\t')));
    if fast {
        return Ok(());
    }
    if let Some((i, c)) = v
        .chars()
        .enumerate()
        .find(|(_, c)| forbidden(*c, multi_line))
    {
        let what = match c {
            '\n' => "a line break (this field is one line)".to_string(),
            '\t' => "a tab (this field is one line)".to_string(),
            '\r' => "a carriage return (U+000D; use \\n for line breaks)".to_string(),
            '\u{0}' => "a NUL character (U+0000)".to_string(),
            '\u{1b}' => "an escape character (U+001B)".to_string(),
            c if ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c) =>
            {
                format!(
                    "a bidirectional text control (U+{:04X}), which can make text read differently from what it holds",
                    c as u32
                )
            }
            c => format!("a control character (U+{:04X})", c as u32),
        };
        return Err(ValidationError::new(
            field,
            format!("holds {what} at character {}; remove it", i + 1),
        ));
    }
    Ok(())
}

/// A single-line field: at most [`MAX_LINE_CHARS`] characters, no control characters.
pub fn line(field: &str, v: &str) -> Result<(), ValidationError> {
    if v.len() > MAX_LINE_CHARS && v.chars().count() > MAX_LINE_CHARS {
        return Err(ValidationError::new(
            field,
            format!(
                "is {} characters long, over the limit of {MAX_LINE_CHARS} for this field",
                v.chars().count()
            ),
        ));
    }
    clean(field, v, false)
}

fn opt_line(field: &str, v: &Option<String>) -> Result<(), ValidationError> {
    match v {
        Some(v) => line(field, v),
        None => Ok(()),
    }
}

/// Multi-line text: at most `max` characters; newline and tab allowed.
pub fn text(field: &str, v: &str, max: usize) -> Result<(), ValidationError> {
    if v.len() > max && v.chars().count() > max {
        return Err(ValidationError::new(
            field,
            format!(
                "is {} characters long, over the limit of {max} for this field",
                v.chars().count()
            ),
        ));
    }
    clean(field, v, true)
}

fn opt_text(field: &str, v: &Option<String>) -> Result<(), ValidationError> {
    match v {
        Some(v) => text(field, v, MAX_TEXT_CHARS),
        None => Ok(()),
    }
}

fn is_full_date(v: &str) -> bool {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    v.len() == 10 && time::Date::parse(v, &fmt).is_ok()
}

fn is_timestamp(v: &str) -> bool {
    time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).is_ok()
}

/// `YYYY-MM-DD`, a real calendar date.
pub fn date(field: &str, v: &str) -> Result<(), ValidationError> {
    if is_full_date(v) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("expected a date as YYYY-MM-DD, got {:?}", clip(v, 40)),
        ))
    }
}

/// Whether `v` is a FHIR date or dateTime of any precision: `YYYY`, `YYYY-MM`,
/// `YYYY-MM-DD`, or a full timestamp with a time zone.
pub fn is_fhir_date(v: &str) -> bool {
    let b = v.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    match b.len() {
        4 => digits(0..4) && v != "0000",
        7 => {
            digits(0..4)
                && b[4] == b'-'
                && digits(5..7)
                && matches!(v[5..7].parse::<u8>(), Ok(1..=12))
        }
        10 => is_full_date(v),
        _ => is_timestamp(v),
    }
}

/// A date of any FHIR precision (`2011`, `2011-05`, `2011-05-04`, or a timestamp).
pub fn fhir_date(field: &str, v: &str) -> Result<(), ValidationError> {
    if is_fhir_date(v) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "expected a date (YYYY, YYYY-MM, YYYY-MM-DD) or a timestamp such as 2024-05-01T09:12:00Z, got {:?}",
                clip(v, 40)
            ),
        ))
    }
}

fn opt_date(field: &str, v: &Option<String>) -> Result<(), ValidationError> {
    match v {
        Some(v) => fhir_date(field, v),
        None => Ok(()),
    }
}

/// An RFC 3339 timestamp, e.g. `2023-05-01T09:12:00Z`.
pub fn timestamp(field: &str, v: &str) -> Result<(), ValidationError> {
    if is_timestamp(v) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "expected an ISO-8601 timestamp such as 2024-05-01T09:12:00Z, got {:?}",
                clip(v, 40)
            ),
        ))
    }
}

#[cfg(test)]
mod tests;
