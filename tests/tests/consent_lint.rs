//! Every consent decision is `chartmesh_core::consent`'s (docs/ARCHITECTURE.md, "Consent").
//! This test reads the daemon's and the store's sources and fails on a consent condition
//! written inline: comparing a grant's access, or deciding on a grant's or a copy's
//! revocation or expiry, outside the listed places that only display or count (and say so).

use std::path::Path;

/// (file, a fragment of the line) where such a condition only labels, counts or records.
const ALLOWED: &[(&str, &str)] = &[
    // Status and console counts of grants in force: no decision.
    ("daemon/src/api.rs", "\"shares\""),
    ("daemon/src/api.rs", "let active = g.is_active(now)"),
    ("daemon/src/sync.rs", "let active = |g"),
    ("daemon/src/sync.rs", "!g.is_active(now)"),
    // The patient copy labels where the record was shared.
    ("daemon/src/patient_copy.rs", "revoked_ms.is_some()"),
    ("daemon/src/patient_copy.rs", "g.is_active(now)"),
    // A problem's clinical status (`Condition::is_active`), not a grant.
    ("daemon/src/node.rs", ".filter(|c| c.is_active())"),
    // Recording a revocation: which stored grant to mark (not whether to disclose).
    (
        "store/src/consent.rs",
        "g.chart_id == ALL_CHARTS && g.is_active(now_ms)",
    ),
    // The sync store reports what is held (the engine decides) and records what arrived.
    ("store/src/sync.rs", "revoked: c.revoked_ms.is_some()"),
    ("store/src/sync.rs", "if r.revoked_ms.is_some()"),
    ("store/src/sync.rs", "|| r.revoked_ms.is_some()"),
];

const PATTERNS: &[&str] = &[
    "== Some(Access::ReadWrite)",
    "!= Some(Access::ReadWrite)",
    "== Access::ReadWrite",
    "!= Access::ReadWrite",
    ".is_active(",
    "revoked_ms.is_some()",
    "revoked_ms.is_none()",
    "expires_ms.is_some_and(",
];

#[test]
fn no_consent_condition_is_written_outside_core_consent() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut found = Vec::new();
    for dir in ["daemon/src", "store/src"] {
        for file in chartmesh_tests::files_under(&root.join(dir)) {
            if file.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = file
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&file).unwrap();
            // Test modules may build whatever they test with.
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for (n, line) in code.lines().enumerate() {
                if !PATTERNS.iter().any(|p| line.contains(p)) {
                    continue;
                }
                let allowed = ALLOWED
                    .iter()
                    .any(|(f, frag)| *f == rel && line.contains(frag));
                if !allowed {
                    found.push(format!("{rel}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "consent conditions written inline (decide with chartmesh_core::consent):\n{}",
        found.join("\n")
    );
}
