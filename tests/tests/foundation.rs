//! The foundation, end to end: real daemons, the real CLI, real SQLite files.

use chartmesh_tests::*;
use rand::Rng;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

#[test]
fn import_then_export_reproduces_the_manifest_checksum_before_and_after_restart() {
    let mut a = Practice::new("Valley Clinic");
    let file = bench_data().join("charts-10000.jsonl");
    let report = a.cli_json(&["import", file.to_str().unwrap()]);
    assert_eq!(report["imported"], 10000, "{report}");
    assert_eq!(report["failed"], 0);

    let out = a.dir.with_extension("export.jsonl");
    let export_and_check = |a: &Practice| {
        a.cli_ok(&["export", "--format", "jsonl", "-o", out.to_str().unwrap()]);
        let bytes = std::fs::read(&out).unwrap();
        let lines = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count();
        assert_eq!(lines, 10000, "one line per chart, none duplicated");
        assert_eq!(set_checksum(&bytes), (10000, manifest_checksum(10000)));
        // The benchmark's own checker agrees (an oracle independent of our code).
        let py = std::process::Command::new("python3")
            .arg(bench_data().join("checksum.py"))
            .arg(&out)
            .output();
        if let Ok(py) = py
            && py.status.success()
        {
            let s = String::from_utf8_lossy(&py.stdout);
            assert!(
                s.contains(&manifest_checksum(10000)),
                "checksum.py says {s}"
            );
        }
    };
    export_and_check(&a);
    a.restart();
    export_and_check(&a);
    // Re-importing the same file changes nothing and is not an error.
    let again = a.cli_json(&["import", file.to_str().unwrap()]);
    assert_eq!(
        (again["imported"].as_u64(), again["unchanged"].as_u64()),
        (Some(0), Some(10000)),
        "{again}"
    );
    let status = a.get("/status");
    assert_eq!(status["charts"], 10000);
}

#[test]
fn malformed_records_each_get_one_clear_error_and_good_records_are_kept() {
    let a = Practice::new("Hill Clinic");
    let good: Vec<String> = std::fs::read_to_string(bench_data().join("charts-1000.jsonl"))
        .unwrap()
        .lines()
        .take(5)
        .map(str::to_string)
        .collect();
    let mut file: Vec<u8> = Vec::new();
    let mut push = |l: &[u8]| {
        file.extend_from_slice(l);
        file.push(b'\n');
    };
    push(good[0].as_bytes()); // line 1: good
    push(&good[1].as_bytes()[..good[1].len() / 2]); // line 2: truncated
    push(
        good[2]
            .replace("\"schemaVersion\":1", "\"schemaVersion\":\"one\"")
            .as_bytes(),
    ); // line 3: wrong type
    push(
        good[3]
            .replacen("\"id\":\"chart-000004\",", "", 1)
            .as_bytes(),
    ); // line 4: missing id
    push(good[2].as_bytes()); // line 5: good (chart-000003)
    push(good[2].as_bytes()); // line 6: duplicate of line 5
    let mut huge = b"{\"id\":\"huge\",\"text\":\"".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 10 * 1024 * 1024));
    huge.extend_from_slice(b"\"}");
    push(&huge); // line 7: 10 MB line
    let mut non_utf8 = good[4].as_bytes().to_vec();
    non_utf8[40] = 0xff;
    push(&non_utf8); // line 8: not UTF-8
    push(
        good[4]
            .replace("\"birthDate\":\"", "\"birthDate\":\"x")
            .as_bytes(),
    ); // line 9: bad date format
    push(good[4].as_bytes()); // line 10: good
    let path = a.dir.with_extension("bad.jsonl");
    std::fs::write(&path, &file).unwrap();

    let out = a.cli(&["--json", "import", path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a file with bad records exits non-zero"
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["imported"], 3, "{report}");
    let errors = report["errors"].as_array().unwrap();
    let by_line: HashMap<u64, String> = errors
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().unwrap(),
                format!(
                    "{} {}",
                    e["field"].as_str().unwrap(),
                    e["message"].as_str().unwrap()
                ),
            )
        })
        .collect();
    assert_eq!(errors.len(), 7, "one error per bad record: {report}");
    assert!(by_line[&2].contains("truncated"), "{}", by_line[&2]);
    assert!(by_line[&3].contains("schemaVersion"), "{}", by_line[&3]);
    assert!(by_line[&4].contains("`id`"), "{}", by_line[&4]);
    assert!(
        by_line[&6].contains("duplicate id") && by_line[&6].contains("line 5"),
        "{}",
        by_line[&6]
    );
    assert!(by_line[&7].contains("over the limit"), "{}", by_line[&7]);
    assert!(by_line[&8].contains("UTF-8"), "{}", by_line[&8]);
    assert!(by_line[&9].contains("patient.birthDate"), "{}", by_line[&9]);

    // The daemon is still serving, and holds exactly the good records, intact.
    let status = a.get("/status");
    assert_eq!(status["charts"], 3);
    let exported = a.cli_ok(&["export"]);
    let hashes = chart_hashes(exported.as_bytes());
    let want = chart_hashes(format!("{}\n{}\n{}\n", good[0], good[2], good[4]).as_bytes());
    assert_eq!(hashes, want);
}

