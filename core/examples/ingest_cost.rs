//! Measures the per-chart cost of each ingest step on the benchmark charts (release build):
//! `cargo run --release -p chartmesh-core --example ingest_cost -- ../shared/bench-data/charts-10000.jsonl`
use chartmesh_core::canonical::SetChecksum;
use chartmesh_core::{ChangeMeta, Chart, ChartDoc, PracticeId};
use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).expect("path to charts-N.jsonl");
    let data = std::fs::read(&path).unwrap();
    let lines: Vec<&[u8]> = data
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let meta = ChangeMeta {
        practice: PracticeId::from_certificate_der(b"x"),
        author: "import".into(),
        action: "import".into(),
        time_ms: 0,
    };
    let n = lines.len() as f64;
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6 / n;
    let t = Instant::now();
    let charts: Vec<Chart> = lines
        .iter()
        .map(|l| Chart::from_json_slice(l).unwrap())
        .collect();
    let parse = t.elapsed();
    let t = Instant::now();
    for c in &charts {
        c.validate().unwrap();
    }
    println!("validate only {:.1} us", us(t.elapsed()));
    let t = Instant::now();
    for c in &charts {
        std::hint::black_box(chartmesh_core::doc::typed_chart_to_hydrate(c));
    }
    println!("typed_chart_to_hydrate {:.1} us", us(t.elapsed()));
    let t = Instant::now();
    let values: Vec<_> = charts.iter().map(|c| c.to_json_value()).collect();
    let tovalue = t.elapsed();
    let t = Instant::now();
    let hs: Vec<_> = values
        .iter()
        .map(chartmesh_core::doc::chart_to_hydrate)
        .collect();
    let hyd = t.elapsed();
    let t = Instant::now();
    for h in &hs {
        let mut d = automerge::AutoCommit::new();
        {
            let m = h;
            automerge::transaction::Transactable::init_root_from_hydrate(&mut d, m).unwrap();
        }
    }
    let init_only = t.elapsed();
    let t = Instant::now();
    for h in &hs {
        let mut d = automerge::AutoCommit::new();
        {
            let m = h;
            automerge::transaction::Transactable::init_root_from_hydrate(&mut d, m).unwrap();
        }
        d.commit();
    }
    let init_commit = t.elapsed();
    let t = Instant::now();
    let mut docs: Vec<ChartDoc> = values
        .iter()
        .map(|v| ChartDoc::create_from_json(v, &meta))
        .collect();
    let build = t.elapsed();
    let t = Instant::now();
    let saves: Vec<Vec<u8>> = docs.iter_mut().map(|d| d.save()).collect();
    let save = t.elapsed();
    let t = Instant::now();
    let csize: usize = docs.iter_mut().map(|d| d.automerge().save().len()).sum();
    let csave = t.elapsed();
    let t = Instant::now();
    let mut docs2: Vec<ChartDoc> = charts.iter().map(|c| ChartDoc::create(c, &meta)).collect();
    let _ = t.elapsed();
    let t = Instant::now();
    let incs: Vec<Vec<u8>> = docs2.iter_mut().map(|d| d.save_incremental()).collect();
    println!(
        "save_incremental of fresh doc {:.1} us, {} bytes avg",
        us(t.elapsed()),
        incs.iter().map(|s| s.len()).sum::<usize>() as f64 / n
    );
    let t = Instant::now();
    let l2: Vec<ChartDoc> = incs
        .iter()
        .map(|s| ChartDoc::load(s, []).unwrap())
        .collect();
    println!("load from change chunk {:.1} us", us(t.elapsed()));
    drop(l2);
    let t = Instant::now();
    let loaded: Vec<ChartDoc> = saves
        .iter()
        .map(|s| ChartDoc::load(s, []).unwrap())
        .collect();
    let load = t.elapsed();
    let t = Instant::now();
    let mut sum = SetChecksum::default();
    for (c, d) in charts.iter().zip(&loaded) {
        sum.add(&c.id, &d.to_json().unwrap());
    }
    let export = t.elapsed();
    let t = Instant::now();
    streaming(&lines, &meta);
    println!(
        "streaming parse+build+save one thread: {:.1} us",
        us(t.elapsed())
    );
    let t = Instant::now();
    std::thread::scope(|s| {
        let (a, b) = lines.split_at(lines.len() / 2);
        let m = &meta;
        let h = s.spawn(move || streaming(a, m));
        streaming(b, m);
        h.join().unwrap();
    });
    println!(
        "streaming two threads: {:.1} us/chart wall = {:.0} charts/s",
        us(t.elapsed()),
        n / t.elapsed().as_secs_f64()
    );
    println!("charts {n}");
    println!("parse+validate {:.1} us", us(parse));
    println!("to_json_value  {:.1} us", us(tovalue));
    println!("json_to_hydrate {:.1} us", us(hyd));
    println!("init only {:.1} us", us(init_only));
    println!("init+commit {:.1} us", us(init_commit));
    println!("build (batch)  {:.1} us", us(build));
    println!(
        "save nocompress {:.1} us, {} bytes avg",
        us(save),
        saves.iter().map(|s| s.len()).sum::<usize>() as f64 / n
    );
    println!(
        "save deflate   {:.1} us, {} bytes avg",
        us(csave),
        csize as f64 / n
    );
    println!("load           {:.1} us", us(load));
    println!("to_json+hash   {:.1} us", us(export));
    println!("checksum {}", sum.finish());
}

#[allow(dead_code)]
pub fn streaming(lines: &[&[u8]], meta: &ChangeMeta) -> usize {
    let mut total = 0;
    for l in lines {
        let c = Chart::from_json_slice(l).unwrap();
        let mut d = ChartDoc::create(&c, meta);
        total += d.save().len();
    }
    total
}
