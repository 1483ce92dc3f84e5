//! `chartmesh import` of FHIR files and `chartmesh export --format fhir`: the daemon does the
//! mapping; this module picks the files, prints the per-type account and writes one Bundle
//! file per chart.

use anyhow::Result;
use serde_json::{Value, json};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use crate::client::{CliError, Client};

/// Whether a file holds FHIR JSON (one Bundle or resource) rather than chart JSONL.
pub fn is_fhir_file(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext.eq_ignore_ascii_case("jsonl") || ext.eq_ignore_ascii_case("ndjson") {
        return false;
    }
    if ext.eq_ignore_ascii_case("json") {
        return true;
    }
    // Sniff: a first line that is a whole JSON object with a resourceType, or a first line
    // that is not a whole object (pretty-printed JSON) while the file starts with `{`.
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut first = String::new();
    let _ = std::io::BufReader::new(f.take(4 << 20)).read_line(&mut first);
    match serde_json::from_str::<Value>(first.trim()) {
        Ok(v) => v.get("resourceType").is_some(),
        Err(_) => first.trim_start().starts_with('{') && !first.contains("\"schemaVersion\""),
    }
}

/// Imports FHIR files one by one and prints what became of every resource.
pub fn import(client: &Client, files: &[PathBuf], author: &str, json_out: bool) -> Result<()> {
    let mut reports = Vec::new();
    let mut bad = 0usize;
    for path in files {
        let body = std::fs::read(path)
            .map_err(|e| CliError::Failed(format!("cannot read {}: {e}", path.display())))?;
        let r = client.post_bytes(
            &format!("/import/fhir?author={}", crate::enc(author)),
            &body,
        )?;
        let errors: u64 = r["summary"]
            .as_object()
            .map(|m| m.values().map(|c| c["errors"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0);
        let file_bad = errors as usize
            + r["chartErrors"].as_array().map_or(0, |a| a.len())
            + usize::from(r["fatal"].is_string());
        bad += file_bad;
        if !json_out {
            print_report(path, &r);
        }
        let mut r = r;
        r["file"] = path.display().to_string().into();
        reports.push(r);
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "files": reports, "failed": bad }))?
        );
    }
    if bad > 0 {
        if json_out {
            return Err(CliError::Reported(1).into());
        }
        return Err(CliError::Failed(format!(
            "{bad} problem(s) in the FHIR input; everything else was imported (see above)"
        ))
        .into());
    }
    Ok(())
}

fn print_report(path: &Path, r: &Value) {
    let file = path.display();
    if let Some(f) = r["fatal"].as_str() {
        eprintln!("{file}: {f}");
        return;
    }
    println!(
        "{file}: {} chart(s) created, {} updated, {} unchanged",
        r["created"], r["updated"], r["unchanged"]
    );
    println!(
        "  {:<28} {:>7} {:>8} {:>7}",
        "resource type", "mapped", "skipped", "errors"
    );
    if let Some(m) = r["summary"].as_object() {
        for (rt, c) in m {
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            println!(
                "  {:<28} {:>7} {:>8} {:>7}",
                rt,
                n("mapped"),
                n("skipped"),
                n("errors")
            );
        }
    }
    // Skipped resources grouped by reason; errors one by one.
    let mut reasons: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for res in r["resources"].as_array().into_iter().flatten() {
        let rt = res["resourceType"].as_str().unwrap_or("?").to_string();
        let reason = res["reason"].as_str().unwrap_or("").to_string();
        if res["outcome"] == "skipped" {
            *reasons.entry((rt, reason)).or_default() += 1;
        } else {
            let id = res["id"]
                .as_str()
                .map(|i| format!("/{i}"))
                .unwrap_or_default();
            eprintln!(
                "{file}: {} ({rt}{id}): {reason}",
                res["at"].as_str().unwrap_or("")
            );
        }
    }
    for ((rt, reason), n) in reasons {
        println!("  skipped {n} {rt}: {reason}");
    }
    for e in r["chartErrors"].as_array().into_iter().flatten() {
        eprintln!(
            "{file}: chart {}: {}",
            e["chart"].as_str().unwrap_or(""),
            e["error"].as_str().unwrap_or("")
        );
    }
}

/// Writes one `<chart-id>.json` Bundle per chart into `dir`.
pub fn export(client: &Client, ids: &[String], dir: &Path) -> Result<usize> {
    crate::output::create_private_dir(dir)
        .map_err(|e| CliError::Failed(format!("cannot create {}: {e}", dir.display())))?;
    let n = client.export_lines(ids, "fhir", &mut |line| {
        let v: Value = serde_json::from_slice(line)?;
        let id = v["chartId"].as_str().unwrap_or_default();
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(CliError::Failed(format!(
                "the daemon sent a bundle with an unusable chart id {id:?}"
            ))
            .into());
        }
        let path = dir.join(format!("{id}.json"));
        crate::output::write_private(&path, &serde_json::to_vec_pretty(&v["bundle"])?)
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))?;
        Ok(())
    })?;
    Ok(n)
}
