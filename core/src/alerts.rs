//! Decision support: checks a medication against the chart's recorded allergies (including
//! drug classes: a penicillin allergy and amoxicillin, sulfonamides, NSAIDs and aspirin,
//! codeine and other opioids), against its active medications (a small interaction table),
//! and for duplicate therapy (two active drugs of the same class).
//!
//! Owns: the drug-class and interaction tables and the checks. Must not touch: the store,
//! the network or the clock. The tables are **illustrative, not clinical-grade**: a short list
//! of well-known, commonly cited interactions and cross-sensitivities, each with its source
//! and severity, so a practice sees how alerts work; they are no substitute for a maintained
//! drug knowledge base.

use serde::Serialize;

use crate::chart::{Allergy, Chart, Medication};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Moderate,
    Severe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlertKind {
    /// The drug (or its class) matches a recorded allergy.
    Allergy,
    /// The drug interacts with an active medication.
    Interaction,
    /// The drug duplicates an active medication of the same class.
    DuplicateTherapy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub kind: AlertKind,
    pub severity: Severity,
    /// The medication checked.
    pub medication: String,
    /// What it conflicts with: the allergy's substance or the other medication's name.
    pub with: String,
    pub message: String,
    /// Where the rule comes from.
    pub source: &'static str,
    /// Stable identity of this alert (kind, both names), for acknowledgements.
    pub key: String,
}

/// Drug classes by member (lower-case generic or brand names).
const CLASSES: &[(&str, &[&str])] = &[
    (
        "penicillin",
        &[
            "penicillin",
            "amoxicillin",
            "ampicillin",
            "piperacillin",
            "dicloxacillin",
            "flucloxacillin",
            "augmentin",
            "amoxicillin/clavulanate",
            "co-amoxiclav",
        ],
    ),
    (
        "cephalosporin",
        &[
            "cephalexin",
            "cefalexin",
            "cefuroxime",
            "ceftriaxone",
            "cefazolin",
            "cefdinir",
        ],
    ),
    (
        "sulfonamide",
        &[
            "sulfamethoxazole",
            "trimethoprim/sulfamethoxazole",
            "co-trimoxazole",
            "bactrim",
            "sulfasalazine",
            "sulfadiazine",
        ],
    ),
    (
        "nsaid",
        &[
            "ibuprofen",
            "naproxen",
            "diclofenac",
            "aspirin",
            "acetylsalicylic acid",
            "celecoxib",
            "ketorolac",
            "meloxicam",
            "indomethacin",
        ],
    ),
    (
        "opioid",
        &[
            "codeine",
            "morphine",
            "oxycodone",
            "hydrocodone",
            "hydromorphone",
            "tramadol",
            "fentanyl",
            "methadone",
            "tapentadol",
        ],
    ),
    (
        "statin",
        &[
            "atorvastatin",
            "simvastatin",
            "rosuvastatin",
            "pravastatin",
            "lovastatin",
        ],
    ),
    (
        "ace-inhibitor",
        &[
            "lisinopril",
            "enalapril",
            "ramipril",
            "captopril",
            "perindopril",
        ],
    ),
    (
        "potassium-sparing-diuretic",
        &["spironolactone", "eplerenone", "amiloride"],
    ),
    (
        "anticoagulant",
        &["warfarin", "apixaban", "rivaroxaban", "dabigatran"],
    ),
    (
        "ssri",
        &[
            "sertraline",
            "fluoxetine",
            "citalopram",
            "escitalopram",
            "paroxetine",
        ],
    ),
    ("triptan", &["sumatriptan", "rizatriptan", "zolmitriptan"]),
    (
        "macrolide",
        &["clarithromycin", "erythromycin", "azithromycin"],
    ),
    (
        "nitrate",
        &[
            "nitroglycerin",
            "glyceryl trinitrate",
            "isosorbide mononitrate",
            "isosorbide dinitrate",
        ],
    ),
    ("pde5-inhibitor", &["sildenafil", "tadalafil", "vardenafil"]),
    (
        "benzodiazepine",
        &["diazepam", "lorazepam", "alprazolam", "clonazepam"],
    ),
    (
        "proton-pump-inhibitor",
        &["omeprazole", "esomeprazole", "pantoprazole", "lansoprazole"],
    ),
];

/// Allergy substances that name a class rather than a drug.
const ALLERGY_CLASS_WORDS: &[(&str, &str)] = &[
    ("penicillins", "penicillin"),
    ("penicillin", "penicillin"),
    ("sulfonamides", "sulfonamide"),
    ("sulfonamide", "sulfonamide"),
    ("sulfa", "sulfonamide"),
    ("sulfa drugs", "sulfonamide"),
    ("nsaids", "nsaid"),
    ("nsaid", "nsaid"),
    ("opioids", "opioid"),
    ("opiates", "opioid"),
    ("cephalosporins", "cephalosporin"),
    ("statins", "statin"),
];

