//! Patient matching: whether a patient read from FHIR is one of this practice's charts, a
//! new patient, or must be held for a person to review. The policy is docs/CLINICAL.md,
//! "Patient matching"; in short, two records are the same patient only when they agree on
//! identity evidence, and anything short of agreement never merges them.
//!
//! - Identifiers are compared as (system, value): the same value under two different systems
//!   is two different identifiers (MRN 12345 of one hospital is not MRN 12345 of another).
//! - A match needs an identifier with the same system and value, **and** the same family
//!   name, birth date and (when both have one) first given name.
//! - The same identifier with a different name or birth date, several charts that match, or
//!   an identifier value that agrees but whose system is unknown on one side: held for review
//!   (the patient gets a chart of its own, listed for review, never merged into another).
//! - No shared identifier: a new chart (two people may share a name and a birth date).
//!
//! Owns: the decision. Must not touch: the store (the daemon gathers the candidates, only
//! this practice's own charts, and carries the decision out).

use serde_json::Value;

use crate::chart::Patient;

/// What to do with an incoming patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It is this chart.
    Same(String),
    /// A new chart.
    New,
    /// A new chart, listed for review with the charts it may be the same patient as.
    Review {
        candidates: Vec<String>,
        reason: String,
    },
}

fn norm(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Same family name, birth date, and first given name when both have one.
pub fn demographics_agree(a: &Patient, b: &Patient) -> bool {
    let given = |p: &Patient| p.name.given.first().map(|g| norm(g));
    norm(&a.name.family) == norm(&b.name.family)
        && a.birth_date == b.birth_date
        && match (given(a), given(b)) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        }
}

/// An identifier with the same system and value on both sides.
pub fn strong_identifier(a: &Patient, b: &Patient) -> bool {
    a.all_identifiers().any(|(sa, va)| {
        sa.is_some()
            && b.all_identifiers()
                .any(|(sb, vb)| sa == sb && va.trim() == vb.trim())
    })
}

/// The same value where at least one side does not say its system.
fn weak_identifier(a: &Patient, b: &Patient) -> bool {
    a.all_identifiers().any(|(sa, va)| {
        b.all_identifiers()
            .any(|(sb, vb)| (sa.is_none() || sb.is_none()) && va.trim() == vb.trim())
    })
}

