//! The patient's copy of their record: the readable HTML page and the International Patient
//! Summary (FHIR R4 document Bundle) of one chart, with where the chart was shared.
//!
//! Owns: gathering what the copy shows (chart, history, grants, peer names) and auditing it.
//! Must not touch: the layout of the page or the FHIR mapping (`chartmesh_core::patient_copy`,
//! `chartmesh_core::fhir`).

use chartmesh_core::audit::AuditEvent;
use chartmesh_core::patient_copy::Sharing;
use chartmesh_core::{Chart, fhir};
use serde_json::Value;

use crate::node::{Node, NodeError};
use crate::{now_ms, rfc3339};

/// The two parts of a patient copy.
pub struct PatientCopy {
    pub html: String,
    pub ips: Value,
}

impl Node {
    /// Builds the patient copy of a chart. Audited as an export (`patient-copy`).
    pub async fn patient_copy(&self, id: &str, actor: &str) -> Result<PatientCopy, NodeError> {
        let key = id.to_string();
        let practice = self.config.practice.name.clone();
        let now = now_ms();
        let copy = self
            .read(move |store| {
                let mut rec = store.get(&key)?.ok_or(NodeError::NotFound(key.clone()))?;
                let chart: Chart = rec.doc.to_chart()?;
                let history = rec.doc.history();
                let names: std::collections::HashMap<String, String> = store
                    .peers()?
                    .into_iter()
                    .map(|p| (p.id.to_string(), p.name))
                    .collect();
                let name = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());
                let mut shared: Vec<Sharing> = Vec::new();
                match &rec.origin {
                    // A chart held from its custodian: say where it came from.
                    Some(origin) => shared.push(Sharing {
                        practice: name(origin),
                        purpose: "custodian of this record".into(),
                        access: rec.access.clone().unwrap_or_default(),
                        since: rfc3339(rec.created_ms),
                        state: if rec.revoked_ms.is_some() {
                            "revoked"
                        } else {
                            "active"
                        }
                        .into(),
                    }),
                    None => {
                        for g in store.grants(None)? {
                            if g.chart_id != key
                                && g.chart_id != chartmesh_core::consent::ALL_CHARTS
                            {
                                continue;
                            }
                            let state = if g.revoked_ms.is_some() {
                                "revoked"
                            } else if g.is_active(now) {
                                "active"
                            } else {
                                "expired"
                            };
                            shared.push(Sharing {
                                practice: name(&g.peer.to_string()),
                                purpose: serde_json::to_value(g.purpose)
                                    .ok()
                                    .and_then(|v| v.as_str().map(str::to_string))
                                    .unwrap_or_default(),
                                access: serde_json::to_value(g.access)
                                    .ok()
                                    .and_then(|v| v.as_str().map(str::to_string))
                                    .unwrap_or_default(),
                                since: rfc3339(g.recorded_ms),
                                state: state.into(),
                            });
                        }
                    }
                }
                let ts = rfc3339(now);
                let mut ips = fhir::ips_bundle(&chart, &history, &practice, &ts);
                // Served inside a JSON answer: decimals as plain numbers.
                fhir::json::unmark(&mut ips);
                Ok(PatientCopy {
                    html: chartmesh_core::patient_copy::html(&chart, &shared, &practice, &ts),
                    ips,
                })
            })
            .await?;
        self.audit(vec![
            AuditEvent::new(now, actor, "export")
                .chart(id)
                .detail("format=patient-copy"),
        ])
        .await?;
        Ok(copy)
    }
}
