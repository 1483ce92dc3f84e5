//! Hardening of the local API and the CLI (issue 11, items 8, 9 and the "also found" list),
//! against real daemons: backups that cannot overwrite anything, imports in bounded memory,
//! bounded names, audited offline reads and list disclosures, owner-only export files, the
//! console's DNS-rebinding and origin defences, terminal-safe output, a quiet closed pipe.

use chartmesh_tests::*;
use serde_json::Value;
use std::io::{BufRead, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// The daemon's peak resident set size so far, in KiB (Linux).
fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn audit_of(p: &Practice, chart: &str) -> Vec<Value> {
    p.get(&format!("/audit?chart={chart}"))["entries"]
        .as_array()
        .unwrap()
        .clone()
}

/// Issue 11, item 9: `POST /api/v1/backup` with the path of `store.key` overwrote the key.
/// Now a backup refuses an existing file, anything inside the data directory and a missing
/// directory, each with a message saying what to do; a backup it writes is 0600.
#[test]
fn a_backup_never_overwrites_and_never_goes_into_the_data_directory() {
    let mut a = Practice::new("Backup Guard");
    a.import_first(3);
    let key_before = std::fs::read(a.dir.join("store.key")).unwrap();
    let outside = a.dir.parent().unwrap().join("elsewhere");
    std::fs::create_dir(&outside).unwrap();
    let existing = outside.join("existing.db");
    std::fs::write(&existing, b"keep me").unwrap();
    let via_dots = a.dir.join("..").join("data").join("new.db");
    let cases: Vec<(String, &str)> = vec![
        (
            a.dir.join("store.key").display().to_string(),
            "already exists",
        ),
        (
            a.dir.join("fresh.db").display().to_string(),
            "inside the data directory",
        ),
        (via_dots.display().to_string(), "inside the data directory"),
        (existing.display().to_string(), "already exists"),
        (
            outside.join("no-such-dir/b.db").display().to_string(),
            "does not exist",
        ),
        ("relative.db".to_string(), "must be absolute"),
    ];
    for (path, why) in &cases {
        let body = serde_json::to_vec(&serde_json::json!({ "path": path })).unwrap();
        let (status, v) = a.post("/backup", &body, "admin").unwrap();
        assert_eq!(status, 422, "{path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(why), "{path}: {msg}");
    }
    assert_eq!(std::fs::read(a.dir.join("store.key")).unwrap(), key_before);
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    assert!(!a.dir.join("fresh.db").exists());
    // A good backup is written, owner-only; the same name a second time is refused.
    let good = outside.join("good.db");
    let v = a.cli_json(&["backup", good.to_str().unwrap()]);
    assert!(v["bytes"].as_u64().unwrap() > 0);
    assert_eq!(mode(&good), 0o600);
    let out = a.cli(&["backup", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    // The daemon is stopped: the CLI writes the backup itself, with the same rules, audited.
    a.stop();
    let out = a.cli(&["backup", a.dir.join("store.key").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let offline = outside.join("offline.db");
    a.cli_ok(&["backup", offline.to_str().unwrap()]);
    assert_eq!(mode(&offline), 0o600);
    assert_eq!(std::fs::read(a.dir.join("store.key")).unwrap(), key_before);
    a.start();
    let backups: Vec<Value> = a.get("/audit")["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "backup")
        .cloned()
        .collect();
    assert_eq!(backups.len(), 2, "{backups:?}");
    assert!(backups[1]["detail"].as_str().unwrap().contains("offline"));
}

/// Issue 11, item 9: 8 MB of bad JSONL lines took the daemon to a 3.97 GB peak and a
/// 363 MB answer. Now the import runs in parts and lists at most 1,000 errors, counting
/// the rest; a 2 MB body of bad lines (1M records) stays far below that.
#[test]
fn a_jsonl_import_of_a_million_bad_lines_stays_in_bounded_memory() {
    let a = Practice::new("Import Bound");
    let pid = a.pid().unwrap();
    let before = peak_rss_kb(pid);
    let body = b"x\n".repeat(1 << 20);
    let mut r = agent()
        .post(format!("{}/import", a.base()))
        .header("Authorization", format!("Bearer {}", a.token()))
        .send(&body[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap();
    let peak = peak_rss_kb(pid);
    eprintln!(
        "daemon peak RSS: {before} KiB before, {peak} KiB after the import; answer {} bytes",
        text.len()
    );
    assert!(peak < 200 * 1024, "daemon peak RSS {peak} KiB");
    assert!(text.len() < 512 * 1024, "answer of {} bytes", text.len());
    let v: Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(v["failed"], 1 << 20);
    assert_eq!(v["imported"], 0);
    assert_eq!(v["errors"].as_array().unwrap().len(), 1000);
    assert_eq!(v["errorsNotListed"], (1 << 20) - 1000);
    assert_eq!(v["errors"][999]["index"], 999);
    // It still imports: good records among bad ones are kept, errors keep their positions.
    let good = std::fs::read(bench_data().join("charts-1000.jsonl")).unwrap();
    let first = good.split(|b| *b == b'\n').next().unwrap();
    let mut mixed = b"oops\n".repeat(600);
    mixed.extend_from_slice(first);
    mixed.push(b'\n');
    mixed.extend_from_slice(b"{\n");
    let (s, v) = a.post("/import", &mixed, "importer").unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["imported"], 1);
    assert_eq!(v["failed"], 601);
    assert_eq!(v["errors"][600]["index"], 601, "{}", v["errors"][600]);
}

/// Issue 11, item 8: the actor name and a note's author were unbounded (1.5 MB stored) and
/// could hold control characters. Now they are refused at the API with a reason.
#[test]
fn names_and_free_text_are_bounded_and_plain_at_the_api() {
    let a = Practice::new("Name Guard");
    a.import_first(1);
    let note = |author: &str| {
        serde_json::to_vec(&serde_json::json!({ "author": author, "entry": { "text": "seen" } }))
            .unwrap()
    };
    let long = "a".repeat(1_500_000);
    for (author, why) in [
        (long.as_str(), "characters long"),
        ("Dr \u{202e}xoF", "control character U+202E"),
        ("Dr\u{1b}[2J", "control character U+001B"),
        ("", "empty"),
    ] {
        let (s, v) = a
            .post("/charts/chart-000001/notes", &note(author), "nurse")
            .unwrap();
        assert_eq!(s, 422, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(why), "{v}");
    }
    // The acting user's name, in the header.
    let (s, v) = a
        .post(
            "/charts/chart-000001/notes",
            &note("Dr Ok"),
            &"u".repeat(101),
        )
        .unwrap();
    assert_eq!(s, 422, "{v}");
    let (s, v) = a
        .post(
            "/charts/chart-000001/notes",
            &note("Dr Ok"),
            "Mme \u{2066}x",
        )
        .unwrap();
    assert_eq!(s, 422, "{v}");
    // A plain name, accents included, is recorded as given.
    let (s, v) = a
        .post(
            "/charts/chart-000001/notes",
            br#"{"entry": {"text": "seen"}}"#,
            "Infirmière Lüdke",
        )
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert!(
        audit_of(&a, "chart-000001")
            .iter()
            .any(|e| e["actor"] == "Infirmière Lüdke")
    );
    // An emergency reason is bounded too (before anything is sent).
    let out = a.cli(&[
        "emergency",
        "request",
        "--mrn",
        "M1",
        "--reason",
        &"r".repeat(1001),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 1000"));
}

/// Issue 11, item 9: emergency requests were not rate-limited. One user may make 6 in ten
/// minutes here; the seventh is refused (exit 5) and audited.
#[test]
fn emergency_requests_are_rate_limited_per_user() {
    let a = Practice::new("Busy ER");
    for i in 0..6 {
        let out = a.cli(&["emergency", "request", "--mrn", "M1", "--reason", "test"]);
        // No practice is connected: refused for that, but counted.
        assert_eq!(out.status.code(), Some(1), "request {i}: {out:?}");
    }
    let out = a.cli(&["emergency", "request", "--mrn", "M1", "--reason", "test"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("emergency requests in the last 10 minutes")
    );
    // Another user is not held back by the first one's limit.
    let out = Command::new(bin("chartmesh"))
        .args(["--data-dir", a.dir.to_str().unwrap(), "--user", "dr-other"])
        .args(["emergency", "request", "--mrn", "M1", "--reason", "test"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let refusals: Vec<Value> = a.get("/audit")["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "refuse" && e["actor"] == "test-user")
        .cloned()
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
}

/// Issue 11, item 8: `--offline` reads while the daemon ran left no audit entry, and
/// offline reads with it stopped were never audited. Now the first is refused (drop
/// --offline) and the second audited; search, due-list and alert answers are audited with
/// each chart they disclosed; export files, FHIR bundles and patient copies are 0600.
#[test]
fn reads_are_audited_by_chart_and_exports_are_owner_only() {
    let mut a = Practice::new("Audit Gaps");
    a.import_first(30);
    let out_dir = a.dir.parent().unwrap().join("out");
    std::fs::create_dir(&out_dir).unwrap();

    // --offline while the daemon runs: refused, nothing read.
    for args in [
        vec!["chart", "show", "--offline", "chart-000001"],
        vec!["export", "--offline"],
    ] {
        let out = a.cli(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("drop --offline"),
            "{out:?}"
        );
    }

    // Search: every chart listed is audited by id (not only a count).
    let family = a.get("/charts/chart-000001")["patient"]["name"]["family"]
        .as_str()
        .unwrap()
        .to_string();
    let prefix: String = family.chars().take(3).collect();
    let found = a.cli_json(&["chart", "search", &prefix]);
    let ids: Vec<String> = found["charts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!ids.is_empty(), "{found}");
    for id in &ids {
        assert!(
            audit_of(&a, id)
                .iter()
                .any(|e| e["action"] == "read" && e["detail"] == "listed in search results"),
            "{id} was listed but its audit trail does not say so"
        );
    }
    // The due list: each patient listed is audited by chart; the population report (counts
    // only) lists nobody and discloses nobody.
    let due = a.get("/due?within=30&today=2026-06-01");
    let listed: Vec<&str> = due["patients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["chart"].as_str().unwrap())
        .collect();
    assert!(!listed.is_empty());
    for id in &listed {
        assert!(
            audit_of(&a, id)
                .iter()
                .any(|e| e["detail"] == "listed in the due list"),
            "{id}"
        );
    }
    let before = a.get("/audit")["entries"].as_array().unwrap().len();
    let pop = a.cli_json(&["report", "population", "--today", "2026-06-01"]);
    assert_eq!(pop["charts"], 30);
    let after = a.get("/audit")["entries"].as_array().unwrap().len();
    assert_eq!(
        after,
        before + 1,
        "the population report is one counts-only entry"
    );

    // Exports, FHIR bundles and the patient copy are owner-only files.
    let jsonl = out_dir.join("all.jsonl");
    std::fs::write(&jsonl, b"").unwrap();
    std::fs::set_permissions(&jsonl, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    a.cli_ok(&["export", "-o", jsonl.to_str().unwrap()]);
    assert_eq!(mode(&jsonl), 0o600);
    let fhir = out_dir.join("fhir");
    a.cli_ok(&[
        "export",
        "--format",
        "fhir",
        "-o",
        fhir.to_str().unwrap(),
        "chart-000001",
    ]);
    assert_eq!(mode(&fhir.join("chart-000001.json")), 0o600);
    let copy = out_dir.join("copy");
    a.cli_ok(&[
        "export",
        "--patient-copy",
        "chart-000002",
        "-o",
        copy.to_str().unwrap(),
    ]);
    assert_eq!(mode(&copy.join("summary.html")), 0o600);
    assert_eq!(mode(&copy.join("ips.json")), 0o600);

    // With the daemon stopped, offline reads work and are audited as the CLI user.
    a.stop();
    let shown = a.cli_json(&["chart", "show", "--offline", "chart-000003"]);
    assert_eq!(shown["id"], "chart-000003");
    let off = out_dir.join("offline.jsonl");
    a.cli_ok(&[
        "export",
        "--offline",
        "-o",
        off.to_str().unwrap(),
        "chart-000004",
        "chart-000005",
    ]);
    assert_eq!(mode(&off), 0o600);
    assert_eq!(std::fs::read_to_string(&off).unwrap().lines().count(), 2);
    a.start();
    let read = audit_of(&a, "chart-000003");
    assert!(
        read.iter().any(|e| e["action"] == "read"
            && e["actor"] == "test-user"
            && e["detail"].as_str().unwrap().contains("offline")),
        "{read:?}"
    );
    for id in ["chart-000004", "chart-000005"] {
        assert!(
            audit_of(&a, id)
                .iter()
                .any(|e| e["action"] == "export"
                    && e["detail"].as_str().unwrap().contains("offline")),
            "{id}"
        );
    }
    a.cli_ok(&["audit", "verify"]);
}

/// Issue 11, item 9: the console answered any Host header (DNS rebinding) and kept the token
/// in localStorage. Now only loopback names are answered, other origins are refused, the
/// token is exchanged once for an HttpOnly SameSite=Strict cookie, and the page carries a
/// strict Content-Security-Policy with no inline script.
#[test]
fn the_console_answers_only_loopback_and_never_holds_the_token() {
    let a = Practice::new("Console Guard");
    let addr = std::fs::read_to_string(a.dir.join("api.addr")).unwrap();
    let root = format!("http://{}", addr.trim());
    let ag = agent();
    // A rebinding page's requests carry its own host name: refused, even with the token.
    let r = ag
        .get(format!("{}/status", a.base()))
        .header("Host", "attacker.example:7360")
        .header("Authorization", format!("Bearer {}", a.token()))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 421);
    let r = ag
        .get(format!("{root}/"))
        .header("Host", "attacker.example")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 421);
    // Another origin is refused.
    let r = ag
        .post(format!("{}/revoke", a.base()))
        .header("Origin", "http://attacker.example")
        .header("Authorization", format!("Bearer {}", a.token()))
        .send_json(serde_json::json!({ "all": true, "peer": "x" }))
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // The page: a strict policy, no inline script, no token storage.
    let mut r = ag.get(format!("{root}/")).call().unwrap();
    let csp = r
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let html = r.body_mut().read_to_string().unwrap();
    assert!(!html.contains("<script>"), "inline script in the page");
    let js = ag
        .get(format!("{root}/console.js"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        !js.contains("localStorage") && !js.contains("#token"),
        "{js}"
    );

    // The token is exchanged once for a cookie scripts cannot read.
    let r = ag
        .post(format!("{}/session", a.base()))
        .header("Authorization", format!("Bearer {}", a.token()))
        .send_empty()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let cookie = r
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let with_cookie = |req: ureq::RequestBuilder<ureq::typestate::WithoutBody>| {
        req.header("Cookie", &session)
            .call()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(with_cookie(ag.get(format!("{}/status", a.base()))), 200);
    let forged = ag
        .get(format!("{}/status", a.base()))
        .header("Cookie", "chartmesh_session=forged")
        .call()
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);
    // A change made with the cookie must come from the console's own origin, with the
    // session's CSRF token (tests/tests/console.rs covers each case).
    let csrf: serde_json::Value = ag
        .get(format!("{}/session", a.base()))
        .header("Cookie", &session)
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let csrf = csrf["csrf"].as_str().unwrap().to_string();
    let post = |origin: Option<&str>| {
        let mut req = ag
            .post(format!("{}/sync/pause", a.base()))
            .header("Cookie", &session)
            .header("X-Chartmesh-Csrf", &csrf);
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        req.send_json(serde_json::json!({ "peer": "not-a-peer" }))
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(post(None), 403);
    // From the console's origin it reaches the handler (which says the peer is not valid).
    assert_eq!(post(Some(&root)), 422);
    // A session cannot mint sign-in links; `chartmesh console` can, and each works once.
    let r = ag
        .post(format!("{}/session/link", a.base()))
        .header("Cookie", &session)
        .header("Origin", &root)
        .header("X-Chartmesh-Csrf", &csrf)
        .send_empty()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let link = a.cli_json(&["console"])["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(link.starts_with(&format!("{root}/login?code=")), "{link}");
    assert!(!link.contains(&a.token()));
    let r = ag.get(&link).call().unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert!(r.headers().get("set-cookie").is_some());
    assert_eq!(ag.get(&link).call().unwrap().status().as_u16(), 401);
}

/// Issue 11, item 9: NUL, ESC and bidi overrides held in the store were printed raw by the
/// CLI. Now every string from the store is escaped on the terminal (`--json` stays JSON).
#[test]
fn the_cli_escapes_control_characters_from_the_store() {
    let mut a = Practice::new("Escape Clinic");
    a.import_first(2);
    a.stop();
    // Text as an older version or a damaged store may hold it, written directly.
    {
        let key = std::fs::read_to_string(a.dir.join("store.key")).unwrap();
        let c = rusqlite::Connection::open(a.dir.join("store.db")).unwrap();
        c.execute_batch(&format!("PRAGMA key = \"x'{}'\";", key.trim()))
            .unwrap();
        c.execute(
            "UPDATE charts SET family = ?1, given = ?2 WHERE id = 'chart-000001'",
            ["Evil\u{1b}[2J\u{1b}]0;pwned\u{7}", "\u{202e}nimda\0x"],
        )
        .unwrap();
    }
    a.start();
    let mrn = a.get("/charts/chart-000001")["patient"]["mrn"]
        .as_str()
        .unwrap()
        .to_string();
    let out = a.cli_ok(&["chart", "search", &mrn]);
    assert!(out.contains("chart-000001"), "{out}");
    for raw in ['\u{1b}', '\u{7}', '\u{202e}', '\0'] {
        assert!(
            !out.contains(raw),
            "{raw:?} reached the terminal raw: {out:?}"
        );
    }
    assert!(
        out.contains("\\u{1b}[2J") && out.contains("\\u{202e}nimda"),
        "{out}"
    );
    // JSON output stays JSON with the text as stored.
    let v = a.cli_json(&["chart", "search", &mrn]);
    assert_eq!(v["charts"][0]["given"], "\u{202e}nimda\0x");
}

/// Also found by hand: every CLI command panicked (exit 101, a backtrace) when its output
/// pipe closed. Now it stops quietly.
#[test]
fn the_cli_is_quiet_when_its_output_pipe_closes() {
    let a = Practice::new("Pipe Clinic");
    a.import_first(200);
    // The reader is gone before anything is written.
    let (status, err) = closed_pipe(&a, &["status"], false);
    assert_ne!(status.code(), Some(101), "{err}");
    assert!(!err.contains("panicked") && err.is_empty(), "{err}");
    // `chartmesh export | head -1`: far more output than a pipe holds.
    let (status, err) = closed_pipe(&a, &["export"], true);
    assert_ne!(status.code(), Some(101), "{err}");
    assert!(!err.contains("panicked") && err.is_empty(), "{err}");
}

/// Runs the CLI with its stdout a pipe that is closed at once, or after the first line has
/// been read; returns how it ended and what it wrote to stderr.
fn closed_pipe(
    a: &Practice,
    args: &[&str],
    read_first_line: bool,
) -> (std::process::ExitStatus, String) {
    let mut child = KillOnDrop(
        Command::new(bin("chartmesh"))
            .args(["--data-dir", a.dir.to_str().unwrap()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.stdout.take().unwrap();
    if read_first_line {
        let mut first = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .unwrap();
        assert!(first.contains("chart-000001"), "{first}");
    } else {
        drop(stdout);
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

/// A failing test leaves no daemon and no temporary directory behind: the fixture kills
/// its daemon and removes its directory while the panic unwinds.
#[test]
fn a_failing_test_leaves_no_daemon_or_directory_behind() {
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let a = Practice::new("Doomed Clinic");
        *seen.lock().unwrap() = Some((a.pid().unwrap(), a.dir.clone()));
        panic!("a test failing half-way");
    }));
    assert!(r.is_err());
    let (pid, dir) = seen.lock().unwrap().clone().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "daemon {pid} still running"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!dir.parent().unwrap().exists());
}
