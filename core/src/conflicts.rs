//! The clinical conflict inbox's rules: which merges of concurrent edits are clinically risky
//! and must be reviewed by a person instead of passing silently.
//!
//! Owns: the rules, applied to three views of a chart's medications and allergies: this
//! practice's before the merge, the peer's (the changes it sent), and the merged result.
//! Must not touch: the store or the network; the store calls [`review`] inside the
//! transaction that applies a peer's changes and files what it returns.
//!
//! Automerge merges concurrent edits without loss, which is right for data and wrong for
//! some clinical situations: both survive, and nobody is told. Two rules, each requiring
//! that the two sides really did act without seeing each other (an entry present on one
//! side only), so a sequential edit never raises them:
//! - **duplicate-dose**: the same drug added at both practices with different doses.
//! - **allergy-removed-while-prescribed**: an allergy removed at one practice while, at the
//!   other, a drug was prescribed that the allergy (or its drug class) would alert on.

use serde::{Deserialize, Serialize};

use crate::alerts::{allergy_alerts_for, is_active, same_drug};
use crate::chart::{Allergy, Medication};

/// The medications and allergies of a chart as one side saw them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub medications: Vec<Medication>,
    pub allergies: Vec<Allergy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    DuplicateDose,
    AllergyRemovedWhilePrescribed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::DuplicateDose => "duplicate-dose",
            Kind::AllergyRemovedWhilePrescribed => "allergy-removed-while-prescribed",
        }
    }
}

/// One risky merge, for review. `summary` names the drugs and substances involved (it is
/// chart content: kept in the encrypted store, never logged or audited).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub kind: Kind,
    pub summary: String,
}

fn dose(m: &Medication) -> String {
    m.dose
        .as_deref()
        .unwrap_or("no dose")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The risky outcomes of merging `peer` into `local`, giving `merged`. Deterministic: the
/// same conflict is described the same way at both practices.
pub fn review(local: &View, peer: &View, merged: &View) -> Vec<Conflict> {
    let mut out: Vec<Conflict> = Vec::new();
    let only_local =
        |m: &Medication| local.medications.contains(m) && !peer.medications.contains(m);
    let only_peer = |m: &Medication| peer.medications.contains(m) && !local.medications.contains(m);
    let active: Vec<&Medication> = merged.medications.iter().filter(|m| is_active(m)).collect();

    for (i, a) in active.iter().enumerate() {
        for b in &active[i + 1..] {
            let concurrent = (only_local(a) && only_peer(b)) || (only_peer(a) && only_local(b));
            if concurrent && same_drug(&a.name, &b.name) && dose(a) != dose(b) {
                let mut doses = [
                    a.dose.clone().unwrap_or_default(),
                    b.dose.clone().unwrap_or_default(),
                ];
                doses.sort();
                out.push(Conflict {
                    kind: Kind::DuplicateDose,
                    summary: format!(
                        "{} was added at both practices with different doses ({} and {}); keep one and stop the other",
                        a.name, doses[0], doses[1]
                    ),
                });
            }
        }
    }

    for m in &active {
        let side = if only_local(m) {
            local
        } else if only_peer(m) {
            peer
        } else {
            continue;
        };
        let removed: Vec<Allergy> = side
            .allergies
            .iter()
            .filter(|a| !merged.allergies.iter().any(|x| x.substance == a.substance))
            .cloned()
            .collect();
        for alert in allergy_alerts_for(&removed, m) {
            out.push(Conflict {
                kind: Kind::AllergyRemovedWhilePrescribed,
                summary: format!(
                    "the {} allergy was removed at one practice while {} was prescribed at the other; confirm the allergy before the drug is given",
                    alert.with, m.name
                ),
            });
        }
    }
    out.sort_by(|a, b| (a.kind as u8, &a.summary).cmp(&(b.kind as u8, &b.summary)));
    out.dedup();
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An active medication with a dose (also used by the document's merge tests).
    pub(crate) fn med(name: &str, dose: &str) -> Medication {
        Medication {
            name: name.into(),
            code: None,
            system: None,
            dose: Some(dose.into()),
            route: None,
            frequency: None,
            start: None,
            status: Some("active".into()),
            ..Default::default()
        }
    }
    fn allergy(s: &str) -> Allergy {
        Allergy {
            substance: s.into(),
            reaction: None,
            severity: None,
            recorded: None,
            ..Default::default()
        }
    }
    fn view(meds: &[Medication], allergies: &[Allergy]) -> View {
        View {
            medications: meds.to_vec(),
            allergies: allergies.to_vec(),
        }
    }

    #[test]
    fn the_same_drug_added_at_both_sides_with_different_doses_is_flagged() {
        let (a, b) = (med("Metformin", "500 mg"), med("Metformin", "1000 mg"));
        let local = view(std::slice::from_ref(&a), &[]);
        let peer = view(std::slice::from_ref(&b), &[]);
        let merged = view(&[a.clone(), b.clone()], &[]);
        let got = review(&local, &peer, &merged);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].kind, Kind::DuplicateDose);
        // Both practices describe it the same way.
        assert_eq!(review(&peer, &local, &merged), got);
        // The same dose at both sides, or both added at one side in turn: not a conflict.
        let same = med("Metformin", "500  MG");
        assert!(
            review(
                &local,
                &view(std::slice::from_ref(&same), &[]),
                &view(&[a.clone(), same], &[])
            )
            .is_empty()
        );
        assert!(review(&merged, &merged, &merged).is_empty());
        assert!(review(&view(&[], &[]), &merged, &merged).is_empty());
    }

    #[test]
    fn an_allergy_removed_while_a_matching_drug_was_prescribed_is_flagged_on_both_sides() {
        let pen = allergy("Penicillin");
        let amox = med("Amoxicillin", "500 mg");
        // Here the allergy was removed; the peer prescribed amoxicillin still seeing it.
        let local = view(&[], &[]);
        let peer = view(std::slice::from_ref(&amox), std::slice::from_ref(&pen));
        let merged = view(std::slice::from_ref(&amox), &[]);
        let got = review(&local, &peer, &merged);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].kind, Kind::AllergyRemovedWhilePrescribed);
        // The other practice's view of the same merge.
        assert_eq!(review(&peer, &local, &merged), got);
        // A drug outside the allergy's class is not flagged.
        let other = med("Metformin", "500 mg");
        assert!(
            review(
                &local,
                &view(std::slice::from_ref(&other), std::slice::from_ref(&pen)),
                &view(&[other], &[])
            )
            .is_empty()
        );
        // Removed after the prescription was seen (sequential): the peer's view already
        // lacks the allergy, so nothing is flagged.
        assert!(
            review(
                &view(std::slice::from_ref(&amox), std::slice::from_ref(&pen)),
                &merged,
                &merged
            )
            .is_empty()
        );
    }
}
