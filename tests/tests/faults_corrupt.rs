//! Corruption: flipped bytes in the store file, a deleted, truncated or damaged write-ahead
//! log. Each is detected when the daemon starts; it refuses to start (so it serves and sends
//! nothing from a damaged store) with a message saying what to do; the store as it was
//! before the damage starts again.

#[path = "faults_util/mod.rs"]
mod util;

use chartmesh_tests::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use util::*;

fn file(p: &Practice, suffix: &str) -> PathBuf {
    p.dir.join(format!("store.db{suffix}"))
}

/// Copies the store's files aside (or back).
fn copy_store(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for s in [
        "store.db",
        "store.db-wal",
        "store.db-shm",
        "store.db-commit",
    ] {
        let _ = std::fs::remove_file(to.join(s));
        if from.join(s).exists() {
            std::fs::copy(from.join(s), to.join(s)).unwrap();
        }
    }
}

fn flip(path: &Path, offset: u64) {
    let mut b = std::fs::read(path).unwrap();
    let i = offset as usize;
    assert!(i < b.len(), "{} has {} bytes", path.display(), b.len());
    b[i] ^= 0x5a;
    b[i + 1] ^= 0xff;
    std::fs::write(path, b).unwrap();
}

/// Starts the daemon on the damaged store: it must refuse, say so and say what to do.
fn assert_refused(p: &mut Practice, case: &str, expect: &str) {
    let log_before = p.log().len();
    let st = p.start_expecting_exit(Duration::from_secs(60));
    assert!(
        !st.success(),
        "{case}: chartmeshd started on a damaged store"
    );
    let log = p.log()[log_before..].to_string();
    assert!(
        log.contains("the chart store is damaged") && log.contains(expect),
        "{case}: {log}"
    );
    assert!(
        log.contains("chartmesh restore") && log.contains("custodians"),
        "{case}: the message should say what to do: {log}"
    );
    assert!(
        !p.dir.join("api.addr").exists(),
        "{case}: the API was served"
    );
    println!(
        "{case}: refused: {}",
        log.lines().last().unwrap_or_default()
    );
}

#[test]
fn damage_to_the_store_or_its_wal_is_detected_at_start_and_nothing_is_served() {
    let lines = bench_lines();
    let mut a = Practice::new("Damaged Clinic");
    let (s, _) = a
        .post("/import", lines[..200].join("\n").as_bytes(), "t")
        .unwrap();
    assert_eq!(s, 200);
    a.stop();
    let good = a.dir.with_extension("good");
    copy_store(&a.dir, &good);
    let pages = std::fs::metadata(file(&a, "")).unwrap().len() / 4096;
    assert!(pages > 20, "{pages} pages");
    let mut cases = 0;

    // Flipped bytes in a page of the store file (a table page, and the first page).
    for (case, offset) in [
        (
            "flipped bytes in the middle of the store",
            (pages / 2) * 4096 + 1000,
        ),
        ("flipped bytes in the last page", (pages - 1) * 4096 + 200),
        ("flipped bytes in the first page", 100),
    ] {
        flip(&file(&a, ""), offset);
        assert_refused(&mut a, case, "");
        copy_store(&good, &a.dir);
        cases += 1;
    }
    a.start();
    assert_eq!(a.get("/status")["charts"], 200);

    // Committed work in the WAL, then the process dies before a checkpoint.
    let (s, _) = a
        .post("/import", lines[200..260].join("\n").as_bytes(), "t")
        .unwrap();
    assert_eq!(s, 200);
    a.kill9();
    let wal = file(&a, "-wal");
    let wal_len = std::fs::metadata(&wal).unwrap().len();
    assert!(
        wal_len > 32 * 1024,
        "the WAL holds the last import ({wal_len} bytes)"
    );
    let crashed = a.dir.with_extension("crashed");
    copy_store(&a.dir, &crashed);
    type Damage = Box<dyn Fn(&Path)>;
    let damages: Vec<(&str, Damage)> = vec![
        (
            "deleted WAL",
            Box::new(|w| {
                std::fs::remove_file(w).unwrap();
                let _ = std::fs::remove_file(w.with_extension("db-shm"));
            }),
        ),
        (
            "truncated WAL",
            Box::new(move |w| {
                let f = std::fs::OpenOptions::new().write(true).open(w).unwrap();
                f.set_len(wal_len / 2).unwrap();
            }),
        ),
        (
            "flipped bytes in the WAL",
            Box::new(move |w| flip(w, wal_len / 3)),
        ),
    ];
    for (case, damage) in &damages {
        damage(&wal);
        assert_refused(&mut a, case, "committed work is missing");
        copy_store(&crashed, &a.dir);
        cases += 1;
    }
    // The undamaged store recovers every committed chart.
    a.start();
    assert_eq!(a.get("/status")["charts"], 260);
    assert_eq!(a.get("/audit/verify")["ok"], true);
    a.stop();
    println!("fault figures: corruption cases = {cases}, each refused at start, none served");
}

/// Measures the start-up check's candidates on a store of 10,000 charts (docs/RELIABILITY.md):
/// `cargo test -p chartmesh-tests --test faults_corrupt -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_integrity_checks_at_10000_charts() {
    let mut a = Practice::new("Big Clinic");
    let file = bench_data().join("charts-10000.jsonl");
    a.cli_ok(&["import", file.to_str().unwrap()]);
    a.stop();
    let bytes = std::fs::metadata(a.dir.join("store.db")).unwrap().len();
    for pragma in ["quick_check", "cipher_integrity_check", "integrity_check"] {
        // Cold cache each time: drop the OS's cached pages of the file first.
        let _ = std::process::Command::new("sh")
            .args(["-c", "sync; echo 1 > /proc/sys/vm/drop_caches"])
            .status();
        let c = open_store(&a.dir);
        let t = Instant::now();
        let mut st = c.prepare(&format!("PRAGMA {pragma}")).unwrap();
        let rows: Vec<String> = st
            .query_map([], |r| {
                r.get::<_, Option<String>>(0).map(|v| v.unwrap_or_default())
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        println!(
            "{pragma}: {:?} on {} MB ({} rows: {:?})",
            t.elapsed(),
            bytes >> 20,
            rows.len(),
            rows.first()
        );
    }
    a.start();
    let t = Instant::now();
    a.stop();
    a.start();
    println!("daemon restart with the check: {:?}", t.elapsed());
    let log = a.log();
    for l in log.lines().filter(|l| l.contains("store checked")) {
        println!("{l}");
    }
}
