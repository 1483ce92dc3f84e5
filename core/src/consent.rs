//! Consent: who may receive which chart, and whose changes may be applied to it.
//!
//! A grant is chart × peer practice × access × purpose × optional expiry, with who recorded
//! it and when. These rules are the single place that decides, on both sides of a grant:
//!
//! - the custodian (the practice whose chart it is): [`may_send`] a chart to a peer,
//!   [`may_apply_change`] a peer's changes to its chart, [`may_grant`] (share or refer);
//! - the holder of a copy received from its custodian: [`may_edit_held`] the copy here,
//!   [`may_return`] its changes to the custodian, [`may_accept_copy`] from a peer;
//! - referrals: [`may_claim_referral_steps`] (a practice acts only in its own name).
//!
//! The sync engine asks them on every item offered, sent and applied, keyed by the TLS-pinned
//! peer identity; the store asks them inside the transaction that writes what they guard.
//! SQL may pre-select candidates for speed, but nothing is sent, applied or edited on a SQL
//! condition alone.

use serde::{Deserialize, Serialize};
use std::str::FromStr;

use crate::error::ValidationError;
use crate::ids::PracticeId;

/// The chart id of a grant that covers every chart this practice holds (own charts only).
pub const ALL_CHARTS: &str = "*";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    Read,
    ReadWrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    Referral,
    Continuity,
    Emergency,
    Replica,
}

impl FromStr for Access {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Access::Read),
            "read-write" => Ok(Access::ReadWrite),
            _ => Err(ValidationError::new(
                "access",
                format!("{s:?}: use read or read-write"),
            )),
        }
    }
}

impl FromStr for Purpose {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "referral" => Ok(Purpose::Referral),
            "continuity" => Ok(Purpose::Continuity),
            "emergency" => Ok(Purpose::Emergency),
            "replica" => Ok(Purpose::Replica),
            _ => Err(ValidationError::new(
                "purpose",
                format!("{s:?}: use referral, continuity, emergency or replica"),
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    /// A chart id, or [`ALL_CHARTS`].
    pub chart_id: String,
    pub peer: PracticeId,
    pub access: Access,
    pub purpose: Purpose,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
    pub recorded_by: String,
    pub recorded_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<i64>,
}

impl Grant {
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.revoked_ms.is_none() && self.expires_ms.is_none_or(|e| now_ms < e)
    }
}

/// Why something was refused. Never shown to the peer (a refusal looks like an unknown
/// chart); recorded in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    NoGrant,
    Expired,
    Revoked,
    ReadOnly,
    NotOurs,
    ForeignActor,
    /// A referral step claimed in another practice's name.
    ForeignClaim,
    /// A chart id that is not a valid chart id.
    InvalidId,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoGrant => "no-grant",
            Refusal::Expired => "expired",
            Refusal::Revoked => "revoked",
            Refusal::ReadOnly => "read-only",
            Refusal::NotOurs => "received-chart-not-reshareable",
            Refusal::ForeignActor => "change-under-another-practice",
            Refusal::ForeignClaim => "referral-step-claims-another-practice",
            Refusal::InvalidId => "invalid-chart-id",
        }
    }
}

/// The grant that applies to `chart` for a peer: a grant for the chart itself, else an
/// all-charts grant. `grants` are that peer's grants.
pub fn applicable<'a>(grants: &'a [Grant], chart_id: &str) -> Option<&'a Grant> {
    let find = |id: &str| grants.iter().find(|g| g.chart_id == id);
    prefer(find(chart_id), find(ALL_CHARTS))
}

/// The rule both [`applicable`] and [`GrantIndex::applicable`] follow: the chart's own grant
/// (active, expired or revoked) wins over an all-charts grant, so revoking one chart under a
/// share of all charts stops that chart alone.
fn prefer<'a>(own: Option<&'a Grant>, all: Option<&'a Grant>) -> Option<&'a Grant> {
    own.or(all)
}

/// One peer's grants indexed by chart: [`applicable`] in constant time, for a pass over many
/// charts (an offer, a delivery, an apply batch), where scanning the list for each chart
/// would cost charts × grants with a grant per chart.
pub struct GrantIndex<'a> {
    by_chart: std::collections::HashMap<&'a str, &'a Grant>,
    all: Option<&'a Grant>,
}

