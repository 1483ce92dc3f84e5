//! What the CLI writes: text from the store printed with control characters escaped (a NUL,
//! an escape sequence or a bidi override in a chart or a name never reaches the terminal
//! raw), and files (exports, FHIR bundles, patient copies) readable by their owner only.

use serde_json::Value;
use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

/// Characters that reorder or hide text when printed: bidi embeddings, overrides and
/// isolates, and the invisible direction marks.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

fn needs_escape(c: char) -> bool {
    c.is_control() || is_bidi_control(c) || matches!(c, '\u{2028}' | '\u{2029}')
}

/// `s` safe to print on a terminal: control, bidi and line-separator characters written as
/// visible escapes (`\n`, `\t`, `\u{1b}`, `\u{202e}`); everything else unchanged.
pub fn esc(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Like [`esc`], but line breaks stay: for the CLI's own messages, which may span lines and
/// quote stored text.
pub fn esc_message(s: &str) -> String {
    s.split('\n')
        .map(|l| esc(l).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A copy of `v` with every string (and object key) passed through [`esc`], for printing.
pub fn escaped(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(esc(s).into_owned()),
        Value::Array(a) => Value::Array(a.iter().map(escaped).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (esc(k).into_owned(), escaped(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Creates (or truncates) a file readable and writable by its owner only (0600), whatever
/// mode an existing file had.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        let f = opts.open(path)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        Ok(f)
    }
    #[cfg(not(unix))]
    opts.open(path)
}

/// Writes a whole file (owner-only) under a temporary name, then renames it into place, so
/// the file is whole or absent.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut f = create_private(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Creates a directory (and its parents) for exported files; new ones are owner-only (0700).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// A plain table for the terminal (no borders; columns sized to their content, wrapped to
/// the terminal's width when there is one). Cells must be escaped by the caller.
pub fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}

/// A progress bar on stderr (drawn only on a terminal) for `total` items.
pub fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta} left)")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// A spinner on stderr (drawn only on a terminal) while something of unknown length runs.
pub fn spinner(what: &str) -> indicatif::ProgressBar {
    let s = indicatif::ProgressBar::new_spinner();
    s.set_message(what.to_string());
    s.enable_steady_tick(std::time::Duration::from_millis(120));
    s
}

/// A byte count for people (`1.50 MiB`).
pub fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_escaped_and_text_kept() {
        assert_eq!(esc("Ana Holhol, café"), "Ana Holhol, café");
        assert_eq!(esc("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(esc("x\0y\nz"), "x\\u{0}y\\nz");
        assert_eq!(esc("\u{202e}evil"), "\\u{202e}evil");
        assert_eq!(esc("\u{2066}i\u{2069}"), "\\u{2066}i\\u{2069}");
        assert_eq!(esc_message("one\ntwo\u{1b}"), "one\ntwo\\u{1b}");
        let v = serde_json::json!({"a\u{7}": ["\u{9b}x", 3]});
        assert_eq!(escaped(&v), serde_json::json!({"a\\u{7}": ["\\u{9b}x", 3]}));
    }
}
