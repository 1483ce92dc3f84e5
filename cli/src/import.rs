//! `chartmesh import`: streams JSONL files to the daemon in chunks, two in flight, and
//! reports every bad record with file, line and reason. Records too large to be a chart are
//! reported without being sent.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use crate::client::{CliError, Client};
use chartmesh_core::MAX_CHART_JSON_BYTES;

const CHUNK_RECORDS: usize = 250;
const CHUNK_BYTES: usize = 4 * 1024 * 1024;
const IN_FLIGHT: usize = 3;
/// The most record errors kept and listed (the first ones, by file and line); the rest are
/// counted, so a file of millions of bad lines cannot fill memory or the terminal.
const MAX_LISTED: usize = 1000;

struct Chunk {
    file: usize,
    lines: Vec<usize>,
    body: Vec<u8>,
}

#[derive(Default)]
struct Totals {
    imported: u64,
    unchanged: u64,
    errors: Vec<Value>,
    /// Errors counted but not kept.
    not_listed: usize,
}

impl Totals {
    fn push_error(&mut self, e: Value) {
        self.errors.push(e);
        if self.errors.len() >= 2 * MAX_LISTED {
            self.keep_first();
        }
    }

    /// Keeps the first [`MAX_LISTED`] errors by file and line; counts the others.
    fn keep_first(&mut self) {
        self.errors.sort_by(|a, b| {
            (a["fileIndex"].as_u64(), a["line"].as_u64())
                .cmp(&(b["fileIndex"].as_u64(), b["line"].as_u64()))
        });
        if self.errors.len() > MAX_LISTED {
            self.not_listed += self.errors.len() - MAX_LISTED;
            self.errors.truncate(MAX_LISTED);
        }
    }
}

