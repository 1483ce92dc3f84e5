//! Referrals between practices: the record kept inside the chart (so it travels with the
//! patient), its events, and the rules of who may move it to which status.
//!
//! Owns: the referral's shape in the chart, the status it is in (a fold over its events) and
//! whether a step is allowed for the practice taking it.
//! Must not touch: the store, the network, or consent grants (the daemon records and revokes
//! the grant that goes with a referral).
//!
//! A referral is a map under the chart's `referrals` key, keyed by referral id. Its fields are
//! written once by the referring practice; every later step is an event appended to its
//! `events` list. Appends at two practices both survive a merge, so the status is never a
//! last-writer-wins register: it is computed from the events in a fixed order, and a step
//! that is not allowed from the status reached so far (a completion after a cancellation made
//! at the same time elsewhere) is kept in the record but does not move the status.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a referral stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Requested,
    Accepted,
    Declined,
    Completed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Requested => "requested",
            Status::Accepted => "accepted",
            Status::Declined => "declined",
            Status::Completed => "completed",
            Status::Cancelled => "cancelled",
        }
    }
    /// No further status change is possible.
    pub fn is_closed(self) -> bool {
        matches!(
            self,
            Status::Declined | Status::Completed | Status::Cancelled
        )
    }
}

/// A step taken on a referral.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Request,
    Accept,
    Decline,
    /// A consult note was added (the note itself is in the chart's notes).
    ConsultNote,
    Complete,
    Cancel,
}

impl std::str::FromStr for Step {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "accept" => Step::Accept,
            "decline" => Step::Decline,
            "note" | "consult-note" => Step::ConsultNote,
            "complete" => Step::Complete,
            "cancel" => Step::Cancel,
            _ => {
                return Err(format!(
                    "unknown referral step {s:?}: use accept, decline, note, complete or cancel"
                ));
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Event {
    pub step: Step,
    /// RFC 3339.
    pub at: String,
    /// The person who took the step.
    pub by: String,
    /// The practice where it was taken.
    pub practice: String,
    /// The consult note's id, for [`Step::ConsultNote`] (and a completion with a note).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Referral {
    pub id: String,
    /// The referring practice.
    pub from: String,
    /// The practice referred to.
    pub to: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specialty: Option<String>,
    /// RFC 3339.
    pub requested: String,
    pub requested_by: String,
    #[serde(default)]
    pub events: Vec<Event>,
}

/// Referrals of one chart, by id.
pub type Referrals = BTreeMap<String, Referral>;

/// Which side of a referral a practice is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Referrer,
    Receiver,
}

impl Referral {
    pub fn side(&self, practice: &str) -> Option<Side> {
        if practice == self.from {
            Some(Side::Referrer)
        } else if practice == self.to {
            Some(Side::Receiver)
        } else {
            None
        }
    }

    /// The events in the order the status is computed in: time, then practice, then step,
    /// so every practice computes the same status from the same events.
    pub fn ordered_events(&self) -> Vec<&Event> {
        let mut ev: Vec<&Event> = self.events.iter().collect();
        ev.sort_by(|a, b| {
            (a.at.as_str(), a.practice.as_str(), a.step as u8).cmp(&(
                b.at.as_str(),
                b.practice.as_str(),
                b.step as u8,
            ))
        });
        ev
    }

    /// The status reached by the events, taking only the steps allowed to the practice that
    /// took them from the status reached before.
    pub fn status(&self) -> Status {
        let mut s = Status::Requested;
        for e in self.ordered_events() {
            let side = self.side(&e.practice);
            if let Ok(Some(next)) = transition(s, e.step, side) {
                s = next;
            }
        }
        s
    }

