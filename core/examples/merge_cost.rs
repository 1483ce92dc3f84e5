//! Measures, step by step, what a holder spends merging one note from a chart's custodian
//! (the bench's incremental phase; release build):
//! `cargo run --release -p chartmesh-core --example merge_cost -- ../shared/bench-data/charts-1000.jsonl`
use chartmesh_core::chart::{Entry, Note};
use chartmesh_core::doc_limits::LoadLimits;
use chartmesh_core::{ChangeMeta, Chart, ChartDoc, PracticeId};
use std::time::{Duration, Instant};

fn main() {
    let path = std::env::args().nth(1).expect("path to charts-N.jsonl");
    let data = std::fs::read(&path).unwrap();
    let meta = |p: &[u8]| ChangeMeta {
        practice: PracticeId::from_certificate_der(p),
        author: "import".into(),
        action: "import".into(),
        time_ms: 0,
    };
    // The custodian's documents, the holder's saved copies, and one note's changes each.
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for l in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let mut doc = ChartDoc::create(&Chart::from_json_slice(l).unwrap(), &meta(b"a"));
        let saved = doc.save();
        let heads = doc.head_bytes();
        let note = Entry::Note(Note {
            id: "n-1".into(),
            author: "Dr A".into(),
            date: "2026-06-01T10:00:00Z".into(),
            text: "Follow-up visit; stable.".into(),
            ..Default::default()
        });
        doc.append(&note, &meta(b"a")).unwrap();
        pairs.push((saved, doc.changes_after(&heads)));
    }
    let n = pairs.len() as f64;
    let mut t = [Duration::ZERO; 10];
    let names = [
        "load",
        "mark_saved",
        "referrals before",
        "merge_limited",
        "referrals after",
        "header",
        "review_merge",
        "save_incremental",
        "head_bytes",
        "due facts + referral ids",
    ];
    for (saved, changes) in &pairs {
        let mut step = 0;
        let mut clock = Instant::now();
        let mut lap = |t: &mut [Duration; 10]| {
            t[step] += clock.elapsed();
            step += 1;
            clock = Instant::now();
        };
        let mut doc = ChartDoc::load(saved, []).unwrap();
        lap(&mut t);
        doc.mark_saved();
        lap(&mut t);
        let before = doc.referrals().unwrap_or_default();
        lap(&mut t);
        let merged = doc.merge_limited(changes, &LoadLimits::default()).unwrap();
        lap(&mut t);
        let after = doc.referrals().unwrap_or_default();
        std::hint::black_box(chartmesh_core::referral::claims_added(&before, &after));
        lap(&mut t);
        std::hint::black_box(doc.header().unwrap());
        lap(&mut t);
        std::hint::black_box(doc.review_merge(&merged).unwrap());
        lap(&mut t);
        std::hint::black_box(doc.save_incremental());
        lap(&mut t);
        std::hint::black_box(doc.head_bytes());
        lap(&mut t);
        let facts = doc.due_view().map(|c| chartmesh_core::due::facts(&c));
        std::hint::black_box((facts.is_ok(), doc.referral_ids()));
        lap(&mut t);
    }
    let mut total = 0.0;
    for (name, d) in names.iter().zip(t) {
        let us = d.as_secs_f64() * 1e6 / n;
        total += us;
        println!("{name:>24}: {us:8.1} µs per chart");
    }
    println!("{:>24}: {total:8.1} µs per chart", "total");
}
