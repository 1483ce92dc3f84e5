//! Refusals audited once per interval per key, with a count: a peer (or an unpaired
//! practice) that is refused again and again — every redial of an unpaired practice, every
//! garbage stream — leaves one audit entry per interval, not one per attempt.

use std::collections::BTreeMap;

/// The interval over which repeated refusals of one key are counted into one entry.
pub const REFUSAL_INTERVAL_MS: u64 = 600_000;

#[derive(Debug, Default)]
pub struct RefusalThrottle {
    keys: BTreeMap<String, Window>,
}

#[derive(Debug)]
struct Window {
    since: u64,
    suppressed: u64,
}

/// What to audit for a refusal just noted, or for a window just closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub key: String,
    /// Refusals this entry stands for (1 for the first of a window).
    pub count: u64,
    /// The first of a new window (else a summary of the repeats of a closed one).
    pub first: bool,
}

impl RefusalThrottle {
    /// Notes one refusal of `key` at `now` (monotonic ms); returns what to audit now.
    pub fn note(&mut self, key: &str, now: u64) -> Vec<Report> {
        let mut out = Vec::new();
        if let Some(w) = self.keys.get(key)
            && w.since + REFUSAL_INTERVAL_MS <= now
        {
            let w = self.keys.remove(key).expect("present");
            if w.suppressed > 0 {
                out.push(Report {
                    key: key.to_string(),
                    count: w.suppressed,
                    first: false,
                });
            }
        }
        match self.keys.get_mut(key) {
            Some(w) => w.suppressed += 1,
            None => {
                // Bounded: a flood of distinct keys (certificates are free to make) keeps at
                // most this many windows; the oldest is closed early.
                if self.keys.len() >= 4096
                    && let Some(oldest) = self
                        .keys
                        .iter()
                        .min_by_key(|(_, w)| w.since)
                        .map(|(k, _)| k.clone())
                {
                    let w = self.keys.remove(&oldest).expect("present");
                    if w.suppressed > 0 {
                        out.push(Report {
                            key: oldest,
                            count: w.suppressed,
                            first: false,
                        });
                    }
                }
                self.keys.insert(
                    key.to_string(),
                    Window {
                        since: now,
                        suppressed: 0,
                    },
                );
                out.push(Report {
                    key: key.to_string(),
                    count: 1,
                    first: true,
                });
            }
        }
        out
    }

    /// When the earliest window with repeats to report ends.
    pub fn next_flush(&self) -> Option<u64> {
        self.keys
            .values()
            .filter(|w| w.suppressed > 0)
            .map(|w| w.since + REFUSAL_INTERVAL_MS)
            .min()
    }

    /// Closes the windows that ended by `now`: their repeats, to audit as one entry each.
    pub fn flush(&mut self, now: u64) -> Vec<Report> {
        let ended: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, w)| w.since + REFUSAL_INTERVAL_MS <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for k in ended {
            let w = self.keys.remove(&k).expect("present");
            if w.suppressed > 0 {
                out.push(Report {
                    key: k,
                    count: w.suppressed,
                    first: false,
                });
            }
        }
        out
    }
}
