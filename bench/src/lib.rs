//! The benchmark runner: starts real `chartmeshd` processes with fresh data directories on
//! 127.0.0.1, drives them through the `chartmesh` CLI exactly as a user would, and measures
//! each phase from outside the processes (wall time, peak RSS from /proc, bytes on disk).
//! A run whose checksum does not match is a failed run, not a slow one.
//!
//! Phases (../shared/bench-data/README.md): load, cold open, initial sync, reconnect no-op
//! (twice), incremental, restart, verify, and peak RSS of both daemons. Between the two
//! daemons sits a counting UDP relay (`relay`), so wire bytes are measured outside them.

pub mod relay;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Options {
    /// `incremental-N.json`: targets and notes per round.
    pub incremental: PathBuf,
    /// Directory holding `chartmeshd` and `chartmesh`.
    pub bin_dir: PathBuf,
    /// The charts to load (JSONL) and their expected set checksum.
    pub charts: PathBuf,
    pub expected_checksum: String,
    pub n: usize,
    pub reps: usize,
    /// Which repetition this is (0-based): picks the incremental round.
    pub rep: usize,
    /// What the link between the two practices does to each datagram, each way (None: a
    /// clean loopback link, the standard run).
    pub link: Option<relay::Impairment>,
    /// Both practices reach each other only through a Syncthing relay server (`strelaysrv`)
    /// on loopback, paired by id with no address; wire bytes are then quinn's count at A.
    pub via_relay: bool,
}

/// A Syncthing relay server on loopback for a relayed run; stopped when dropped.
struct RelayServer {
    child: Child,
    addr: String,
    id: String,
    _dir: tempfile::TempDir,
}

