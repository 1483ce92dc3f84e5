//! Emergency ("break-glass") access: a clinician at a paired practice asks the custodians it
//! is connected to for a patient's chart, by MRN or by family name and birth date, with a
//! reason. Each custodian's configured policy decides; an allowed request becomes a read-only
//! grant (purpose emergency) that expires by itself, and the chart travels by normal sync.
//!
//! Owns: the request and answer, the validation of a query, and the decision.
//! Must not touch: the store, the network or the clock (the daemon passes matches and time).
//!
//! The decision is taken before any lookup is revealed: with a deny policy the answer is the
//! same whether or not the patient is known here, and a query matching several patients is
//! refused instead of disclosing them all.

use serde::{Deserialize, Serialize};

/// The most charts one request may open (one patient may have a few charts).
pub const MAX_MATCHES: usize = 3;
/// The longest reason accepted.
pub const MAX_REASON: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Query {
    pub mrn: Option<String>,
    pub family: Option<String>,
    /// YYYY-MM-DD.
    pub birth_date: Option<String>,
}

impl Query {
    /// An MRN, or a family name with a birth date: nothing broader.
    pub fn validate(&self) -> Result<(), String> {
        let set = |s: &Option<String>| s.as_deref().is_some_and(|x| !x.trim().is_empty());
        if set(&self.mrn) {
            return Ok(());
        }
        if set(&self.family) && set(&self.birth_date) {
            return crate::chart::date("birthDate", self.birth_date.as_deref().unwrap_or(""))
                .map_err(|e| e.to_string());
        }
        Err("search by --mrn, or by --family with --birth-date".into())
    }
}

/// A custodian's policy for emergency requests from its paired practices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Deny,
    /// Allow, read-only, for this long.
    Allow {
        duration_ms: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub query: Query,
    pub reason: String,
    /// The clinician asking (their user name at the requesting practice).
    pub requester: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// Read-only access to these charts until `expires_ms` (by the custodian's clock), that
    /// is for `valid_for_ms` from now: the requester counts from when it hears the answer, by
    /// its own clock, so a skew between the two clocks never lengthens the access. The
    /// charts arrive by sync.
    Granted {
        charts: Vec<String>,
        expires_ms: i64,
        valid_for_ms: i64,
    },
    /// Refused, with the reason in words.
    Denied { why: String },
    /// The policy allows, but no chart here matches.
    NotFound,
}

/// What the custodian answers, given its policy and the charts matching the query.
pub fn decide(policy: Policy, request: &Request, matches: &[String], now_ms: i64) -> Answer {
    if let Err(e) = request.query.validate() {
        return Answer::Denied { why: e };
    }
    if request.reason.trim().is_empty() {
        return Answer::Denied {
            why: "an emergency request needs a reason".into(),
        };
    }
    if request.reason.len() > MAX_REASON {
        return Answer::Denied {
            why: format!("the reason is longer than {MAX_REASON} bytes"),
        };
    }
    let duration_ms = match policy {
        Policy::Deny => {
            return Answer::Denied {
                why: "this practice does not allow emergency access".into(),
            };
        }
        Policy::Allow { duration_ms } => duration_ms,
    };
    match matches.len() {
        0 => Answer::NotFound,
        n if n > MAX_MATCHES => Answer::Denied {
            why: format!("the query matches {n} patients here; ask by MRN"),
        },
        _ => Answer::Granted {
            charts: matches.to_vec(),
            expires_ms: now_ms + duration_ms,
            valid_for_ms: duration_ms,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(mrn: Option<&str>, family: Option<&str>, birth: Option<&str>, reason: &str) -> Request {
        Request {
            query: Query {
                mrn: mrn.map(Into::into),
                family: family.map(Into::into),
                birth_date: birth.map(Into::into),
            },
            reason: reason.into(),
            requester: "dr x".into(),
        }
    }

    #[test]
    fn deny_answers_the_same_whether_or_not_the_patient_is_known() {
        let r = req(Some("M1"), None, None, "unconscious in ER");
        let a = decide(Policy::Deny, &r, &["c1".into()], 0);
        let b = decide(Policy::Deny, &r, &[], 0);
        assert_eq!(a, b);
        assert!(matches!(a, Answer::Denied { .. }));
    }

    #[test]
    fn allow_grants_until_the_duration_ends_and_refuses_broad_or_bad_queries() {
        let allow = Policy::Allow { duration_ms: 1000 };
        let r = req(Some("M1"), None, None, "unconscious in ER");
        assert_eq!(
            decide(allow, &r, &["c1".into()], 50),
            Answer::Granted {
                charts: vec!["c1".into()],
                expires_ms: 1050,
                valid_for_ms: 1000
            }
        );
        assert_eq!(decide(allow, &r, &[], 50), Answer::NotFound);
        let many: Vec<String> = (0..4).map(|i| format!("c{i}")).collect();
        assert!(matches!(decide(allow, &r, &many, 0), Answer::Denied { .. }));
        for bad in [
            req(None, Some("Ward"), None, "x"),
            req(None, None, Some("1960-01-01"), "x"),
            req(None, Some("Ward"), Some("1960-13-01"), "x"),
            req(Some("M1"), None, None, "  "),
        ] {
            assert!(
                matches!(
                    decide(allow, &bad, &["c1".into()], 0),
                    Answer::Denied { .. }
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            decide(
                allow,
                &req(None, Some("Ward"), Some("1960-01-01"), "x"),
                &["c1".into()],
                0
            ),
            Answer::Granted { .. }
        ));
    }
}
