//! The daemon binary's own contract (also makes `cargo test` build `chartmeshd` for the
//! end-to-end tests in `tests/`).

use std::process::Command;

#[test]
fn version_and_bad_config_are_reported() {
    let exe = env!("CARGO_BIN_EXE_chartmeshd");
    let out = Command::new(exe).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("chartmeshd"));

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(exe)
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .env("CHARTMESH_API_LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CHARTMESH_API_LISTEN"), "{err}");
}