impl RelayServer {
    fn start() -> Result<RelayServer> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = dir.path().join("relay.log");
        let child = Command::new("strelaysrv")
            .arg(format!("-listen={addr}"))
            .args(["-pools=", "-status-srv=", "-nat=false"])
            .arg(format!("-keys={}", dir.path().display()))
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .spawn()
            .context("starting strelaysrv (Debian package syncthing-relaysrv) for --via relay")?;
        let mut server = RelayServer {
            child,
            addr,
            id: String::new(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(rest) = text.split("id=").nth(1) {
                server.id = rest
                    .split(['&', '\n', ' '])
                    .next()
                    .unwrap_or_default()
                    .to_string();
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "strelaysrv did not print its id within 20 s (see {})",
            log.display()
        )
    }
}

impl Drop for RelayServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Daemon {
    dir: PathBuf,
    child: Child,
}

impl Daemon {
    fn start(bin_dir: &Path, dir: &Path) -> Result<Daemon> {
        let _ = std::fs::remove_file(dir.join("api.addr"));
        // CHARTMESH_BENCH_LOG=info keeps each daemon's log next to its data directory.
        let (level, stderr) = match std::env::var("CHARTMESH_BENCH_LOG") {
            Ok(level) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.with_extension("log"))?;
                eprintln!("log: {}", dir.with_extension("log").display());
                (level, Stdio::from(f))
            }
            Err(_) => ("warn".to_string(), Stdio::null()),
        };
        let child = Command::new(bin_dir.join("chartmeshd"))
            .arg("--data-dir")
            .arg(dir)
            .env("CHARTMESH_LOG", level)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting chartmeshd")?;
        let d = Daemon {
            dir: dir.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            // The daemon writes api.addr once it listens; then its API must answer.
            if dir.join("api.addr").exists() && Api::of(dir).and_then(|a| a.get("/status")).is_ok()
            {
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        bail!("chartmeshd did not answer within 30 s")
    }

    /// Peak resident set size of the process so far (VmHWM), in KiB.
    fn peak_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Stops the daemon and returns its peak RSS (KiB). (A run that fails before this
    /// still stops it: see the `Drop`.)
    fn stop_keep_rss(mut self) -> Result<u64> {
        let rss = self.peak_rss_kb();
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let st = self.child.wait()?;
        if !st.success() {
            bail!("chartmeshd in {} exited with {st}", self.dir.display());
        }
        Ok(rss)
    }
}

/// A daemon left running by a failed run (an early `?`, a panic) is killed, never left
/// behind. After a clean stop this does nothing (the child was already waited for).
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(bin_dir: &Path, dir: &Path, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(bin_dir.join("chartmesh"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env("CHARTMESH_USER", "bench")
        .output()?)
}

fn cli_ok(bin_dir: &Path, dir: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let o = cli(bin_dir, dir, args)?;
    if !o.status.success() {
        bail!(
            "chartmesh {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(o.stdout)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let m = match e.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            total += if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            };
        }
    }
    total
}

fn checksum_of(jsonl: &[u8]) -> Result<(usize, String)> {
    let mut s = chartmesh_core::canonical::SetChecksum::default();
    for line in jsonl.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(line)?;
        s.add(v["id"].as_str().unwrap_or_default(), &v);
    }
    Ok((s.count(), s.finish()))
}

/// One repetition: every phase, on fresh data directories.
pub fn run_once(o: &Options) -> Result<Value> {
    let guard = tempfile::tempdir()?;
    let root = guard.path().to_path_buf();
    let _guard = if std::env::var("CHARTMESH_BENCH_LOG").is_ok() {
        // Keep the data directories and logs for inspection.
        eprintln!("data directories kept in {}", guard.keep().display());
        None
    } else {
        Some(guard)
    };
    let relay_server = if o.via_relay {
        Some(RelayServer::start()?)
    } else {
        None
    };
    let relay_args: Vec<&str> = match &relay_server {
        Some(r) => vec!["--relay", &r.addr, "--relay-id", &r.id],
        None => vec![],
    };
    let a = root.join("a");
    let mut init_a = vec![
        "init",
        "--name",
        "Bench A",
        "--api",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
    ];
    init_a.extend(&relay_args);
    cli_ok(&o.bin_dir, &a, &init_a)?;
    let da = Daemon::start(&o.bin_dir, &a)?;

    // 1. load: import the N charts into A durably.
    let t = Instant::now();
    let out = cli_ok(
        &o.bin_dir,
        &a,
        &["--json", "import", o.charts.to_str().unwrap()],
    )?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let report: Value = serde_json::from_slice(&out)?;
    if report["imported"].as_u64() != Some(o.n as u64) {
        bail!(
            "load imported {} charts, expected {}",
            report["imported"],
            o.n
        );
    }
    let load_rss = da.peak_rss_kb();
    let exported = cli_ok(&o.bin_dir, &a, &["export"])?;
    let (count, sum) = checksum_of(&exported)?;
    let load_ok = count == o.n && sum == o.expected_checksum;
    if !load_ok {
        bail!(
            "checksum after load: {count} charts, {sum}; expected {} and {}",
            o.n,
            o.expected_checksum
        );
    }
    let mut a_max = da.peak_rss_kb();
    a_max = a_max.max(da.stop_keep_rss()?);
    let disk = dir_bytes(&a);

    // 2. cold open: a fresh process opens A's store and reads one chart.
    let first_id = {
        let line = exported.split(|b| *b == b'\n').next().unwrap_or_default();
        serde_json::from_slice::<Value>(line)?["id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let t = Instant::now();
    let shown = cli_ok(
        &o.bin_dir,
        &a,
        &["--json", "chart", "show", "--offline", &first_id],
    )?;
    let cold_ms = t.elapsed().as_secs_f64() * 1e3;
    let v: Value = serde_json::from_slice(&shown)?;
    if v["id"] != first_id.as_str() {
        bail!("cold open read the wrong chart");
    }

    // Sync phases: A (restarted on its store) and B (fresh), each reaching the other
    // through its own counting relay.
    let da = Daemon::start(&o.bin_dir, &a)?;
    let b = root.join("b");
    let b_listen = format!("127.0.0.1:{}", free_udp_port()?);
    let mut init_b = vec![
        "init",
        "--name",
        "Bench B",
        "--api",
        "127.0.0.1:0",
        "--listen",
        &b_listen,
    ];
    init_b.extend(&relay_args);
    cli_ok(&o.bin_dir, &b, &init_b)?;
    let mut db = Daemon::start(&o.bin_dir, &b)?;
    let id_a = practice_id(&o.bin_dir, &a)?;
    let id_b = practice_id(&o.bin_dir, &b)?;
    let relay_to_a = relay::Relay::start_impaired(sync_addr(&a)?, o.link)?;
    let relay_to_b = relay::Relay::start_impaired(b_listen.parse()?, o.link)?;
    // Through the relay the UDP relays carry nothing: A's own count (quinn's, every byte of
    // every connection since A started, both ways) is the wire.
    let a_bytes = || -> u64 {
        Api::of(&a)
            .and_then(|api| api.get("/status"))
            .map(|s| {
                s["sync"]["bytesSent"].as_u64().unwrap_or(0)
                    + s["sync"]["bytesReceived"].as_u64().unwrap_or(0)
            })
            .unwrap_or(0)
    };
    let wire = || {
        if o.via_relay {
            a_bytes()
        } else {
            relay_to_a.bytes() + relay_to_b.bytes()
        }
    };
    let (to_b, to_a) = (relay_to_b.addr.to_string(), relay_to_a.addr.to_string());
    let mut add_b = vec!["peer", "add", &id_b, "--name", "Bench B"];
    let mut add_a = vec!["peer", "add", &id_a, "--name", "Bench A"];
    if !o.via_relay {
        add_b.extend(["--addr", &to_b]);
        add_a.extend(["--addr", &to_a]);
    }
    cli_ok(&o.bin_dir, &a, &add_b)?;
    cli_ok(&o.bin_dir, &b, &add_a)?;
    sync_wait(&o.bin_dir, &b, &id_a)?;

    // 3. initial sync: from the grant until all N are durable in B (B's pull complete).
    let (api_a, api_b) = (Api::of(&a)?, Api::of(&b)?);
    let w0 = wire();
    let t = Instant::now();
    api_a.post(
        "/shares",
        &json!({ "peer": id_b, "all": true, "purpose": "replica" }),
    )?;
    // A's view: B confirmed it holds everything shared with it, durably.
    api_a.wait_in_sync(&id_b)?;
    let initial_ms = t.elapsed().as_secs_f64() * 1e3;
    let initial_wire = wire() - w0;
    let (count, sum) = checksum_of(&cli_ok(&o.bin_dir, &b, &["export"])?)?;
    let initial_ok = count == o.n && sum == o.expected_checksum;
    if !initial_ok {
        bail!(
            "checksum after initial sync: {count} charts, {sum}; expected {} and {}",
            o.n,
            o.expected_checksum
        );
    }
    sync_wait(&o.bin_dir, &a, &id_b)?;

    // 4. reconnect no-op, twice: B drops the connection and reconnects, nothing changed.
    let mut reconnects = Vec::new();
    for _ in 0..2 {
        cli_ok(&o.bin_dir, &b, &["sync", "pause", "--peer", &id_a])?;
        let w0 = wire();
        let t = Instant::now();
        api_b.post("/sync/resume", &json!({ "peer": id_a }))?;
        api_b.wait_in_sync(&id_a)?;
        api_a.wait_in_sync(&id_b)?;
        reconnects.push(json!({ "ms": t.elapsed().as_secs_f64() * 1e3, "wireBytes": wire() - w0 }));
    }

    // 5. incremental: while B is offline, A appends the round's note to the 10 targets.
    let incremental;
    {
        let inc_path = &o.incremental;
        let inc: Value = serde_json::from_slice(&std::fs::read(inc_path)?)?;
        let rounds = inc["rounds"]
            .as_object()
            .map(|r| r.len())
            .unwrap_or(0)
            .max(1);
        let round = (o.rep % rounds) + 1;
        let r = &inc["rounds"][round.to_string()];
        cli_ok(&o.bin_dir, &b, &["sync", "pause", "--peer", &id_a])?;
        for target in inc["incrementalTargets"].as_array().into_iter().flatten() {
            let id = target.as_str().unwrap_or_default();
            let note = &r["notes"][id];
            cli_ok(
                &o.bin_dir,
                &a,
                &[
                    "note",
                    "add",
                    id,
                    "--id",
                    note["id"].as_str().unwrap_or_default(),
                    "--author",
                    note["author"].as_str().unwrap_or_default(),
                    "--date",
                    note["date"].as_str().unwrap_or_default(),
                    "--text",
                    note["text"].as_str().unwrap_or_default(),
                ],
            )?;
        }
        let w0 = wire();
        let t = Instant::now();
        api_b.post("/sync/resume", &json!({ "peer": id_a }))?;
        api_b.wait_in_sync(&id_a)?;
        api_a.wait_in_sync(&id_b)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let bytes = wire() - w0;
        let expected = r["checksumAfter"].as_str().unwrap_or_default();
        let (count, sum) = checksum_of(&cli_ok(&o.bin_dir, &b, &["export"])?)?;
        let ok = count == o.n && sum == expected;
        if !ok {
            bail!(
                "checksum after the incremental phase (round {round}): {count} charts, {sum}; expected {expected}"
            );
        }
        sync_wait(&o.bin_dir, &a, &id_b)?;
        incremental = json!({ "ms": ms, "wireBytes": bytes, "checksumOk": ok, "round": round });
    }

    // 6. restart: B's process restarts on its store; from spawn until in sync again.
    let mut b_max = db.peak_rss_kb().max(db.stop_keep_rss()?);
    let w0 = wire();
    let t = Instant::now();
    db = Daemon::start(&o.bin_dir, &b)?;
    Api::of(&b)?.wait_in_sync(&id_a)?;
    api_a.wait_in_sync(&id_b)?;
    let restart_ms = t.elapsed().as_secs_f64() * 1e3;
    let restart_wire = wire() - w0;
    sync_wait(&o.bin_dir, &a, &id_b)?;
    b_max = b_max.max(db.stop_keep_rss()?);
    a_max = a_max.max(da.stop_keep_rss()?);

    // Not a reference phase, so after the run's peak RSS was taken: the due list over every
    // chart of A, on a fresh A process (a fixed day, so runs compare), and A's peak RSS for it.
    let da = Daemon::start(&o.bin_dir, &a)?;
    let t = Instant::now();
    let due = Api::of(&a)?.get("/due?today=2026-06-01")?;
    let due_ms = t.elapsed().as_secs_f64() * 1e3;
    if due["charts"].as_u64() != Some(o.n as u64) {
        bail!("the due list covered {} charts, not {}", due["charts"], o.n);
    }
    let due_patients = due["patients"].as_array().map_or(0, |p| p.len());
    let due_rss = da.stop_keep_rss()?;

    // 7. verify: a fresh process opens B's store.
    let (vcount, vsum) = checksum_of(&cli_ok(&o.bin_dir, &b, &["export", "--offline"])?)?;
    let expected_final = {
        let inc: Value = serde_json::from_slice(&std::fs::read(&o.incremental)?)?;
        inc["rounds"][incremental["round"].to_string()]["checksumAfter"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let verify_ok = vcount == o.n && vsum == expected_final;
    if !verify_ok {
        bail!(
            "verify: B's store holds {vcount} charts, {vsum}; expected {} and {expected_final}",
            o.n
        );
    }

    Ok(json!({
        "load": { "ms": load_ms, "docsPerSec": o.n as f64 / (load_ms / 1e3), "maxRssKB": load_rss, "diskBytes": disk, "checksumOk": load_ok },
        "cold": { "processWallMs": cold_ms },
        "due": { "ms": due_ms, "patients": due_patients, "maxRssKB": due_rss },
        "initial": { "ms": initial_ms, "wireBytes": initial_wire, "checksumOk": initial_ok },
        "reconnect1": reconnects[0],
        "reconnect2": reconnects[1],
        "incremental": incremental,
        "restart": { "ms": restart_ms, "wireBytes": restart_wire },
        "verify": { "count": vcount, "checksumOk": verify_ok },
        "rss": { "aMaxKB": a_max, "bMaxKB": b_max },
    }))
}

/// The daemon's local API, for the timed parts of the sync phases (a CLI process per poll
/// would measure process start-up, not sync).
struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    fn of(dir: &Path) -> Result<Api> {
        let addr = std::fs::read_to_string(dir.join("api.addr"))?;
        Ok(Api {
            base: format!("http://{}/api/v1", addr.trim()),
            token: std::fs::read_to_string(dir.join("api-token"))?
                .trim()
                .to_string(),
            agent: ureq::Agent::new_with_defaults(),
        })
    }

    fn get(&self, path: &str) -> Result<Value> {
        Ok(self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", &format!("Bearer {}", self.token))
            .call()?
            .body_mut()
            .read_json()?)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        Ok(self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("X-Chartmesh-User", "bench")
            .send_json(body)?
            .body_mut()
            .read_json()?)
    }

    /// Waits until `peer` is connected and in sync both ways, as this daemon sees it.
    fn wait_in_sync(&self, peer: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let v = self.get("/sync")?;
            let ok = v["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["id"] == peer && p["connected"] == true && p["inSync"] == true);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not in sync with {peer} after 300 s: {v}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn practice_id(bin_dir: &Path, dir: &Path) -> Result<String> {
    let v: Value = serde_json::from_slice(&cli_ok(bin_dir, dir, &["--json", "id"])?)?;
    Ok(v["id"].as_str().context("practice id")?.to_string())
}

fn sync_addr(dir: &Path) -> Result<std::net::SocketAddr> {
    Ok(std::fs::read_to_string(dir.join("sync.addr"))?
        .trim()
        .parse()?)
}

fn sync_wait(bin_dir: &Path, dir: &Path, peer: &str) -> Result<()> {
    cli_ok(
        bin_dir,
        dir,
        &["sync", "wait", "--peer", peer, "--timeout", "300"],
    )
    .map(|_| ())
}

pub fn run(o: &Options) -> Result<Vec<Value>> {
    (0..o.reps)
        .map(|rep| run_once(&Options { rep, ..o.clone() }))
        .collect()
}

/// A markdown table: median (min–max) over reps for each figure.
/// (figure, JSON pointer, decimals, PouchDB at N=1,000, PouchDB at N=10,000): the reference
/// figures of `../shared/bench-data/reference.md` (median of 3 at 1,000; one run at 10,000).
const ROWS: &[(&str, &str, usize, &str, &str)] = &[
    ("due list: peak RSS of A (KB)", "/due/maxRssKB", 0, "", ""),
    (
        "due list over all charts (ms; not a reference phase)",
        "/due/ms",
        0,
        "",
        "",
    ),
    ("load: charts/s", "/load/docsPerSec", 0, "5,938", "8,479"),
    ("load: ms", "/load/ms", 0, "", ""),
    (
        "load: peak RSS (KB)",
        "/load/maxRssKB",
        0,
        "120 MB",
        "252 MB",
    ),
    (
        "load: bytes on disk",
        "/load/diskBytes",
        0,
        "5.4 MB",
        "33 MB",
    ),
    (
        "cold open + read one chart (ms)",
        "/cold/processWallMs",
        1,
        "215",
        "213",
    ),
    ("initial sync (ms)", "/initial/ms", 0, "676", "5,000"),
    (
        "initial sync: wire bytes",
        "/initial/wireBytes",
        0,
        "740 KB",
        "7.4 MB",
    ),
    (
        "reconnect no-op 1 (ms)",
        "/reconnect1/ms",
        1,
        "276",
        "2,700",
    ),
    (
        "reconnect no-op 1: wire bytes",
        "/reconnect1/wireBytes",
        0,
        "110 KB",
        "1.2 MB",
    ),
    ("reconnect no-op 2 (ms)", "/reconnect2/ms", 1, "16", "13"),
    (
        "reconnect no-op 2: wire bytes",
        "/reconnect2/wireBytes",
        0,
        "5.1 KB",
        "5.1 KB",
    ),
    (
        "incremental, 10 notes (ms)",
        "/incremental/ms",
        1,
        "30",
        "38",
    ),
    (
        "incremental: wire bytes",
        "/incremental/wireBytes",
        0,
        "19 KB",
        "19 KB",
    ),
    ("restart B + reconnect (ms)", "/restart/ms", 1, "57", "89"),
    (
        "restart: wire bytes",
        "/restart/wireBytes",
        0,
        "7.9 KB",
        "7.9 KB",
    ),
    ("verify: charts in B", "/verify/count", 0, "", ""),
    ("peak RSS A (KB)", "/rss/aMaxKB", 0, "123 MB", "199 MB"),
    ("peak RSS B (KB)", "/rss/bMaxKB", 0, "138 MB", "215 MB"),
];

/// A markdown table: median (min–max) over reps for each figure, beside PouchDB's figure at
/// the same N (when N is 1,000 or 10,000).
pub fn table(reps: &[Value], n: usize) -> String {
    let mut s =
        String::from("| figure | median (min–max) | PouchDB (reference) |\n|---|---:|---:|\n");
    for &(name, ptr, digits, at_1k, at_10k) in ROWS {
        let reference = match n {
            1000 => at_1k,
            10000 => at_10k,
            _ => "",
        };
        let mut v: Vec<f64> = reps
            .iter()
            .filter_map(|r| r.pointer(ptr).and_then(|x| x.as_f64()))
            .collect();
        if v.is_empty() {
            continue;
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let f = |x: f64| format!("{x:.digits$}");
        s.push_str(&format!(
            "| {name} | {} ({}–{}) | {reference} |\n",
            f(v[v.len() / 2]),
            f(v[0]),
            f(v[v.len() - 1])
        ));
    }
    s
}

/// The charts of a run, their expected checksum, and the incremental phase's file.
pub struct Dataset {
    pub charts: PathBuf,
    pub checksum: String,
    pub incremental: PathBuf,
    /// Where a smoke run's files were made; removed with the dataset.
    _made_in: Option<tempfile::TempDir>,
}

/// The dataset for N charts: the bench-data set for 1000 or 10000, or for a smoke run the
/// first N charts of the 1000 set with an incremental file made here in the same format
/// (10 targets, one note per round, `checksumAfter` computed by our own checksum code).
pub fn dataset(data: &Path, n: usize) -> Result<Dataset> {
    let full = data.join(format!("charts-{n}.jsonl"));
    if full.exists() {
        let m: Value = serde_json::from_slice(&std::fs::read(
            data.join(format!("charts-{n}.manifest.json")),
        )?)?;
        return Ok(Dataset {
            charts: full,
            checksum: m["checksum"].as_str().unwrap_or_default().to_string(),
            incremental: data.join(format!("incremental-{n}.json")),
            _made_in: None,
        });
    }
    let src = std::fs::read(data.join("charts-1000.jsonl"))
        .with_context(|| format!("reading {}", data.display()))?;
    let lines: Vec<&[u8]> = src
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .take(n)
        .collect();
    if lines.len() < n {
        bail!("N = {n} is more than the 1000 charts available for a prefix run; use 1000 or 10000");
    }
    let mut body = lines.join(&b'\n');
    body.push(b'\n');
    let made_in = tempfile::Builder::new()
        .prefix("chartmesh-bench-")
        .tempdir()?;
    let path = made_in.path().join(format!("charts-{n}.jsonl"));
    std::fs::write(&path, &body)?;
    let charts: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_slice(l))
        .collect::<Result<_, _>>()?;
    let step = (n / 10).max(1);
    let targets: Vec<String> = charts
        .iter()
        .step_by(step)
        .take(10)
        .map(|c| c["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut rounds = serde_json::Map::new();
    for round in 1..=3 {
        let mut notes = serde_json::Map::new();
        let mut sum = chartmesh_core::canonical::SetChecksum::default();
        for c in &charts {
            let id = c["id"].as_str().unwrap_or_default();
            let mut c = c.clone();
            if targets.iter().any(|t| t == id) {
                let note = json!({
                    "id": format!("{id}-inc-{round}"), "author": "Nurse Bench",
                    "date": "2025-11-20T10:15:00Z", "text": format!("Round {round} follow-up for {id}."),
                });
                c["notes"]
                    .as_array_mut()
                    .context("notes")?
                    .push(note.clone());
                notes.insert(id.to_string(), note);
            }
            sum.add(id, &c);
        }
        rounds.insert(
            round.to_string(),
            json!({ "checksumAfter": sum.finish(), "notes": notes }),
        );
    }
    let incremental = made_in.path().join(format!("incremental-{n}.json"));
    std::fs::write(
        &incremental,
        serde_json::to_vec(&json!({ "n": n, "incrementalTargets": targets, "rounds": rounds }))?,
    )?;
    Ok(Dataset {
        charts: path,
        checksum: checksum_of(&body)?.1,
        incremental,
        _made_in: Some(made_in),
    })
}
