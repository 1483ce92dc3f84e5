//! Shared fixtures for the end-to-end tests: real `chartmeshd` processes on 127.0.0.1 with
//! their own data directories, the real `chartmesh` CLI, and the benchmark charts.
//! Waiting is always on a condition with a deadline, never a bare sleep.
//!
//! Nothing is left behind, on any path: a [`Practice`] kills its daemon and removes its
//! temporary directory when dropped (also while a failed test unwinds), and any other
//! process a test starts is held in a [`KillOnDrop`].

pub mod mesh;
pub mod netns;
pub mod raw_peer;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/` — where cargo put the binaries next to this test executable.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("deps dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    dir.to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        p.display()
    );
    p
}

/// The shared benchmark data (`../shared/bench-data` beside the repository), or
/// `$CHARTMESH_BENCH_DATA`.
pub fn bench_data() -> PathBuf {
    if let Some(p) = std::env::var_os("CHARTMESH_BENCH_DATA") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench-data");
    assert!(
        p.join("charts-1000.jsonl").exists(),
        "benchmark charts not found at {} (set CHARTMESH_BENCH_DATA)",
        p.display()
    );
    p
}

pub fn manifest_checksum(n: usize) -> String {
    let m: Value = serde_json::from_slice(
        &std::fs::read(bench_data().join(format!("charts-{n}.manifest.json"))).unwrap(),
    )
    .unwrap();
    m["checksum"].as_str().unwrap().to_string()
}

/// Waits for `cond` to hold, polling, up to `timeout`; panics with `what` if it never does.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A UDP port on 127.0.0.1 that is free right now.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Pairs two practices both ways (each adds the other with its sync address).
pub fn pair(a: &Practice, b: &Practice) {
    for (x, y) in [(a, b), (b, a)] {
        let name = y.get("/status")["practice"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        x.cli_ok(&[
            "peer",
            "add",
            &y.id(),
            "--addr",
            &y.sync_addr(),
            "--name",
            &name,
        ]);
    }
}

/// Waits until `a` sees `b` connected.
pub fn wait_connected(a: &Practice, b: &Practice) {
    let id = b.id();
    wait_until("the practices to connect", Duration::from_secs(60), || {
        a.get("/sync")["peers"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["id"] == id && p["connected"] == true))
    });
}

/// A child process killed (and reaped) when dropped, so a failing test cannot leave it
/// running.
/// A Syncthing relay server (`strelaysrv`, Debian's syncthing-relaysrv) run by a test, in
/// network namespace `netns` when given, listening on `listen`; stopped when dropped.
pub struct RelayServer {
    _child: KillOnDrop,
    /// Where it listens (HOST:PORT).
    pub addr: String,
    /// Its id (the SHA-256 of its certificate), as `--relay-id` takes it.
    pub id: String,
    _dir: tempfile::TempDir,
}

impl RelayServer {
    /// Starts it (no pool, no status server) and waits for it to print its id.
    pub fn start(netns: Option<&str>, listen: &str) -> RelayServer {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("relay.log");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "strelaysrv"]);
                c
            }
            None => Command::new("strelaysrv"),
        };
        let child = cmd
            .arg(format!("-listen={listen}"))
            .args(["-pools=", "-status-srv=", "-nat=false"])
            .arg(format!("-keys={}", dir.path().display()))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("strelaysrv starts");
        let child = KillOnDrop(child);
        let mut id = String::new();
        wait_until(
            "the relay to print its URI",
            std::time::Duration::from_secs(20),
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                match text.split("id=").nth(1) {
                    Some(rest) => {
                        id = rest.split(['&', '\n', ' ']).next().unwrap().to_string();
                        true
                    }
                    None => false,
                }
            },
        );
        RelayServer {
            _child: child,
            addr: listen.to_string(),
            id,
            _dir: dir,
        }
    }
}

pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Processes named `name` whose parent is this test process and that are still running
/// (not exited and waiting to be reaped). Linux only (reads /proc); empty elsewhere.
pub fn live_children(name: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces, so split after the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let mut rest = stat[close + 1..].split_whitespace();
        let (state, ppid) = (rest.next(), rest.next().and_then(|p| p.parse::<u32>().ok()));
        if comm == name && ppid == Some(me) && state != Some("Z") {
            out.push(pid);
        }
    }
    out
}

/// One practice: a data directory and, while started, its daemon process.
pub struct Practice {
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    agent: ureq::Agent,
    /// Extra environment for the daemon process (e.g. FAILPOINTS, faketime).
    env: Vec<(String, String)>,
    /// The network namespace the daemon and CLI run in (None: this one).
    netns: Option<String>,
}

impl Practice {
    /// A new practice in a fresh temporary directory, initialised through the CLI with
    /// ephemeral loopback ports.
    pub fn new(name: &str) -> Practice {
        Self::new_in(&std::env::temp_dir(), name)
    }

    /// [`Practice::new`] with its temporary directory (data directory and log) under `base`.
    pub fn new_in(base: &Path, name: &str) -> Practice {
        Self::new_in_with(base, name, &[])
    }

    /// [`Practice::new`] initialised with `init_args` added (e.g. `--relay ADDR --relay-id ID`).
    pub fn new_with(name: &str, init_args: &[&str]) -> Practice {
        Self::new_in_with(&std::env::temp_dir(), name, init_args)
    }

    fn new_in_with(base: &Path, name: &str, init_args: &[&str]) -> Practice {
        let mut p = Practice::unstarted(tempfile::tempdir_in(base).unwrap(), None);
        // A fixed sync port (picked free now), so peers can reach it again after a restart.
        let listen = format!("127.0.0.1:{}", free_udp_port());
        let mut args = vec![
            "init",
            "--name",
            name,
            "--api",
            "127.0.0.1:0",
            "--listen",
            &listen,
        ];
        args.extend_from_slice(init_args);
        let out = p.cli(&args);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        p.start();
        p
    }

    /// A practice whose daemon and CLI run in network namespace `ns`, its sync endpoint on
    /// every address there (port 7361), initialised with `init_args` added (e.g. `--relay`).
    pub fn new_in_netns(name: &str, ns: &str, init_args: &[&str]) -> Practice {
        let mut p = Practice::unstarted(tempfile::tempdir().unwrap(), Some(ns.to_string()));
        let mut args = vec![
            "init",
            "--name",
            name,
            "--api",
            "127.0.0.1:0",
            "--listen",
            "0.0.0.0:7361",
        ];
        args.extend_from_slice(init_args);
        p.cli_ok(&args);
        p.start();
        p
    }

    /// A practice with its data directory in `tmp`, not initialised and not started.
    fn unstarted(tmp: tempfile::TempDir, netns: Option<String>) -> Practice {
        Practice {
            dir: tmp.path().join("data"),
            _tmp: Some(tmp),
            child: None,
            agent: agent(),
            env: Vec::new(),
            netns,
        }
    }

    fn command(&self, program: PathBuf) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Runs `f` where the daemon's loopback API is reachable (its namespace, if any).
    fn reach<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match &self.netns {
            Some(ns) => netns::in_netns(ns, f),
            None => f(),
        }
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The practice id.
    pub fn id(&self) -> String {
        self.cli_json(&["id"])["id"].as_str().unwrap().to_string()
    }

    /// The sync address from the config (stable across restarts).
    pub fn sync_addr(&self) -> String {
        let cfg = std::fs::read_to_string(self.dir.join("config.toml")).unwrap();
        let v: toml::Value = toml::from_str(&cfg).unwrap();
        v["sync"]["listen"].as_str().unwrap().to_string()
    }

    /// Waits until `peer` is connected and in sync both ways.
    pub fn sync_wait(&self, peer: &Practice, timeout_s: u32) {
        let out = self.cli(&[
            "sync",
            "wait",
            "--peer",
            &peer.id(),
            "--timeout",
            &timeout_s.to_string(),
        ]);
        assert!(
            out.status.success(),
            "sync wait failed: {}{}\n--- log ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// Creates a small chart (a fixed patient under `mrn`) through the CLI; returns its id.
    pub fn new_chart(&self, mrn: &str) -> String {
        let c = self.cli_json(&[
            "chart",
            "create",
            "--mrn",
            mrn,
            "--family",
            "Ward",
            "--given",
            "Ida",
            "--birth-date",
            "1961-02-03",
        ]);
        c["id"].as_str().unwrap().to_string()
    }

    /// Imports the first `n` bench charts (a file of them next to the data directory).
    pub fn import_first(&self, n: usize) {
        let all = std::fs::read(bench_data().join("charts-1000.jsonl")).unwrap();
        let head: Vec<u8> = all
            .split(|b| *b == b'\n')
            .take(n)
            .flat_map(|l| l.iter().copied().chain([b'\n']))
            .collect();
        let file = self.dir.with_extension(format!("first-{n}.jsonl"));
        std::fs::write(&file, head).unwrap();
        let r = self.cli_json(&["import", file.to_str().unwrap()]);
        assert_eq!(r["imported"], n as u64, "{r}");
    }

    /// Exports every chart (through the daemon) as JSONL bytes.
    pub fn export_all(&self) -> Vec<u8> {
        let out = self.cli(&["export"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Sets the environment the daemon gets from its next start on (empty: none extra).
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let _ = std::fs::remove_file(self.dir.join("api.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .unwrap();
        let child = self
            .command(bin("chartmeshd"))
            .args(["--data-dir", self.dir.to_str().unwrap()])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("chartmeshd starts");
        self.child = Some(child);
    }

    /// Starts the daemon and expects it to exit by itself (a refused start, a crash at a
    /// failpoint) within `timeout`; returns its exit status.
    pub fn start_expecting_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.spawn();
        self.wait_exit(timeout)
    }

    /// Waits for the running daemon to exit by itself within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let c = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            if Instant::now() > deadline {
                let log = self.log();
                self.kill9();
                panic!("chartmeshd did not exit within {timeout:?}; log: {log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the daemon process is running (false once it exited).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    pub fn start(&mut self) {
        self.spawn();
        let me = &*self;
        wait_until(
            "the daemon's API to answer",
            Duration::from_secs(30),
            || me.try_get("/status").is_ok(),
        );
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(st)) = c.try_wait() {
                    assert!(
                        st.success(),
                        "chartmeshd exited with {st} on SIGTERM; log: {}",
                        self.log()
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "chartmeshd did not stop on SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Sets the emergency policy (`allow`/`deny`) and its duration in the config, and
    /// restarts the daemon on it.
    pub fn set_emergency_policy(&mut self, policy: &str, duration: &str) {
        let path = self.dir.join("config.toml");
        let mut v: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["emergency"]["policy"] = policy.into();
        v["emergency"]["duration"] = duration.into();
        std::fs::write(&path, toml::to_string(&v).unwrap()).unwrap();
        self.restart();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(bin("chartmesh"))
            .arg("--data-dir")
            .arg(&self.dir)
            .args(args)
            .env("CHARTMESH_USER", "test-user")
            .output()
            .expect("chartmesh runs")
    }

    /// Runs the CLI and asserts success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "chartmesh {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.cli_ok(&a)).unwrap()
    }

    pub fn base(&self) -> String {
        let addr = std::fs::read_to_string(self.dir.join("api.addr")).unwrap_or_default();
        format!("http://{}/api/v1", addr.trim())
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("api-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn try_get(&self, path: &str) -> Result<(u16, Value), String> {
        let (agent, url, auth) = (
            self.agent.clone(),
            format!("{}{path}", self.base()),
            format!("Bearer {}", self.token()),
        );
        let mut r = self.reach(move || {
            agent
                .get(url)
                .header("Authorization", auth)
                .call()
                .map_err(|e| e.to_string())
        })?;
        let status = r.status().as_u16();
        let v = r
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_json()
            .map_err(|e| e.to_string())?;
        Ok((status, v))
    }

    pub fn get(&self, path: &str) -> Value {
        let (s, v) = self.try_get(path).unwrap();
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }

    pub fn post(&self, path: &str, body: &[u8], user: &str) -> Result<(u16, Value), String> {
        let (agent, url, auth, user, body) = (
            self.agent.clone(),
            format!("{}{path}", self.base()),
            format!("Bearer {}", self.token()),
            user.to_string(),
            body.to_vec(),
        );
        let mut r = self.reach(move || {
            agent
                .post(url)
                .header("Authorization", auth)
                .header("X-Chartmesh-User", user)
                .header("Content-Type", "application/json")
                .send(&body[..])
                .map_err(|e| e.to_string())
        })?;
        let status = r.status().as_u16();
        let v = r.body_mut().read_json().map_err(|e| e.to_string())?;
        Ok((status, v))
    }
}

impl Drop for Practice {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// `id → sha256(canonical JSON)` for every chart of a JSONL file or export.
pub fn chart_hashes(jsonl: &[u8]) -> std::collections::HashMap<String, String> {
    jsonl
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_slice(l).unwrap();
            (
                v["id"].as_str().unwrap().to_string(),
                chartmesh_core::canonical::chart_hash(&v),
            )
        })
        .collect()
}

/// The set checksum of a JSONL export, computed as the benchmark defines it.
pub fn set_checksum(jsonl: &[u8]) -> (usize, String) {
    let mut s = chartmesh_core::canonical::SetChecksum::default();
    for (id, h) in chart_hashes(jsonl) {
        s.add_hash(&id, &h);
    }
    (s.count(), s.finish())
}

/// The shared FHIR samples (`../shared/fhir-samples`), or `$CHARTMESH_FHIR_SAMPLES`.
pub fn fhir_samples() -> PathBuf {
    if let Some(p) = std::env::var_os("CHARTMESH_FHIR_SAMPLES") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fhir-samples");
    assert!(
        p.is_dir(),
        "FHIR samples not found at {} (set CHARTMESH_FHIR_SAMPLES)",
        p.display()
    );
    p
}

/// The pinned independent FHIR validator (fhir.resources 6.4.0: FHIR R4 4.0.1, on pydantic 1).
pub const FHIR_VALIDATOR_PACKAGES: &[&str] = &["fhir.resources==6.4.0", "pydantic>=1.10,<2"];

/// A Python with the independent FHIR R4 validator: `$CHARTMESH_FHIR_PYTHON`, else a venv
/// under `target/fhir-venv`, created (from PyPI) on first use. Serialised across test
/// processes by a lock file so two tests never build it at once.
pub fn fhir_python() -> PathBuf {
    if let Some(p) = std::env::var_os("CHARTMESH_FHIR_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fhir-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(".ready");
    std::fs::create_dir_all(venv.parent().unwrap()).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(venv.with_extension("lock"))
        .unwrap();
    lock.lock().unwrap();
    if !ready.exists() {
        let run = |cmd: &mut Command, what: &str| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                out.status.success(),
                "{what} failed (the FHIR validator comes from PyPI; set CHARTMESH_FHIR_PYTHON to a python with fhir.resources 6.4.0 to use another):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "creating the validator venv",
        );
        run(
            Command::new(&python)
                .args(["-m", "pip", "install", "-q"])
                .args(FHIR_VALIDATOR_PACKAGES),
            "installing fhir.resources",
        );
        std::fs::write(&ready, "").unwrap();
    }
    let _ = lock.unlock();
    python
}

/// Runs the independent validator over files or directories; returns (ok, its report).
pub fn validate_fhir(paths: &[&Path]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fhir/validate.py");
    let out = Command::new(fhir_python())
        .arg(script)
        .args(paths)
        .output()
        .expect("the validator runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// Renders a local HTML file in headless Chromium (Debian's `chromium` package) and returns
/// the DOM as Chromium built it. Fails with what to install when Chromium is missing.
pub fn chromium_dom(file: &Path) -> String {
    chromium_dom_url(&format!("file://{}", file.display()))
}

/// Loads `url` (a file or a page on 127.0.0.1) in headless Chromium, lets its scripts run
/// (up to 5 s of virtual time) and returns the DOM.
pub fn chromium_dom_url(url: &str) -> String {
    let exe = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
        .expect("headless Chromium is needed for this test: install Debian's chromium package (apt install chromium) or set CHROMIUM");
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            &format!("--user-data-dir={}", profile.path().display()),
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ])
        // Its shared-memory files (--disable-dev-shm-usage) go into the profile, removed
        // with it.
        .env("TMPDIR", profile.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium failed: {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not render {url} within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}
