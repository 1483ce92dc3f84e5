//! The benchmark runner at small N, so it cannot rot: real daemons, the real CLI, and the
//! checksum checks that make a wrong result a failed run. (The real runs are release builds
//! at N = 1,000 and 10,000, outside the test suite: see docs/PERFORMANCE.md.)

#[test]
fn bench_runs_at_small_n_and_checks_its_checksums() {
    let ds = chartmesh_bench::dataset(&chartmesh_tests::bench_data(), 50).unwrap();
    let opts = chartmesh_bench::Options {
        bin_dir: chartmesh_tests::bin_dir(),
        charts: ds.charts,
        expected_checksum: ds.checksum,
        incremental: ds.incremental,
        n: 50,
        reps: 1,
        rep: 0,
        link: None,
        via_relay: false,
    };
    let reps = chartmesh_bench::run(&opts).unwrap();
    let r = &reps[0];
    assert_eq!(r["load"]["checksumOk"], true);
    assert!(r["load"]["docsPerSec"].as_f64().unwrap() > 0.0);
    assert!(
        r["load"]["maxRssKB"].as_u64().unwrap() > 1000,
        "RSS is read from /proc: {r}"
    );
    assert!(
        r["load"]["diskBytes"].as_u64().unwrap() > 50 * 1000,
        "50 charts take space: {r}"
    );
    assert!(r["cold"]["processWallMs"].as_f64().unwrap() > 0.0);
    assert!(r["due"]["ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(
        r["due"]["patients"].as_u64().unwrap() > 0,
        "50 bench charts have items due: {r}"
    );
    // Every sync phase ran and was checked; bytes were counted by the relay.
    assert_eq!(r["initial"]["checksumOk"], true, "{r}");
    assert!(
        r["initial"]["wireBytes"].as_u64().unwrap() > 50 * 500,
        "{r}"
    );
    for phase in ["reconnect1", "reconnect2", "restart"] {
        let b = r[phase]["wireBytes"].as_u64().unwrap();
        assert!(b > 0 && b < 100_000, "{phase}: {b} bytes: {r}");
    }
    assert_eq!(r["incremental"]["checksumOk"], true, "{r}");
    assert!(
        r["incremental"]["wireBytes"].as_u64().unwrap() > 10 * 100,
        "{r}"
    );
    assert_eq!(r["verify"]["count"], 50);
    assert_eq!(r["verify"]["checksumOk"], true);
    assert!(r["rss"]["bMaxKB"].as_u64().unwrap() > 1000);
    let table = chartmesh_bench::table(&reps, 50);
    assert!(table.contains("load: charts/s"), "{table}");

    // A wrong expected checksum is a failed run.
    let ds = chartmesh_bench::dataset(&chartmesh_tests::bench_data(), 20).unwrap();
    let bad = chartmesh_bench::Options {
        bin_dir: chartmesh_tests::bin_dir(),
        charts: ds.charts,
        expected_checksum: "0".repeat(64),
        incremental: ds.incremental,
        n: 20,
        reps: 1,
        rep: 0,
        link: None,
        via_relay: false,
    };
    let err = chartmesh_bench::run(&bad).unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
    // The failed run stopped its daemons: none is left running.
    let left = chartmesh_tests::live_children("chartmeshd");
    assert!(
        left.is_empty(),
        "daemons left running by a failed run: {left:?}"
    );
}
