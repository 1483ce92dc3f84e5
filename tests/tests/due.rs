//! Due lists and the population report on the 10,000 bench charts, against an independent
//! computation (tests/due/oracle.py, standard-library Python written from docs/CLINICAL.md).

use chartmesh_tests::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn oracle(file: &Path, today: &str, within: u32) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("due/oracle.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(file)
        .arg(today)
        .arg(within.to_string())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn due_counts_per_rule_match_an_independent_computation_on_10000_charts() {
    let a = Practice::new("Due Clinic");
    let file = bench_data().join("charts-10000.jsonl");
    a.cli_ok(&["import", file.to_str().unwrap()]);
    for (today, within) in [("2026-06-01", 0u32), ("2026-06-01", 90)] {
        let v = a.cli_json(&["due", "--today", today, "--within", &within.to_string()]);
        assert_eq!(v["charts"], 10000);
        let expected = oracle(&file, today, within);
        let mut total = 0;
        for r in v["rules"].as_array().unwrap() {
            let id = r["rule"].as_str().unwrap();
            let e = &expected[id];
            assert_eq!(r["due"], e[0], "{today} +{within}: rule {id}: due");
            assert_eq!(r["overdue"], e[1], "{today} +{within}: rule {id}: overdue");
            total += r["due"].as_u64().unwrap();
        }
        assert!(
            total > 1000,
            "the rules should find plenty due in the bench charts: {total}"
        );
        // The patient list holds exactly the patients with items, each item once.
        let items: usize = v["patients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["items"].as_array().unwrap().len())
            .sum();
        assert_eq!(items as u64, total);
    }
    // The population report counts charts by active condition.
    let p = a.cli_json(&["report", "population", "--today", "2026-06-01"]);
    let mut diabetes = 0;
    for line in std::fs::read_to_string(&file).unwrap().lines() {
        let c: Value = serde_json::from_str(line).unwrap();
        if c["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["code"] == "E11.9" && x["status"] == "active")
        {
            diabetes += 1;
        }
    }
    let key = "E11.9 Type 2 diabetes mellitus without complications";
    assert_eq!(p["conditions"][key], diabetes, "{}", p["conditions"]);
    assert!(p.get("patients").is_none());
}
