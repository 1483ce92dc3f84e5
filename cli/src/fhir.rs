//! `chartmesh import` of FHIR (Bundles, single resources, Bulk Data NDJSON files and
//! directories) and `chartmesh export --format fhir|ndjson`: the daemon does the mapping and
//! the patient matching; this module reads the files, sends them in parts, prints the
//! per-type account and writes the export.
//!
//! A file up to [`WHOLE_FILE`] bytes is sent as it is. A larger one, and every NDJSON file,
//! is read resource by resource and sent in parts of at most [`PART_RESOURCES`] resources or
//! [`PART_BYTES`] bytes, one part at a time, with a progress bar. Each part carries, as
//! context, the Patients, Medications and Practitioners its resources refer to (sent again,
//! not reported again), so references resolve and patient matching decides the same way in
//! every part. The text of every resource is sent as read, so decimals keep their digits.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use crate::client::{CliError, Client};

/// Files up to this size are sent in one request.
pub const WHOLE_FILE: u64 = 8 * 1024 * 1024;
/// The most resources in one part of a larger input.
pub const PART_RESOURCES: usize = 500;
/// The most bytes of resources in one part (context comes on top).
pub const PART_BYTES: usize = 8 * 1024 * 1024;
/// The most problems printed one by one per file (all are in `--json`'s counts).
const MAX_PRINTED: usize = 50;

/// Whether a path holds FHIR (a Bundle or resource, NDJSON, or a directory of them) rather
/// than chart JSONL.
pub fn is_fhir_file(path: &Path) -> bool {
    if path.is_dir() {
        return true;
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext.eq_ignore_ascii_case("ndjson") {
        return true;
    }
    if ext.eq_ignore_ascii_case("jsonl") {
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
    let first = first.trim_start_matches('\u{feff}');
    match serde_json::from_str::<Value>(first.trim()) {
        Ok(v) => v.get("resourceType").is_some(),
        Err(_) => first.trim_start().starts_with('{') && !first.contains("\"schemaVersion\""),
    }
}

/// The files to import: files as given; a directory's `*.ndjson` and `*.json` files, Patient
/// files first (a Bulk Data export), then by name.
fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if !p.is_dir() {
            out.push(p.clone());
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| CliError::Failed(format!("cannot read {}: {e}", p.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| {
                f.is_file()
                    && f.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        e.eq_ignore_ascii_case("ndjson") || e.eq_ignore_ascii_case("json")
                    })
            })
            .collect();
        files.sort_by_key(|f| {
            let name = f
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            (!name.starts_with("Patient"), name)
        });
        if files.is_empty() {
            return Err(CliError::Failed(format!(
                "{} holds no .ndjson or .json files",
                p.display()
            ))
            .into());
        }
        out.extend(files);
    }
    Ok(out)
}

/// One resource read from a file.
struct Item {
    /// Where it is: `entry[3]`, `line 12`.
    label: String,
    full_url: Option<String>,
    raw: String,
    rtype: String,
    /// The keys other resources may use to refer to it.
    keys: Vec<String>,
    /// The references it makes.
    refs: Vec<String>,
}

impl Item {
    fn new(label: String, full_url: Option<String>, raw: String) -> Item {
        let v: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
        let rtype = v["resourceType"].as_str().unwrap_or("").to_string();
        let mut keys = Vec::new();
        if let Some(u) = &full_url {
            keys.push(u.clone());
        }
        if let Some(id) = v["id"].as_str() {
            keys.push(format!("{rtype}/{id}"));
        }
        let mut refs = Vec::new();
        for field in ["subject", "patient", "beneficiary", "medicationReference"] {
            if let Some(r) = v[field]["reference"].as_str() {
                refs.push(norm_ref(r));
            }
        }
        for list in ["author", "performer", "participant"] {
            for a in v[list].as_array().into_iter().flatten() {
                for r in [&a["reference"], &a["individual"]["reference"]] {
                    if let Some(r) = r.as_str() {
                        refs.push(norm_ref(r));
                    }
                }
            }
        }
        Item {
            label,
            full_url,
            raw,
            rtype,
            keys,
            refs,
        }
    }
    fn is_context(&self) -> bool {
        matches!(
            self.rtype.as_str(),
            "Patient" | "Medication" | "Practitioner"
        )
    }
    fn entry_json(&self) -> String {
        match &self.full_url {
            Some(u) => format!(
                "{{\"fullUrl\":{},\"resource\":{}}}",
                serde_json::to_string(u).unwrap_or_default(),
                self.raw
            ),
            None => format!("{{\"resource\":{}}}", self.raw),
        }
    }
}

