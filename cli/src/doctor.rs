//! `chartmesh doctor`: checks a practice's setup and says, for each problem, what to do.
//! Works with the daemon running or stopped: what needs the daemon (peers, its view of the
//! audit log) is asked of it; what does not (files, permissions, the store's pages, the last
//! backup) is read from the data directory, read-only. Nothing is changed.
//!
//! Exit codes: 0 when no check failed (warnings allowed), 1 when one did.

use anyhow::Result;
use chartmesh_datadir::datadir;
use serde::Serialize;
use serde_json::{Value, json};
use std::path::Path;

use crate::client::{CliError, Client};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Info,
    Warn,
    Fail,
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do about it (for warnings and failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

struct Report(Vec<Finding>);

impl Report {
    fn add(&mut self, check: &'static str, status: Status, detail: impl Into<String>) {
        self.0.push(Finding {
            check,
            status,
            detail: detail.into(),
            fix: None,
        });
    }
    fn bad(
        &mut self,
        check: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.0.push(Finding {
            check,
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        });
    }
}

pub fn run(dir: &Path, user: &str, json_out: bool) -> Result<()> {
    let findings = check(dir, user);
    let failed = findings.iter().any(|f| f.status == Status::Fail);
    let v = json!({ "ok": !failed, "dataDir": dir.display().to_string(), "findings": findings });
    crate::print(json_out, &v, |_| {
        let mut t = crate::output::table(&["check", "", "finding", "what to do"]);
        for f in &findings {
            let mark = match f.status {
                Status::Ok => "ok",
                Status::Info => "info",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            t.add_row(vec![
                f.check.to_string(),
                mark.to_string(),
                crate::output::esc(&f.detail).into_owned(),
                crate::output::esc(f.fix.as_deref().unwrap_or("")).into_owned(),
            ]);
        }
        println!("{t}");
        let n = |s: Status| findings.iter().filter(|f| f.status == s).count();
        println!(
            "{} failed, {} warning(s), {} ok.",
            n(Status::Fail),
            n(Status::Warn),
            n(Status::Ok)
        );
    });
    if failed {
        return Err(CliError::Reported(1).into());
    }
    Ok(())
}

/// Every check, in order; later checks are skipped when what they need is missing.
pub fn check(dir: &Path, user: &str) -> Vec<Finding> {
    let mut r = Report(Vec::new());
    let d = dir.display();
    if let Some(problem) = datadir::unreadable(dir) {
        r.bad(
            "data directory",
            Status::Fail,
            problem,
            "run doctor as the daemon's user (e.g. `sudo -u chartmesh chartmesh doctor`)",
        );
        return r.0;
    }
    if !datadir::is_initialized(dir) {
        r.bad(
            "data directory",
            Status::Fail,
            format!("no chartmesh data directory at {d}"),
            "give the daemon's directory with --data-dir (the service uses /var/lib/chartmesh), or create one: chartmesh init --name NAME",
        );
        return r.0;
    }
    r.add("data directory", Status::Ok, format!("{d}"));
    let config = match chartmesh_datadir::config::Config::load(&dir.join(datadir::CONFIG)) {
        Ok(c) => Some(c),
        Err(e) => {
            r.bad(
                "config",
                Status::Fail,
                e.to_string(),
                "correct config.toml (docs/OPERATIONS.md, \"Configuration\"); the daemon will not start until then",
            );
            None
        }
    };
    permissions(&mut r, dir);

    // The daemon and the service.
    let running = datadir::daemon_running(dir);
    let client = if running {
        Client::connect(dir, user).ok()
    } else {
        None
    };
    let status = client.as_ref().and_then(|c| c.get("/status").ok());
    match (&status, running) {
        (Some(s), _) => r.add(
            "daemon",
            Status::Ok,
            format!(
                "running: practice {:?}, {} charts, API {}",
                s["practice"]["name"].as_str().unwrap_or(""),
                s["charts"],
                s["api"].as_str().unwrap_or("")
            ),
        ),
        (None, true) => r.bad(
            "daemon",
            Status::Fail,
            "the data directory is locked (a daemon or an offline command holds it) but the API does not answer",
            "wait for an offline command (restore, key rotate) to finish; else the daemon is stuck: see its log (journalctl -u chartmeshd) and restart it",
        ),
        (None, false) => r.bad(
            "daemon",
            Status::Fail,
            "chartmeshd is not running: nothing syncs and the CLI and console do not work",
            format!(
                "start it: `systemctl start chartmeshd` (installed as a service), else `chartmeshd --data-dir {d}`"
            ),
        ),
    }
    service(&mut r);
    if let Some(c) = &config {
        ports(&mut r, c, status.as_ref(), dir);
    }
    if let Some(s) = &status {
        port_mapping(&mut r, &s["sync"]["portMapping"]);
    }
    disk(&mut r, dir);
    store(&mut r, dir, client.as_ref());
    certificate(&mut r, dir);
    last_backup(&mut r, dir, config.as_ref());
    peers(&mut r, client.as_ref());
    r.0
}

fn permissions(r: &mut Report, dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| m.permissions().mode() & 0o777)
        };
        let mut bad = false;
        for (rel, allowed) in [
            ("store.key", 0o600),
            ("identity/key.der", 0o600),
            ("api-token", 0o640),
            (datadir::CONFIG, 0o640),
        ] {
            let p = dir.join(rel);
            if let Some(m) = mode(&p)
                && m & !allowed != 0
            {
                bad = true;
                r.bad(
                    "permissions",
                    Status::Fail,
                    format!(
                        "{} is mode {m:04o}: readable by {}",
                        p.display(),
                        if m & 0o004 != 0 {
                            "every user of this computer"
                        } else {
                            "more than the daemon's user"
                        }
                    ),
                    format!("chmod {:04o} {}", allowed, p.display()),
                );
            }
        }
        if let Some(m) = mode(dir)
            && m & 0o007 != 0
        {
            bad = true;
            r.bad(
                "permissions",
                Status::Fail,
                format!("{} is mode {m:04o}: other users may enter it", dir.display()),
                format!(
                    "chmod 0750 {} (staff get access through the daemon's group: docs/OPERATIONS.md, \"Staff access\")",
                    dir.display()
                ),
            );
        }
        if !bad {
            r.add(
                "permissions",
                Status::Ok,
                "key files are private to the daemon's user",
            );
        }
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        r.add("permissions", Status::Skip, "not checked on this system");
    }
}

