//! A peer's document that decompresses into millions of operations (issue 5 of the hardening
//! review): a 571-byte automerge document carrying 2M list insertions took 1.3 GB and 3.8 s
//! to load. `ChartDoc::load_limited` refuses it in bounded time and memory, while the
//! largest document the default limits accept still loads under 100 MB.
//!
//! One test per file: peak RSS is per process, so nothing else may run beside it.

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjType, ROOT, ScalarValue};
use chartmesh_core::{ChartDoc, LoadError, LoadLimits};
use std::path::Path;
use std::time::{Duration, Instant};

const FIXTURE: &str = "tests/fixtures/hostile-2m-list-ops.automerge";

/// A document whose one change inserts `n` nulls into a list: a few hundred bytes.
fn list_of_nulls(n: usize) -> Vec<u8> {
    let mut d = AutoCommit::new();
    let list = d.put_object(ROOT, "notes", ObjType::List).unwrap();
    d.splice(&list, 0, 0, std::iter::repeat_n(ScalarValue::Null, n))
        .unwrap();
    d.save()
}

/// Peak resident memory of this process since the last [`reset_peak`], in bytes.
fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// Resets the peak (Linux: writing 5 to clear_refs).
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

#[test]
fn a_document_of_2m_operations_is_refused_fast_in_bounded_memory() {
    if !Path::new("/proc/self/clear_refs").exists() {
        println!("SKIPPED: needs Linux /proc to measure peak RSS");
        return;
    }
    let hostile = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE)).expect(
        "the fixture (regenerate: cargo test -p chartmesh-core --test hostile_doc -- --ignored)",
    );
    assert!(hostile.len() < 1024, "{} bytes", hostile.len());
    let limits = LoadLimits::default();

    reset_peak();
    let t = Instant::now();
    let e = ChartDoc::load_limited(&hostile, &limits).err().unwrap();
    let took = t.elapsed();
    let peak = peak_rss();
    println!(
        "hostile document: {} bytes refused in {took:?}, peak RSS {} MB: {e}",
        hostile.len(),
        peak >> 20
    );
    match e {
        LoadError::TooManyOps { found, limit } => {
            assert!(found > limit && found <= 2_000_010, "{found}")
        }
        other => panic!("expected TooManyOps, got {other}"),
    }
    assert!(took < Duration::from_millis(100), "{took:?}");
    assert!(peak < 100 << 20, "peak RSS {} MB", peak >> 20);

    // The largest list the default limits accept loads, still under 100 MB.
    let at_limit = list_of_nulls(limits.max_ops as usize - 10);
    reset_peak();
    let t = Instant::now();
    let doc = ChartDoc::load_limited(&at_limit, &limits).unwrap();
    let took = t.elapsed();
    let peak = peak_rss();
    drop(doc);
    println!(
        "document at the limit ({} ops): loaded in {took:?}, peak RSS {} MB",
        limits.max_ops - 10,
        peak >> 20
    );
    assert!(peak < 100 << 20, "peak RSS {} MB", peak >> 20);
}

/// Writes the fixture: `cargo test -p chartmesh-core --test hostile_doc -- --ignored`.
#[test]
#[ignore]
fn regenerate_the_fixture() {
    let bytes = list_of_nulls(2_000_000);
    std::fs::write(Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE), &bytes).unwrap();
    println!("{} bytes", bytes.len());
}
