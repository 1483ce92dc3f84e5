//! API routes of the workflows across practices (referrals, the conflict inbox, corrections)
//! and of the patient copy.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiState, json_body, user};
use crate::guard::{check_name, check_text};
use crate::node::NodeError;

/// The longest reason, resolution or correction note accepted, in characters.
const MAX_REASON: usize = 2000;

#[derive(Deserialize)]
pub(super) struct ReferBody {
    chart: String,
    to: String,
    reason: String,
    specialty: Option<String>,
}

pub(super) async fn refer(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), NodeError> {
    let b: ReferBody = json_body(&body)?;
    check_text("reason", &b.reason, MAX_REASON).map_err(NodeError::Invalid)?;
    if let Some(s) = &b.specialty {
        check_name("specialty", s).map_err(NodeError::Invalid)?;
    }
    let r = st
        .node
        .refer(
            &b.chart,
            &b.to,
            &b.reason,
            b.specialty.as_deref(),
            &user(&headers),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "chart": b.chart, "referral": r })),
    ))
}

#[derive(Deserialize)]
pub(super) struct ReferralsQuery {
    direction: Option<String>,
}

pub(super) async fn referrals(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<ReferralsQuery>,
) -> Result<Json<Value>, NodeError> {
    let list = st
        .node
        .referrals(q.direction.as_deref(), &user(&headers))
        .await?;
    Ok(Json(json!({ "referrals": list })))
}

#[derive(Deserialize, Default)]
pub(super) struct StepBody {
    text: Option<String>,
}

pub(super) async fn referral_step(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((id, step)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, NodeError> {
    let b: StepBody = if body.is_empty() {
        StepBody::default()
    } else {
        json_body(&body)?
    };
    Ok(Json(
        st.node
            .referral_step(&id, &step, b.text.as_deref(), &user(&headers))
            .await?,
    ))
}

#[derive(Deserialize)]
pub(super) struct ConflictsQuery {
    #[serde(default)]
    all: bool,
}

pub(super) async fn conflicts(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<ConflictsQuery>,
) -> Result<Json<Value>, NodeError> {
    let list = st.node.conflicts(q.all, &user(&headers)).await?;
    Ok(Json(json!({ "conflicts": list })))
}

#[derive(Deserialize)]
pub(super) struct ResolveBody {
    resolution: String,
}

pub(super) async fn resolve_conflict(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    body: Bytes,
) -> Result<Json<Value>, NodeError> {
    let b: ResolveBody = json_body(&body)?;
    check_text("the resolution (--note)", &b.resolution, MAX_REASON).map_err(NodeError::Invalid)?;
    let c = st
        .node
        .resolve_conflict(id, &b.resolution, &user(&headers))
        .await?;
    Ok(Json(json!({ "conflict": c })))
}

#[derive(Deserialize)]
pub(super) struct CorrectBody {
    /// The allergy's substance, or the medication's name.
    target: String,
    reason: String,
}

/// `POST /charts/{id}/allergies/remove` and `POST /charts/{id}/medications/stop`.
pub(super) async fn correct(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((id, section, action)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>, NodeError> {
    let id = st.node.resolve(&id).await?;
    match (section.as_str(), action.as_str()) {
        ("allergies", "remove") | ("medications", "stop") => {}
        _ => {
            return Err(NodeError::Invalid(format!(
                "unknown correction {section}/{action}: use allergies/remove or medications/stop"
            )));
        }
    }
    let b: CorrectBody = json_body(&body)?;
    check_name("the substance or medication name", &b.target).map_err(NodeError::Invalid)?;
    check_text("reason", &b.reason, MAX_REASON).map_err(NodeError::Invalid)?;
    let n = st
        .node
        .correct(&id, &section, &b.target, &b.reason, &user(&headers))
        .await?;
    Ok(Json(
        json!({ "chart": id, "section": section, "changed": n }),
    ))
}

/// `GET /charts/{id}/patient-copy`: `{html, ips}`.
pub(super) async fn patient_copy(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, NodeError> {
    let id = st.node.resolve(&id).await?;
    let c = st.node.patient_copy(&id, &user(&headers)).await?;
    Ok(Json(json!({ "chart": id, "html": c.html, "ips": c.ips })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EmergencyBody {
    mrn: Option<String>,
    family: Option<String>,
    birth_date: Option<String>,
    reason: String,
    peer: Option<String>,
}

/// `POST /emergency/request`: ask connected custodians for a patient's chart.
pub(super) async fn emergency_request(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, NodeError> {
    let b: EmergencyBody = json_body(&body)?;
    let query = chartmesh_core::emergency::Query {
        mrn: b.mrn,
        family: b.family,
        birth_date: b.birth_date,
    };
    let answers = st
        .node
        .emergency_request(query, &b.reason, &user(&headers), b.peer.as_deref())
        .await?;
    Ok(Json(json!({ "answers": answers })))
}

/// `GET /emergency/log`: emergency requests made and answered here.
pub(super) async fn emergency_log(
    State(st): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<Value>, NodeError> {
    let log = st.node.emergency_log(&user(&headers)).await?;
    Ok(Json(json!({ "entries": log })))
}