fn service(r: &mut Report) {
    #[cfg(target_os = "linux")]
    {
        let Ok(out) = std::process::Command::new("systemctl")
            .args(["is-active", "chartmeshd.service"])
            .output()
        else {
            r.add("service", Status::Skip, "no systemd here");
            return;
        };
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match state.as_str() {
            "active" => r.add("service", Status::Ok, "chartmeshd.service is active"),
            "inactive" | "failed" => r.bad(
                "service",
                Status::Warn,
                format!("chartmeshd.service is {state}"),
                "systemctl start chartmeshd; journalctl -u chartmeshd -n 50 says why it stopped",
            ),
            _ => r.add(
                "service",
                Status::Info,
                "not installed as a system service (chartmesh service install)",
            ),
        }
    }
    #[cfg(not(target_os = "linux"))]
    r.add(
        "service",
        Status::Skip,
        "services are checked on Linux only (docs/OPERATIONS.md)",
    );
}

fn ports(
    r: &mut Report,
    c: &chartmesh_datadir::config::Config,
    status: Option<&Value>,
    dir: &Path,
) {
    match status {
        Some(s) => {
            let sync = s["sync"]["listen"].as_str().unwrap_or("").to_string();
            let loopback = sync
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip().is_loopback());
            if loopback {
                r.bad(
                    "ports",
                    Status::Warn,
                    format!("sync listens on {sync}: only this computer can connect"),
                    format!(
                        "to let other practices connect set [sync] listen = \"0.0.0.0:{}\" in {} and allow that UDP port in the firewall",
                        c.sync.listen.port(),
                        dir.join(datadir::CONFIG).display()
                    ),
                );
            } else {
                r.add(
                    "ports",
                    Status::Ok,
                    format!(
                        "API {} (loopback), sync {sync} (UDP)",
                        s["api"].as_str().unwrap_or("")
                    ),
                );
            }
        }
        None => {
            // The daemon is stopped: would it be able to listen?
            let mut busy = Vec::new();
            if c.api.listen.port() != 0 && std::net::TcpListener::bind(c.api.listen).is_err() {
                busy.push(format!("API {} (TCP)", c.api.listen));
            }
            if c.sync.listen.port() != 0 && std::net::UdpSocket::bind(c.sync.listen).is_err() {
                busy.push(format!("sync {} (UDP)", c.sync.listen));
            }
            if busy.is_empty() {
                r.add(
                    "ports",
                    Status::Ok,
                    format!("{} and {} are free", c.api.listen, c.sync.listen),
                );
            } else {
                r.bad(
                    "ports",
                    Status::Fail,
                    format!("in use by another program: {}", busy.join(", ")),
                    "stop that program (ss -lntup shows it), or change api.listen / sync.listen in config.toml",
                );
            }
        }
    }
}

