//! Random `kill -9` of real daemons while two practices import, edit and sync: every write
//! a daemon acknowledged is there after every restart and arrives at the paired practice.
//!
//! CI runs 200 kills; `CHARTMESH_FAULT_KILLS=2000 cargo test -p chartmesh-tests --test
//! faults_kill -- --nocapture` runs 2,000 (docs/RELIABILITY.md). The seed is printed;
//! `CHARTMESH_FAULT_SEED=<seed>` replays the same choices of victim and timing.

#[path = "faults_util/mod.rs"]
mod util;

use chartmesh_tests::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use util::*;

/// What a daemon acknowledged: charts imported, notes added (chart, note id).
#[derive(Default)]
struct Acked {
    charts: BTreeSet<String>,
    notes: BTreeSet<(String, String)>,
}

fn base_of(dir: &Path) -> Option<String> {
    let addr = std::fs::read_to_string(dir.join("api.addr")).ok()?;
    let addr = addr.trim();
    (!addr.is_empty()).then(|| format!("http://{addr}/api/v1"))
}

/// Imports `lines` in chunks of 5 (retrying a chunk until acknowledged) and adds notes to
/// acknowledged charts, against whichever daemon is running on `dir`, until `stop`.
fn worker(
    dir: PathBuf,
    tag: &'static str,
    lines: Vec<String>,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<AtomicBool>,
    seed: u64,
    requests: Arc<AtomicU64>,
) {
    let agent = agent();
    let token = std::fs::read_to_string(dir.join("api-token"))
        .unwrap()
        .trim()
        .to_string();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let chunks: Vec<&[String]> = lines.chunks(5).collect();
    let mut next = 0;
    let mut note_n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(base) = base_of(&dir) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        requests.fetch_add(1, Ordering::Relaxed);
        let import = next < chunks.len() && rng.random_bool(0.3);
        if import {
            let body = chunks[next].join("\n");
            if let Ok((200, v)) = post(&agent, &base, &token, "/import", body.as_bytes()) {
                assert_eq!(v["failed"], 0, "{v}");
                let mut a = acked.lock().unwrap();
                a.charts.extend(chunks[next].iter().map(|l| id_of(l)));
                next += 1;
            }
        } else {
            let chart = {
                let a = acked.lock().unwrap();
                if a.charts.is_empty() {
                    None
                } else {
                    let i = rng.random_range(0..a.charts.len());
                    a.charts.iter().nth(i).cloned()
                }
            };
            let Some(chart) = chart else { continue };
            note_n += 1;
            let note = format!("{tag}-{note_n}");
            let path = format!("/charts/{chart}/notes");
            if let Ok((201, _)) = post(&agent, &base, &token, &path, &note_body(&note)) {
                acked.lock().unwrap().notes.insert((chart, note));
            }
        }
    }
}

#[test]
fn random_kill9_during_import_edits_and_sync_loses_no_acknowledged_write() {
    let kills: usize = std::env::var("CHARTMESH_FAULT_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("CHARTMESH_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!(
        "kill -9 fault test: seed {seed} (CHARTMESH_FAULT_SEED={seed} replays it), {kills} kills"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let lines = bench_lines();
    let mut a = Practice::new("Kill Clinic A");
    let mut b = Practice::new("Kill Clinic B");
    pair(&a, &b);
    let (ida, idb) = (a.id(), b.id());
    a.cli_ok(&["share", "--all", "--with", &idb]);
    b.cli_ok(&["share", "--all", "--with", &ida]);

    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let acked_a = Arc::new(Mutex::new(Acked::default()));
    let acked_b = Arc::new(Mutex::new(Acked::default()));
    let workers = [
        (a.dir.clone(), "a", lines[..500].to_vec(), acked_a.clone()),
        (b.dir.clone(), "b", lines[500..].to_vec(), acked_b.clone()),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (dir, tag, lines, acked))| {
        let (stop, requests) = (stop.clone(), requests.clone());
        let seed = seed.wrapping_add(i as u64 + 1);
        std::thread::spawn(move || worker(dir, tag, lines, acked, stop, seed, requests))
    })
    .collect::<Vec<_>>();

    let t = Instant::now();
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.random_range(20..200)));
        let victim = if rng.random_bool(0.5) { &mut a } else { &mut b };
        victim.kill9();
        victim.start();
        if k % 50 == 49 {
            println!("{} kills, {:?}", k + 1, t.elapsed());
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let kill_time = t.elapsed();

    // A dead peer's connection lingers until QUIC's idle timeout; clean restarts end it.
    a.restart();
    b.restart();
    a.sync_wait(&b, 120);
    b.sync_wait(&a, 120);

    let mut lost = Vec::new();
    let mut checked = 0u64;
    for (owner, peer, acked) in [(&a, &b, &acked_a), (&b, &a, &acked_b)] {
        let acked = acked.lock().unwrap();
        for p in [owner, peer] {
            for id in &acked.charts {
                let (s, c) = p.try_get(&format!("/charts/{id}")).unwrap();
                checked += 1;
                if s != 200 {
                    lost.push(format!("chart {id} missing at {}", p.dir.display()));
                    continue;
                }
                for (chart, note) in acked.notes.iter().filter(|(c, _)| c == id) {
                    checked += 1;
                    if !has_note(&c, note) {
                        lost.push(format!(
                            "note {note} of {chart} missing at {}",
                            p.dir.display()
                        ));
                    }
                }
            }
        }
        assert_eq!(owner.get("/audit/verify")["ok"], true);
    }
    let (charts, notes) = {
        let (x, y) = (acked_a.lock().unwrap(), acked_b.lock().unwrap());
        (
            x.charts.len() + y.charts.len(),
            x.notes.len() + y.notes.len(),
        )
    };
    println!(
        "fault figures: seed {seed}; kill -9 = {kills} in {kill_time:?}; requests = {}; acknowledged writes = {} ({charts} charts, {notes} notes); checked at both practices = {checked}; lost acknowledged writes = {}",
        requests.load(Ordering::Relaxed),
        charts + notes,
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "seed {seed}: lost acknowledged writes = {}: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    assert!(charts > 0 && notes > 0, "the workload did nothing");
    a.stop();
    b.stop();
    assert_store_consistent(&a.dir, "A after the kills");
    assert_store_consistent(&b.dir, "B after the kills");
}
