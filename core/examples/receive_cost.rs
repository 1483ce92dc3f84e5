//! Measures the per-chart cost of receiving a whole chart from a peer (release build):
//! `cargo run --release -p chartmesh-core --example receive_cost -- ../shared/bench-data/charts-1000.jsonl`
use chartmesh_core::{ChangeMeta, Chart, ChartDoc, PracticeId};
use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).expect("path to charts-N.jsonl");
    let data = std::fs::read(&path).unwrap();
    let meta = ChangeMeta {
        practice: PracticeId::from_certificate_der(b"x"),
        author: "import".into(),
        action: "import".into(),
        time_ms: 0,
    };
    let saved: Vec<Vec<u8>> = data
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| ChartDoc::create(&Chart::from_json_slice(l).unwrap(), &meta).save())
        .collect();
    let n = saved.len() as f64;
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6 / n;
    let t = Instant::now();
    let mut docs: Vec<ChartDoc> = saved
        .iter()
        .map(|b| ChartDoc::load(b, []).unwrap())
        .collect();
    let load = t.elapsed();
    let t = Instant::now();
    let limits = chartmesh_core::doc_limits::LoadLimits::default();
    for b in &saved {
        std::hint::black_box(chartmesh_core::doc_limits::scan(b, &limits).unwrap());
    }
    let scan = t.elapsed();
    let t = Instant::now();
    for d in docs.iter_mut() {
        std::hint::black_box(d.referral_ids());
    }
    let referrals = t.elapsed();
    let t = Instant::now();
    for d in docs.iter_mut() {
        std::hint::black_box(d.due_view().unwrap());
    }
    let due_view = t.elapsed();
    let t = Instant::now();
    for d in docs.iter_mut() {
        std::hint::black_box(d.automerge().get_missing_deps(&[]));
    }
    let missing = t.elapsed();
    let t = Instant::now();
    let jsons: Vec<serde_json::Value> = docs.iter().map(|d| d.to_json().unwrap()).collect();
    let to_json = t.elapsed();
    let t = Instant::now();
    for j in &jsons {
        Chart::from_json_slice(&serde_json::to_vec(j).unwrap()).unwrap();
    }
    let validate_bytes = t.elapsed();
    let t = Instant::now();
    for j in &jsons {
        Chart::from_json_value(j.clone()).unwrap();
    }
    let validate_value = t.elapsed();
    let t = Instant::now();
    for d in docs.iter_mut() {
        std::hint::black_box(d.head_bytes());
    }
    let heads = t.elapsed();
    let t = Instant::now();
    for (d, j) in docs.iter().zip(&jsons) {
        let h = d.header().unwrap();
        assert_eq!(h.id, j["id"].as_str().unwrap());
        assert_eq!(h.mrn, j["patient"]["mrn"].as_str().unwrap());
    }
    let header = t.elapsed();
    println!(
        "per chart (µs): limits scan {:.1}, referral ids {:.1}, due view {:.1}, missing deps {:.1}",
        us(scan),
        us(referrals),
        us(due_view),
        us(missing)
    );
    println!(
        "per chart (µs): load {:.0}, to_json {:.0}, validate via bytes {:.0}, validate from value {:.0}, heads {:.1}, header {:.1}",
        us(load),
        us(to_json),
        us(validate_bytes),
        us(validate_value),
        us(heads),
        us(header)
    );
}