pub fn run(client: &Client, files: &[PathBuf], author: &str, json_out: bool) -> Result<()> {
    let total_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = if json_out || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total_bytes)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let path_query = format!("/import?author={}", crate::enc(author));
    let mut totals = Totals::default();
    let (chunk_tx, chunk_rx) = mpsc::sync_channel::<Chunk>(IN_FLIGHT);
    let chunk_rx = std::sync::Mutex::new(chunk_rx);
    let (res_tx, res_rx) = mpsc::channel::<(Chunk, Result<Value, CliError>)>();
    let mut read_error = None;
    std::thread::scope(|s| {
        for _ in 0..IN_FLIGHT {
            let res_tx = res_tx.clone();
            let chunk_rx = &chunk_rx;
            let path_query = &path_query;
            s.spawn(move || {
                loop {
                    let next = chunk_rx.lock().unwrap().recv();
                    let Ok(chunk) = next else { break };
                    let r = client.post_bytes(path_query, &chunk.body);
                    if res_tx.send((chunk, r)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(res_tx);
        let reader = s.spawn(|| read_files(files, chunk_tx, &bar));
        let mut fatal: Option<CliError> = None;
        for (chunk, r) in res_rx {
            bar.inc(chunk.body.len() as u64);
            match r {
                Ok(report) => {
                    totals.imported += report["imported"].as_u64().unwrap_or(0);
                    totals.unchanged += report["unchanged"].as_u64().unwrap_or(0);
                    totals.not_listed += report["errorsNotListed"].as_u64().unwrap_or(0) as usize;
                    for e in report["errors"].as_array().cloned().unwrap_or_default() {
                        let idx = e["index"].as_u64().unwrap_or(0) as usize;
                        let mut message = e["message"].as_str().unwrap_or("").to_string();
                        if let Some(d) = e["duplicate_of"].as_u64() {
                            message.push_str(&format!(
                                " (line {})",
                                chunk.lines.get(d as usize).copied().unwrap_or(0)
                            ));
                        }
                        totals.push_error(json!({
                            "fileIndex": chunk.file,
                            "file": files[chunk.file].display().to_string(),
                            "line": chunk.lines.get(idx).copied().unwrap_or(0),
                            "id": e["id"],
                            "field": e["field"],
                            "message": message,
                        }));
                    }
                    bar.set_message(format!("{} charts", totals.imported + totals.unchanged));
                }
                Err(e) => {
                    if fatal.is_none() {
                        fatal = Some(e);
                    }
                }
            }
        }
        match reader.join().expect("reader thread") {
            Ok(local_errors) => {
                for e in local_errors {
                    totals.push_error(e);
                }
            }
            Err(e) => read_error = Some(e),
        }
        bar.finish_and_clear();
        if let Some(f) = fatal {
            read_error = Some(anyhow::anyhow!(CliError::Unreachable(format!(
                "{f}; {} charts were imported and are safe; run the same import again to finish (charts already imported are skipped)",
                totals.imported + totals.unchanged
            ))));
        }
    });
    if let Some(e) = read_error {
        return Err(e);
    }
    totals.keep_first();
    for e in &mut totals.errors {
        if let Some(o) = e.as_object_mut() {
            o.remove("fileIndex");
        }
    }
    let failed = totals.errors.len() + totals.not_listed;
    let summary = json!({ "imported": totals.imported, "unchanged": totals.unchanged, "failed": failed, "errors": totals.errors, "errorsNotListed": totals.not_listed });
    if json_out {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        for e in &totals.errors {
            let id = e["id"]
                .as_str()
                .map(|i| format!(" ({i})"))
                .unwrap_or_default();
            let field = e["field"]
                .as_str()
                .filter(|f| !f.is_empty())
                .map(|f| format!("{f}: "))
                .unwrap_or_default();
            eprintln!(
                "{}:{}{}: {}{}",
                e["file"].as_str().unwrap_or(""),
                e["line"],
                crate::output::esc(&id),
                crate::output::esc(&field),
                crate::output::esc(e["message"].as_str().unwrap_or(""))
            );
        }
        if totals.not_listed > 0 {
            eprintln!(
                "… and {} more record error(s) not listed (the first {MAX_LISTED} are above)",
                totals.not_listed
            );
        }
        println!(
            "imported {} charts, {} unchanged, {} failed",
            totals.imported, totals.unchanged, failed
        );
    }
    if failed > 0 {
        if json_out {
            return Err(CliError::Reported(1).into());
        }
        return Err(CliError::Failed(format!(
            "{failed} record(s) were not imported; see the errors above"
        ))
        .into());
    }
    Ok(())
}

/// Reads the files into chunks; returns the records rejected before sending.
fn read_files(
    files: &[PathBuf],
    tx: mpsc::SyncSender<Chunk>,
    bar: &ProgressBar,
) -> Result<Vec<Value>> {
    let mut local = Vec::new();
    for (fi, path) in files.iter().enumerate() {
        let f = std::fs::File::open(path)
            .map_err(|e| CliError::Failed(format!("cannot open {}: {e}", path.display())))?;
        let mut r = std::io::BufReader::with_capacity(1 << 20, f);
        let mut chunk = Chunk {
            file: fi,
            lines: Vec::new(),
            body: Vec::with_capacity(CHUNK_BYTES),
        };
        let mut line = Vec::new();
        let mut lineno = 0usize;
        loop {
            line.clear();
            let n = r
                .read_until(b'\n', &mut line)
                .map_err(|e| CliError::Failed(format!("cannot read {}: {e}", path.display())))?;
            if n == 0 {
                break;
            }
            lineno += 1;
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                bar.inc(n as u64);
                continue;
            }
            if line.len() > MAX_CHART_JSON_BYTES {
                bar.inc(n as u64);
                local.push(too_large(path, fi, lineno, line.len()));
                continue;
            }
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            chunk.lines.push(lineno);
            chunk.body.extend_from_slice(&line);
            if chunk.lines.len() >= CHUNK_RECORDS || chunk.body.len() >= CHUNK_BYTES {
                let full = std::mem::replace(
                    &mut chunk,
                    Chunk {
                        file: fi,
                        lines: Vec::new(),
                        body: Vec::with_capacity(CHUNK_BYTES),
                    },
                );
                if tx.send(full).is_err() {
                    return Ok(local);
                }
            }
        }
        if !chunk.lines.is_empty() && tx.send(chunk).is_err() {
            return Ok(local);
        }
    }
    Ok(local)
}

fn too_large(path: &Path, file_index: usize, line: usize, len: usize) -> Value {
    json!({
        "fileIndex": file_index,
        "file": path.display().to_string(),
        "line": line,
        "id": Value::Null,
        "field": "",
        "message": format!("record is {len} bytes, over the limit of {MAX_CHART_JSON_BYTES} bytes for one chart; is this file JSONL (one chart per line)?"),
    })
}
