//! The patient's copy of their record: one self-contained, readable HTML page (no scripts,
//! no external files; trend charts are inline SVG), printable and openable in any browser.
//!
//! Owns: what the patient copy shows and how it is laid out.
//! Must not touch: the store or files; the daemon passes the chart, where it was shared, and
//! the time, and writes the page where the user asked.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::chart::{Chart, Observation};

/// A practice the record was shared with, for the "where your record was shared" section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharing {
    /// The practice's name (or id when it has none).
    pub practice: String,
    pub purpose: String,
    pub access: String,
    /// RFC 3339.
    pub since: String,
    /// `active`, `revoked` or `expired`.
    pub state: String,
}

/// The most recent observations listed in the table.
pub const RECENT_OBSERVATIONS: usize = 15;
/// The most recent values drawn in one trend chart.
pub const TREND_POINTS: usize = 12;

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn opt(s: &Option<String>) -> String {
    s.as_deref().map(esc).unwrap_or_default()
}

fn day(ts: &str) -> &str {
    ts.get(..10).unwrap_or(ts)
}

/// One section: a heading and a table, or a sentence saying there is nothing to list.
fn table(out: &mut String, id: &str, title: &str, head: &[&str], rows: Vec<Vec<String>>) {
    let _ = write!(out, "<section id=\"{id}\"><h2>{}</h2>", esc(title));
    if rows.is_empty() {
        out.push_str("<p class=\"none\">Nothing recorded.</p></section>\n");
        return;
    }
    out.push_str("<table><thead><tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{c}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></section>\n");
}