#[test]
fn kill9_during_import_never_loses_an_acknowledged_chart() {
    let mut a = Practice::new("Ridge Clinic");
    let source = std::fs::read(bench_data().join("charts-10000.jsonl")).unwrap();
    let want = chart_hashes(&source);
    let lines: Vec<&[u8]> = source
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let chunks: Vec<Vec<u8>> = lines.chunks(250).map(|c| c.join(&b'\n')).collect();
    let ids_of = |i: usize| -> Vec<String> {
        lines[i * 250..((i + 1) * 250).min(lines.len())]
            .iter()
            .map(|l| {
                serde_json::from_slice::<Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let mut acked: Vec<String> = Vec::new();
    let mut next_chunk = 0;
    let mut rng = rand::rng();
    for round in 0..20 {
        // Import from the first unacknowledged chunk, in a thread; kill at a random moment.
        let base = a.base();
        let token = a.token();
        let todo: Vec<(usize, Vec<u8>)> = (next_chunk..chunks.len())
            .map(|i| (i, chunks[i].clone()))
            .collect();
        let (tx, rx) = std::sync::mpsc::channel::<usize>();
        let importer = std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            for (i, body) in todo {
                let r = agent
                    .post(format!("{base}/import"))
                    .header("Authorization", format!("Bearer {token}"))
                    .send(&body[..]);
                match r {
                    Ok(mut resp) if resp.status() == 200 => {
                        let v: Value = resp.body_mut().read_json().unwrap();
                        assert_eq!(v["failed"], 0, "{v}");
                        let _ = tx.send(i);
                    }
                    _ => return,
                }
            }
        });
        let delay = rng.random_range(20..600);
        std::thread::sleep(Duration::from_millis(delay)); // the kill point itself is what is random here
        a.kill9();
        importer.join().unwrap();
        for i in rx.try_iter() {
            acked.extend(ids_of(i));
            next_chunk = next_chunk.max(i + 1);
        }
        a.start();
        // The store opens cleanly and every acknowledged chart is there and intact.
        let count = a.get("/status")["charts"].as_u64().unwrap() as usize;
        assert!(
            count >= acked.len(),
            "round {round}: {count} charts in the store, {} acknowledged",
            acked.len()
        );
        for id in acked.iter().rev().take(10).chain(acked.iter().take(5)) {
            let chart = a.get(&format!("/charts/{id}"));
            assert_eq!(
                &chartmesh_core::canonical::chart_hash(&chart),
                &want[id],
                "round {round}: chart {id} changed"
            );
        }
        let verify = a.get("/audit/verify");
        assert_eq!(verify["ok"], true, "round {round}: {verify}");
        if next_chunk == chunks.len() {
            break;
        }
    }
    // Finish whatever is left, then everything matches the source exactly, with no duplicates.
    let file = bench_data().join("charts-10000.jsonl");
    let r = a.cli_json(&["import", file.to_str().unwrap()]);
    assert_eq!(r["failed"], 0, "{r}");
    let exported = a.cli_ok(&["export"]);
    assert_eq!(exported.lines().count(), 10000);
    assert_eq!(
        set_checksum(exported.as_bytes()),
        (10000, manifest_checksum(10000))
    );
    for id in &acked {
        assert!(want.contains_key(id));
    }
}

#[test]
fn concurrent_edits_of_one_chart_from_two_clients_both_survive_with_history() {
    let a = Practice::new("Lake Clinic");
    let first = std::fs::read_to_string(bench_data().join("charts-1000.jsonl"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let (s, _) = a.post("/import", first.as_bytes(), "importer").unwrap();
    assert_eq!(s, 200);
    let id = "chart-000001";
    let before = a.get(&format!("/charts/{id}"))["notes"]
        .as_array()
        .unwrap()
        .len();
    std::thread::scope(|scope| {
        for who in ["Dr Alpha", "Nurse Beta"] {
            let a = &a;
            scope.spawn(move || {
                for i in 0..15 {
                    let body = serde_json::json!({ "entry": { "text": format!("note {i} by {who}") }, "author": who });
                    let (s, v) = a.post(&format!("/charts/{id}/notes"), body.to_string().as_bytes(), who).unwrap();
                    assert_eq!(s, 201, "{v}");
                }
            });
        }
    });
    let chart = a.get(&format!("/charts/{id}"));
    let notes = chart["notes"].as_array().unwrap();
    assert_eq!(notes.len(), before + 30);
    for who in ["Dr Alpha", "Nurse Beta"] {
        for i in 0..15 {
            let text = format!("note {i} by {who}");
            assert!(
                notes
                    .iter()
                    .any(|n| n["text"] == text.as_str() && n["author"] == who),
                "missing {text}"
            );
        }
    }
    // The CLI's history shows both authors, the action and the time.
    let h = a.cli_json(&["history", id]);
    let changes = h["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 31);
    let practice = a.cli_json(&["id"])["id"].as_str().unwrap().to_string();
    for who in ["Dr Alpha", "Nurse Beta"] {
        let mine: Vec<_> = changes.iter().filter(|c| c["author"] == who).collect();
        assert_eq!(mine.len(), 15);
        assert!(mine.iter().all(|c| c["action"] == "add note"
            && c["practice"] == practice.as_str()
            && c["time_ms"].as_i64().unwrap() > 1_700_000_000_000));
    }
    let human = a.cli_ok(&["history", id]);
    assert!(human.contains("Dr Alpha") && human.contains("Nurse Beta"));
}

#[test]
fn cli_edits_append_in_the_bench_shape_and_errors_name_the_problem() {
    let a = Practice::new("Bay Clinic");
    let created = a.cli_json(&[
        "chart",
        "create",
        "--mrn",
        "MRN1",
        "--family",
        "Okafor",
        "--given",
        "Ada",
        "--birth-date",
        "1970-03-04",
        "--sex",
        "female",
    ]);
    let id = created["id"].as_str().unwrap();
    a.cli_ok(&[
        "note",
        "add",
        id,
        "--author",
        "Dr Ana",
        "--text",
        "Seen today.",
    ]);
    a.cli_ok(&[
        "med",
        "add",
        id,
        "--name",
        "Metformin",
        "--dose",
        "500 mg",
        "--route",
        "oral",
        "--frequency",
        "twice daily",
    ]);
    a.cli_ok(&[
        "allergy",
        "add",
        id,
        "--substance",
        "Penicillin",
        "--reaction",
        "Rash",
        "--severity",
        "moderate",
    ]);
    a.cli_ok(&[
        "obs", "add", id, "--code", "8480-6", "--value", "131", "--unit", "mm[Hg]",
    ]);
    a.cli_ok(&[
        "obs", "add", id, "--code", "8310-5", "--value", "36.6", "--unit", "Cel",
    ]);
    let c = a.cli_json(&["chart", "show", id]);
    assert_eq!(c["notes"][0]["author"], "Dr Ana");
    assert_eq!(c["notes"][0]["text"], "Seen today.");
    assert_eq!(c["medications"][0]["dose"], "500 mg");
    assert_eq!(c["allergies"][0]["severity"], "moderate");
    assert_eq!(c["observations"][0]["value"], 131);
    assert_eq!(c["observations"][1]["value"], 36.6);
    // Found by name, MRN and birth date.
    for q in ["okaf", "MRN1", "1970-03-04"] {
        let r = a.cli_json(&["chart", "search", q]);
        assert_eq!(r["charts"][0]["id"], id, "search {q}");
    }
    // Not found → exit 4; bad input → exit 1 with the field named; bad usage → 2.
    assert_eq!(
        a.cli(&["chart", "show", "no-such-chart"]).status.code(),
        Some(4)
    );
    let bad = a.cli(&[
        "obs",
        "add",
        id,
        "--code",
        "x",
        "--value",
        "1",
        "--unit",
        "u",
        "--date",
        "yesterday",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("date"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert_eq!(
        a.cli(&[
            "obs", "add", id, "--code", "x", "--value", "high", "--unit", "u"
        ])
        .status
        .code(),
        Some(2)
    );
    // Every read and change is in the audit log, and the chain verifies.
    let audit = a.cli_json(&["audit", "--chart", id]);
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"create") && actions.contains(&"update") && actions.contains(&"read"),
        "{actions:?}"
    );
    let all = a.cli_json(&["audit"]);
    let searches = all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "search")
        .count();
    assert_eq!(searches, 3, "each search is audited");
    a.cli_ok(&["audit", "verify"]);
    // The offline read (no daemon) sees the same chart.
    let mut a = a;
    a.stop();
    let off = a.cli_json(&["chart", "show", "--offline", id]);
    assert_eq!(off, c);
}

#[test]
fn one_daemon_per_data_directory_and_sigterm_shuts_down_cleanly() {
    let mut a = Practice::new("Pine Clinic");
    let second = std::process::Command::new(bin("chartmeshd"))
        .arg("--data-dir")
        .arg(&a.dir)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already running"), "{err}");
    // The first daemon is unaffected, stops cleanly on SIGTERM (exit 0) and starts again.
    a.get("/status");
    a.stop();
    assert!(
        !a.dir.join("api.addr").exists(),
        "the API address file is removed on shutdown"
    );
    a.start();
    a.get("/status");
    // A token that is wrong gets 401 and no data.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let r = agent
        .get(format!("{}/charts?q=a", a.base()))
        .header("Authorization", "Bearer wrong")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}
