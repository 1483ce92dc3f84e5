//! Clock skew of ±24 h between practices (libfaketime on one real daemon; Debian's
//! `faketime` package, installed by .ci/run; skipped with a message where it is missing).
//! What is promised (docs/RELIABILITY.md, "Clocks"):
//! - pairing and sync work: practice certificates are valid from 48 h before they were made
//!   and never expire, and nothing else in the handshake reads the clock;
//! - a grant's expiry is an instant set by the custodian; the custodian's clock decides what
//!   it sends and which received changes it accepts; the receiver's clock decides how it
//!   treats its copy (read-only and "expired" once its own clock passes that instant);
//! - emergency access ends at the instant the custodian set; the requester removes its copy
//!   when its own clock reaches it (so a requester 24 h ahead removes it at once).

use chartmesh_tests::*;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

fn libfaketime() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// A practice whose daemon runs `offset` (libfaketime syntax, e.g. "+1d") from real time.
fn skewed(name: &str, lib: &std::path::Path, offset: &str) -> Practice {
    let mut p = Practice::new(name);
    p.stop();
    p.set_env(&[
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("FAKETIME", offset),
        ("DONT_FAKE_MONOTONIC", "1"),
    ]);
    p.start();
    p
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn rfc3339(ms: i64) -> String {
    // Enough for a test: whole seconds, UTC, via the CLI-free civil-from-days algorithm.
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn practices_a_day_apart_pair_sync_and_honour_grant_expiry_as_documented() {
    let Some(lib) = libfaketime() else {
        println!(
            "SKIPPED: clock-skew test needs libfaketime (Debian package faketime; .ci/run installs it)"
        );
        return;
    };
    let a = Practice::new("True Clock Clinic");
    a.import_first(4);
    let ahead = skewed("Ahead Clinic", &lib, "+1d");
    let behind = skewed("Behind Clinic", &lib, "-1d");
    // The faked clock is in effect: the skewed daemons stamp their audit entries a day off.
    for (p, sign) in [(&ahead, 1i64), (&behind, -1)] {
        p.cli_ok(&[
            "chart",
            "create",
            "--mrn",
            "MRN-SKEW",
            "--family",
            "Skew",
            "--given",
            "Ann",
            "--birth-date",
            "1970-01-01",
        ]);
        let t = p.get("/audit?limit=5")["entries"][0]["time_ms"]
            .as_i64()
            .unwrap();
        let off = (t - now_ms()) * sign;
        assert!(
            off > 23 * 3_600_000 && off < 25 * 3_600_000,
            "offset {off} ms"
        );
    }
    for p in [&ahead, &behind] {
        pair(&a, p);
        let id = p.id();
        // chart-000001: expires in 12 h by the custodian's (true) clock, read-write.
        // chart-000002: expires in 36 h, read-write.
        for (chart, hours) in [("chart-000001", 12), ("chart-000002", 36)] {
            a.cli_ok(&[
                "share",
                chart,
                "--with",
                &id,
                "--access",
                "read-write",
                "--purpose",
                "referral",
                "--expires",
                &rfc3339(now_ms() + hours * 3_600_000),
            ]);
        }
        // TLS and sync across the skew.
        p.sync_wait(&a, 60);
        for chart in ["chart-000001", "chart-000002"] {
            assert_eq!(
                p.try_get(&format!("/charts/{chart}")).unwrap().0,
                200,
                "{chart} did not arrive"
            );
        }
    }
    // The receiver's clock decides how it treats its copy: 24 h ahead, the 12-hour grant
    // has ended there (read-only, "expired"); the 36-hour one has not.
    let custody = |p: &Practice, c: &str| p.get(&format!("/charts/{c}/custody"))["status"].clone();
    assert_eq!(custody(&ahead, "chart-000001"), "expired");
    assert_eq!(custody(&ahead, "chart-000002"), "shared-with-us");
    assert_eq!(custody(&behind, "chart-000001"), "shared-with-us");
    let note = |p: &Practice, c: &str, text: &str| {
        p.post(
            &format!("/charts/{c}/notes"),
            json!({"entry": {"text": text}, "author": "Dr Skew"})
                .to_string()
                .as_bytes(),
            "Dr Skew",
        )
        .unwrap()
        .0
    };
    assert_eq!(note(&ahead, "chart-000001", "ahead, expired here"), 403);
    assert_eq!(note(&ahead, "chart-000002", "ahead, still granted"), 201);
    assert_eq!(note(&behind, "chart-000001", "behind, granted"), 201);
    // The custodian's clock decides what it accepts: both edits made under grants active by
    // its clock arrive.
    let has = |c: &str, text: &str| {
        a.get(&format!("/charts/{c}"))["notes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["text"] == text))
    };
    wait_until(
        "the edits made across the skew to arrive",
        Duration::from_secs(60),
        || has("chart-000002", "ahead, still granted") && has("chart-000001", "behind, granted"),
    );
    assert!(!has("chart-000001", "ahead, expired here"));
    for p in [&a, &ahead, &behind] {
        assert_eq!(p.get("/audit/verify")["ok"], true);
    }
    println!("fault figures: clock skew = 2 practices at ±24 h, 6 grant checks as documented");
}

/// The skew a practice measured against each peer (ms), from `status --json`.
fn skews(p: &Practice) -> Vec<(String, Option<i64>)> {
    p.cli_json(&["status"])["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["name"].as_str().unwrap().to_string(),
                x["clockSkewMs"].as_i64(),
            )
        })
        .collect()
}

/// Issue 15: each practice measures the clock skew of every connected peer (its wall clock,
/// carried by each pull, against ours, corrected by half the round trip); `status`,
/// `/metrics` and `doctor` show it, and doctor names a peer whose clock is more than a
/// minute off, with the fix. A peer in step gets no finding.
#[test]
fn doctor_names_a_peer_whose_clock_is_two_hours_off() {
    let Some(lib) = libfaketime() else {
        println!(
            "SKIPPED: clock-skew test needs libfaketime (Debian package faketime; .ci/run installs it)"
        );
        return;
    };
    let a = Practice::new("True Clock Clinic");
    let mut b = Practice::new("In Step Clinic");
    let ahead = skewed("Two Hours Ahead Clinic", &lib, "+2h");
    pair(&a, &b);
    pair(&a, &ahead);
    wait_connected(&a, &b);
    wait_connected(&a, &ahead);
    wait_until(
        "both peers' clocks measured",
        Duration::from_secs(60),
        || skews(&a).iter().all(|(_, s)| s.is_some()),
    );
    let measured = skews(&a);
    let of = |name: &str| {
        measured
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, s)| *s)
            .unwrap()
    };
    let two_h = 2 * 3_600_000;
    assert!(
        (of("Two Hours Ahead Clinic") - two_h).abs() < 30_000,
        "{measured:?}"
    );
    assert!(of("In Step Clinic").abs() < 5_000, "{measured:?}");

    // doctor at the true-clock practice: the peer two hours ahead is named with the fix;
    // the one in step is fine.
    let out = a.cli(&["--json", "doctor"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let clock: Vec<&serde_json::Value> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["check"] == "clock")
        .collect();
    let warn: Vec<_> = clock.iter().filter(|f| f["status"] == "warn").collect();
    assert_eq!(warn.len(), 1, "{clock:#?}");
    let detail = warn[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("Two Hours Ahead Clinic") && detail.contains("ahead of"),
        "{detail}"
    );
    assert!(detail.contains("skew +7"), "the skew in seconds: {detail}");
    assert!(
        warn[0]["fix"]
            .as_str()
            .unwrap()
            .contains("timedatectl set-ntp true"),
        "{}",
        warn[0]
    );
    assert!(
        clock.iter().any(
            |f| f["status"] == "ok" && f["detail"].as_str().unwrap().contains("In Step Clinic")
        ),
        "{clock:#?}"
    );
    // Warnings do not fail doctor.
    assert_eq!(out.status.code(), Some(0), "{v:#}");
    // The human form names it too.
    let text = a.cli_ok(&["doctor"]);
    assert!(
        text.contains("Two Hours Ahead Clinic (") && text.contains("'s clock is 7"),
        "{text}"
    );

    // The skewed practice sees the true one two hours behind it.
    wait_until("the skewed side measured", Duration::from_secs(60), || {
        skews(&ahead).iter().all(|(_, s)| s.is_some())
    });
    let back = skews(&ahead)[0].1.unwrap();
    assert!((back + two_h).abs() < 30_000, "{back}");

    // And /metrics carries it, in seconds.
    let addr = std::fs::read_to_string(a.dir.join("api.addr")).unwrap();
    let text = ureq::get(format!("http://{}/metrics", addr.trim()))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("chartmesh_peer_clock_skew_seconds{")
                && l.contains("Two Hours Ahead Clinic")
        })
        .unwrap_or_else(|| panic!("{text}"));
    let secs: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((secs - 7200.0).abs() < 30.0, "{line}");

    // A peer that went away: doctor names it as not reachable, when it was last seen, and
    // what to do.
    b.stop();
    wait_until(
        "the stopped peer to be seen gone",
        Duration::from_secs(60),
        || {
            a.get("/sync")["peers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "In Step Clinic" && p["connected"] == false)
        },
    );
    let out = a.cli(&["--json", "doctor"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gone = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| {
            f["check"] == "peer" && f["detail"].as_str().unwrap().starts_with("In Step Clinic")
        })
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(gone["status"], "warn", "{gone}");
    let detail = gone["detail"].as_str().unwrap();
    assert!(
        detail.contains("not reachable") && detail.contains("last seen"),
        "{detail}"
    );
    assert!(!gone["fix"].as_str().unwrap().is_empty(), "{gone}");
}