    /// The ids of the consult notes written for this referral.
    pub fn consult_notes(&self) -> Vec<&str> {
        self.events
            .iter()
            .filter_map(|e| e.note_id.as_deref())
            .collect()
    }
}

/// The practices that the steps new in `after` (compared with `before`) say they were taken
/// at: each new event's practice, and each new referral's referring practice. A merge from a
/// peer may only add steps claiming that peer (the store refuses anything else), so one
/// practice cannot cancel, accept or complete a referral in another's name.
pub fn claims_added(before: &Referrals, after: &Referrals) -> Vec<String> {
    let mut out = Vec::new();
    for (id, r) in after {
        match before.get(id) {
            None => {
                out.push(r.from.clone());
                out.extend(r.events.iter().map(|e| e.practice.clone()));
            }
            Some(old) => out.extend(
                r.events
                    .iter()
                    .filter(|e| !old.events.contains(e))
                    .map(|e| e.practice.clone()),
            ),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// May `side` take `step` from status `s`? Ok(Some(next)) moves the status, Ok(None) keeps it
/// (a consult note), Err says why not, in words for the user.
pub fn transition(s: Status, step: Step, side: Option<Side>) -> Result<Option<Status>, String> {
    use Side::*;
    use Status::*;
    let side = side.ok_or("this practice is neither the referring nor the receiving one")?;
    match (step, side, s) {
        (Step::Request, _, _) => Err("a referral is requested once, when it is made".into()),
        (Step::Accept, Receiver, Requested) => Ok(Some(Accepted)),
        (Step::Decline, Receiver, Requested) => Ok(Some(Declined)),
        (Step::ConsultNote, Receiver, Requested | Accepted) => Ok(None),
        (Step::Complete, Receiver, Accepted) => Ok(Some(Completed)),
        (Step::Cancel, Referrer, Requested | Accepted) => Ok(Some(Cancelled)),
        (Step::Accept | Step::Decline | Step::ConsultNote | Step::Complete, Referrer, _) => Err(
            "only the practice the patient was referred to can accept, decline, add a consult note or complete"
                .into(),
        ),
        (Step::Cancel, Receiver, _) => {
            Err("only the referring practice can cancel; decline it instead".into())
        }
        (_, _, s) => Err(format!("the referral is {}", s.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn referral(events: &[(Step, &str, &str)]) -> Referral {
        Referral {
            id: "r1".into(),
            from: "A".into(),
            to: "B".into(),
            reason: "r".into(),
            specialty: None,
            requested: "2026-01-01T00:00:00Z".into(),
            requested_by: "dr a".into(),
            events: events
                .iter()
                .map(|(step, at, practice)| Event {
                    step: *step,
                    at: (*at).into(),
                    by: "x".into(),
                    practice: (*practice).into(),
                    note_id: None,
                })
                .collect(),
        }
    }

    #[test]
    fn the_round_trip_moves_through_each_status() {
        let mut r = referral(&[(Step::Request, "2026-01-01T00:00:00Z", "A")]);
        assert_eq!(r.status(), Status::Requested);
        r.events
            .extend(referral(&[(Step::Accept, "2026-01-02T00:00:00Z", "B")]).events);
        assert_eq!(r.status(), Status::Accepted);
        r.events
            .extend(referral(&[(Step::ConsultNote, "2026-01-03T00:00:00Z", "B")]).events);
        assert_eq!(r.status(), Status::Accepted);
        r.events
            .extend(referral(&[(Step::Complete, "2026-01-04T00:00:00Z", "B")]).events);
        assert_eq!(r.status(), Status::Completed);
        assert!(r.status().is_closed());
    }

    #[test]
    fn steps_by_the_wrong_side_or_from_the_wrong_status_do_not_count() {
        // A cannot accept its own referral; B cannot cancel it; nothing completes unaccepted.
        let r = referral(&[
            (Step::Accept, "2026-01-02T00:00:00Z", "A"),
            (Step::Cancel, "2026-01-02T00:00:01Z", "B"),
            (Step::Complete, "2026-01-02T00:00:02Z", "B"),
        ]);
        assert_eq!(r.status(), Status::Requested);
        assert!(transition(Status::Requested, Step::Accept, Some(Side::Referrer)).is_err());
        assert!(transition(Status::Completed, Step::Cancel, Some(Side::Referrer)).is_err());
        assert!(transition(Status::Requested, Step::Accept, None).is_err());
    }

    #[test]
    fn the_practices_claimed_by_new_steps_are_listed() {
        let before: Referrals = [(
            "r1".to_string(),
            referral(&[(Step::Request, "2026-01-01T00:00:00Z", "A")]),
        )]
        .into();
        let mut after = before.clone();
        assert!(claims_added(&before, &after).is_empty());
        after
            .get_mut("r1")
            .unwrap()
            .events
            .extend(referral(&[(Step::Cancel, "2026-01-02T00:00:00Z", "A")]).events);
        assert_eq!(claims_added(&before, &after), vec!["A".to_string()]);
        let mut r2 = referral(&[(Step::Request, "2026-01-03T00:00:00Z", "C")]);
        r2.from = "C".into();
        after.insert("r2".into(), r2);
        assert_eq!(
            claims_added(&before, &after),
            vec!["A".to_string(), "C".to_string()]
        );
    }

    #[test]
    fn concurrent_cancel_and_complete_resolve_the_same_everywhere() {
        // Accepted; then A cancels and B completes at the same time. Whichever is earlier
        // wins, and the order of the events in the list does not matter.
        let mut e = vec![
            (Step::Accept, "2026-01-02T00:00:00Z", "B"),
            (Step::Cancel, "2026-01-03T00:00:00Z", "A"),
            (Step::Complete, "2026-01-03T00:00:05Z", "B"),
        ];
        assert_eq!(referral(&e).status(), Status::Cancelled);
        e.swap(1, 2);
        assert_eq!(referral(&e).status(), Status::Cancelled);
    }
}
