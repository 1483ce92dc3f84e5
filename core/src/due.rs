//! Due lists: which checks, tests and vaccines a patient is due or overdue for, from a small,
//! documented, data-driven rule table (docs/CLINICAL.md), and the population counts built on
//! the same pass.
//!
//! Owns: the rules and their evaluation against one chart and a given "today". Must not
//! touch: the store or the clock (today is an argument, so results are reproducible).

use serde::Serialize;
use time::{Date, Month};

use crate::chart::Chart;

/// Who a rule applies to.
#[derive(Debug, Clone, Copy)]
pub enum Applies {
    /// Patients with an active condition whose code starts with one of these.
    Condition(&'static [&'static str]),
    /// Patients aged at least `min` and below `max` years.
    Age { min: u32, max: u32 },
}

/// What satisfies a rule.
#[derive(Debug, Clone, Copy)]
pub enum Evidence {
    /// An observation with one of these LOINC codes.
    Observation(&'static [&'static str]),
    /// An immunization with one of these CVX codes.
    Immunization(&'static [&'static str]),
}

#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub id: &'static str,
    pub title: &'static str,
    pub applies: Applies,
    pub evidence: Evidence,
    /// Repeat interval in months; `None`: once is enough.
    pub every_months: Option<u32>,
}

/// The rules (illustrative intervals after common primary-care guidance; docs/CLINICAL.md).
pub const RULES: &[Rule] = &[
    Rule {
        id: "hba1c-diabetes",
        title: "HbA1c every 6 months (type 2 diabetes)",
        applies: Applies::Condition(&["E11"]),
        evidence: Evidence::Observation(&["4548-4"]),
        every_months: Some(6),
    },
    Rule {
        id: "bp-hypertension",
        title: "Blood pressure every 12 months (hypertension)",
        applies: Applies::Condition(&["I10"]),
        evidence: Evidence::Observation(&["8480-6"]),
        every_months: Some(12),
    },
    Rule {
        id: "tsh-hypothyroidism",
        title: "TSH every 12 months (hypothyroidism)",
        applies: Applies::Condition(&["E03"]),
        evidence: Evidence::Observation(&["3016-3"]),
        every_months: Some(12),
    },
    Rule {
        id: "lipids-hyperlipidemia",
        title: "Cholesterol every 12 months (hyperlipidaemia)",
        applies: Applies::Condition(&["E78"]),
        evidence: Evidence::Observation(&["2093-3"]),
        every_months: Some(12),
    },
    Rule {
        id: "annual-checkup",
        title: "Yearly check-up: vital signs every 12 months (adults)",
        applies: Applies::Age { min: 18, max: 200 },
        evidence: Evidence::Observation(&["8480-6", "8867-4", "29463-7", "8310-5"]),
        every_months: Some(12),
    },
    Rule {
        id: "mmr-child",
        title: "MMR vaccine from age 1 (children)",
        applies: Applies::Age { min: 1, max: 18 },
        evidence: Evidence::Immunization(&["03"]),
        every_months: None,
    },
    Rule {
        id: "influenza-65",
        title: "Influenza vaccine every 12 months (65 and over)",
        applies: Applies::Age { min: 65, max: 200 },
        evidence: Evidence::Immunization(&["141"]),
        every_months: Some(12),
    },
    Rule {
        id: "pneumococcal-65",
        title: "Pneumococcal vaccine once (65 and over)",
        applies: Applies::Age { min: 65, max: 200 },
        evidence: Evidence::Immunization(&["133"]),
        every_months: None,
    },
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DueItem {
    pub rule: &'static str,
    pub title: &'static str,
    /// When it became or becomes due (YYYY-MM-DD).
    pub due: String,
    pub overdue: bool,
    /// The last time it was done, if ever.
    pub last_done: Option<String>,
    pub why: String,
}

/// Parses `YYYY-MM-DD` (or the date part of a timestamp).
pub fn parse_date(s: &str) -> Option<Date> {
    let d = s.get(..10)?;
    let y: i32 = d.get(..4)?.parse().ok()?;
    let m: u8 = d.get(5..7)?.parse().ok()?;
    let day: u8 = d.get(8..10)?.parse().ok()?;
    Date::from_calendar_date(y, Month::try_from(m).ok()?, day).ok()
}

/// `d` plus `months`, the day clamped to the month's length.
pub fn add_months(d: Date, months: u32) -> Date {
    let total = d.year() * 12 + (d.month() as i32 - 1) + months as i32;
    let (y, m) = (total.div_euclid(12), (total.rem_euclid(12) + 1) as u8);
    let month = Month::try_from(m).expect("1..=12");
    let last = time::util::days_in_month(month, y);
    Date::from_calendar_date(y, month, d.day().min(last)).expect("valid date")
}

fn age_on(birth: Date, today: Date) -> i32 {
    let mut age = today.year() - birth.year();
    if (today.month() as u8, today.day()) < (birth.month() as u8, birth.day()) {
        age -= 1;
    }
    age
}

/// The items due for `chart` on or before `horizon` (today + the look-ahead), as of `today`.
pub fn due_items(chart: &Chart, today: Date, horizon: Date) -> Vec<DueItem> {
    // Nothing is due for a patient who has died.
    if chart.patient.is_deceased() {
        return Vec::new();
    }
    let Some(birth) = parse_date(&chart.patient.birth_date) else {
        return Vec::new();
    };
    let age = age_on(birth, today);
    let mut out = Vec::new();
    for rule in RULES {
        // Whether it applies, and since when.
        let since = match rule.applies {
            Applies::Condition(prefixes) => {
                // Only a problem the patient has: not resolved, not refuted, not an error.
                let hit = chart
                    .conditions
                    .iter()
                    .find(|c| c.is_active() && prefixes.iter().any(|p| c.code.starts_with(p)));
                match hit {
                    Some(c) => c.onset.as_deref().and_then(parse_date).unwrap_or(today),
                    None => continue,
                }
            }
            Applies::Age { min, max } => {
                if age < min as i32 || age >= max as i32 {
                    continue;
                }
                add_months(birth, min * 12)
            }
        };
        let last = match rule.evidence {
            // A result entered in error or cancelled, or a vaccine not given, is no evidence.
            Evidence::Observation(codes) => chart
                .observations
                .iter()
                .filter(|o| o.is_evidence() && result_codes(o).any(|c| codes.contains(&c)))
                .filter_map(|o| parse_date(&o.date))
                .max(),
            Evidence::Immunization(codes) => chart
                .immunizations
                .iter()
                .filter(|i| i.was_given() && i.code.as_deref().is_some_and(|c| codes.contains(&c)))
                .filter_map(|i| parse_date(&i.date))
                .max(),
        };
        let due = match (last, rule.every_months) {
            (Some(_), None) => continue,
            (Some(l), Some(m)) => add_months(l, m),
            (None, _) => since,
        };
        if due > horizon {
            continue;
        }
        out.push(DueItem {
            rule: rule.id,
            title: rule.title,
            due: due.to_string(),
            overdue: due < today,
            last_done: last.map(|d| d.to_string()),
            why: match last {
                Some(l) => format!("last done {l}"),
                None => "never recorded".into(),
            },
        });
    }
    out
}

/// The codes a result stands for: its own and its components' (a blood pressure panel
/// holds the systolic pressure as a component).
fn result_codes(o: &crate::chart::Observation) -> impl Iterator<Item = &str> {
    std::iter::once(o.code.as_str()).chain(o.components.iter().map(|c| c.code.as_str()))
}

/// The part of a chart the rules read, reduced to what decides them: the patient, every
/// condition (also counted by the population report), and only the latest observation and
/// immunization of each code a rule names. [`due_items`] gives the same items for the
/// reduced chart as for the whole one. The store keeps this per chart, up to date on every
/// write, so a due list reads a few hundred bytes per chart instead of loading documents.
pub fn facts(chart: &Chart) -> Chart {
    use std::collections::BTreeMap;
    let mut obs: BTreeMap<&str, (time::Date, &str)> = BTreeMap::new();
    let mut imm: BTreeMap<&str, &crate::chart::Immunization> = BTreeMap::new();
    for rule in RULES {
        match rule.evidence {
            Evidence::Observation(codes) => {
                for o in chart.observations.iter().filter(|o| o.is_evidence()) {
                    let Some(d) = parse_date(&o.date) else {
                        continue;
                    };
                    for code in result_codes(o).filter(|c| codes.contains(c)) {
                        let e = obs.entry(code).or_insert((d, o.date.as_str()));
                        if d > e.0 {
                            *e = (d, o.date.as_str());
                        }
                    }
                }
            }
            Evidence::Immunization(codes) => {
                for i in chart.immunizations.iter().filter(|i| i.was_given()) {
                    let Some(code) = i.code.as_deref().filter(|c| codes.contains(c)) else {
                        continue;
                    };
                    let Some(d) = parse_date(&i.date) else {
                        continue;
                    };
                    let e = imm.entry(code).or_insert(i);
                    if parse_date(&e.date).is_none_or(|x| d > x) {
                        *e = i;
                    }
                }
            }
        }
    }
    let mut out = Chart::empty(
        chart.id.clone(),
        crate::chart::Patient {
            mrn: chart.patient.mrn.clone(),
            name: chart.patient.name.clone(),
            birth_date: chart.patient.birth_date.clone(),
            deceased: chart.patient.deceased,
            deceased_date: chart.patient.deceased_date.clone(),
            ..Default::default()
        },
    );
    out.kind = chart.kind.clone();
    out.schema_version = chart.schema_version;
    // Only what the rules and the population report read: stored for every chart.
    out.conditions = chart
        .conditions
        .iter()
        .map(|c| crate::chart::Condition {
            code: c.code.clone(),
            display: c.display.clone(),
            onset: c.onset.clone(),
            status: c.status.clone(),
            verification: c.verification.clone(),
            ..Default::default()
        })
        .collect();
    out.observations = obs
        .into_iter()
        .map(|(code, (_, date))| crate::chart::Observation {
            code: code.to_string(),
            value: Some(0.into()),
            date: date.to_string(),
            ..Default::default()
        })
        .collect();
    out.immunizations = imm
        .into_values()
        .map(|i| crate::chart::Immunization {
            vaccine: String::new(),
            code: i.code.clone(),
            date: i.date.clone(),
            ..Default::default()
        })
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(birth: &str, conditions: &str, observations: &str, immunizations: &str) -> Chart {
        let j = format!(
            r#"{{"id":"c1","type":"chart","schemaVersion":1,"patient":{{"mrn":"M","name":{{"family":"F"}},"birthDate":"{birth}"}},"conditions":[{conditions}],"observations":[{observations}],"immunizations":[{immunizations}],"createdAt":"2020-01-01T00:00:00Z","updatedAt":"2020-01-01T00:00:00Z"}}"#
        );
        Chart::from_json_slice(j.as_bytes()).unwrap()
    }

    fn d(s: &str) -> Date {
        parse_date(s).unwrap()
    }

    #[test]
    fn the_light_document_view_gives_the_same_items_as_the_full_chart() {
        let c = chart(
            "1950-02-03",
            r#"{"code":"E11.9","status":"active","onset":"2010-01-01"},{"code":"I10","status":"active"}"#,
            r#"{"code":"4548-4","value":7.1,"date":"2025-09-01T10:00:00Z"}"#,
            r#"{"vaccine":"Flu","code":"141","date":"2025-10-01"}"#,
        );
        let meta = crate::ChangeMeta {
            practice: crate::PracticeId::from_certificate_der(b"p"),
            author: "t".into(),
            action: "test".into(),
            time_ms: 1,
        };
        let doc = crate::ChartDoc::create(&c, &meta);
        let (today, horizon) = (d("2026-06-01"), d("2026-09-01"));
        let full = due_items(&doc.to_chart().unwrap(), today, horizon);
        assert!(!full.is_empty());
        assert_eq!(due_items(&doc.due_view().unwrap(), today, horizon), full);
        assert_eq!(due_items(&facts(&c), today, horizon), full);
    }

    #[test]
    fn the_reduced_facts_give_the_same_items_on_the_bench_charts() {
        let dir = std::env::var_os("CHARTMESH_BENCH_DATA")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench-data")
            });
        let path = dir.join("charts-1000.jsonl");
        let Ok(all) = std::fs::read_to_string(&path) else {
            panic!("{} is needed for this test", path.display());
        };
        let (today, horizon) = (d("2026-06-01"), d("2026-09-01"));
        let mut items = 0;
        for line in all.lines().take(300) {
            let c = Chart::from_json_slice(line.as_bytes()).unwrap();
            let full = due_items(&c, today, horizon);
            let f = facts(&c);
            // Stored as JSON and read back.
            let back: Chart = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
            assert_eq!(due_items(&back, today, horizon), full, "{}", c.id);
            let codes =
                |cs: &[crate::chart::Condition]| -> Vec<(String, Option<String>, Option<String>)> {
                    cs.iter()
                        .map(|x| (x.code.clone(), x.display.clone(), x.status.clone()))
                        .collect()
                };
            assert_eq!(codes(&back.conditions), codes(&c.conditions));
            items += full.len();
        }
        assert!(
            items > 100,
            "the sample exercises the rules ({items} items)"
        );
    }

    #[test]
    fn months_add_with_clamping() {
        assert_eq!(add_months(d("2025-08-31"), 6), d("2026-02-28"));
        assert_eq!(add_months(d("2024-12-15"), 12), d("2025-12-15"));
    }

    #[test]
    fn diabetes_needs_hba1c_every_six_months() {
        let c = chart(
            "1960-01-01",
            r#"{"code":"E11.9","status":"active","onset":"2010-01-01"}"#,
            r#"{"code":"4548-4","value":7.1,"date":"2025-09-01T10:00:00Z"},{"code":"8480-6","value":120,"date":"2026-01-05T10:00:00Z"}"#,
            "",
        );
        let items = due_items(&c, d("2026-02-01"), d("2026-02-01"));
        assert!(
            items.iter().all(|i| i.rule != "hba1c-diabetes"),
            "{items:?}"
        );
        let items = due_items(&c, d("2026-03-15"), d("2026-03-15"));
        let h = items.iter().find(|i| i.rule == "hba1c-diabetes").unwrap();
        assert_eq!(h.due, "2026-03-01");
        assert!(h.overdue);
        // Within 60 days of 2026-02-01 it shows as due, not overdue.
        let items = due_items(&c, d("2026-02-01"), d("2026-04-02"));
        assert!(
            items
                .iter()
                .any(|i| i.rule == "hba1c-diabetes" && !i.overdue)
        );
    }

    #[test]
    fn resolved_conditions_and_ages_out_of_range_do_not_apply() {
        let c = chart(
            "2000-01-01",
            r#"{"code":"I10","status":"resolved"}"#,
            "",
            "",
        );
        let items = due_items(&c, d("2026-01-01"), d("2026-01-01"));
        assert!(items.iter().all(|i| i.rule != "bp-hypertension"));
        assert!(
            items
                .iter()
                .all(|i| i.rule != "influenza-65" && i.rule != "mmr-child")
        );
        assert!(items.iter().any(|i| i.rule == "annual-checkup"));
    }

    #[test]
    fn once_only_vaccines_are_done_after_one_dose() {
        let kid = chart(
            "2022-03-01",
            "",
            "",
            r#"{"vaccine":"MMR","code":"03","date":"2023-04-01"}"#,
        );
        assert!(due_items(&kid, d("2026-01-01"), d("2026-01-01")).is_empty());
        let kid = chart("2022-03-01", "", "", "");
        let items = due_items(&kid, d("2026-01-01"), d("2026-01-01"));
        assert_eq!(items[0].rule, "mmr-child");
        assert_eq!(items[0].due, "2023-03-01");
    }

    fn chart2(
        patient_extra: &str,
        conditions: &str,
        observations: &str,
        immunizations: &str,
    ) -> Chart {
        let j = format!(
            r#"{{"id":"c1","type":"chart","schemaVersion":2,"patient":{{"mrn":"M","name":{{"family":"F"}},"birthDate":"1950-01-01"{patient_extra}}},"conditions":[{conditions}],"observations":[{observations}],"immunizations":[{immunizations}],"createdAt":"2020-01-01T00:00:00Z","updatedAt":"2020-01-01T00:00:00Z"}}"#
        );
        Chart::from_json_slice(j.as_bytes()).unwrap()
    }

    #[test]
    fn negated_and_erroneous_entries_are_never_evidence_and_the_dead_are_never_due() {
        let (today, horizon) = (d("2026-06-01"), d("2026-06-01"));
        let rules = |c: &Chart| -> Vec<&str> {
            let a = due_items(c, today, horizon)
                .iter()
                .map(|i| i.rule)
                .collect::<Vec<_>>();
            // The reduced facts say the same.
            assert_eq!(
                due_items(&facts(c), today, horizon)
                    .iter()
                    .map(|i| i.rule)
                    .collect::<Vec<_>>(),
                a
            );
            a
        };
        // A refuted or entered-in-error diabetes does not make HbA1c due; a confirmed one does.
        for v in ["refuted", "entered-in-error"] {
            let c = chart2(
                "",
                &format!(r#"{{"code":"E11.9","status":"active","verification":"{v}"}}"#),
                "",
                "",
            );
            assert!(!rules(&c).contains(&"hba1c-diabetes"), "{v}");
        }
        let c = chart2(
            "",
            r#"{"code":"E11.9","status":"active","verification":"confirmed"}"#,
            "",
            "",
        );
        assert!(rules(&c).contains(&"hba1c-diabetes"));
        // An HbA1c entered in error does not satisfy the rule; a final one does.
        let obs = |status: &str| {
            format!(
                r#"{{"code":"4548-4","value":7.1,"date":"2026-05-01T10:00:00Z","status":"{status}"}}"#
            )
        };
        let c = chart2("", r#"{"code":"E11.9"}"#, &obs("entered-in-error"), "");
        assert!(rules(&c).contains(&"hba1c-diabetes"));
        let c = chart2("", r#"{"code":"E11.9"}"#, &obs("final"), "");
        assert!(!rules(&c).contains(&"hba1c-diabetes"));
        // A flu vaccine not given does not count.
        let c = chart2(
            "",
            "",
            "",
            r#"{"vaccine":"Flu","code":"141","date":"2026-01-01","status":"not-done"}"#,
        );
        assert!(rules(&c).contains(&"influenza-65"));
        let c = chart2(
            "",
            "",
            "",
            r#"{"vaccine":"Flu","code":"141","date":"2026-01-01"}"#,
        );
        assert!(!rules(&c).contains(&"influenza-65"));
        // A blood pressure panel's systolic component is evidence of a blood pressure check.
        let bp = r#"{"code":"85354-9","date":"2026-05-01T10:00:00Z","components":[{"code":"8480-6","value":120},{"code":"8462-4","value":80}]}"#;
        let c = chart2("", r#"{"code":"I10"}"#, bp, "");
        assert!(!rules(&c).contains(&"bp-hypertension"));
        // Nothing is due for a patient who has died.
        let c = chart2(
            r#","deceasedDate":"2008-03-01""#,
            r#"{"code":"E11.9"}"#,
            "",
            "",
        );
        assert!(rules(&c).is_empty());
    }
}