fn disk(r: &mut Report, dir: &Path) {
    match fs4::available_space(dir) {
        Ok(free) => {
            let mb = free / (1024 * 1024);
            let store = std::fs::metadata(datadir::store_path(dir))
                .map(|m| m.len() / (1024 * 1024))
                .unwrap_or(0);
            if mb < 200 {
                r.bad(
                    "disk space",
                    Status::Fail,
                    format!("{mb} MB free on the data directory's disk (store {store} MB)"),
                    "free space now: at a full disk writes are refused (nothing is lost, but nothing new is kept)",
                );
            } else if mb < 1024 || mb < store * 2 {
                r.bad(
                    "disk space",
                    Status::Warn,
                    format!("{mb} MB free (store {store} MB)"),
                    "free some space: a backup or key rotation needs room for a copy of the store",
                );
            } else {
                r.add(
                    "disk space",
                    Status::Ok,
                    format!("{mb} MB free (store {store} MB)"),
                );
            }
        }
        Err(e) => r.add("disk space", Status::Skip, format!("cannot tell: {e}")),
    }
}

fn store(r: &mut Report, dir: &Path, client: Option<&Client>) {
    let key = match datadir::store_key(dir) {
        Ok(k) => k,
        Err(e) => {
            r.bad(
                "store",
                Status::Fail,
                e.to_string(),
                "put back store.key from your key backup (docs/OPERATIONS.md, \"Encryption at rest and backups\")",
            );
            return;
        }
    };
    let path = datadir::store_path(dir);
    if !path.exists() {
        r.add(
            "store",
            Status::Info,
            "no store yet (made at the daemon's first start)",
        );
        return;
    }
    match chartmesh_store::integrity::deep_check(&path, &key) {
        Ok(d) if d.ok() => r.add(
            "store",
            Status::Ok,
            format!(
                "{} pages verified (cipher_integrity_check, integrity_check) in {} ms",
                d.pages, d.millis
            ),
        ),
        Ok(d) => r.bad(
            "store",
            Status::Fail,
            format!(
                "{} damaged page(s), {} structure problem(s): {}",
                d.cipher_problems.len(),
                d.problems.len(),
                d.cipher_problems
                    .first()
                    .or(d.problems.first())
                    .cloned()
                    .unwrap_or_default()
            ),
            "stop the daemon, keep the damaged store aside, restore the last good backup (chartmesh restore FILE); peers send back what they hold",
        ),
        Err(e) => r.bad(
            "store",
            Status::Fail,
            e.to_string(),
            "stop the daemon and restore the last good backup (chartmesh restore FILE)",
        ),
    }
    // The audit chain: through the daemon when it runs, else read-only from the file.
    let report = match client {
        Some(c) => c.get("/audit/verify").map_err(|e| e.to_string()),
        None => chartmesh_store::Store::open_read_only(&path, &key)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                let v = chartmesh_datadir::audit_verify_report(&s).map_err(|e| e.to_string());
                s.close();
                v
            }),
    };
    match report {
        Ok(v) if v["ok"] == true => r.add(
            "audit chain",
            Status::Ok,
            format!("{} entries, hash chain intact", v["entries"]),
        ),
        Ok(v) => r.bad(
            "audit chain",
            Status::Fail,
            format!(
                "broken at entry {}: {}",
                v["firstBadSeq"],
                v["reason"].as_str().unwrap_or("")
            ),
            "the log was changed outside chartmesh: keep this store as evidence (copy the data directory), report it, and restore the last good backup",
        ),
        Err(e) => r.bad(
            "audit chain",
            Status::Fail,
            format!("cannot be read: {e}"),
            "see the store finding above",
        ),
    }
}

