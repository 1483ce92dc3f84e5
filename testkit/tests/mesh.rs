//! The simulated mesh: seeded scenarios of five practices sharing, editing, revoking, asking
//! for emergency access, crashing, partitioning and flapping, with the invariants of
//! `chartmesh_testkit::scenario` checked after every step and at quiescence.
//!
//! `cargo test -p chartmesh-testkit` runs 1,000 scenarios (two tests of 500, one per core).
//! `CHARTMESH_SIM_SCENARIOS=100000` runs more; `CHARTMESH_SIM_BASE` moves the first seed;
//! `CHARTMESH_SIM_SEED=<seed>` replays one (`--test mesh replay -- --nocapture`).

use chartmesh_testkit::mesh::{Faults, Mesh};
use chartmesh_testkit::scenario::{Op, PRACTICES, ops_of_seed, run};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Drops operations one at a time while the scenario still fails: the smallest failing
/// scenario is the clearest report.
fn shrink(seed: u64, ops: Vec<Op>) -> Vec<Op> {
    let mut ops = ops;
    let mut i = 0;
    while i < ops.len() {
        let mut fewer = ops.clone();
        fewer.remove(i);
        if run(seed, PRACTICES, &fewer).is_err() {
            ops = fewer;
        } else {
            i += 1;
        }
    }
    ops
}

fn scenarios(parity: u64) {
    let total = env_u64("CHARTMESH_SIM_SCENARIOS", 1000);
    let base = env_u64("CHARTMESH_SIM_BASE", 1);
    let t0 = std::time::Instant::now();
    let (mut runs, mut messages, mut crashes) = (0u64, 0u64, 0u64);
    for seed in (base..base + total).filter(|s| s % 2 == parity) {
        let ops = ops_of_seed(seed);
        match run(seed, PRACTICES, &ops) {
            Ok(stats) => {
                runs += 1;
                messages += stats.messages;
                crashes += stats.crashes;
            }
            Err(report) => {
                let small = shrink(seed, ops);
                panic!(
                    "{report}\n\nsmallest failing scenario for seed {seed}: {small:?}\n{}",
                    run(seed, PRACTICES, &small).err().unwrap_or_default()
                );
            }
        }
    }
    eprintln!(
        "{runs} scenarios ({messages} messages, {crashes} crashes) in {:?}",
        t0.elapsed()
    );
}

#[test]
fn scenarios_even_seeds() {
    scenarios(0);
}

#[test]
fn scenarios_odd_seeds() {
    scenarios(1);
}

/// Seeds that once failed (found by long runs), replayed by every run.
const REGRESSIONS: &[(u64, &str)] = &[
    (
        27290,
        "an emergency asked for a chart whose earlier share had ended: its revoked mark ended the emergency at once, and the copy removed mid-pull was refused and checkpointed past",
    ),
    (
        45023,
        "the same, on another path: the copy removed between the pull's want and its apply",
    ),
    (
        35412,
        "a note written under read-write and narrowed to read before it arrived: the custodian refuses it, the holder keeps it (the convergence check knew no such case)",
    ),
    (
        3366,
        "an expired emergency grant removed a copy holding notes written here under a later read-write share",
    ),
    (
        28164,
        "an expired emergency grant removed a copy held under a later, still active share; the holder's checkpoint was past it",
    ),
];

#[test]
fn regression_seeds() {
    for (seed, what) in REGRESSIONS {
        if let Err(report) = run(*seed, PRACTICES, &ops_of_seed(*seed)) {
            panic!("seed {seed} ({what}) fails again:\n{report}");
        }
    }
}

#[test]
fn replay() {
    let Some(seed) = std::env::var("CHARTMESH_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    else {
        eprintln!("set CHARTMESH_SIM_SEED=<seed> to replay one scenario");
        return;
    };
    let ops = ops_of_seed(seed);
    eprintln!("ops: {ops:?}");
    match run(seed, PRACTICES, &ops) {
        Ok(stats) => eprintln!("passed: {stats:?}"),
        Err(report) => panic!("{report}"),
    }
}

