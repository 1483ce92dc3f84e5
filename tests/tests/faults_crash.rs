//! Crash at every write point (failpoints, docs/RELIABILITY.md): a real `chartmeshd` built
//! with the store's `failpoints` feature is started with `FAILPOINTS` naming one point; an
//! import batch, a chart edit or a sync from a peer then reaches it and the process aborts
//! there (no destructor, no flush). After a restart the store is in the state before the
//! transaction or after it, never in between, and the same work then completes.

#[path = "faults_util/mod.rs"]
mod util;

use chartmesh_tests::*;
use std::time::Duration;
use util::*;

const BATCH: usize = 12;

/// Every point an import batch passes, and where to stop (`n*off->return` lets n hits pass).
const IMPORT_POINTS: &[(&str, &str)] = &[
    ("write.insert.before", "return"),
    ("write.insert.row", "return"),
    ("write.insert.row", "5*off->return"),
    ("write.insert.between_charts", "return"),
    ("write.insert.between_charts", "7*off->return"),
    ("write.insert.after", "return"),
    ("write.before_commit.insert", "return"),
    ("write.after_commit.insert", "return"),
];

/// Every point a chart edit passes.
const EDIT_POINTS: &[&str] = &[
    "write.edit.before",
    "write.doc.body",
    "write.edit.persisted",
    "write.edit.after",
    "write.before_commit.edit",
    "write.after_commit.edit",
];

/// Points every writer task passes (a received sync batch is one).
const TASK_POINTS: &[&str] = &[
    "write.task.before",
    "write.task.after",
    "write.before_commit.task",
    "write.after_commit.task",
    // Inside the sync apply itself (store::sync::apply_one): before an item, after a new
    // copy's row and before its document, after a merge is written and before its audit.
    "sync.apply.item",
    "sync.apply.after_row",
    "sync.apply.after_merge",
];

fn committed_at(point: &str) -> bool {
    point.starts_with("write.after_commit")
}

/// Arms `spec` at the next start, waits for the start, runs `work` (which must reach the
/// point), and waits for the abort. Returns the log lines the abort left.
fn crash_during(p: &mut Practice, point: &str, spec: &str, work: impl FnOnce(&Practice)) {
    p.stop();
    p.set_env(&[("FAILPOINTS", &format!("{point}={spec}"))]);
    p.start();
    assert_armed(p, point);
    work(p);
    let st = p.wait_exit(Duration::from_secs(30));
    assert!(
        !st.success(),
        "{point}: the daemon should have aborted, exited {st}"
    );
    assert!(
        p.log().contains(&format!("failpoint {point}: aborting")),
        "{point}: did not abort at the point"
    );
    p.set_env(&[]);
    p.start();
}

#[test]
fn a_crash_at_any_write_point_of_an_import_or_edit_leaves_before_or_after() {
    let lines = bench_lines();
    let mut a = Practice::new("Crash Clinic");
    let agent = agent();
    let mut scenarios = 0;
    for (round, (point, spec)) in IMPORT_POINTS.iter().enumerate() {
        let batch = &lines[round * BATCH..(round + 1) * BATCH];
        let body = batch.join("\n");
        let before = a.get("/status")["charts"].as_u64().unwrap();
        crash_during(&mut a, point, spec, |a| {
            let r = post(&agent, &a.base(), &a.token(), "/import", body.as_bytes());
            assert!(r.is_err(), "{point}: the import was answered: {r:?}");
        });
        let after = a.get("/status")["charts"].as_u64().unwrap();
        let present = batch
            .iter()
            .filter(|l| a.try_get(&format!("/charts/{}", id_of(l))).unwrap().0 == 200)
            .count();
        let want = if committed_at(point) { BATCH } else { 0 };
        assert_eq!(
            present, want,
            "{point}={spec}: {present} of {BATCH} charts kept"
        );
        assert_eq!(after, before + want as u64, "{point}={spec}");
        assert_eq!(a.get("/audit/verify")["ok"], true, "{point}");
        a.stop();
        assert_store_consistent(&a.dir, point);
        a.start();
        // The next operation completes: the same import again, then every chart is as sent.
        let (s, v) = a.post("/import", body.as_bytes(), "fault-test").unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["failed"], 0, "{v}");
        let hashes = chart_hashes(body.as_bytes());
        for (id, h) in &hashes {
            assert_eq!(
                &chartmesh_core::canonical::chart_hash(&a.get(&format!("/charts/{id}"))),
                h
            );
        }
        scenarios += 1;
    }
    let chart = id_of(&lines[0]);
    for (i, point) in EDIT_POINTS.iter().enumerate() {
        let note = format!("crash-edit-{i}");
        let body = note_body(&note);
        let history_before = a.cli_json(&["history", &chart])["changes"]
            .as_array()
            .unwrap()
            .len();
        crash_during(&mut a, point, "return", |a| {
            let r = post(
                &agent,
                &a.base(),
                &a.token(),
                &format!("/charts/{chart}/notes"),
                &body,
            );
            assert!(r.is_err(), "{point}: the edit was answered: {r:?}");
        });
        let c = a.get(&format!("/charts/{chart}"));
        let history = a.cli_json(&["history", &chart])["changes"]
            .as_array()
            .unwrap()
            .len();
        if committed_at(point) {
            assert!(has_note(&c, &note), "{point}: a committed edit was lost");
            assert_eq!(history, history_before + 1, "{point}");
        } else {
            assert!(!has_note(&c, &note), "{point}: half an edit was kept");
            assert_eq!(history, history_before, "{point}");
        }
        assert_eq!(a.get("/audit/verify")["ok"], true, "{point}");
        // The next edit completes and the chart reads back whole.
        let (s, v) = a
            .post(
                &format!("/charts/{chart}/notes"),
                &note_body(&format!("{note}-again")),
                "fault-test",
            )
            .unwrap();
        assert_eq!(s, 201, "{point}: {v}");
        assert!(has_note(
            &a.get(&format!("/charts/{chart}")),
            &format!("{note}-again")
        ));
        scenarios += 1;
    }
    a.stop();
    assert_store_consistent(&a.dir, "after every edit point");
    println!("fault figures: crash points (import + edit) = {scenarios}, lost or half-written = 0");
}

