//! Running chartmesh as a practice does: the first run, the CLI's words and exit codes,
//! ids with check characters, logs in files, backups, staff access to a service's data
//! directory. Real daemons and the real CLI.

use chartmesh_tests::*;
use serde_json::Value;
use std::process::Command;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn corrections_say_what_changed_and_a_missing_entry_is_not_found() {
    let p = Practice::new("Valley Family Practice");
    let chart = p.new_chart("OPS-1");
    p.cli_ok(&["allergy", "add", &chart, "--substance", "Latex"]);

    // An allergy the chart does not have: "not found", exit 4, nothing changed.
    let out = p.cli(&[
        "allergy",
        "remove",
        &chart,
        "--substance",
        "Penicillin",
        "--reason",
        "entered in error",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("has no allergy to \"Penicillin\"") && !e.contains("expected shape"),
        "{e}"
    );
    let out = p.cli(&[
        "med", "stop", &chart, "--name", "Aspirin", "--reason", "done",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no active medication named"),
        "{}",
        stderr(&out)
    );

    // One that it has: said in words, singular.
    let said = p.cli_ok(&[
        "allergy",
        "remove",
        &chart,
        "--substance",
        "latex",
        "--reason",
        "entered in error",
    ]);
    assert_eq!(
        said.trim(),
        format!("{chart}: removed the allergy to latex (1 entry).")
    );
}

#[test]
fn chart_show_names_and_groups_observations() {
    let p = Practice::new("Valley Family Practice");
    let chart = p.new_chart("OPS-2");
    for (code, value, date) in [
        ("8480-6", "141", "2026-03-01T09:00:00Z"),
        ("2345-7", "5.4", "2026-02-01T09:00:00Z"),
        ("8480-6", "128", "2026-01-01T09:00:00Z"),
        ("99999-9", "7", "2026-01-15T09:00:00Z"),
    ] {
        p.cli_ok(&[
            "obs", "add", &chart, "--code", code, "--value", value, "--unit", "x", "--date", date,
        ]);
    }
    let shown = p.cli_ok(&["chart", "show", &chart]);
    let obs: Vec<&str> = shown
        .lines()
        .skip_while(|l| !l.starts_with("Observations"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    assert_eq!(obs.len(), 4, "{shown}");
    // By name, then oldest first within a name; the unknown code is named by its code.
    assert!(obs[0].contains("Glucose"), "{shown}");
    assert!(obs[1].contains("LOINC 99999-9"), "{shown}");
    assert!(
        obs[2].contains("Systolic blood pressure") && obs[2].contains("128"),
        "{shown}"
    );
    assert!(
        obs[3].contains("Systolic blood pressure") && obs[3].contains("141"),
        "{shown}"
    );
}

#[test]
fn received_and_revoked_copies_are_marked_and_peers_are_named_briefly() {
    let a = Practice::new("Valley Family Practice");
    let b = Practice::new("Ridge Cardiology");
    // Pair with the checked id as `chartmesh id` prints it (dashes and all).
    let checked_b = b.cli_json(&["id"])["checkedId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(checked_b.len(), 63, "{checked_b}");
    assert!(b.cli_ok(&["id"]).starts_with(&checked_b));
    a.cli_ok(&[
        "peer",
        "add",
        &checked_b,
        "--addr",
        &b.sync_addr(),
        "--name",
        "Ridge Cardiology",
    ]);
    b.cli_ok(&[
        "peer",
        "add",
        &a.id().to_lowercase(),
        "--addr",
        &a.sync_addr(),
        "--name",
        "Valley",
    ]);
    // A typo in a checked id is caught before anything is stored.
    let mut typo: Vec<char> = checked_b.chars().collect();
    typo[2] = if typo[2] == 'A' { 'B' } else { 'A' };
    let typo: String = typo.into_iter().collect();
    let out = a.cli(&[
        "peer",
        "add",
        &typo,
        "--addr",
        "127.0.0.1:9",
        "--name",
        "Typo",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("typo"), "{}", stderr(&out));
    assert_eq!(
        a.cli_json(&["peer", "list"])["peers"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let read = a.new_chart("OPS-3");
    let rw = a.new_chart("OPS-4");
    // The peer by name, and by a short prefix of its id.
    a.cli_ok(&["share", &read, "--with", "ridge cardiology"]);
    let short: String = b.id().chars().take(6).collect();
    a.cli_ok(&["share", &rw, "--with", &short, "--access", "read-write"]);
    // A name that is not a peer: refused at once, saying so.
    let out = a.cli(&["share", &read, "--with", "Nobody Clinic"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no paired practice"),
        "{}",
        stderr(&out)
    );
    a.cli_ok(&[
        "sync",
        "wait",
        "--peer",
        "Ridge Cardiology",
        "--timeout",
        "60",
    ]);
    b.sync_wait(&a, 60);

    let shown = b.cli_ok(&["chart", "show", &read]);
    assert!(
        shown.starts_with("RECEIVED from Valley (") && shown.contains("READ-ONLY"),
        "{shown}"
    );
    let shown = b.cli_ok(&["chart", "show", &rw]);
    assert!(shown.contains("shared read-write"), "{shown}");
    let own = a.cli_ok(&["chart", "show", &read]);
    assert!(!own.contains("RECEIVED"), "{own}");

    a.cli_ok(&["revoke", &read, "--from", "Ridge Cardiology"]);
    wait_until(
        "the revoked copy to be marked",
        std::time::Duration::from_secs(60),
        || {
            String::from_utf8_lossy(&b.cli(&["chart", "show", &read]).stdout)
                .starts_with("REVOKED COPY")
        },
    );
}

#[test]
fn logs_written_to_a_file_carry_no_colour_codes() {
    let p = Practice::new("Valley Family Practice");
    p.cli_ok(&["status"]);
    let log = p.log();
    assert!(log.contains("chartmeshd ready"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape in the log file: {log:?}"
    );
}

#[test]
fn first_start_takes_a_name_and_explains_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let out = Command::new(bin("chartmesh"))
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "init",
            "--name",
            "Hill Clinic",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("Created practice \"Hill Clinic\""), "{said}");
    assert!(said.contains(&dir.display().to_string()), "{said}");
    assert!(
        said.contains("127.0.0.1:7361") && said.contains("0.0.0.0:7361"),
        "{said}"
    );
    assert!(said.contains("chartmesh service install"), "{said}");
    // Without --name and without a terminal: a usage error, not a silent default.
    let out = Command::new(bin("chartmesh"))
        .args([
            "--data-dir",
            tmp.path().join("other").to_str().unwrap(),
            "init",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--name"), "{}", stderr(&out));
}

#[test]
fn a_backup_to_a_missing_folder_says_the_folder_does_not_exist() {
    let p = Practice::new("Valley Family Practice");
    let target = p.dir.parent().unwrap().join("no-such-folder").join("b.db");
    let out = p.cli(&["backup", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("does not exist") && e.contains("mkdir -p") && !e.contains("unable to open"),
        "{e}"
    );
}

/// docs/OPERATIONS.md, "Staff access": a staff member in the daemon's group, with the data
/// directory 0750 and api-token 0640, uses the CLI; before that, the error says permission
/// denied (not "no data directory").
#[test]
fn staff_access_to_a_service_data_directory_works_as_documented() {
    if !is_root() || which("setpriv").is_none() {
        println!("SKIPPED: needs root and setpriv to run the CLI as another user");
        return;
    }
    let mut p = Practice::new("Valley Family Practice");
    let dir = p.dir.clone();
    // The temporary parent is 0700: let others reach the data directory's own mode.
    chmod(dir.parent().unwrap(), "0755");
    let as_staff = |args: &[&str]| as_nobody("chartmesh", &dir, args);
    let out = as_staff(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("permission denied")
            && e.contains("Staff access")
            && !e.contains("no chartmesh data directory"),
        "{e}"
    );
    // What docs/OPERATIONS.md says to do (the group is the daemon's; here nogroup).
    run(
        "chgrp",
        &[
            "65534",
            dir.to_str().unwrap(),
            dir.join("api-token").to_str().unwrap(),
        ],
    );
    chmod(&dir, "0750");
    chmod(&dir.join("api-token"), "0640");
    let out = as_staff(&["--json", "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["practice"]["name"], "Valley Family Practice");
    // The daemon does not take the access back when it restarts.
    p.restart();
    let out = as_staff(&["--json", "id"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["id"].as_str().unwrap(), p.id());
    // Stopped: staff are told the daemon is not running (exit 3).
    p.stop();
    let out = as_staff(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("not running"), "{}", stderr(&out));
}

/// A store the daemon's user may not write (here: `store.db` left owned by root, as after a
/// command run with sudo, while the service user owns the rest) stops chartmeshd with that
/// said, and without the advice for damage (restore a backup, which would lose what was
/// written since); an offline command says the same. Nothing is changed, and once the file is
/// given back the daemon starts with every chart.
#[test]
fn a_store_the_daemon_may_not_write_is_reported_as_such_not_as_damage() {
    if !is_root() || which("setpriv").is_none() {
        println!("SKIPPED: needs root and setpriv to run chartmeshd as another user");
        return;
    }
    let mut p = Practice::new("Valley Family Practice");
    let chart = p.new_chart("Access");
    p.stop();
    let dir = p.dir.clone();
    let store = dir.join("store.db");
    let before = std::fs::read(&store).unwrap();
    // The temporary parent is 0700: let the other user reach the data directory.
    chmod(dir.parent().unwrap(), "0755");
    run("chown", &["-R", "65534:65534", dir.to_str().unwrap()]);
    run("chown", &["0:0", store.to_str().unwrap()]);
    let as_service = |prog: &str, args: &[&str]| as_nobody(prog, &dir, args);
    let out = as_service("chartmeshd", &[]);
    assert!(!out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("store.db") && e.contains("not damaged") && !e.contains("restore"),
        "{e}"
    );
    let out = as_service("chartmesh", &["chart", "show", "--offline", &chart]);
    assert!(!out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("not damaged") && !e.contains("restore"), "{e}");
    assert_eq!(std::fs::read(&store).unwrap(), before, "nothing changed");
    // Given back (all of it to root, the daemon's user here), it starts with the chart.
    run("chown", &["-R", "0:0", dir.to_str().unwrap()]);
    p.start();
    let v = p.get(&format!("/charts/{chart}"));
    assert_eq!(v["id"].as_str(), Some(chart.as_str()));
}

/// Runs `prog` (chartmesh or chartmeshd) on the data directory `dir` as the user nobody
/// (uid and gid 65534, no supplementary groups), as staff or a service user would.
fn as_nobody(prog: &str, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin(prog))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env("USER", "nobody")
        .env("CHARTMESH_LOG", "warn")
        .output()
        .unwrap()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn which(prog: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

fn chmod(path: &std::path::Path, mode: &str) {
    run("chmod", &[mode, path.to_str().unwrap()]);
}

fn run(prog: &str, args: &[&str]) {
    let st = Command::new(prog).args(args).status().unwrap();
    assert!(st.success(), "{prog} {args:?}");
}

/// The README's walk-through writes its output files outside the checkout (a new user runs
/// it from the clone): every `-o`/`--output`/`>` target is absolute.
#[test]
fn the_readme_walk_through_writes_outside_the_checkout() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut in_sh = false;
    let mut bad = Vec::new();
    let mut outputs = 0;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = line.starts_with("```sh");
            continue;
        }
        if !in_sh {
            continue;
        }
        let cmd = line.split(" #").next().unwrap();
        let words: Vec<&str> = cmd.split_whitespace().collect();
        for w in words.windows(2) {
            if matches!(w[0], "-o" | "--output" | ">") {
                outputs += 1;
                if !(w[1].starts_with('/') || w[1].starts_with("~/") || w[1].starts_with('$')) {
                    bad.push(line.to_string());
                }
            }
        }
    }
    assert!(
        outputs >= 5,
        "the walk-through has output files ({outputs} found)"
    );
    assert!(bad.is_empty(), "README writes into the checkout: {bad:#?}");
}

fn doctor(p: &Practice) -> (i32, Value) {
    let out = p.cli(&["--json", "doctor"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

/// The doctor's finding for `check` (the first one whose status is `status`, if given).
fn finding<'a>(v: &'a Value, check: &str, status: Option<&str>) -> Option<&'a Value> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check && status.is_none_or(|s| f["status"] == s))
}

#[test]
fn doctor_reports_a_broken_setup_with_the_fix_for_each() {
    let mut p = Practice::new("Valley Family Practice");
    p.new_chart("DOC-1");
    let (code, v) = doctor(&p);
    assert_eq!(code, 0, "{v:#}");
    for check in [
        "data directory",
        "permissions",
        "daemon",
        "store",
        "audit chain",
        "certificate",
    ] {
        assert!(finding(&v, check, Some("ok")).is_some(), "{check}: {v:#}");
    }
    let f = finding(&v, "store", Some("ok")).unwrap();
    assert!(
        f["detail"]
            .as_str()
            .unwrap()
            .contains("cipher_integrity_check"),
        "{f}"
    );
    // No backup yet: a warning that says how to make one.
    let f = finding(&v, "last backup", Some("warn")).unwrap();
    assert!(
        f["fix"].as_str().unwrap().contains("chartmesh backup"),
        "{f}"
    );

    // A backup, verified after writing; then corrupted on its disk.
    let backup = p.dir.parent().unwrap().join("doctor-backup.db");
    let said = p.cli_ok(&["backup", backup.to_str().unwrap()]);
    assert!(said.contains("verified"), "{said}");
    let ok = p.cli_json(&["backup", "verify", backup.to_str().unwrap()]);
    assert_eq!(ok["ok"], true, "{ok}");
    assert!(finding(&doctor(&p).1, "last backup", Some("ok")).is_some());
    let mut bytes = std::fs::read(&backup).unwrap();
    assert!(bytes.len() > 3 * 4096);
    bytes[2 * 4096 + 1000] ^= 0x5a;
    std::fs::write(&backup, &bytes).unwrap();
    let out = p.cli(&["backup", "verify", backup.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let (code, v) = doctor(&p);
    assert_eq!(code, 1, "{v:#}");
    let f = finding(&v, "last backup", Some("fail")).expect("the corrupted backup is found");
    assert!(
        f["fix"].as_str().unwrap().contains("make a new backup"),
        "{f}"
    );

    // The store key readable by everyone.
    let key = p.dir.join("store.key");
    chmod(&key, "0644");
    let (code, v) = doctor(&p);
    assert_eq!(code, 1);
    let f = finding(&v, "permissions", Some("fail")).expect("the key's mode is found");
    assert!(f["detail"].as_str().unwrap().contains("store.key"), "{f}");
    assert_eq!(f["fix"], format!("chmod 0600 {}", key.display()));
    chmod(&key, "0600");

    // The daemon stopped.
    p.stop();
    let (code, v) = doctor(&p);
    assert_eq!(code, 1);
    let f = finding(&v, "daemon", Some("fail")).expect("the stopped daemon is found");
    assert!(
        f["fix"]
            .as_str()
            .unwrap()
            .contains("systemctl start chartmeshd"),
        "{f}"
    );
    // What does not need the daemon is still checked.
    assert!(finding(&v, "store", Some("ok")).is_some(), "{v:#}");
    assert!(finding(&v, "audit chain", Some("ok")).is_some(), "{v:#}");
    // The human form names each finding and its fix.
    let out = p.cli(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL") && text.contains("chartmeshd is not running"),
        "{text}"
    );
}

fn http_get(url: &str, host: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(url);
    if let Some(h) = host {
        req = req.header("Host", h);
    }
    let mut resp = req.call().unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

#[test]
fn metrics_are_scraped_and_parsed_as_prometheus_text() {
    let a = Practice::new("Valley Family Practice");
    let b = Practice::new("Ridge Cardiology");
    pair(&a, &b);
    wait_connected(&a, &b);
    let chart = a.new_chart("MET-1");
    a.cli_ok(&["share", &chart, "--with", "Ridge Cardiology"]);
    a.sync_wait(&b, 60);
    let addr = std::fs::read_to_string(a.dir.join("api.addr")).unwrap();
    let base = format!("http://{}", addr.trim());

    let (status, body) = http_get(&format!("{base}/healthz"), None);
    assert_eq!((status, body.trim()), (200, "ok"));
    // Addressed to another name (DNS rebinding): refused.
    let (status, _) = http_get(&format!("{base}/metrics"), Some("evil.example"));
    assert_eq!(status, 421);

    // Audit entries by action: what the API's audit log holds, action by action.
    let log = a.cli_json(&["audit"]);
    let sends = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "sync-send")
        .count() as f64;
    assert!(sends >= 1.0, "{log}");
    let (status, text) = http_get(&format!("{base}/metrics"), None);
    assert_eq!(status, 200, "{text}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |name: &str, label: Option<(&str, &str)>| -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|c| c.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            })
    };
    assert_eq!(value("chartmesh_peers_paired", None), Some(1.0), "{text}");
    assert_eq!(
        value("chartmesh_peers_connected", None),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value("chartmesh_charts", None), Some(1.0), "{text}");
    let short: String = b.id().chars().take(9).collect();
    assert_eq!(
        value("chartmesh_peer_connected", Some(("peer", &short))),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            "chartmesh_peer_sync_lag_seconds",
            Some(("name", "Ridge Cardiology"))
        ),
        Some(0.0),
        "{text}"
    );
    assert!(
        value("chartmesh_peer_pending_changes", Some(("peer", &short))).is_some(),
        "{text}"
    );
    assert!(
        value("chartmesh_store_bytes", None).unwrap() > 4096.0,
        "{text}"
    );
    assert!(
        value(
            "chartmesh_audit_entries_total",
            Some(("action", "sync-send"))
        )
        .unwrap()
            >= sends,
        "{text}"
    );
    assert!(value("chartmesh_refusals_total", None).is_some(), "{text}");
    // The writes above (create, share) were timed.
    let writes = scrape
        .samples
        .iter()
        .find(|s| s.metric == "chartmesh_api_write_seconds_count")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v)
            | prometheus_parse::Value::Gauge(v) => v,
            _ => 0.0,
        });
    assert!(writes.unwrap_or(0.0) >= 2.0, "{text}");
}

/// Every sample of a scrape of `p`'s `/metrics`, parsed as Prometheus text.
fn scrape(p: &Practice) -> prometheus_parse::Scrape {
    let addr = std::fs::read_to_string(p.dir.join("api.addr")).unwrap();
    let (status, text) = http_get(&format!("http://{}/metrics", addr.trim()), None);
    assert_eq!(status, 200, "{text}");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of `metric` for the peer named `name` (or the unlabelled one when None).
fn sample(s: &prometheus_parse::Scrape, metric: &str, name: Option<&str>) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && name.is_none_or(|n| x.labels.get("name") == Some(n)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// Text that does not compress below 6 bits a character (the sync stream is zstd).
fn random_text(seed: &mut u64, len: usize) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .";
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ABC[(*seed >> 58) as usize] as char
        })
        .collect()
}

/// Issue 15: bytes sent to and received from each peer (and in total) are counted from the
/// transport, in `/metrics` and `status --json`, and never go down across a reconnect.
#[test]
fn bytes_sent_and_received_are_counted_per_peer_across_reconnects() {
    let a = Practice::new("Valley Family Practice");
    let b = Practice::new("Ridge Cardiology");
    pair(&a, &b);
    wait_connected(&a, &b);
    // N charts, each with a note of random text: at least `floor` bytes must cross however
    // well they compress.
    let (n, len) = (8, 6000);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    for i in 0..n {
        let chart = a.new_chart(&format!("BYT-{i}"));
        let body = serde_json::json!({ "entry": { "text": random_text(&mut seed, len) }, "author": "Dr Byte" });
        let (code, v) = a
            .post(
                &format!("/charts/{chart}/notes"),
                body.to_string().as_bytes(),
                "Dr Byte",
            )
            .unwrap();
        assert_eq!(code, 201, "{v}");
    }
    let floor = (n * len * 6 / 8) as f64;
    // What B received from A, and A sent to B, as scraped now.
    let received = || {
        sample(
            &scrape(&b),
            "chartmesh_sync_bytes_received_total",
            Some("Valley Family Practice"),
        )
        .unwrap()
    };
    let sent_by_a = || {
        sample(
            &scrape(&a),
            "chartmesh_sync_bytes_sent_total",
            Some("Ridge Cardiology"),
        )
        .unwrap()
    };
    let before = received();
    assert!(
        before < floor,
        "nothing shared yet, {before} bytes received"
    );
    a.cli_ok(&["share", "--all", "--with", "Ridge Cardiology"]);
    a.sync_wait(&b, 60);
    assert_eq!(b.get("/status")["charts"], n);

    // The puller received at least the charts; the custodian sent at least as much.
    let got = received();
    assert!(
        got >= floor,
        "B received {got} bytes, the charts hold at least {floor}"
    );
    let sent = sent_by_a();
    assert!(sent >= floor, "A sent {sent} bytes");
    // The totals hold the peer's bytes.
    let all = |p: &Practice, m: &str| sample(&scrape(p), m, None).unwrap();
    assert!(all(&b, "chartmesh_sync_all_bytes_received_total") >= got);
    assert!(all(&a, "chartmesh_sync_all_bytes_sent_total") >= sent);
    // status --json carries the same counters.
    let st = b.cli_json(&["status"]);
    let peer = &st["peers"][0];
    assert!(peer["bytesReceived"].as_f64().unwrap() >= got, "{peer}");
    assert!(peer["bytesSent"].as_u64().unwrap() > 0, "{peer}");
    assert!(
        st["sync"]["bytesReceived"].as_f64().unwrap() >= got,
        "{}",
        st["sync"]
    );

    // A reconnect (pause closes the connection, resume dials again): the bytes of the
    // closed connection are kept, so the counters never go down.
    b.cli_ok(&["sync", "pause", "--peer", "Valley Family Practice"]);
    wait_until(
        "the connection to close",
        std::time::Duration::from_secs(30),
        || b.get("/sync")["peers"][0]["connected"] == false,
    );
    let paused = received();
    assert!(
        paused >= got,
        "{paused} < {got} after the connection closed"
    );
    b.cli_ok(&["sync", "resume", "--peer", "Valley Family Practice"]);
    wait_connected(&b, &a);
    b.sync_wait(&a, 60);
    let again = received();
    assert!(
        again > paused,
        "{again} <= {paused}: the new connection's bytes are not added"
    );
    let sent_again = sent_by_a();
    assert!(sent_again >= sent, "{sent_again} < {sent}");
}

#[test]
fn scheduled_backups_are_verified_and_only_the_newest_kept() {
    let mut p = Practice::new("Valley Family Practice");
    p.new_chart("BAK-1");
    let dir = p.dir.parent().unwrap().join("scheduled");
    std::fs::create_dir(&dir).unwrap();
    // Something the schedule did not make is never deleted.
    std::fs::write(dir.join("chartmesh-keep-me.db"), b"not ours").unwrap();
    let cfg_path = p.dir.join("config.toml");
    let mut cfg: toml::Value =
        toml::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let mut backup = toml::Table::new();
    backup.insert("interval".into(), "1s".into());
    backup.insert("keep".into(), 2.into());
    backup.insert("dir".into(), dir.to_str().unwrap().into());
    cfg.as_table_mut()
        .unwrap()
        .insert("backup".into(), toml::Value::Table(backup));
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();
    p.restart();
    let scheduled = || -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_str().unwrap();
                n.starts_with("chartmesh-2") && n.ends_with(".db")
            })
            .collect();
        v.sort();
        v
    };
    let audit_backups = |p: &Practice| {
        p.cli_json(&["audit"])["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "backup" && e["actor"] == "backup-schedule")
            .count()
    };
    wait_until(
        "four scheduled backups",
        std::time::Duration::from_secs(60),
        || audit_backups(&p) >= 4,
    );
    // The last is recorded for the doctor.
    let (_, v) = doctor(&p);
    assert!(finding(&v, "last backup", Some("ok")).is_some(), "{v:#}");
    // With the schedule stopped (it writes one a second and deletes the oldest, so a file
    // listed while it runs may be gone by the time it is read): retention kept two (a third
    // may have been written just before the stop), the oldest deleted, and each verifies.
    p.stop();
    let kept = scheduled();
    assert!((2..=3).contains(&kept.len()), "{kept:?}");
    assert!(dir.join("chartmesh-keep-me.db").exists());
    for f in &kept[..2] {
        let v = p.cli_json(&["backup", "verify", f.to_str().unwrap()]);
        assert_eq!(v["check"]["charts"], 1, "{v}");
    }
}

#[test]
fn completions_and_man_pages_are_generated() {
    let out = Command::new(bin("chartmesh"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("complete") && script.contains("doctor") && script.contains("service"),
        "{script}"
    );
    if which("bash").is_some() {
        // The script is valid bash.
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("c.bash");
        std::fs::write(&f, script.as_bytes()).unwrap();
        let st = Command::new("bash")
            .args(["-n", f.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let out = Command::new(bin("chartmesh"))
        .args(["man"])
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && page.contains(".TH chartmesh") && page.contains("doctor"),
        "{page}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin("chartmesh"))
        .args(["man", "--dir", tmp.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for page in [
        "chartmesh.1",
        "chartmesh-peer-add.1",
        "chartmesh-backup-verify.1",
        "chartmesh-service-install.1",
    ] {
        assert!(tmp.path().join(page).is_file(), "{page} missing");
    }
    if which("man").is_some() {
        let out = Command::new("man")
            .args([
                "-l",
                tmp.path().join("chartmesh-peer-add.1").to_str().unwrap(),
            ])
            .env("MANPAGER", "cat")
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("--addr"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn a_closed_pipe_ends_the_cli_quietly() {
    let p = Practice::new("Valley Family Practice");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} --data-dir {} man | head -c 10 >/dev/null; {} --data-dir {} peer list | head -c 1 >/dev/null",
            bin("chartmesh").display(),
            p.dir.display(),
            bin("chartmesh").display(),
            p.dir.display()
        ))
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

/// The unit `chartmesh service install` writes is generated and checked by systemd itself.
#[test]
fn the_service_unit_is_valid_for_systemd() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = Command::new(bin("chartmesh"))
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "service",
            "install",
            "--print",
            "--name",
            "Hill Clinic",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let unit = String::from_utf8(out.stdout).unwrap();
    assert!(
        unit.contains("Type=notify") && unit.contains("WatchdogSec="),
        "{unit}"
    );
    assert!(
        unit.contains(&format!(
            "ExecStart={} --data-dir {} --name \"Hill Clinic\"",
            bin("chartmeshd").display(),
            data.display()
        )),
        "{unit}"
    );
    assert!(
        unit.contains("User=chartmesh") && unit.contains("StandardError=journal"),
        "{unit}"
    );
    let out = Command::new(bin("chartmesh"))
        .args(["service", "install", "--user-service", "--print"])
        .output()
        .unwrap();
    let user_unit = String::from_utf8(out.stdout).unwrap();
    assert!(
        !user_unit.contains("User=") && user_unit.contains("WantedBy=default.target"),
        "{user_unit}"
    );
    let Some(analyze) = which("systemd-analyze") else {
        println!("SKIPPED: systemd-analyze is not installed; the unit was not verified by systemd");
        return;
    };
    for (name, text) in [("system", &unit), ("user", &user_unit)] {
        let f = tmp.path().join("chartmeshd.service");
        std::fs::write(&f, text).unwrap();
        let out = Command::new(&analyze)
            .args(["verify", "--man=no", f.to_str().unwrap()])
            .output()
            .unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        // Only what is about this unit counts (the host's own units may draw warnings).
        let ours: Vec<&str> = said
            .lines()
            .filter(|l| l.contains("chartmeshd.service"))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "{name} unit: {said}"
        );
    }
}

/// Every command path of the CLI, walked from its clap tree as `chartmesh man --dir` writes
/// it (one page per command, `chartmesh-peer-add.1`): (path, whether it has subcommands).
fn command_tree() -> Vec<(String, bool)> {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin("chartmesh"))
        .args(["man", "--dir", tmp.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut pages: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".1").map(str::to_string))
        .filter_map(|n| n.strip_prefix("chartmesh-").map(|p| p.replace('-', " ")))
        .collect();
    pages.sort();
    pages
        .iter()
        .map(|p| {
            let group = pages.iter().any(|q| q.starts_with(&format!("{p} ")));
            (p.clone(), group)
        })
        .collect()
}

/// Issue 15: `--json` on every command. The clap tree is walked; every command that runs
/// (a leaf, or a group that runs without a subcommand) is run with `--json` and its output
/// must be JSON (a document, or JSON lines for a stream of charts), on success and on
/// error. Commands whose output is a file format of its own are listed, with the reason.
#[test]
fn every_command_answers_in_json() {
    // Output that is not ours to wrap: a shell script, a manual page.
    const NOT_JSON: &[(&str, &str)] = &[
        (
            "completions",
            "prints a shell completion script for the shell to source",
        ),
        (
            "man",
            "prints a manual page (roff), or writes them into --dir",
        ),
        ("help", "clap's help text"),
    ];
    let mut a = Practice::new("Json Clinic");
    let b = Practice::new("Json Partner");
    pair(&a, &b);
    wait_connected(&a, &b);
    let chart = a.new_chart("JSON-1");
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let fresh = t("fresh");
    // A practice id to pair and unpair: the fresh directory's.
    let init = Command::new(bin("chartmesh"))
        .args([
            "--json",
            "--data-dir",
            &fresh,
            "init",
            "--name",
            "Fresh Json",
        ])
        .output()
        .unwrap();
    let fresh_id = serde_json::from_slice::<Value>(&init.stdout).unwrap_or_else(|e| {
        panic!(
            "init --json: {e}: {}",
            String::from_utf8_lossy(&init.stdout)
        )
    })["practice"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    a.cli_ok(&["share", &chart, "--with", "Json Partner"]);
    a.sync_wait(&b, 60);

    // (command path, its arguments after the path, whether it must succeed)
    let backup = t("backup.db");
    let export = t("export.jsonl");
    let runs: Vec<(&str, Vec<String>, bool)> = vec![
        ("id", vec![], true),
        ("status", vec![], true),
        ("peer list", vec![], true),
        (
            "peer add",
            vec![fresh_id.clone(), "--addr".into(), "127.0.0.1:9".into()],
            true,
        ),
        ("peer remove", vec![fresh_id.clone()], true),
        (
            "share",
            vec![chart.clone(), "--with".into(), "Json Partner".into()],
            true,
        ),
        ("shares", vec![], true),
        (
            "chart create",
            [
                "--mrn",
                "JSON-2",
                "--family",
                "Json",
                "--given",
                "Ann",
                "--birth-date",
                "1980-01-01",
            ]
            .map(String::from)
            .to_vec(),
            true,
        ),
        ("chart show", vec![chart.clone()], true),
        ("chart search", vec!["Ward".into()], true),
        (
            "note add",
            vec![chart.clone(), "--text".into(), "json note".into()],
            true,
        ),
        (
            "med add",
            vec![
                chart.clone(),
                "--name".into(),
                "amoxicillin".into(),
                "--dose".into(),
                "500 mg".into(),
            ],
            true,
        ),
        (
            "med stop",
            vec![
                chart.clone(),
                "--name".into(),
                "amoxicillin".into(),
                "--reason".into(),
                "course done".into(),
            ],
            true,
        ),
        (
            "allergy add",
            vec![chart.clone(), "--substance".into(), "latex".into()],
            true,
        ),
        (
            "allergy remove",
            vec![
                chart.clone(),
                "--substance".into(),
                "latex".into(),
                "--reason".into(),
                "in error".into(),
            ],
            true,
        ),
        (
            "obs add",
            vec![
                chart.clone(),
                "--code".into(),
                "8867-4".into(),
                "--value".into(),
                "72".into(),
                "--unit".into(),
                "/min".into(),
            ],
            true,
        ),
        ("history", vec![chart.clone()], true),
        ("alerts", vec![chart.clone()], true),
        ("audit", vec![], true),
        ("audit verify", vec![], true),
        ("due", vec![], true),
        ("report population", vec![], true),
        ("export", vec!["-o".into(), export.clone()], true),
        ("export", vec![chart.clone()], true),
        ("import", vec![export.clone()], true),
        ("backup", vec![backup.clone()], true),
        ("backup verify", vec![backup.clone()], true),
        ("doctor", vec![], false),
        ("console", vec![], true),
        ("sync wait", vec!["--timeout".into(), "30".into()], true),
        (
            "sync pause",
            vec!["--peer".into(), "Json Partner".into()],
            true,
        ),
        (
            "sync resume",
            vec!["--peer".into(), "Json Partner".into()],
            true,
        ),
        (
            "refer",
            vec![
                chart.clone(),
                "--to".into(),
                "Json Partner".into(),
                "--reason".into(),
                "a second opinion".into(),
            ],
            true,
        ),
        ("referrals", vec![], true),
        ("referral accept", vec!["no-such-referral".into()], false),
        ("referral decline", vec!["no-such-referral".into()], false),
        (
            "referral note",
            vec!["no-such-referral".into(), "--text".into(), "x".into()],
            false,
        ),
        ("referral complete", vec!["no-such-referral".into()], false),
        ("referral cancel", vec!["no-such-referral".into()], false),
        ("conflicts", vec![], true),
        (
            "conflicts resolve",
            vec!["999".into(), "--note".into(), "x".into()],
            false,
        ),
        (
            "emergency request",
            vec![
                "--mrn".into(),
                "NOBODY".into(),
                "--reason".into(),
                "unconscious, no history".into(),
            ],
            // Denied (exit 5): emergency access is off at the partner.
            false,
        ),
        ("emergency log", vec![], true),
        (
            "service install",
            vec!["--print".into(), "--user-service".into()],
            true,
        ),
        ("service status", vec!["--user-service".into()], false),
        ("service uninstall", vec!["--user-service".into()], false),
        (
            "revoke",
            vec![chart.clone(), "--from".into(), "Json Partner".into()],
            true,
        ),
    ];
    let mut bad = Vec::new();
    let mut check = |path: &str, out: std::process::Output, must_succeed: bool| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = serde_json::from_str::<Value>(&text).is_ok()
            || (!text.trim().is_empty()
                && text
                    .lines()
                    .all(|l| serde_json::from_str::<Value>(l).is_ok()));
        if !json || (must_succeed && !out.status.success()) {
            bad.push(format!(
                "{path} ({}): {}{}",
                out.status,
                text.chars().take(300).collect::<String>(),
                stderr(&out).chars().take(300).collect::<String>()
            ));
        }
    };
    for (path, args, must) in &runs {
        let mut all = vec!["--json"];
        all.extend(path.split(' '));
        all.extend(args.iter().map(String::as_str));
        check(path, a.cli(&all), *must);
    }
    // What needs the daemon stopped, or another data directory.
    a.stop();
    for (path, args) in [
        ("restore", vec![backup.as_str(), "--yes"]),
        ("key rotate", vec![]),
        ("chart show", vec![chart.as_str(), "--offline"]),
    ] {
        let mut all = vec!["--json"];
        all.extend(path.split(' '));
        all.extend(args);
        check(path, a.cli(&all), true);
    }
    let out = Command::new(bin("chartmesh"))
        .args([
            "--json",
            "--data-dir",
            &t("fresh2"),
            "init",
            "--name",
            "Fresh Two",
        ])
        .output()
        .unwrap();
    check("init", out, true);
    assert!(bad.is_empty(), "not JSON with --json:\n{}", bad.join("\n"));

    // Every command that runs was run (or is listed with its reason).
    let ran: std::collections::BTreeSet<&str> = runs
        .iter()
        .map(|r| r.0)
        .chain(["key rotate", "restore", "init"])
        .collect();
    for (path, group) in command_tree() {
        let last = path.rsplit(' ').next().unwrap();
        if ran.contains(path.as_str()) || NOT_JSON.iter().any(|(p, _)| *p == path || *p == last) {
            continue;
        }
        assert!(group, "`chartmesh {path}` is not checked with --json here");
    }
}