impl<'a> GrantIndex<'a> {
    pub fn new(grants: &'a [Grant]) -> GrantIndex<'a> {
        let mut by_chart = std::collections::HashMap::with_capacity(grants.len());
        for g in grants {
            by_chart.entry(g.chart_id.as_str()).or_insert(g);
        }
        GrantIndex {
            all: by_chart.get(ALL_CHARTS).copied(),
            by_chart,
        }
    }

    /// The same answer as [`applicable`] over the grants it was made from.
    pub fn applicable(&self, chart_id: &str) -> Option<&'a Grant> {
        prefer(self.by_chart.get(chart_id).copied(), self.all)
    }
}

fn active(grant: Option<&Grant>, now_ms: i64) -> Result<&Grant, Refusal> {
    let g = grant.ok_or(Refusal::NoGrant)?;
    if g.revoked_ms.is_some() {
        return Err(Refusal::Revoked);
    }
    if !g.is_active(now_ms) {
        return Err(Refusal::Expired);
    }
    Ok(g)
}

/// May this practice send (or announce) the chart to the peer? Only with an active grant,
/// and only a chart this practice holds as its own: a received chart is never re-shared.
pub fn may_send(
    grant: Option<&Grant>,
    chart_origin: Option<&str>,
    now_ms: i64,
) -> Result<(), Refusal> {
    if chart_origin.is_some() {
        return Err(Refusal::NotOurs);
    }
    active(grant, now_ms).map(|_| ())
}

/// May a change to the chart from the peer be applied? Only under an active read-write grant,
/// and only if every change is written under the peer's own actor.
pub fn may_apply_change(
    grant: Option<&Grant>,
    peer: &PracticeId,
    change_actors: &[[u8; 16]],
    now_ms: i64,
) -> Result<(), Refusal> {
    let g = active(grant, now_ms)?;
    if g.access != Access::ReadWrite {
        return Err(Refusal::ReadOnly);
    }
    if change_actors.iter().any(|a| a != &peer.actor_bytes()) {
        return Err(Refusal::ForeignActor);
    }
    Ok(())
}

/// May this practice record a grant of the chart? Not for a chart it received from elsewhere.
pub fn may_grant(chart_origin: Option<&str>) -> Result<(), Refusal> {
    if chart_origin.is_some() {
        Err(Refusal::NotOurs)
    } else {
        Ok(())
    }
}

/// Does an emergency access to `chart` need a grant of its own? Not when a grant in force
/// already covers it: break-glass never replaces (so never narrows) an existing grant.
pub fn emergency_grant_needed(grants: &[Grant], chart_id: &str, now_ms: i64) -> bool {
    !applicable(grants, chart_id).is_some_and(|g| g.is_active(now_ms))
}

/// How this practice holds a copy of another practice's chart (as recorded when the copy
/// was received or its grant last changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held<'a> {
    /// The practice whose chart it is.
    pub custodian: &'a str,
    pub access: Option<Access>,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
}

fn held_active(h: &Held<'_>, now_ms: i64) -> Result<(), Refusal> {
    if h.revoked_ms.is_some() {
        return Err(Refusal::Revoked);
    }
    if h.expires_ms.is_some_and(|e| now_ms >= e) {
        return Err(Refusal::Expired);
    }
    Ok(())
}

/// Is a chart served to local applications as a current record (the FHIR API, the due
/// list)? A copy whose grant was revoked stays, marked, as the record of what was received
/// (`chart show` says so), but is no longer offered as the patient's current chart.
pub fn serves_as_current(revoked_ms: Option<i64>) -> bool {
    revoked_ms.is_none()
}

/// May a copy held from its custodian be changed here? Only under an active read-write grant.
pub fn may_edit_held(h: &Held<'_>, now_ms: i64) -> Result<(), Refusal> {
    held_active(h, now_ms)?;
    if h.access != Some(Access::ReadWrite) {
        return Err(Refusal::ReadOnly);
    }
    Ok(())
}

/// May changes made here to a held copy be offered and sent back to `to`? Only to the
/// copy's custodian, and only while the copy may be edited here (active, read-write).
pub fn may_return(h: &Held<'_>, to: &str, now_ms: i64) -> Result<(), Refusal> {
    if h.custodian != to {
        return Err(Refusal::NotOurs);
    }
    may_edit_held(h, now_ms)
}

/// May a chart sent by a peer (its custodian, as the TLS-pinned identity proves) be filed
/// here as its copy? Only under a valid chart id: the id becomes part of the copy's local key.
pub fn may_accept_copy(chart_id: &str) -> Result<(), Refusal> {
    crate::ids::ChartId::parse(chart_id)
        .map(|_| ())
        .map_err(|_| Refusal::InvalidId)
}