fn norm_ref(r: &str) -> String {
    if r.starts_with("urn:") || r.contains('?') {
        return r.to_string();
    }
    let parts: Vec<&str> = r.split('/').collect();
    let end = parts
        .iter()
        .position(|p| *p == "_history")
        .unwrap_or(parts.len());
    if end >= 2 {
        format!("{}/{}", parts[end - 2], parts[end - 1])
    } else {
        r.to_string()
    }
}

/// Reads a file's resources: NDJSON lines, or a Bundle's entries (or the one resource).
fn read_items(path: &Path) -> Result<Vec<Item>> {
    let bytes = std::fs::read(path)
        .map_err(|e| CliError::Failed(format!("cannot read {}: {e}", path.display())))?;
    let body = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let text = std::str::from_utf8(body).map_err(|_| {
        CliError::Failed(format!(
            "{} is not UTF-8 text; save it as UTF-8 and import it again",
            path.display()
        ))
    })?;
    #[derive(serde::Deserialize)]
    struct Entry<'a> {
        #[serde(rename = "fullUrl")]
        full_url: Option<String>,
        #[serde(borrow)]
        resource: Option<&'a RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Bundle<'a> {
        #[serde(rename = "resourceType")]
        resource_type: String,
        #[serde(borrow, default)]
        entry: Vec<Entry<'a>>,
    }
    if let Ok(b) = serde_json::from_str::<Bundle>(text)
        && b.resource_type == "Bundle"
    {
        return Ok(b
            .entry
            .into_iter()
            .enumerate()
            .filter_map(|(i, e)| {
                e.resource
                    .map(|r| Item::new(format!("entry[{i}]"), e.full_url, r.get().to_string()))
            })
            .collect());
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(Item::new(format!("line {}", n + 1), None, line.to_string()));
    }
    Ok(out)
}

/// The sum of the daemon's reports for the parts of one input.
#[derive(Default)]
struct Totals {
    patients: BTreeMap<String, String>,
    summary: BTreeMap<String, [u64; 3]>,
    resources: Vec<Value>,
    omitted: u64,
    review: Vec<Value>,
    chart_errors: Vec<Value>,
    fatal: Option<String>,
}

impl Totals {
    fn add(&mut self, r: &Value, labels: Option<&[String]>, context: usize) {
        for p in r["patients"].as_array().into_iter().flatten() {
            let chart = p["chart"].as_str().unwrap_or("").to_string();
            let outcome = p["outcome"].as_str().unwrap_or("").to_string();
            let rank = |o: &str| match o {
                "created" | "review" | "error" => 3,
                "updated" => 2,
                _ => 1,
            };
            let e = self
                .patients
                .entry(chart)
                .or_insert_with(|| outcome.clone());
            if rank(&outcome) > rank(e) {
                *e = outcome;
            }
        }
        if let Some(m) = r["summary"].as_object() {
            for (rt, c) in m {
                let e = self.summary.entry(rt.clone()).or_default();
                for (i, k) in ["mapped", "skipped", "errors"].iter().enumerate() {
                    e[i] += c[k].as_u64().unwrap_or(0);
                }
            }
        }
        for res in r["resources"].as_array().into_iter().flatten() {
            let mut res = res.clone();
            if let (Some(labels), Some(at)) = (labels, res["at"].as_str()) {
                let orig = at
                    .strip_prefix("entry[")
                    .and_then(|x| x.strip_suffix(']'))
                    .and_then(|x| x.parse::<usize>().ok())
                    .and_then(|i| i.checked_sub(context))
                    .and_then(|i| labels.get(i));
                if let Some(o) = orig {
                    res["at"] = o.clone().into();
                }
            }
            self.resources.push(res);
        }
        self.omitted += r["resourcesOmitted"].as_u64().unwrap_or(0);
        self.review
            .extend(r["review"].as_array().cloned().unwrap_or_default());
        self.chart_errors
            .extend(r["chartErrors"].as_array().cloned().unwrap_or_default());
        if let Some(f) = r["fatal"].as_str() {
            self.fatal.get_or_insert_with(|| f.to_string());
        }
    }
    fn count(&self, outcome: &str) -> usize {
        self.patients
            .values()
            .filter(|o| o.as_str() == outcome)
            .count()
    }
    fn problems(&self) -> usize {
        self.summary.values().map(|c| c[2] as usize).sum::<usize>()
            + self.chart_errors.len()
            + usize::from(self.fatal.is_some())
    }
    fn to_json(&self, file: &Path) -> Value {
        let summary: serde_json::Map<String, Value> = self
            .summary
            .iter()
            .map(|(k, c)| {
                (
                    k.clone(),
                    json!({ "mapped": c[0], "skipped": c[1], "errors": c[2] }),
                )
            })
            .collect();
        let mut v = json!({
            "file": file.display().to_string(),
            "created": self.count("created") + self.count("review"),
            "updated": self.count("updated"),
            "unchanged": self.count("unchanged"),
            "review": self.review,
            "chartErrors": self.chart_errors,
            "summary": summary,
            "resources": self.resources,
        });
        if self.omitted > 0 {
            v["resourcesOmitted"] = self.omitted.into();
        }
        if let Some(f) = &self.fatal {
            v["fatal"] = f.clone().into();
        }
        v
    }
}

