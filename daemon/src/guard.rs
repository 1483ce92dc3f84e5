//! What the local API accepts and how it accounts for what it discloses: bounds on names and
//! free text given by callers (no control or bidi characters, a length limit), a small
//! sliding-window rate limiter, and the audit entries that name each chart a list answer
//! disclosed.
//!
//! Owns: those checks and counters. Must not touch: chart content rules (`chartmesh_core`),
//! SQL, the wire.

use chartmesh_core::audit::AuditEvent;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest user or author name accepted, in characters.
pub const MAX_NAME: usize = 100;

/// Characters that reorder or hide text when shown: bidi embeddings, overrides, isolates
/// and direction marks, and the Unicode line and paragraph separators.
pub fn is_format_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
            | '\u{2028}'
            | '\u{2029}'
    )
}

/// A person's name as recorded in the audit log and as the author of changes: not blank,
/// at most [`MAX_NAME`] characters, no control or bidi characters.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err(format!("{what} is empty: give a name"));
    }
    let n = name.chars().count();
    if n > MAX_NAME {
        return Err(format!(
            "{what} is {n} characters long; at most {MAX_NAME} are accepted"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_control() || is_format_control(*c))
    {
        return Err(format!(
            "{what} contains the control character U+{:04X}; use plain text",
            c as u32
        ));
    }
    Ok(())
}

/// Free text from a caller (a reason): not blank, at most `max` characters, no control
/// characters other than line breaks and tabs, no bidi characters.
pub fn check_text(what: &str, text: &str, max: usize) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err(format!("{what} is empty"));
    }
    let n = text.chars().count();
    if n > max {
        return Err(format!(
            "{what} is {n} characters long; at most {max} are accepted"
        ));
    }
    if let Some(c) = text
        .chars()
        .find(|c| (c.is_control() && !matches!(c, '\n' | '\t' | '\r')) || is_format_control(*c))
    {
        return Err(format!(
            "{what} contains the control character U+{:04X}; use plain text",
            c as u32
        ));
    }
    Ok(())
}

/// The audit entry of a list answer: one entry naming every chart it disclosed (none for
/// an empty list), so `chartmesh audit --chart ID` shows every list that named the patient
/// (not only a count) while a list of thousands costs one chained entry.
pub fn disclosed<'a>(
    actor: &str,
    action: &str,
    what: &str,
    charts: impl Iterator<Item = &'a str>,
) -> Option<AuditEvent> {
    let e = AuditEvent::new(crate::now_ms(), actor, action)
        .detail(what)
        .charts(charts);
    (!e.charts.is_empty()).then_some(e)
}

/// At most `max` events per key in any `window`; the keys kept are bounded (the oldest
/// are forgotten), so a flood of new keys cannot grow it without end.
pub struct RateLimit {
    max: usize,
    window: Duration,
    seen: Mutex<HashMap<String, VecDeque<Instant>>>,
}

/// The most keys a limiter remembers.
const MAX_KEYS: usize = 4096;

impl RateLimit {
    pub fn new(max: usize, window: Duration) -> RateLimit {
        RateLimit {
            max,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Records one event for `key` if the limit allows it; false if it does not.
    pub fn allow(&self, key: &str) -> bool {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&self, key: &str, now: Instant) -> bool {
        let mut seen = self.seen.lock().unwrap();
        if seen.len() >= MAX_KEYS && !seen.contains_key(key) {
            let window = self.window;
            seen.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < window));
            if seen.len() >= MAX_KEYS {
                // Still full of live keys: forget one (the limit is per key, best effort).
                if let Some(k) = seen.keys().next().cloned() {
                    seen.remove(&k);
                }
            }
        }
        let q = seen.entry(key.to_string()).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            q.pop_front();
        }
        if q.len() >= self.max {
            return false;
        }
        q.push_back(now);
        true
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_and_plain() {
        assert!(check_name("--user", "Dr Sela Korvin").is_ok());
        assert!(check_name("--user", "Dr Müller-Lüdenscheidt").is_ok());
        assert!(check_name("--user", "  ").is_err());
        assert!(check_name("--user", &"x".repeat(101)).is_err());
        assert!(check_name("--user", &"é".repeat(100)).is_ok());
        for bad in ["a\u{1b}[2J", "a\0b", "\u{202e}nimda", "a\nb", "x\u{2066}"] {
            assert!(check_name("--user", bad).is_err(), "{bad:?}");
        }
        assert!(check_text("reason", "line one\nline two\tok", 50).is_ok());
        assert!(check_text("reason", "bell\u{7}", 50).is_err());
        assert!(check_text("reason", "\u{202e}x", 50).is_err());
        assert!(check_text("reason", &"y".repeat(51), 50).is_err());
    }

    #[test]
    fn the_limit_holds_per_key_within_the_window() {
        let l = RateLimit::new(2, Duration::from_secs(60));
        let t = Instant::now();
        assert!(l.allow_at("a", t));
        assert!(l.allow_at("a", t));
        assert!(!l.allow_at("a", t + Duration::from_secs(1)));
        assert!(l.allow_at("b", t));
        assert!(l.allow_at("a", t + Duration::from_secs(61)));
    }
}