fn certificate(r: &mut Report, dir: &Path) {
    let id = match chartmesh_datadir::identity::Identity::load(dir) {
        Ok(i) => i,
        Err(e) => {
            r.bad(
                "certificate",
                Status::Fail,
                e.to_string(),
                "restore identity/ from your backup of the data directory: a new identity is a new practice id every peer must pair again",
            );
            return;
        }
    };
    let now = chartmesh_datadir::now_ms() / 1000;
    match id.validity() {
        None => r.bad(
            "certificate",
            Status::Fail,
            "identity/cert.der does not parse",
            "restore identity/ from your backup of the data directory",
        ),
        Some((from, _)) if from > now => r.bad(
            "certificate",
            Status::Fail,
            format!(
                "not valid yet by this computer's clock (valid from {})",
                chartmesh_datadir::rfc3339(from * 1000)
            ),
            "this computer's clock is behind: set it right (timedatectl set-ntp true)",
        ),
        Some((_, until)) if until < now => r.bad(
            "certificate",
            Status::Fail,
            format!("expired {}", chartmesh_datadir::rfc3339(until * 1000)),
            "peers refuse it: make a new identity (a new practice id) and pair again",
        ),
        Some((_, until)) if until - now < 30 * 86_400 => r.bad(
            "certificate",
            Status::Warn,
            format!("expires {}", chartmesh_datadir::rfc3339(until * 1000)),
            "plan a new identity and pairing before then",
        ),
        Some((_, until)) => r.add(
            "certificate",
            Status::Ok,
            format!(
                "practice {} valid until {}",
                id.id.short(),
                &chartmesh_datadir::rfc3339(until * 1000)[..10]
            ),
        ),
    }
}

fn last_backup(r: &mut Report, dir: &Path, config: Option<&chartmesh_datadir::config::Config>) {
    let schedule = config.and_then(|c| c.backup.schedule().ok().flatten());
    let Some(last) = datadir::last_backup(dir) else {
        r.bad(
            "last backup",
            Status::Warn,
            "no backup recorded",
            "chartmesh backup /media/usb/chartmesh-$(date +%F).db, or set [backup] interval, dir and keep in config.toml",
        );
        return;
    };
    let age_h = (chartmesh_datadir::now_ms() - last.time_ms) / 3_600_000;
    let path = Path::new(&last.path);
    match datadir::verify_backup(dir, path) {
        Err(e) => r.bad(
            "last backup",
            Status::Fail,
            format!("the last backup ({age_h} h old) does not verify: {e}"),
            "make a new backup now (chartmesh backup FILE) and check the disk it was on",
        ),
        Ok(c) => {
            // Overdue: older than two scheduled intervals, or than two days without a schedule.
            let limit_h = schedule
                .map(|(ms, _, _)| 2 * ms / 3_600_000)
                .unwrap_or(48)
                .max(1);
            if age_h > limit_h {
                r.bad(
                    "last backup",
                    Status::Warn,
                    format!("{} is {age_h} h old ({} charts)", last.path, c.charts),
                    "back up now (chartmesh backup FILE); check the backup schedule's log lines",
                );
            } else {
                r.add(
                    "last backup",
                    Status::Ok,
                    format!(
                        "{} ({age_h} h old) verifies: {} charts, {} audit entries",
                        last.path, c.charts, c.audit_entries
                    ),
                );
            }
        }
    }
}

/// The gateway's mapping of the sync port (`sync.port_mapping`), or why there is none.
/// Informational: most practices are reached through the relay or hole punching without it.
fn port_mapping(r: &mut Report, v: &Value) {
    if v.is_null() {
        return;
    }
    match (v["protocol"].as_str(), v["external"].as_str()) {
        (Some(protocol), Some(external)) => r.add(
            "port mapping",
            Status::Ok,
            format!(
                "the router maps {external} to the sync port ({protocol}, lease {} min left)",
                v["leaseLeftS"].as_u64().unwrap_or(0) / 60
            ),
        ),
        _ => r.add(
            "port mapping",
            Status::Info,
            format!(
                "none: {} (peers reach this practice through the relay or hole punching)",
                v["reason"].as_str().unwrap_or("unknown")
            ),
        ),
    }
}