fn progress(hidden: bool, total: u64) -> ProgressBar {
    let bar = if hidden || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} resources {msg} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Imports FHIR files and directories and prints what became of every resource.
pub fn import(client: &Client, paths: &[PathBuf], author: &str, json_out: bool) -> Result<()> {
    let files = expand(paths)?;
    let mut reports = Vec::new();
    let mut bad = 0usize;
    // Context resources seen so far (a Bulk Data directory's Patient file serves the rest).
    let mut pool: HashMap<String, usize> = HashMap::new();
    let mut pool_items: Vec<Item> = Vec::new();
    for path in &files {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let ndjson = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("ndjson"));
        let mut totals = Totals::default();
        if size <= WHOLE_FILE && !ndjson {
            let body = std::fs::read(path)
                .map_err(|e| CliError::Failed(format!("cannot read {}: {e}", path.display())))?;
            let r = client.post_bytes(
                &format!("/import/fhir?author={}", crate::enc(author)),
                &body,
            )?;
            totals.add(&r, None, 0);
            // Its patients can serve as context for the files after it.
            if let Ok(items) = read_items(path) {
                for it in items.into_iter().filter(Item::is_context) {
                    for k in &it.keys {
                        pool.insert(k.clone(), pool_items.len());
                    }
                    pool_items.push(it);
                }
            }
        } else {
            let items = read_items(path)?;
            let bar = progress(json_out, items.len() as u64);
            bar.set_message(path.display().to_string());
            // The file's own context resources go first, so they are reported once.
            let (ctx, rest): (Vec<Item>, Vec<Item>) = items.into_iter().partition(Item::is_context);
            let mut sent_ctx: std::collections::HashSet<String> = Default::default();
            let mut queue: Vec<Item> = ctx;
            let ctx_index: HashMap<String, usize> = queue
                .iter()
                .enumerate()
                .flat_map(|(i, it)| it.keys.iter().map(move |k| (k.clone(), i)))
                .collect();
            queue.extend(rest);
            let mut start = 0;
            while start < queue.len() {
                let mut end = start;
                let mut bytes = 0;
                while end < queue.len()
                    && end - start < PART_RESOURCES
                    && (bytes == 0 || bytes + queue[end].raw.len() <= PART_BYTES)
                {
                    bytes += queue[end].raw.len();
                    end += 1;
                }
                let part = &queue[start..end];
                // Context: what the part refers to that is not in it.
                let in_part: std::collections::HashSet<&str> = part
                    .iter()
                    .flat_map(|i| i.keys.iter().map(String::as_str))
                    .collect();
                let mut context: Vec<&Item> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                for it in part {
                    for r in &it.refs {
                        if in_part.contains(r.as_str()) {
                            continue;
                        }
                        let found = pool.get(r).map(|i| &pool_items[*i]).or_else(|| {
                            ctx_index
                                .get(r)
                                .map(|i| &queue[*i])
                                .filter(|c| sent_ctx.contains(&c.label))
                        });
                        if let Some(c) = found
                            && seen.insert(c.raw.as_ptr() as usize)
                        {
                            context.push(c);
                        }
                    }
                }
                let mut body = String::from(
                    "{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":[",
                );
                for (i, it) in context.iter().copied().chain(part.iter()).enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    body.push_str(&it.entry_json());
                }
                body.push_str("]}");
                let labels: Vec<String> = part.iter().map(|i| i.label.clone()).collect();
                let r = client.post_bytes(
                    &format!(
                        "/import/fhir?author={}&context={}",
                        crate::enc(author),
                        context.len()
                    ),
                    body.as_bytes(),
                );
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        bar.finish_and_clear();
                        return Err(CliError::Unreachable(format!(
                            "{e}; {} of {} resources of {} were imported and are safe; run the same import again to finish (what is already imported is not added twice)",
                            start,
                            queue.len(),
                            path.display()
                        ))
                        .into());
                    }
                };
                totals.add(&r, Some(&labels), context.len());
                for it in part.iter().filter(|i| i.is_context()) {
                    sent_ctx.insert(it.label.clone());
                }
                bar.inc((end - start) as u64);
                start = end;
            }
            bar.finish_and_clear();
            for it in queue.into_iter().filter(Item::is_context) {
                for k in &it.keys {
                    pool.insert(k.clone(), pool_items.len());
                }
                pool_items.push(it);
            }
        }
        bad += totals.problems();
        let v = totals.to_json(path);
        if !json_out {
            print_report(path, &v);
        }
        reports.push(v);
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
    // Skipped resources grouped by reason; errors one by one (the first few).
    let mut reasons: BTreeMap<(String, String), usize> = Default::default();
    let mut printed = 0;
    let mut errors = 0;
    for res in r["resources"].as_array().into_iter().flatten() {
        let rt = res["resourceType"].as_str().unwrap_or("?").to_string();
        let reason = res["reason"].as_str().unwrap_or("").to_string();
        if res["outcome"] == "skipped" {
            *reasons.entry((rt, reason)).or_default() += 1;
        } else {
            errors += 1;
            if printed < MAX_PRINTED {
                printed += 1;
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
    }
    let more = errors - printed + r["resourcesOmitted"].as_u64().unwrap_or(0) as usize;
    if more > 0 {
        eprintln!(
            "{file}: … and {more} more problem(s) (see the counts above; --json lists the first 1000 per part)"
        );
    }
    for ((rt, reason), n) in reasons {
        println!("  skipped {n} {rt}: {reason}");
    }
    for v in r["review"].as_array().into_iter().flatten() {
        println!(
            "  held for review: chart {} may be the same patient as {} ({}); it was not merged",
            v["chart"].as_str().unwrap_or(""),
            v["candidates"]
                .as_array()
                .map(|c| c
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
            v["reason"].as_str().unwrap_or("")
        );
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
        let v = chartmesh_core::fhir::json::parse(line)?;
        let id = chart_id_of(&v)?;
        let path = dir.join(format!("{id}.json"));
        crate::output::write_private(
            &path,
            chartmesh_core::fhir::json::to_string_pretty(&v["bundle"]).as_bytes(),
        )
        .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))?;
        Ok(())
    })?;
    Ok(n)
}