/// Cross-sensitivity between an allergy class and a drug class, beyond the same class.
const CROSS: &[(&str, &str, Severity, &str)] = &[(
    "penicillin",
    "cephalosporin",
    Severity::Moderate,
    "penicillin allergy: low but real cross-reactivity with cephalosporins",
)];

const SOURCE_CLASS: &str = "drug-class cross-sensitivity (illustrative table, docs/CLINICAL.md)";

/// Interacting class pairs (either order).
const INTERACTIONS: &[(&str, &str, Severity, &str)] = &[
    (
        "anticoagulant",
        "nsaid",
        Severity::Severe,
        "bleeding risk: NSAIDs with an anticoagulant",
    ),
    (
        "anticoagulant",
        "macrolide",
        Severity::Moderate,
        "macrolides can raise anticoagulant levels (INR)",
    ),
    (
        "ssri",
        "nsaid",
        Severity::Moderate,
        "gastrointestinal bleeding risk: SSRI with an NSAID",
    ),
    (
        "ssri",
        "triptan",
        Severity::Severe,
        "serotonin syndrome risk: SSRI with a triptan",
    ),
    (
        "ace-inhibitor",
        "potassium-sparing-diuretic",
        Severity::Severe,
        "hyperkalaemia risk: ACE inhibitor with a potassium-sparing diuretic",
    ),
    (
        "nitrate",
        "pde5-inhibitor",
        Severity::Severe,
        "severe hypotension: nitrate with a PDE5 inhibitor",
    ),
    (
        "opioid",
        "benzodiazepine",
        Severity::Severe,
        "respiratory depression: opioid with a benzodiazepine",
    ),
    (
        "statin",
        "macrolide",
        Severity::Severe,
        "myopathy risk: statin with clarithromycin/erythromycin",
    ),
    (
        "ace-inhibitor",
        "nsaid",
        Severity::Moderate,
        "reduced antihypertensive effect and kidney risk: ACE inhibitor with an NSAID",
    ),
];

const SOURCE_INTERACTION: &str =
    "interaction table (illustrative, after commonly cited label warnings; docs/CLINICAL.md)";

/// Words of a drug name, lower-case, for matching ("Salbutamol inhaler" → its first word too).
fn norm(s: &str) -> String {
    s.trim().to_lowercase()
}

/// The classes a medication belongs to, by exact name or by its first word
/// ("Amoxicillin 500 mg capsule" → amoxicillin). Never by substring: "Ferrous sulfate" is
/// not a sulfonamide.
pub fn classes_of(name: &str) -> Vec<&'static str> {
    let n = norm(name);
    let first = n.split([' ', ',']).next().unwrap_or("");
    CLASSES
        .iter()
        .filter(|(_, members)| members.iter().any(|m| *m == n || *m == first))
        .map(|(c, _)| *c)
        .collect()
}

fn allergy_classes(substance: &str) -> Vec<&'static str> {
    let s = norm(substance);
    let mut out: Vec<&'static str> = ALLERGY_CLASS_WORDS
        .iter()
        .filter(|(w, _)| *w == s)
        .map(|(_, c)| *c)
        .collect();
    out.extend(classes_of(substance));
    out.sort();
    out.dedup();
    out
}

pub(crate) fn same_drug(a: &str, b: &str) -> bool {
    let (a, b) = (norm(a), norm(b));
    a == b || a.split(' ').next() == b.split(' ').next()
}

/// An active medication: its status says it is in use and it is not a do-not-perform order
/// ([`Medication::is_active`]).
pub(crate) fn is_active(m: &Medication) -> bool {
    m.is_active()
}

/// One alert for `med` against `with` (an allergy's substance or another drug's name); its
/// key (kind and both names) identifies it for acknowledgements.
fn alert(
    kind: AlertKind,
    severity: Severity,
    med: &Medication,
    with: &str,
    message: String,
    source: &'static str,
) -> Alert {
    let k = match kind {
        AlertKind::Allergy => "allergy",
        AlertKind::Interaction => "interaction",
        AlertKind::DuplicateTherapy => "duplicate",
    };
    Alert {
        kind,
        severity,
        medication: med.name.clone(),
        with: with.to_string(),
        key: format!("{k}:{}:{}", norm(&med.name), norm(with)),
        message,
        source,
    }
}

