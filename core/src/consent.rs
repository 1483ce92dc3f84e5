//! Consent: who may receive which chart, and whose changes may be applied to it.
//!
//! A grant is chart × peer practice × access × purpose × optional expiry, with who recorded
//! it and when. These rules are the single place that decides; the sync layer asks them on
//! every outbound chart and every inbound change, keyed by the TLS-pinned peer identity.

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
        }
    }
}

/// The grant that applies to `chart` for a peer: a grant for the chart itself, else an
/// all-charts grant. `grants` are that peer's grants.
pub fn applicable<'a>(grants: &'a [Grant], chart_id: &str) -> Option<&'a Grant> {
    grants
        .iter()
        .find(|g| g.chart_id == chart_id)
        .or_else(|| grants.iter().find(|g| g.chart_id == ALL_CHARTS))
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
