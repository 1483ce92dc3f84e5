//! The patient copy: the HTML page renders in headless Chromium with the key sections and
//! values of the chart, and the International Patient Summary is a valid FHIR R4 document
//! (Composition first; problems, allergies and medications always present).

use chartmesh_tests::mesh::Mesh;
use chartmesh_tests::*;
use serde_json::Value;

/// A bench chart among the first `n` with a repeated numeric observation, medications,
/// allergies, immunizations and notes.
fn rich_chart(n: usize) -> Value {
    let all = std::fs::read_to_string(bench_data().join("charts-1000.jsonl")).unwrap();
    all.lines()
        .take(n)
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|c| {
            let len = |k: &str| c[k].as_array().map_or(0, |a| a.len());
            let obs = c["observations"].as_array().unwrap();
            let repeated = obs.iter().any(|o| {
                obs.iter()
                    .filter(|x| x["code"] == o["code"] && x["value"].is_number())
                    .count()
                    >= 2
            });
            repeated
                && len("medications") > 0
                && len("allergies") > 0
                && len("immunizations") > 0
                && len("notes") > 0
        })
        .expect("a rich chart in the bench data")
}

fn section<'a>(ips: &'a Value, loinc: &str) -> &'a Value {
    ips["entry"][0]["resource"]["section"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["code"]["coding"][0]["code"] == loinc)
        .unwrap_or_else(|| panic!("no section {loinc}"))
}

#[test]
fn the_patient_copy_renders_in_chromium_and_its_ips_is_valid() {
    let [a, b] = Mesh::new(&["Valley Family Practice", "Hill Cardiology"])
        .paired()
        .into_array();
    a.import_first(200);
    let c = rich_chart(200);
    let id = c["id"].as_str().unwrap();
    a.cli_ok(&[
        "refer",
        id,
        "--to",
        &b.id(),
        "--reason",
        "palpitations on exertion",
    ]);

    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("copy");
    a.cli_ok(&["export", "--patient-copy", id, "-o", dir.to_str().unwrap()]);
    let dom = chromium_dom(&dir.join("summary.html"));

    // The sections, in the DOM Chromium built.
    for s in [
        "Problems",
        "Medications",
        "Allergies",
        "Recent results and measurements",
        "Immunizations",
        "Notes from your care team",
        "Referrals",
        "Where your record was shared",
    ] {
        assert!(dom.contains(&format!("{s}</h2>")), "section {s} missing");
    }
    // The values.
    let p = &c["patient"];
    assert!(dom.contains(p["name"]["family"].as_str().unwrap()));
    assert!(dom.contains(p["mrn"].as_str().unwrap()));
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    for m in c["medications"].as_array().unwrap() {
        assert!(dom.contains(&esc(m["name"].as_str().unwrap())), "{m}");
    }
    for x in c["allergies"].as_array().unwrap() {
        assert!(dom.contains(&esc(x["substance"].as_str().unwrap())), "{x}");
    }
    for i in c["immunizations"].as_array().unwrap() {
        assert!(dom.contains(&esc(i["vaccine"].as_str().unwrap())), "{i}");
    }
    // The most recent observation is in the table, and a trend chart was drawn.
    let latest = c["observations"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|o| o["date"].as_str().unwrap().to_string())
        .unwrap();
    assert!(dom.contains(&format!(
        "<td>{}</td>",
        &latest["date"].as_str().unwrap()[..10]
    )));
    assert!(
        dom.contains("<svg") && dom.contains("<polyline"),
        "no trend chart"
    );
    // The referral and where the record went.
    assert!(dom.contains("palpitations on exertion"));
    assert!(dom.contains("Hill Cardiology"));

    // The IPS: valid R4, Composition first, the three required sections with entries.
    let ips_path = dir.join("ips.json");
    let (ok, report) = validate_fhir(&[&ips_path]);
    assert!(ok, "{report}");
    let ips: Value = serde_json::from_slice(&std::fs::read(&ips_path).unwrap()).unwrap();
    assert_eq!(ips["type"], "document");
    assert_eq!(ips["entry"][0]["resource"]["resourceType"], "Composition");
    assert_eq!(
        ips["entry"][0]["resource"]["type"]["coding"][0]["code"],
        "60591-5"
    );
    assert_eq!(
        section(&ips, "10160-0")["entry"].as_array().unwrap().len(),
        c["medications"].as_array().unwrap().len()
    );
    assert_eq!(
        section(&ips, "48765-2")["entry"].as_array().unwrap().len(),
        c["allergies"].as_array().unwrap().len()
    );

    // The chart's full FHIR export carries the referral as a valid ServiceRequest too.
    let fhir_dir = out.path().join("fhir");
    a.cli_ok(&[
        "export",
        "--format",
        "fhir",
        "-o",
        fhir_dir.to_str().unwrap(),
        id,
    ]);
    let files = files_under(&fhir_dir);
    let refs: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
    let (ok, report) = validate_fhir(&refs);
    assert!(ok, "{report}");
    let bundle: Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert!(
        bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["resource"]["resourceType"] == "ServiceRequest"
                && e["resource"]["reasonCode"][0]["text"] == "palpitations on exertion")
    );

    // The copy is audited as an export of that chart.
    let audit = a.get(&format!("/audit?chart={id}"));
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "export" && e["detail"] == "format=patient-copy")
    );
}

#[test]
fn an_empty_chart_gives_sections_with_an_empty_reason() {
    let a = Practice::new("Empty Clinic");
    let c = a.cli_json(&[
        "chart",
        "create",
        "--mrn",
        "E-1",
        "--family",
        "Blank",
        "--given",
        "Bo",
        "--birth-date",
        "2001-01-01",
    ]);
    let id = c["id"].as_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    a.cli_ok(&[
        "export",
        "--patient-copy",
        id,
        "-o",
        out.path().to_str().unwrap(),
    ]);
    let ips_path = out.path().join("ips.json");
    let (ok, report) = validate_fhir(&[&ips_path]);
    assert!(ok, "{report}");
    let ips: Value = serde_json::from_slice(&std::fs::read(&ips_path).unwrap()).unwrap();
    for code in ["11450-4", "48765-2", "10160-0"] {
        let s = section(&ips, code);
        assert!(s["entry"].is_null(), "{s}");
        assert_eq!(s["emptyReason"]["coding"][0]["code"], "nilknown", "{s}");
    }
    let dom = chromium_dom(&out.path().join("summary.html"));
    assert!(dom.contains("Blank") && dom.contains("Nothing recorded."));
    // Unknown chart: a clear error, nothing written.
    let other = tempfile::tempdir().unwrap();
    let bad = a.cli(&[
        "export",
        "--patient-copy",
        "chart-nope",
        "-o",
        other.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(4));
    assert!(!other.path().join("x").join("summary.html").exists());
}