/// A result as a person reads it: "> 1.2 mg/dL", a coded answer, a text.
fn result_text(o: &Observation) -> String {
    if let Some(v) = &o.value {
        let cmp = o
            .comparator
            .as_deref()
            .map(|c| format!("{c} "))
            .unwrap_or_default();
        return format!("{}{} {}", esc(&cmp), v, opt(&o.unit));
    }
    if let Some(c) = &o.value_coding {
        return c
            .text
            .as_deref()
            .or(c.display.as_deref())
            .or(c.code.as_deref())
            .map(esc)
            .unwrap_or_default();
    }
    if let Some(t) = &o.value_string {
        return esc(t);
    }
    if let Some(b) = o.value_boolean {
        return if b { "yes" } else { "no" }.into();
    }
    if let Some(t) = &o.value_date_time {
        return esc(t);
    }
    o.components
        .iter()
        .map(|c| {
            let v = c
                .value
                .as_ref()
                .map(|v| format!("{v} {}", opt(&c.unit)))
                .or_else(|| {
                    c.value_coding
                        .as_ref()
                        .and_then(|x| x.display.as_deref().map(esc))
                })
                .or_else(|| c.value_string.as_deref().map(esc))
                .unwrap_or_default();
            format!(
                "{}: {}",
                c.display
                    .as_deref()
                    .map(esc)
                    .unwrap_or_else(|| esc(&c.code)),
                v.trim()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn trend_svg(title: &str, unit: &str, points: &[&Observation]) -> String {
    let vals: Vec<f64> = points
        .iter()
        .filter_map(|o| o.value.as_ref().and_then(|v| v.as_f64()))
        .collect();
    let (w, h, pad) = (320.0, 90.0, 12.0);
    let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let n = vals.len().max(2) as f64 - 1.0;
    let xy: Vec<(f64, f64)> = vals
        .iter()
        .enumerate()
        .map(|(i, v)| {
            (
                pad + (w - 2.0 * pad) * i as f64 / n,
                h - pad - (h - 2.0 * pad) * (v - lo) / span,
            )
        })
        .collect();
    let poly: Vec<String> = xy.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let mut s = format!(
        "<figure class=\"trend\"><svg role=\"img\" aria-label=\"{} trend\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\"><polyline fill=\"none\" stroke=\"#1f5f8b\" stroke-width=\"2\" points=\"{}\"/>",
        esc(title),
        poly.join(" ")
    );
    for (x, y) in &xy {
        let _ = write!(
            s,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"#1f5f8b\"/>"
        );
    }
    let first = points.first().map(|o| day(&o.date)).unwrap_or("");
    let last = points.last().map(|o| day(&o.date)).unwrap_or("");
    let _ = write!(
        s,
        "</svg><figcaption>{}: {} values from {first} to {last}, lowest {lo} {u}, highest {hi} {u}</figcaption></figure>",
        esc(title),
        vals.len(),
        u = esc(unit)
    );
    s
}

/// The patient copy as one HTML page. Only what is true of the patient is shown: a problem
/// refuted or entered in error, a drug recorded as "do not give" or not taken, a vaccine not
/// given, a result or note entered in error are left out. `generated` is the RFC 3339 time it was made and
/// `practice` the name of the practice that made it.
pub fn html(chart: &Chart, shared: &[Sharing], practice: &str, generated: &str) -> String {
    let p = &chart.patient;
    let name = format!("{} {}", p.name.given.join(" "), p.name.family);
    let mut o = String::with_capacity(16 * 1024);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Health record of {n}</title>\
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}}\
h1{{margin-bottom:.2rem}}h2{{border-bottom:2px solid #1f5f8b;padding-bottom:.2rem;margin-top:2rem}}\
table{{border-collapse:collapse;width:100%}}th,td{{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #ddd;vertical-align:top}}\
.none{{color:#666;font-style:italic}}.meta{{color:#555}}figure.trend{{display:inline-block;margin:.5rem 1rem .5rem 0}}\
figcaption{{font-size:.85rem;color:#444;max-width:320px}}@media print{{body{{margin:0}}}}</style></head><body>\n",
        n = esc(&name)
    );
    let _ = writeln!(
        o,
        "<header><h1 id=\"patient\">{}</h1><p class=\"meta\">Born {} · {} · Record number (MRN) {}</p>\
{}<p class=\"meta\">Your copy of your health record, made by {} on {}. Chart {}.</p></header>",
        esc(&name),
        esc(&p.birth_date),
        opt(&p.sex),
        esc(&p.mrn),
        if p.is_deceased() {
            format!(
                "<p class=\"meta\">Deceased{}</p>",
                p.deceased_date
                    .as_deref()
                    .map(|d| format!(" {}", esc(d)))
                    .unwrap_or_default()
            )
        } else {
            String::new()
        },
        esc(practice),
        esc(day(generated)),
        esc(&chart.id)
    );

    table(
        &mut o,
        "problems",
        "Problems",
        &["Problem", "Code", "Since", "Status"],
        chart
            .conditions
            .iter()
            .filter(|c| c.is_fact())
            .map(|c| vec![opt(&c.display), esc(&c.code), opt(&c.onset), opt(&c.status)])
            .collect(),
    );
    table(
        &mut o,
        "medications",
        "Medications",
        &["Medication", "Dose", "How often", "Since", "Status"],
        chart
            .medications
            .iter()
            .filter(|m| m.is_fact())
            .map(|m| {
                vec![
                    esc(&m.name),
                    m.dose
                        .as_deref()
                        .or(m.dosage.as_deref())
                        .map(esc)
                        .or_else(|| {
                            m.dose_quantity
                                .as_ref()
                                .map(|q| format!("{} {}", q.value, opt(&q.unit)))
                        })
                        .unwrap_or_default(),
                    opt(&m.frequency),
                    opt(&m.start),
                    opt(&m.status),
                ]
            })
            .collect(),
    );
    table(
        &mut o,
        "allergies",
        "Allergies",
        &["Substance", "Reaction", "Severity"],
        chart
            .allergies
            .iter()
            .filter(|a| {
                !matches!(
                    a.verification.as_deref(),
                    Some("refuted") | Some("entered-in-error")
                )
            })
            .map(|a| vec![esc(&a.substance), opt(&a.reaction), opt(&a.severity)])
            .collect(),
    );

    // Observations: the most recent in a table, and a trend per measurement with 2+ values.
    let mut obs: Vec<&Observation> = chart
        .observations
        .iter()
        .filter(|o| o.is_evidence())
        .collect();
    obs.sort_by(|a, b| b.date.cmp(&a.date));
    let _ = write!(
        o,
        "<section id=\"observations\"><h2>Recent results and measurements</h2>"
    );
    if obs.is_empty() {
        o.push_str("<p class=\"none\">Nothing recorded.</p>");
    } else {
        let mut series: BTreeMap<&str, Vec<&Observation>> = BTreeMap::new();
        for x in &obs {
            series.entry(x.code.as_str()).or_default().push(x);
        }
        o.push_str("<div class=\"trends\">");
        for (code, mut pts) in series {
            pts.retain(|x| {
                x.value.as_ref().and_then(|v| v.as_f64()).is_some() && x.comparator.is_none()
            });
            if pts.len() < 2 {
                continue;
            }
            pts.truncate(TREND_POINTS);
            pts.reverse();
            let title = pts[0].display.clone().unwrap_or_else(|| code.to_string());
            let unit = pts[0].unit.clone().unwrap_or_default();
            o.push_str(&trend_svg(&title, &unit, &pts));
        }
        o.push_str("</div><table><thead><tr><th>Date</th><th>Measurement</th><th>Value</th></tr></thead><tbody>");
        for x in obs.iter().take(RECENT_OBSERVATIONS) {
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(day(&x.date)),
                x.display
                    .as_deref()
                    .map(esc)
                    .unwrap_or_else(|| esc(&x.code)),
                result_text(x),
            );
        }
        o.push_str("</tbody></table>");
    }
    o.push_str("</section>\n");

    table(
        &mut o,
        "immunizations",
        "Immunizations",
        &["Vaccine", "Date", "Lot"],
        chart
            .immunizations
            .iter()
            .filter(|i| i.was_given())
            .map(|i| vec![esc(&i.vaccine), esc(day(&i.date)), opt(&i.lot)])
            .collect(),
    );
    let mut visits: Vec<_> = chart.encounters.iter().filter(|e| e.happened()).collect();
    visits.sort_by(|a, b| b.start.cmp(&a.start));
    table(
        &mut o,
        "visits",
        "Visits",
        &["Date", "Visit", "Reason", "Seen by"],
        visits
            .iter()
            .map(|e| {
                vec![
                    e.start.as_deref().map(|d| esc(day(d))).unwrap_or_default(),
                    opt(&e.display),
                    opt(&e.reason),
                    opt(&e.practitioner),
                ]
            })
            .collect(),
    );
    table(
        &mut o,
        "procedures",
        "Procedures",
        &["Date", "Procedure", "Reason"],
        chart
            .procedures
            .iter()
            .filter(|p| p.happened())
            .map(|p| {
                vec![
                    p.date.as_deref().map(|d| esc(day(d))).unwrap_or_default(),
                    p.display
                        .as_deref()
                        .map(esc)
                        .unwrap_or_else(|| esc(&p.code)),
                    opt(&p.reason),
                ]
            })
            .collect(),
    );
    let mut notes: Vec<_> = chart.notes.iter().filter(|n| !n.is_error()).collect();
    notes.sort_by(|a, b| b.date.cmp(&a.date));
    table(
        &mut o,
        "notes",
        "Notes from your care team",
        &["Date", "Written by", "Note"],
        notes
            .iter()
            .map(|n| vec![esc(day(&n.date)), esc(&n.author), esc(&n.text)])
            .collect(),
    );
    let mut refs: Vec<Vec<String>> = chart
        .referrals
        .values()
        .map(|r| {
            vec![
                esc(day(&r.requested)),
                esc(&r.reason),
                r.specialty.as_deref().map(esc).unwrap_or_default(),
                esc(r.status().as_str()),
            ]
        })
        .collect();
    if let Some(r) = &chart.referral {
        refs.push(vec![
            opt(&r.date),
            opt(&r.reason),
            esc(&r.to),
            opt(&r.status),
        ]);
    }
    table(
        &mut o,
        "referrals",
        "Referrals",
        &["Date", "Reason", "To", "Status"],
        refs,
    );
    table(
        &mut o,
        "shared",
        "Where your record was shared",
        &["Practice", "Why", "Access", "Since", "Now"],
        shared
            .iter()
            .map(|s| {
                vec![
                    esc(&s.practice),
                    esc(&s.purpose),
                    esc(&s.access),
                    esc(day(&s.since)),
                    esc(&s.state),
                ]
            })
            .collect(),
    );
    o.push_str("</body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_every_section_escapes_content_and_draws_trends() {
        let c = r#"{"id":"c1","type":"chart","schemaVersion":1,"patient":{"mrn":"M<1>","name":{"given":["Ann"],"family":"O'Neil"},"birthDate":"1970-01-01"},
        "medications":[{"name":"Metformin","dose":"500 mg"}],
        "observations":[{"code":"4548-4","display":"HbA1c","value":7.9,"unit":"%","date":"2025-01-01T00:00:00Z"},{"code":"4548-4","display":"HbA1c","value":7.1,"unit":"%","date":"2025-07-01T00:00:00Z"}],
        "notes":[{"id":"n","author":"Dr X","date":"2025-07-01T00:00:00Z","text":"<script>alert(1)</script>"}],
        "createdAt":"2020-01-01T00:00:00Z","updatedAt":"2020-01-01T00:00:00Z"}"#;
        let chart = Chart::from_json_slice(c.as_bytes()).unwrap();
        let h = html(&chart, &[], "Valley Practice", "2026-01-01T00:00:00Z");
        for id in [
            "problems",
            "medications",
            "allergies",
            "observations",
            "immunizations",
            "notes",
            "referrals",
            "shared",
        ] {
            assert!(h.contains(&format!("<section id=\"{id}\">")), "{id}");
        }
        assert!(h.contains("O&#39;Neil") && h.contains("M&lt;1&gt;"));
        assert!(!h.contains("<script>"));
        assert!(h.contains("<polyline") && h.contains("HbA1c: 2 values"));
        assert!(h.contains("Nothing recorded."));
    }
}