/// Whether two records carry exactly the same identity evidence: the same identifiers (as
/// sets) and agreeing demographics. A chart made from an input agrees fully with that input.
pub fn same_evidence(a: &Patient, b: &Patient) -> bool {
    let set = |p: &Patient| {
        let mut v: Vec<(Option<String>, String)> = p
            .all_identifiers()
            .map(|(s, v)| (s.map(str::to_string), v.trim().to_string()))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    demographics_agree(a, b) && set(a) == set(b)
}

/// Decides for `incoming`, given this practice's own charts that share an identifier value
/// with it or carry the chart id it names (`candidates`: chart id, patient). `chart_id` is the
/// chart id the input names when it is chartmesh's own (an export of a chart), else None.
pub fn decide(
    incoming: &Patient,
    chart_id: Option<&str>,
    candidates: &[(String, Patient)],
) -> Decision {
    if let Some(id) = chart_id
        && let Some((_, p)) = candidates.iter().find(|(c, _)| c == id)
    {
        return if demographics_agree(incoming, p) {
            Decision::Same(id.to_string())
        } else {
            Decision::Review {
                candidates: vec![id.to_string()],
                reason: format!(
                    "the input names chart {id}, but the name or birth date differ from that chart's"
                ),
            }
        };
    }
    let strong: Vec<&(String, Patient)> = candidates
        .iter()
        .filter(|(_, p)| strong_identifier(incoming, p))
        .collect();
    let agree: Vec<&String> = strong
        .iter()
        .filter(|(_, p)| demographics_agree(incoming, p))
        .map(|(id, _)| id)
        .collect();
    match agree.len() {
        1 => return Decision::Same(agree[0].clone()),
        n if n > 1 => {
            return Decision::Review {
                candidates: agree.into_iter().cloned().collect(),
                reason: format!(
                    "{n} charts have the same identifier, name and birth date; which one is this patient?"
                ),
            };
        }
        _ => {}
    }
    if !strong.is_empty() {
        return Decision::Review {
            candidates: strong.iter().map(|(id, _)| id.clone()).collect(),
            reason: "a chart has the same identifier (system and value) but a different name or birth date".into(),
        };
    }
    let weak: Vec<String> = candidates
        .iter()
        .filter(|(_, p)| weak_identifier(incoming, p) && demographics_agree(incoming, p))
        .map(|(id, _)| id.clone())
        .collect();
    if !weak.is_empty() {
        return Decision::Review {
            candidates: weak,
            reason: "a chart has the same identifier value, name and birth date, but the identifier's system is not known on both sides".into(),
        };
    }
    Decision::New
}

/// What a matched chart gains from the incoming record: identifiers and contacts it lacks,
/// demographic fields it does not have, and the patient's death. Nothing it has is changed.
/// Returns (field, value) pairs for [`crate::ChartDoc::set_patient_fields`].
pub fn patient_updates(stored: &Patient, incoming: &Patient) -> Vec<(&'static str, Option<Value>)> {
    let mut out: Vec<(&'static str, Option<Value>)> = Vec::new();
    if stored.mrn_system.is_none()
        && incoming.mrn_system.is_some()
        && stored.mrn == incoming.mrn
        && !stored
            .identifiers
            .iter()
            .any(|i| i.system == incoming.mrn_system && i.value == incoming.mrn)
    {
        out.push(("mrnSystem", to(&incoming.mrn_system)));
    }
    let mut ids = stored.identifiers.clone();
    let has = |ids: &[crate::chart::Identifier], s: &Option<String>, v: &str| {
        ids.iter().any(|i| &i.system == s && i.value == v)
            || (stored.mrn == v && (stored.mrn_system == *s || incoming.mrn_system == *s))
    };
    if !has(&ids, &incoming.mrn_system, &incoming.mrn) {
        ids.push(crate::chart::Identifier {
            system: incoming.mrn_system.clone(),
            value: incoming.mrn.clone(),
            kind: Some("MR".into()),
        });
    }
    for i in &incoming.identifiers {
        if !has(&ids, &i.system, &i.value) {
            ids.push(i.clone());
        }
    }
    if ids.len() != stored.identifiers.len() && ids.len() <= crate::chart::MAX_LIST_ITEMS {
        out.push(("identifiers", to(&ids)));
    }
    if !stored.is_deceased() && incoming.is_deceased() {
        if incoming.deceased {
            out.push(("deceased", Some(Value::Bool(true))));
        }
        if incoming.deceased_date.is_some() {
            out.push(("deceasedDate", to(&incoming.deceased_date)));
        }
    } else if stored.deceased_date.is_none() && incoming.deceased_date.is_some() {
        out.push(("deceasedDate", to(&incoming.deceased_date)));
    }
    if stored.sex.is_none() && incoming.sex.is_some() {
        out.push(("sex", to(&incoming.sex)));
    }
    if stored.language.is_none() && incoming.language.is_some() {
        out.push(("language", to(&incoming.language)));
    }
    if stored.phone.is_none() && incoming.phone.is_some() {
        out.push(("phone", to(&incoming.phone)));
    }
    let mut telecom = stored.telecom.clone();
    for t in &incoming.telecom {
        if !telecom.contains(t) && stored.phone.as_deref() != Some(t.value.as_str()) {
            telecom.push(t.clone());
        }
    }
    if telecom.len() != stored.telecom.len() && telecom.len() <= crate::chart::MAX_LIST_ITEMS {
        out.push(("telecom", to(&telecom)));
    }
    if stored.address.is_none() && incoming.address.is_some() {
        out.push(("address", to(&incoming.address)));
    }
    out
}

fn to<T: serde::Serialize>(v: &T) -> Option<Value> {
    Some(serde_json::to_value(v).expect("patient fields serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chart::{HumanName, Identifier};

    fn patient(mrn: &str, system: Option<&str>, family: &str, given: &str, birth: &str) -> Patient {
        Patient {
            mrn: mrn.into(),
            mrn_system: system.map(str::to_string),
            name: HumanName {
                given: vec![given.into()],
                family: family.into(),
            },
            birth_date: birth.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_same_mrn_under_another_system_is_another_patient() {
        let stored = patient("12345", Some("urn:hosp:a"), "Lee", "Ann", "1970-01-02");
        let other = patient("12345", Some("urn:hosp:b"), "Kay", "Bob", "1980-03-04");
        let c = vec![("chart-a".to_string(), stored.clone())];
        assert_eq!(decide(&other, None, &c), Decision::New);
        // Even with the same name and birth date, another system is not agreement.
        let twin = patient("12345", Some("urn:hosp:b"), "Lee", "Ann", "1970-01-02");
        assert_eq!(decide(&twin, None, &c), Decision::New);
        // The same system and value and the same person: the same chart.
        let again = patient("12345", Some("urn:hosp:a"), "LEE", "ann", "1970-01-02");
        assert_eq!(decide(&again, None, &c), Decision::Same("chart-a".into()));
    }

    #[test]
    fn anything_short_of_agreement_is_held_for_review() {
        let stored = patient("12345", Some("urn:hosp:a"), "Lee", "Ann", "1970-01-02");
        let c = vec![("chart-a".to_string(), stored.clone())];
        // Same identifier, other birth date.
        let d = decide(
            &patient("12345", Some("urn:hosp:a"), "Lee", "Ann", "1971-01-02"),
            None,
            &c,
        );
        assert!(matches!(d, Decision::Review { .. }), "{d:?}");
        // Same identifier, other first name.
        let d = decide(
            &patient("12345", Some("urn:hosp:a"), "Lee", "Bea", "1970-01-02"),
            None,
            &c,
        );
        assert!(matches!(d, Decision::Review { .. }), "{d:?}");
        // The value agrees but one side does not say its system.
        let d = decide(
            &patient("12345", None, "Lee", "Ann", "1970-01-02"),
            None,
            &c,
        );
        assert!(matches!(d, Decision::Review { .. }), "{d:?}");
        // Two charts agree fully.
        let c2 = vec![
            ("chart-a".to_string(), stored.clone()),
            ("chart-b".to_string(), stored.clone()),
        ];
        let d = decide(&stored, None, &c2);
        assert!(
            matches!(d, Decision::Review { ref candidates, .. } if candidates.len() == 2),
            "{d:?}"
        );
        // A chartmesh chart id with another person's name.
        let d = decide(
            &patient("9", None, "Kay", "Bob", "1980-03-04"),
            Some("chart-a"),
            &c,
        );
        assert!(matches!(d, Decision::Review { .. }), "{d:?}");
    }

    #[test]
    fn other_identifiers_count_with_their_systems() {
        let mut stored = patient("M1", Some("urn:hosp:a"), "Lee", "Ann", "1970-01-02");
        stored.identifiers.push(Identifier {
            system: Some("http://hl7.org/fhir/sid/us-ssn".into()),
            value: "999-11-2222".into(),
            kind: Some("SS".into()),
        });
        let mut incoming = patient("X9", Some("urn:hosp:z"), "Lee", "Ann", "1970-01-02");
        incoming.identifiers.push(Identifier {
            system: Some("http://hl7.org/fhir/sid/us-ssn".into()),
            value: "999-11-2222".into(),
            kind: None,
        });
        let c = vec![("chart-a".to_string(), stored.clone())];
        assert_eq!(
            decide(&incoming, None, &c),
            Decision::Same("chart-a".into())
        );
        let ups = patient_updates(&stored, &incoming);
        let ids = ups
            .iter()
            .find(|(k, _)| *k == "identifiers")
            .unwrap()
            .1
            .clone()
            .unwrap();
        assert_eq!(ids.as_array().unwrap().len(), 2, "{ids}");
        assert!(ids.to_string().contains("urn:hosp:z"));
    }
}