/// Allergy alerts only: `med` against these allergies.
pub fn allergy_alerts_for(allergies: &[crate::chart::Allergy], med: &Medication) -> Vec<Alert> {
    let mut out = Vec::new();
    allergy_alerts(allergies, med, &mut out);
    out
}

/// Alerts for adding `med` to `chart` (the chart as it is, without `med`).
pub fn check_new_medication(chart: &Chart, med: &Medication) -> Vec<Alert> {
    let mut out = Vec::new();
    allergy_alerts(&chart.allergies, med, &mut out);
    let others: Vec<&Medication> = chart.medications.iter().filter(|m| is_active(m)).collect();
    medication_alerts(&others, med, &mut out);
    out
}

/// Every alert standing in a chart: each active medication against the allergies, and each
/// pair of active medications once. A medication that arrived by sync is checked like any other.
pub fn chart_alerts(chart: &Chart) -> Vec<Alert> {
    let active: Vec<&Medication> = chart.medications.iter().filter(|m| is_active(m)).collect();
    let mut out = Vec::new();
    for (i, m) in active.iter().enumerate() {
        allergy_alerts(&chart.allergies, m, &mut out);
        medication_alerts(&active[..i], m, &mut out);
    }
    out
}

fn allergy_alerts(allergies: &[Allergy], med: &Medication, out: &mut Vec<Alert>) {
    let med_classes = classes_of(&med.name);
    // A refuted, resolved or erroneous allergy is not one the patient has.
    for a in allergies.iter().filter(|a| a.is_active()) {
        let severe =
            a.severity.as_deref() == Some("severe") || a.criticality.as_deref() == Some("high");
        if same_drug(&a.substance, &med.name) {
            out.push(alert(
                AlertKind::Allergy,
                Severity::Severe,
                med,
                &a.substance,
                format!("recorded allergy to {}{}", a.substance, reaction(a)),
                "recorded allergy (same drug)",
            ));
            continue;
        }
        let a_classes = allergy_classes(&a.substance);
        if let Some(c) = a_classes.iter().find(|c| med_classes.contains(c)) {
            out.push(alert(
                AlertKind::Allergy,
                if severe || *c != "opioid" {
                    Severity::Severe
                } else {
                    Severity::Moderate
                },
                med,
                &a.substance,
                format!(
                    "{} is a{} {c}; recorded allergy to {}{}",
                    med.name,
                    if c.starts_with(['a', 'e', 'i', 'o', 'u']) {
                        "n"
                    } else {
                        ""
                    },
                    a.substance,
                    reaction(a)
                ),
                SOURCE_CLASS,
            ));
            continue;
        }
        for (ac, mc, sev, why) in CROSS {
            if a_classes.contains(ac) && med_classes.contains(mc) {
                out.push(alert(
                    AlertKind::Allergy,
                    *sev,
                    med,
                    &a.substance,
                    (*why).to_string(),
                    SOURCE_CLASS,
                ));
            }
        }
    }
}

fn reaction(a: &Allergy) -> String {
    match (&a.reaction, &a.severity) {
        (Some(r), Some(s)) => format!(" ({r}, {s})"),
        (Some(r), None) => format!(" ({r})"),
        (None, Some(s)) => format!(" ({s})"),
        (None, None) => String::new(),
    }
}

fn medication_alerts(active: &[&Medication], med: &Medication, out: &mut Vec<Alert>) {
    let mine = classes_of(&med.name);
    for other in active {
        if same_drug(&other.name, &med.name) {
            out.push(alert(
                AlertKind::DuplicateTherapy,
                Severity::Moderate,
                med,
                &other.name,
                format!(
                    "{} is already an active medication{}",
                    other.name,
                    other
                        .dose
                        .as_ref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                ),
                "duplicate therapy (same drug)",
            ));
            continue;
        }
        let theirs = classes_of(&other.name);
        if let Some(c) = mine.iter().find(|c| theirs.contains(c)) {
            out.push(alert(
                AlertKind::DuplicateTherapy,
                Severity::Moderate,
                med,
                &other.name,
                format!(
                    "two active drugs of the same class ({c}): {} and {}",
                    med.name, other.name
                ),
                "duplicate therapy (same class)",
            ));
        }
        for (x, y, sev, why) in INTERACTIONS {
            if (mine.contains(x) && theirs.contains(y)) || (mine.contains(y) && theirs.contains(x))
            {
                out.push(alert(
                    AlertKind::Interaction,
                    *sev,
                    med,
                    &other.name,
                    (*why).to_string(),
                    SOURCE_INTERACTION,
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests;