/// Past this, a peer's clock is reported as off: grant expiry and emergency access are
/// instants, so a practice whose clock is off ends or keeps access at the wrong time.
pub const CLOCK_SKEW_LIMIT_MS: i64 = 60_000;

/// Each paired practice: whether it is reachable (how, since when, else why not) and how far
/// its clock is from ours.
fn peers(r: &mut Report, client: Option<&Client>) {
    let Some(c) = client else {
        r.add("peers", Status::Skip, "the daemon is not running");
        r.add(
            "clock",
            Status::Skip,
            "the daemon is not running: the clock skew against peers is measured while connected",
        );
        return;
    };
    let Ok(v) = c.get("/sync") else {
        r.add("peers", Status::Skip, "the daemon did not answer /sync");
        return;
    };
    let list = v["peers"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        r.add(
            "peers",
            Status::Info,
            "no paired practices (chartmesh peer add ID --addr HOST:PORT)",
        );
    }
    let now = chartmesh_datadir::now_ms();
    let ago = |ms: &Value| {
        ms.as_i64()
            .map(|t| {
                let s = (now - t).max(0) / 1000;
                match s {
                    0..120 => format!("last seen {s} s ago"),
                    120..7200 => format!("last seen {} min ago", s / 60),
                    7200..172_800 => format!("last seen {} h ago", s / 3600),
                    _ => format!("last seen {} days ago", s / 86_400),
                }
            })
            .unwrap_or_else(|| "not seen since the daemon started".into())
    };
    let mut measured = 0;
    for p in &list {
        let name = format!(
            "{} ({})",
            p["name"].as_str().unwrap_or(""),
            p["id"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(9)
                .collect::<String>()
        );
        let addr = p["addr"].as_str().unwrap_or("");
        let addr = if addr.is_empty() { "no address" } else { addr };
        if p["paused"] == true {
            r.add(
                "peer",
                Status::Info,
                format!("{name}: paused (chartmesh sync resume --peer …)"),
            );
        } else if p["connected"] == true {
            r.add(
                "peer",
                Status::Ok,
                format!(
                    "{name} at {addr}: connected ({}{}), {}",
                    p["path"].as_str().unwrap_or("direct"),
                    p["rttMs"]
                        .as_u64()
                        .map(|ms| format!(", {ms} ms round trip"))
                        .unwrap_or_default(),
                    if p["inSync"] == true {
                        "in sync".to_string()
                    } else {
                        format!("{} change(s) pending", p["pendingChanges"])
                    }
                ),
            );
        } else {
            let why = p["unreachable"].as_str().map(str::to_string).unwrap_or_else(|| {
                format!(
                    "check that {addr} is right and reachable over UDP, that its daemon runs and that it paired this practice back"
                )
            });
            r.bad(
                "peer",
                Status::Warn,
                format!(
                    "{name} at {addr}: not reachable, {}{}",
                    ago(&p["lastSeenMs"]),
                    p["lastError"]
                        .as_str()
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                ),
                why,
            );
        }
        if let Some(skew) = p["clockSkewMs"].as_i64() {
            measured += 1;
            let secs = skew as f64 / 1000.0;
            let who = name.as_str();
            let dir = if skew > 0 { "ahead of" } else { "behind" };
            if skew.abs() > CLOCK_SKEW_LIMIT_MS {
                r.bad(
                    "clock",
                    Status::Warn,
                    format!(
                        "{who}'s clock is {:.0} s {dir} this practice's (skew {secs:+.0} s): consent expiry and emergency access end at the wrong time",
                        secs.abs()
                    ),
                    "set up NTP on the practice whose clock is off (`timedatectl set-ntp true`, then check `timedatectl status`); compare both with a trusted clock to tell which",
                );
            } else {
                r.add(
                    "clock",
                    Status::Ok,
                    if skew.abs() < 1000 {
                        format!("{who}: clock skew {skew:+} ms")
                    } else {
                        format!("{who}: clock skew {secs:+.1} s")
                    },
                );
            }
        }
    }
    if measured == 0 && !list.is_empty() {
        r.add(
            "clock",
            Status::Skip,
            "no peer's clock measured yet (it is measured when a connected peer pulls; older versions do not send it)",
        );
    }
}
