//! The benchmark runner: starts real `chartmeshd` processes with fresh data directories on
//! 127.0.0.1, drives them through the `chartmesh` CLI exactly as a user would, and measures
//! each phase from outside the processes (wall time, peak RSS from /proc, bytes on disk).
//! A run whose checksum does not match is a failed run, not a slow one.
//!
//! Phases implemented: `load` and `cold` (see ../shared/bench-data/README.md).

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Options {
    /// Directory holding `chartmeshd` and `chartmesh`.
    pub bin_dir: PathBuf,
    /// The charts to load (JSONL) and their expected set checksum.
    pub charts: PathBuf,
    pub expected_checksum: String,
    pub n: usize,
    pub reps: usize,
}

struct Daemon {
    dir: PathBuf,
    child: Child,
}

impl Daemon {
    fn start(bin_dir: &Path, dir: &Path) -> Result<Daemon> {
        let _ = std::fs::remove_file(dir.join("api.addr"));
        let child = Command::new(bin_dir.join("chartmeshd"))
            .arg("--data-dir")
            .arg(dir)
            .env("CHARTMESH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chartmeshd")?;
        let d = Daemon {
            dir: dir.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if cli(bin_dir, dir, &["status"])
                .map(|o| o.status.success())
                .unwrap_or(false)
            {
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(5));
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

    fn stop(mut self) -> Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let st = self.child.wait()?;
        if !st.success() {
            bail!("chartmeshd in {} exited with {st}", self.dir.display());
        }
        Ok(())
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
    let tmp = tempfile::tempdir()?;
    let a = tmp.path().join("a");
    cli_ok(
        &o.bin_dir,
        &a,
        &[
            "init",
            "--name",
            "Bench A",
            "--api",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
        ],
    )?;
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
    let a_max = da.peak_rss_kb();
    da.stop()?;
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

    Ok(json!({
        "load": { "ms": load_ms, "docsPerSec": o.n as f64 / (load_ms / 1e3), "maxRssKB": load_rss, "diskBytes": disk, "checksumOk": load_ok },
        "cold": { "processWallMs": cold_ms },
        "rss": { "aMaxKB": a_max },
    }))
}

pub fn run(o: &Options) -> Result<Vec<Value>> {
    (0..o.reps).map(|_| run_once(o)).collect()
}

/// A markdown table: median (min–max) over reps for each figure.
pub fn table(reps: &[Value]) -> String {
    let rows = [
        ("load: charts/s", "/load/docsPerSec", 0),
        ("load: ms", "/load/ms", 0),
        ("load: peak RSS (KB)", "/load/maxRssKB", 0),
        ("load: bytes on disk", "/load/diskBytes", 0),
        ("cold open + read one chart (ms)", "/cold/processWallMs", 1),
        ("peak RSS A (KB)", "/rss/aMaxKB", 0),
    ];
    let mut s = String::from("| figure | median (min–max) |\n|---|---:|\n");
    for (name, ptr, digits) in rows {
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
            "| {name} | {} ({}–{}) |\n",
            f(v[v.len() / 2]),
            f(v[0]),
            f(v[v.len() - 1])
        ));
    }
    s
}

/// The JSONL file for N charts and its expected checksum: the bench-data set for 1000 or
/// 10000, or the first N charts of the 1000 set (checksum computed here) for a smoke run.
pub fn dataset(data: &Path, n: usize) -> Result<(PathBuf, String)> {
    let full = data.join(format!("charts-{n}.jsonl"));
    if full.exists() {
        let m: Value = serde_json::from_slice(&std::fs::read(
            data.join(format!("charts-{n}.manifest.json")),
        )?)?;
        return Ok((full, m["checksum"].as_str().unwrap_or_default().to_string()));
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
    let path =
        std::env::temp_dir().join(format!("chartmesh-bench-{n}-{}.jsonl", std::process::id()));
    std::fs::write(&path, &body)?;
    Ok((path, checksum_of(&body)?.1))
}