/// A reconnect with nothing changed costs the same few messages whatever the number of
/// shared charts.
#[test]
fn a_no_op_reconnect_costs_a_constant_number_of_messages() {
    let cost = |charts: usize| {
        // Control messages neither lost nor duplicated here: the count is exact.
        let faults = Faults {
            control_drop: 0.0,
            control_dup: 0.0,
            ..Faults::default()
        };
        let mut m = Mesh::new(7, 2, faults);
        for _ in 0..charts {
            m.create_chart(0, false);
        }
        m.share(0, None, 1, false, None);
        m.settle(10_000);
        assert_eq!(m.keys(1).len(), charts, "the initial sync completed");
        let before = m.messages();
        m.break_link(0, 1, "test");
        m.settle(10_000);
        m.check_quiescent();
        assert!(m.stats.violations.is_empty(), "{:?}", m.stats.violations);
        m.messages() - before
    };
    // Each way: Pull, OfferEnd, Done; at most one more pull each if a nudge crossed the
    // reconnect. Never one message per chart.
    for n in [5, 60, 300] {
        let c = cost(n);
        assert!(c <= 12, "a no-op reconnect cost {c} messages at {n} charts");
    }
}

/// One chart revoked under a share of all charts: its own revoked grant wins over the
/// all-charts grant (the brief's rule, checked at the wire by the independent oracle), so an
/// edit of it is never sent again while the practice's other charts keep flowing. The seeded
/// scenarios seldom combine the two (a mutation preferring the all-charts grant went
/// through 1,000 of them unseen), so the combination is spelled out here.
#[test]
fn a_chart_revoked_under_an_all_charts_share_is_not_sent_again() {
    let ops = vec![
        // Practice 0 holds charts 0 and 5 (each practice starts with one; this is its second).
        Op::Create {
            at: 0,
            canary: false,
        },
        Op::Share {
            chart: None,
            to: 1,
            rw: false,
            expires_in_ms: None,
        },
        Op::Wait { ms: 2_000 },
        Op::Revoke {
            chart: Some(5),
            to: 1,
        },
        Op::Edit { at: 0, chart: 5 },
        Op::Edit { at: 0, chart: 0 },
        Op::Wait { ms: 3_000 },
    ];
    let stats = run(7, PRACTICES, &ops).unwrap_or_else(|e| panic!("{e}"));
    assert!(stats.charts_sent >= 3, "{stats:?}");
}

/// Two practices, no control message lost: practice 0 creates a chart and shares it with
/// practice 1 (`rw`, expiring after `expires_in_ms`), and three seconds pass.
fn one_chart_shared(seed: u64, rw: bool, expires_in_ms: Option<u64>) -> (Mesh, String) {
    let faults = Faults {
        control_drop: 0.0,
        control_dup: 0.0,
        ..Faults::default()
    };
    let mut m = Mesh::new(seed, 2, faults);
    let chart = m.create_chart(0, false).unwrap();
    m.share(0, Some(&chart), 1, rw, expires_in_ms);
    m.settle(3_000);
    (m, chart)
}

/// The key of practice 1's copy of practice 0's `chart`, if it holds one.
fn copy_key_at_1(m: &Mesh, chart: &str) -> Option<String> {
    m.keys(1)
        .into_iter()
        .find(|k| k.starts_with(&format!("{chart}@")))
}

