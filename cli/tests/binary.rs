//! The CLI binary's exit codes for usage errors and an unreachable daemon (also makes
//! `cargo test` build `chartmesh` for the end-to-end tests in `tests/`).

use std::process::Command;

#[test]
fn usage_and_unreachable_exit_codes() {
    let exe = env!("CARGO_BIN_EXE_chartmesh");
    assert_eq!(
        Command::new(exe).arg("--help").status().unwrap().code(),
        Some(0)
    );
    assert_eq!(
        Command::new(exe)
            .arg("no-such-command")
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = Command::new(exe)
        .args(["--data-dir", d, "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chartmesh init"));
    // An initialised directory with no daemon running: still 3, and the message says how to start it.
    let out = Command::new(exe)
        .args([
            "--data-dir",
            d,
            "init",
            "--name",
            "T",
            "--api",
            "127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(exe)
        .args(["--data-dir", d, "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chartmeshd --data-dir"));
}