fn chart_id_of(v: &Value) -> Result<String> {
    let id = v["chartId"].as_str().unwrap_or_default();
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        return Err(CliError::Failed(format!(
            "the daemon sent a bundle with an unusable chart id {id:?}"
        ))
        .into());
    }
    Ok(id.to_string())
}

/// Writes FHIR Bulk Data NDJSON into `dir`: one `<Type>.ndjson` file per resource type, one
/// resource per line, references relative (`Patient/ID`), as a bulk `$export` produces.
pub fn export_ndjson(client: &Client, ids: &[String], dir: &Path) -> Result<usize> {
    use std::io::Write;
    crate::output::create_private_dir(dir)
        .map_err(|e| CliError::Failed(format!("cannot create {}: {e}", dir.display())))?;
    let mut files: BTreeMap<String, std::io::BufWriter<std::fs::File>> = BTreeMap::new();
    let n = client.export_lines(ids, "fhir", &mut |line| {
        let v = chartmesh_core::fhir::json::parse(line)?;
        chart_id_of(&v)?;
        for r in chartmesh_core::fhir::bundle_resources(&v["bundle"]) {
            let t = r["resourceType"].as_str().unwrap_or("Unknown").to_string();
            if !files.contains_key(&t) {
                let path = dir.join(format!("{t}.ndjson"));
                let f = crate::output::create_private(&path).map_err(|e| {
                    CliError::Failed(format!("cannot write {}: {e}", path.display()))
                })?;
                files.insert(t.clone(), std::io::BufWriter::new(f));
            }
            let w = files.get_mut(&t).expect("just inserted");
            w.write_all(chartmesh_core::fhir::json::to_string(&r).as_bytes())?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })?;
    for (_, mut w) in files {
        w.flush()?;
    }
    Ok(n)
}
