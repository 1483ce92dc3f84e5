//! Compliance with real daemons and real (encrypted) SQLite files: the audit chain detects
//! tampering, nothing readable is left in the data directory, backups taken during an
//! import restore to a store that opens and verifies.

use chartmesh_tests::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn store_key(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("store.key"))
        .unwrap()
        .trim()
        .to_string()
}

/// Opens the practice's encrypted store directly, as an attacker with the key file would.
fn open_raw(dir: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(dir.join("store.db")).unwrap();
    c.execute_batch(&format!("PRAGMA key = \"x'{}'\";", store_key(dir)))
        .unwrap();
    c
}

fn verify_offline(p: &Practice) -> (Option<i32>, Value) {
    let out = p.cli(&["--json", "audit", "verify", "--offline"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "audit verify --offline printed no JSON report: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

#[test]
fn audit_verify_pinpoints_edits_deletions_swaps_and_truncation() {
    let mut a = Practice::new("Audit Clinic");
    // A handful of audited actions.
    a.import_first(3);
    for id in ["chart-000001", "chart-000002", "chart-000003"] {
        a.cli_ok(&["chart", "show", id]);
    }
    a.cli_ok(&[
        "note",
        "add",
        "chart-000001",
        "--text",
        "follow-up in two weeks",
    ]);
    a.stop();
    let (code, v) = verify_offline(&a);
    assert_eq!(code, Some(0), "{v}");
    let n = v["entries"].as_i64().unwrap();
    assert!(n >= 7, "expected several audit entries, got {n}");

    let db = a.dir.join("store.db");
    let pristine = a.dir.parent().unwrap().join("pristine.db");
    std::fs::copy(&db, &pristine).unwrap();
    let reset = || {
        for s in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{s}", db.display()));
        }
        std::fs::copy(&pristine, &db).unwrap();
    };
    let cases: Vec<(&str, String, i64)> = vec![
        ("edited", "UPDATE audit SET actor = 'mallory' WHERE seq = 3".into(), 3),
        ("deleted", "DELETE FROM audit WHERE seq = 4".into(), 4),
        (
            "swapped",
            "UPDATE audit SET seq = -5 WHERE seq = 5; UPDATE audit SET seq = 5 WHERE seq = 6; UPDATE audit SET seq = 6 WHERE seq = -5".into(),
            5,
        ),
        ("truncated", format!("DELETE FROM audit WHERE seq > {}", n - 2), n - 1),
    ];
    for (what, sql, first_bad) in cases {
        reset();
        open_raw(&a.dir).execute_batch(&sql).unwrap();
        let (code, v) = verify_offline(&a);
        assert_eq!(code, Some(6), "{what}: verification did not fail: {v}");
        assert_eq!(v["ok"], false);
        assert_eq!(v["firstBadSeq"], first_bad, "{what}: {v}");
        assert!(!v["reason"].as_str().unwrap().is_empty());
    }
    reset();
    assert_eq!(verify_offline(&a).0, Some(0));
    // The running daemon verifies the same untouched log, and exports it as FHIR AuditEvents.
    a.start();
    a.cli_ok(&["audit", "verify"]);
    let bundle = a.cli_json(&["audit", "--fhir"]);
    let entries = bundle["entry"].as_array().unwrap();
    assert!(entries.len() as i64 >= n);
    assert_eq!(entries[0]["resource"]["resourceType"], "AuditEvent");
    let out = a.dir.parent().unwrap().join("audit.json");
    std::fs::write(&out, serde_json::to_vec(&bundle).unwrap()).unwrap();
    let (ok, report) = validate_fhir(&[&out]);
    assert!(ok, "AuditEvent bundle is not valid R4:\n{report}");
}

#[test]
fn no_patient_name_or_note_text_is_readable_in_the_data_directory() {
    let mut a = Practice::new("Cipher Clinic");
    let file = bench_data().join("charts-1000.jsonl");
    a.cli_ok(&["import", file.to_str().unwrap()]);
    let secret_note = "Patient reports zebrafish allergy, confidential";
    a.cli_ok(&["note", "add", "chart-000010", "--text", secret_note]);
    // Needles: names and note text of the first 100 bench charts, plus the note just added.
    let mut needles: Vec<String> = vec![secret_note.into()];
    for line in std::fs::read_to_string(&file).unwrap().lines().take(100) {
        let c: Value = serde_json::from_str(line).unwrap();
        needles.push(c["patient"]["name"]["family"].as_str().unwrap().into());
        needles.push(c["patient"]["mrn"].as_str().unwrap().into());
        if let Some(n) = c["notes"].as_array().and_then(|n| n.first()) {
            let t = n["text"].as_str().unwrap();
            needles.push(t.chars().take(40).collect());
        }
    }
    needles.retain(|n| n.len() >= 6);
    let data_dir = a.dir.clone();
    let scan = |when: &str| {
        let files = files_under(&data_dir);
        assert!(files.iter().any(|f| f.ends_with("store.db")));
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            for n in &needles {
                assert!(
                    !bytes.windows(n.len()).any(|w| w == n.as_bytes()),
                    "{when}: {n:?} readable in {}",
                    f.display()
                );
            }
        }
    };
    scan("while running");
    a.stop();
    scan("after shutdown");
    // And the data is all there, through the key.
    a.start();
    assert_eq!(
        a.cli_json(&["chart", "show", "chart-000010"])["notes"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["text"],
        secret_note
    );
    // A wrong key is refused with a clear error, and nothing is changed.
    a.stop();
    let good = store_key(&a.dir);
    std::fs::write(a.dir.join("store.key"), "ab".repeat(32)).unwrap();
    let out = Command::new(bin("chartmeshd"))
        .args(["--data-dir", a.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store key does not open"), "{err}");
    std::fs::write(a.dir.join("store.key"), good).unwrap();
    a.start();
    assert_eq!(a.get("/status")["charts"], 1000);
}

#[test]
fn a_backup_taken_during_an_import_restores_to_a_store_that_verifies() {
    let mut a = Practice::new("Backup Clinic");
    let file = bench_data().join("charts-10000.jsonl");
    let mut import = KillOnDrop(
        Command::new(bin("chartmesh"))
            .args([
                "--data-dir",
                a.dir.to_str().unwrap(),
                "import",
                file.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(
        "the import to be under way",
        Duration::from_secs(120),
        || a.get("/status")["charts"].as_u64().unwrap_or(0) > 0,
    );
    let backup = a.dir.parent().unwrap().join("during-import.backup");
    let v = a.cli_json(&["backup", backup.to_str().unwrap()]);
    assert!(v["bytes"].as_u64().unwrap() > 0);
    assert!(import.wait().unwrap().success());
    let full = a.get("/status")["charts"].as_u64().unwrap();
    assert_eq!(full, 10000);
    // Restore refuses while the daemon runs; with it stopped the backup replaces the store.
    let out = a.cli(&["restore", backup.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.stop();
    let r = a.cli_json(&["restore", "--yes", backup.to_str().unwrap()]);
    let restored = r["charts"].as_u64().unwrap();
    assert!(restored > 0 && restored <= 10000, "{r}");
    let previous = r["previous"].as_str().unwrap();
    assert!(
        Path::new(previous).exists(),
        "the replaced store was not kept"
    );
    a.start();
    a.cli_ok(&["audit", "verify"]);
    assert_eq!(a.get("/status")["charts"].as_u64().unwrap(), restored);
    // Every restored chart is a whole chart from the source file.
    let source = chart_hashes(&std::fs::read(&file).unwrap());
    let got = chart_hashes(&a.export_all());
    assert_eq!(got.len() as u64, restored);
    for (id, h) in &got {
        assert_eq!(
            source.get(id),
            Some(h),
            "chart {id} differs from the source"
        );
    }
    // A file that is not a backup is refused with a reason, and the store is untouched.
    a.stop();
    let junk = a.dir.parent().unwrap().join("junk.backup");
    std::fs::write(&junk, b"not a database at all, just text").unwrap();
    let out = a.cli(&["restore", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a usable backup"));
    a.start();
    assert_eq!(a.get("/status")["charts"].as_u64().unwrap(), restored);
}

#[test]
fn key_rotation_re_encrypts_the_store_and_keeps_the_old_pair_aside() {
    let mut a = Practice::new("Rotate Clinic");
    a.import_first(20);
    let before = a.export_all();
    // Refused while the daemon runs.
    assert_eq!(a.cli(&["key", "rotate"]).status.code(), Some(5));
    a.stop();
    let old_key = store_key(&a.dir);
    let r = a.cli_json(&["key", "rotate"]);
    assert_eq!(r["charts"], 20);
    let new_key = store_key(&a.dir);
    assert_ne!(old_key, new_key);
    let kept = Path::new(r["previous"].as_str().unwrap());
    assert!(kept.join("store.db").exists() && kept.join("store.key").exists());
    // The old key no longer opens the store; the new one does, with everything in it.
    let c = rusqlite::Connection::open(a.dir.join("store.db")).unwrap();
    c.execute_batch(&format!("PRAGMA key = \"x'{old_key}'\";"))
        .unwrap();
    assert!(
        c.query_row("SELECT count(*) FROM sqlite_master", [], |r| r
            .get::<_, i64>(0))
            .is_err()
    );
    drop(c);
    a.start();
    a.cli_ok(&["audit", "verify"]);
    assert_eq!(a.export_all(), before);
}

#[test]
fn a_store_written_before_encryption_is_encrypted_on_first_start_without_loss() {
    let mut a = Practice::new("Upgrade Clinic");
    a.import_first(20);
    let before = a.export_all();
    a.stop();
    // Make the store what an older chartmesh left: plaintext SQLite, no key file.
    let db = a.dir.join("store.db");
    let plain = a.dir.join("plain.db");
    {
        let c = open_raw(&a.dir);
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        c.execute(
            "ATTACH DATABASE ?1 AS plain KEY ''",
            [plain.to_str().unwrap()],
        )
        .unwrap();
        c.query_row("SELECT sqlcipher_export('plain')", [], |_| Ok(()))
            .unwrap();
        c.execute_batch(&format!(
            "PRAGMA plain.user_version = {v}; DETACH DATABASE plain;"
        ))
        .unwrap();
    }
    std::fs::rename(&plain, &db).unwrap();
    std::fs::remove_file(a.dir.join("store.key")).unwrap();
    assert!(
        std::fs::read(&db)
            .unwrap()
            .starts_with(b"SQLite format 3\0")
    );
    // An offline read does not touch it; it says what to do.
    let out = a.cli(&["export", "--offline"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("start chartmeshd once"));
    // The daemon encrypts it and serves the same charts.
    a.start();
    assert_eq!(a.export_all(), before);
    a.cli_ok(&["audit", "verify"]);
    assert!(a.dir.join("store.key").exists());
    a.stop();
    assert!(
        !std::fs::read(&db)
            .unwrap()
            .starts_with(b"SQLite format 3\0")
    );
    let family = serde_json::from_slice::<Value>(before.split(|b| *b == b'\n').next().unwrap())
        .unwrap()["patient"]["name"]["family"]
        .as_str()
        .unwrap()
        .to_string();
    for f in files_under(&a.dir) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(family.len()).any(|w| w == family.as_bytes()),
            "{family} readable in {}",
            f.display()
        );
    }
}
