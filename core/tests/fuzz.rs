//! Fuzz targets for what arrives from outside: a sync message (`sync::Msg::decode`), a
//! peer's chart document (`ChartDoc::load_limited`), a JSONL chart line
//! (`Chart::from_json_slice`) and a FHIR Bundle (`fhir::import`). Property-driven on the
//! stable toolchain (proptest): arbitrary bytes, and valid inputs with bytes flipped, cut
//! or inserted. None may panic; what loads must read back.
//!
//! CI runs a short pass; a long run: `PROPTEST_CASES=100000 cargo test -p chartmesh-core
//! --test fuzz --release`. A failing input is saved by proptest under
//! `proptest-regressions/` (commit it), and inputs kept as files under
//! `tests/fuzz-fixtures/<target>/` are replayed on every run.

use chartmesh_core::sync::Msg;
use chartmesh_core::{ChangeMeta, Chart, ChartDoc, LoadLimits, PracticeId};
use proptest::prelude::*;
use proptest::sample::Index;
use std::path::Path;
use std::sync::OnceLock;

/// A real chart (the first of the benchmark set), also replayed as a fixture.
const CHART: &str = include_str!("fuzz-fixtures/jsonl_line/bench-chart-000001.json");

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Flips, cuts and an insertion applied to a valid input.
#[derive(Debug, Clone)]
struct Mutation {
    flips: Vec<(Index, u8)>,
    cut: Option<Index>,
    insert: Option<(Index, Vec<u8>)>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec((any::<Index>(), 1u8..=255), 0..6),
        prop::option::weighted(0.2, any::<Index>()),
        prop::option::weighted(
            0.2,
            (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16)),
        ),
    )
        .prop_map(|(flips, cut, insert)| Mutation { flips, cut, insert })
}

fn mutate(mut s: Vec<u8>, m: &Mutation) -> Vec<u8> {
    if s.is_empty() {
        return s;
    }
    for (i, x) in &m.flips {
        let i = i.index(s.len());
        s[i] ^= x;
    }
    if let Some((i, bytes)) = &m.insert {
        let i = i.index(s.len());
        s.splice(i..i, bytes.iter().copied());
    }
    if let Some(c) = &m.cut {
        s.truncate(c.index(s.len()));
    }
    s
}

fn doc_seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let meta = ChangeMeta {
            practice: PracticeId::from_certificate_der(b"fuzz"),
            author: "Dr A".into(),
            action: "create".into(),
            time_ms: 1,
        };
        let chart = Chart::from_json_slice(CHART.as_bytes()).unwrap();
        let mut doc = ChartDoc::create(&chart, &meta);
        let full = doc.save();
        let _ = doc.save_incremental();
        doc.put_root_str("updatedAt", "2026-01-01T00:00:00Z")
            .unwrap();
        doc.automerge().commit();
        let inc = doc.save_incremental();
        vec![
            full.clone(),
            inc.clone(),
            [full, inc].concat(),
            doc.automerge().save(),
        ]
    })
}

fn bundle_seed() -> &'static Vec<u8> {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| {
        let dir = std::env::var_os("CHARTMESH_FHIR_SAMPLES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fhir-samples"));
        // The first entries of a real sample (Patient first), small enough to fuzz fast.
        let sample = std::fs::read_dir(&dir).ok().and_then(|mut d| {
            d.find_map(|e| {
                let p = e.ok()?.path();
                (p.extension()? == "json").then_some(p)
            })
        });
        match sample {
            Some(p) => {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
                if let Some(e) = v["entry"].as_array_mut() {
                    e.truncate(12);
                }
                serde_json::to_vec(&v).unwrap()
            }
            None => br#"{"resourceType":"Bundle","type":"collection","entry":[{"resource":{"resourceType":"Patient","id":"p1","identifier":[{"value":"MRN-9"}],"name":[{"family":"Fuzz","given":["Ana"]}],"birthDate":"1980-02-03","gender":"female"}},{"resource":{"resourceType":"Condition","subject":{"reference":"Patient/p1"},"code":{"coding":[{"system":"http://snomed.info/sct","code":"44054006","display":"Diabetes"}]},"onsetDateTime":"2020-01-01"}}]}"#.to_vec(),
        }
    })
}

fn load_doc(bytes: &[u8]) {
    if let Ok(doc) = ChartDoc::load_limited(bytes, &LoadLimits::default()) {
        // What loads must read (to a chart, or to a clear error), never panic.
        let _ = doc.to_json();
        let _ = doc.header();
    }
}

fn import_bundle(bytes: &[u8]) {
    let _ = chartmesh_core::fhir::import(bytes, "2026-01-01T00:00:00Z");
}

fn chart_line(bytes: &[u8]) {
    if let Ok(c) = Chart::from_json_slice(bytes) {
        // A line that validates builds a document that reads back the same chart.
        let meta = ChangeMeta {
            practice: PracticeId::from_certificate_der(b"fuzz"),
            author: "import".into(),
            action: "create".into(),
            time_ms: 1,
        };
        let doc = ChartDoc::create(&c, &meta);
        assert_eq!(doc.to_chart().unwrap(), c);
    }
}

fn sync_msg(bytes: &[u8]) {
    use chartmesh_core::sync::{MAX_MESSAGE, MAX_REQUEST};
    for limit in [MAX_REQUEST, MAX_MESSAGE, 64] {
        if let Ok(m) = Msg::decode(bytes, limit) {
            // What decodes (its fields checked) encodes again and decodes to the same message.
            let again = m.encode();
            assert_eq!(Msg::decode(&again, MAX_MESSAGE), Ok(m));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1000)))]

    #[test]
    fn sync_message_decoding(input in prop::collection::vec(any::<u8>(), 0..512)) {
        sync_msg(&input);
    }

    #[test]
    fn peer_document_load(seed in 0usize..4, m in mutation()) {
        load_doc(&mutate(doc_seeds()[seed].clone(), &m));
    }

    #[test]
    fn peer_document_arbitrary_bytes(input in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut with_magic = vec![0x85, 0x6f, 0x4a, 0x83];
        with_magic.extend_from_slice(&input);
        load_doc(&with_magic);
        load_doc(&input);
    }

    #[test]
    fn jsonl_chart_line(m in mutation()) {
        chart_line(&mutate(CHART.as_bytes().to_vec(), &m));
    }

    #[test]
    fn jsonl_chart_line_arbitrary(input in "\\PC{0,300}") {
        chart_line(input.as_bytes());
    }
}

proptest! {
    // A FHIR import of a 12-entry Bundle costs milliseconds: fewer cases by default.
    #![proptest_config(ProptestConfig::with_cases(cases(200)))]

    #[test]
    fn fhir_bundle(m in mutation()) {
        import_bundle(&mutate(bundle_seed().clone(), &m));
    }
}

/// A fuzz target: takes any bytes, must not panic.
type Target = fn(&[u8]);

/// Inputs kept from earlier findings (`tests/fuzz-fixtures/<target>/`), replayed every run.
#[test]
fn fixtures_replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-fixtures");
    let targets: [(&str, Target); 4] = [
        ("sync_msg", sync_msg),
        ("peer_doc", load_doc),
        ("jsonl_line", chart_line),
        ("fhir_bundle", import_bundle),
    ];
    for (dir, target) in targets {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() && p.extension().is_none_or(|x| x != "md") {
                target(&std::fs::read(&p).unwrap());
            }
        }
    }
}