#[test]
fn a_crash_while_applying_a_peers_sync_leaves_a_whole_store_and_the_next_sync_completes() {
    let lines = bench_lines();
    let a = Practice::new("Custodian");
    let mut b = Practice::new("Receiver");
    pair(&a, &b);
    let b_id = b.id();
    let mut scenarios = 0;
    for (round, point) in TASK_POINTS.iter().enumerate() {
        // B is down while A imports and shares new charts (or, for a point of the merge
        // path, adds notes to charts B holds), then B starts armed: its first pull's batch
        // reaches the point.
        b.stop();
        let merge = point.contains("merge");
        let batch = if merge {
            &lines[800 + (round - 1) * 20..800 + round * 20]
        } else {
            &lines[800 + round * 20..800 + (round + 1) * 20]
        };
        let ids: Vec<String> = batch.iter().map(|l| id_of(l)).collect();
        if merge {
            for id in &ids {
                let (s, v) = a
                    .post(
                        &format!("/charts/{id}/notes"),
                        &note_body(&format!("merge-{id}")),
                        "fault-test",
                    )
                    .unwrap();
                assert_eq!(s, 201, "{v}");
            }
        } else {
            let file = a.dir.with_extension(format!("sync-{round}.jsonl"));
            std::fs::write(&file, batch.join("\n")).unwrap();
            a.cli_ok(&["import", file.to_str().unwrap()]);
            let mut args = vec!["share"];
            args.extend(ids.iter().map(String::as_str));
            args.extend(["--with", &b_id]);
            a.cli_ok(&args);
        }
        b.set_env(&[("FAILPOINTS", &format!("{point}=return"))]);
        // The point may be reached before the API answers: wait for the exit alone.
        let st = b.start_expecting_exit(Duration::from_secs(60));
        assert_armed(&b, point);
        assert!(!st.success(), "{point}: B should have aborted");
        // On disk, before anything else touches it: whole.
        let n = assert_store_consistent(&b.dir, point);
        b.set_env(&[]);
        // A still holds its connection to the B that died; B's new one replaces it at once
        // (a peer that dials again has lost the old one), well before QUIC's 30 s timeout.
        b.start();
        b.sync_wait(&a, 20);
        for (id, h) in chart_hashes(batch.join("\n").as_bytes()) {
            let (s, c) = b.try_get(&format!("/charts/{id}")).unwrap();
            assert_eq!(s, 200, "{point}: {id} did not arrive after the crash");
            if merge {
                assert!(
                    has_note(&c, &format!("merge-{id}")),
                    "{point}: the note of {id} did not arrive"
                );
            } else {
                assert_eq!(
                    chartmesh_core::canonical::chart_hash(&c),
                    h,
                    "{point}: {id}"
                );
            }
        }
        assert_eq!(b.get("/audit/verify")["ok"], true, "{point}");
        println!("{point}: {n} charts on disk after the crash, all there after the next sync");
        scenarios += 1;
    }
    b.stop();
    assert_store_consistent(&b.dir, "after every sync point");
    println!("fault figures: crash points (sync apply) = {scenarios}, lost or half-written = 0");
}