/// Break-glass for a chart whose earlier share has ended. The copy still held marked revoked
/// must not count as the emergency having ended (it once did: the copy was removed before
/// the emergency's grant arrived, and the removal also forgot when the emergency ends, so the
/// copy later outlived it). The copy is brought up to date, readable for the emergency's
/// 30 s, and removed when they are over.
#[test]
fn emergency_access_to_a_chart_whose_share_ended_lasts_its_time_then_ends() {
    let (mut m, chart) = one_chart_shared(11, false, Some(500));
    let copy = |m: &Mesh| {
        let key = copy_key_at_1(m, &chart)?;
        m.store(1)
            .sync_charts(&[key.as_str()])
            .unwrap()
            .remove(&key)
    };
    let ended = copy(&m).expect("the copy arrived under the share");
    assert!(ended.revoked_ms.is_some(), "the share ended: {ended:?}");
    assert!(
        m.edit(0, &chart),
        "the custodian edits after the share ended"
    );
    m.emergency(1, 0, "M0");
    // Housekeeping every millisecond: it runs between the answer and the copy's arrival.
    for _ in 0..3_000 {
        m.run_for(1);
        m.housekeeping();
    }
    let held = copy(&m).expect("the emergency copy is held");
    assert!(held.revoked_ms.is_none(), "{held:?}");
    let custodian = m.store(0).sync_charts(&[chart.as_str()]).unwrap();
    assert_eq!(held.heads, custodian[&chart].heads, "and up to date");
    m.settle(35_000);
    assert!(
        copy(&m).is_none(),
        "the emergency ended: the copy is removed"
    );
    m.check_quiescent();
    assert!(m.stats.violations.is_empty(), "{:?}", m.stats.violations);
}

/// A holder writes a note under a read-write grant, and the custodian narrows the grant to
/// read before the note reaches it (seed 35412 found it). The custodian does not take the
/// note: it cannot tell when a change was written, and changes are accepted only under a
/// read-write grant. The holder keeps it, read-only; the custodian's later edits still reach
/// the copy; read-write again, and the note is taken.
#[test]
fn a_note_written_under_read_write_then_narrowed_stays_at_the_holder_until_read_write_again() {
    let (mut m, chart) = one_chart_shared(13, true, None);
    let copy = copy_key_at_1(&m, &chart).expect("the copy arrived");
    let notes = |m: &Mesh, node: usize, key: &str| {
        let rec = m.store(node).get(key).unwrap().unwrap();
        rec.doc.to_chart().unwrap().notes.len()
    };
    assert!(m.edit(1, &copy), "the holder writes under read-write");
    m.share(0, Some(&chart), 1, false, None);
    m.settle(3_000);
    assert_eq!(notes(&m, 0, &chart), 0, "not taken under a read grant");
    assert_eq!(notes(&m, 1, &copy), 1, "kept at the holder");
    assert!(!m.edit(1, &copy), "the copy is read-only now");
    assert!(m.edit(0, &chart));
    m.settle(3_000);
    assert_eq!(
        notes(&m, 1, &copy),
        2,
        "the custodian's note reached the copy"
    );
    m.check_quiescent();
    assert!(m.stats.violations.is_empty(), "{:?}", m.stats.violations);
    m.share(0, Some(&chart), 1, true, None);
    m.settle(3_000);
    assert_eq!(
        notes(&m, 0, &chart),
        2,
        "read-write again: the note is taken"
    );
    m.check_quiescent();
    assert!(m.stats.violations.is_empty(), "{:?}", m.stats.violations);
}

/// Every chart of a practice shared with another arrives; each edit on either side of a
/// read-write grant reaches the other; a revocation marks the copy.
#[test]
fn a_plain_scenario_passes_its_invariants() {
    let ops = vec![
        Op::Share {
            chart: Some(0),
            to: 1,
            rw: true,
            expires_in_ms: None,
        },
        Op::Edit { at: 0, chart: 0 },
        Op::EditCopy { at: 1, chart: 0 },
        Op::Share {
            chart: None,
            to: 2,
            rw: false,
            expires_in_ms: Some(3_000),
        },
        Op::Crash { at: 1 },
        Op::Edit { at: 0, chart: 0 },
        Op::Restart { at: 1 },
        Op::Revoke {
            chart: Some(0),
            to: 1,
        },
        Op::Wait { ms: 5_000 },
    ];
    let stats = run(99, PRACTICES, &ops).unwrap_or_else(|e| panic!("{e}"));
    assert!(stats.charts_sent >= 3, "{stats:?}");
    assert!(stats.crashes == 1, "{stats:?}");
}