/// May a peer's changes add these referral steps (`claims`: the practices the new steps name)
/// to one of this practice's charts? Only steps in the peer's own name. (A copy held from its
/// custodian carries steps other practices took, relayed and checked by the custodian.)
pub fn may_claim_referral_steps(claims: &[String], peer: &str) -> Result<(), Refusal> {
    if claims.iter().any(|p| p != peer) {
        return Err(Refusal::ForeignClaim);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(chart: &str, access: Access, expires: Option<i64>) -> Grant {
        Grant {
            chart_id: chart.into(),
            peer: PracticeId::from_certificate_der(b"b"),
            access,
            purpose: Purpose::Continuity,
            expires_ms: expires,
            recorded_by: "admin".into(),
            recorded_ms: 0,
            revoked_ms: None,
        }
    }

    #[test]
    fn nothing_is_sent_without_an_active_grant() {
        assert_eq!(may_send(None, None, 10), Err(Refusal::NoGrant));
        let g = grant("c1", Access::Read, Some(100));
        assert_eq!(may_send(Some(&g), None, 10), Ok(()));
        assert_eq!(may_send(Some(&g), None, 100), Err(Refusal::Expired));
        let mut r = g.clone();
        r.revoked_ms = Some(5);
        assert_eq!(may_send(Some(&r), None, 10), Err(Refusal::Revoked));
        assert_eq!(
            may_send(Some(&g), Some("another practice"), 10),
            Err(Refusal::NotOurs)
        );
    }

    #[test]
    fn a_chart_grant_wins_over_an_all_charts_grant() {
        let gs = vec![
            grant(ALL_CHARTS, Access::Read, None),
            grant("c1", Access::ReadWrite, None),
        ];
        assert_eq!(applicable(&gs, "c1").unwrap().access, Access::ReadWrite);
        assert_eq!(applicable(&gs, "c2").unwrap().chart_id, ALL_CHARTS);
        assert!(applicable(&gs[1..], "c2").is_none());
        for list in [&gs[..], &gs[1..], &gs[..1], &[][..]] {
            let index = GrantIndex::new(list);
            for c in ["c1", "c2", "c3", ALL_CHARTS] {
                assert_eq!(index.applicable(c), applicable(list, c), "{c}");
            }
        }
    }

    #[test]
    fn a_held_copy_is_edited_and_returned_only_under_an_active_read_write_grant() {
        let rw = Held {
            custodian: "A",
            access: Some(Access::ReadWrite),
            expires_ms: Some(100),
            revoked_ms: None,
        };
        assert_eq!(may_edit_held(&rw, 10), Ok(()));
        assert_eq!(may_return(&rw, "A", 10), Ok(()));
        assert_eq!(may_return(&rw, "B", 10), Err(Refusal::NotOurs));
        assert_eq!(may_edit_held(&rw, 100), Err(Refusal::Expired));
        assert_eq!(may_return(&rw, "A", 100), Err(Refusal::Expired));
        let ro = Held {
            access: Some(Access::Read),
            ..rw
        };
        assert_eq!(may_edit_held(&ro, 10), Err(Refusal::ReadOnly));
        let revoked = Held {
            revoked_ms: Some(5),
            ..rw
        };
        assert_eq!(may_return(&revoked, "A", 10), Err(Refusal::Revoked));
        assert_eq!(may_accept_copy("chart-1"), Ok(()));
        for bad in ["*", "..\\x", "C:\\a", "a\u{1b}[31m", "", &"x".repeat(129)] {
            assert_eq!(may_accept_copy(bad), Err(Refusal::InvalidId), "{bad:?}");
        }
        assert_eq!(may_claim_referral_steps(&["B".into()], "B"), Ok(()));
        assert_eq!(
            may_claim_referral_steps(&["B".into(), "A".into()], "B"),
            Err(Refusal::ForeignClaim)
        );
    }

    #[test]
    fn changes_need_read_write_and_the_peers_own_actor() {
        let peer = PracticeId::from_certificate_der(b"b");
        let other = PracticeId::from_certificate_der(b"c");
        let rw = grant("c1", Access::ReadWrite, None);
        let ro = grant("c1", Access::Read, None);
        assert_eq!(
            may_apply_change(Some(&rw), &peer, &[peer.actor_bytes()], 1),
            Ok(())
        );
        assert_eq!(
            may_apply_change(Some(&ro), &peer, &[peer.actor_bytes()], 1),
            Err(Refusal::ReadOnly)
        );
        assert_eq!(
            may_apply_change(None, &peer, &[peer.actor_bytes()], 1),
            Err(Refusal::NoGrant)
        );
        assert_eq!(
            may_apply_change(Some(&rw), &peer, &[other.actor_bytes()], 1),
            Err(Refusal::ForeignActor)
        );
    }
}
