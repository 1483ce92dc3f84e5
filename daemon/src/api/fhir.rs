//! The FHIR R4 REST API (`/fhir`), so a practice's EMR or any FHIR tool reads and writes
//! through chartmesh, and the FHIR import routes of the JSON API (`/api/v1/import/fhir`,
//! `/api/v1/import/review`).
//!
//! Same listener (loopback only) and same bearer token as the JSON API. Reads are built from
//! the chart with `chartmesh_core::fhir::chart_to_bundle` (resources keep the ids of the
//! chart's FHIR export; references are relative, `Patient/ID`); writes go through the same
//! import path and patient matching as `chartmesh import` (`Node::import_fhir`). Every read
//! and write is audited. Every error is an OperationOutcome.
//!
//! Owns: the FHIR HTTP surface. Must not touch: the mapping (`chartmesh_core::fhir`), SQL.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;

use super::{ApiState, MAX_IMPORT_BODY, user};
use crate::node::NodeError;
use chartmesh_core::audit::AuditEvent;
use chartmesh_core::consent;
use chartmesh_core::fhir;
use chartmesh_store::StoreError;

const FHIR_JSON: &str = "application/fhir+json";

/// The resource types served, with the key of their ids in a chart's export and the field
/// that names the patient.
const TYPES: &[(&str, &str, &str)] = &[
    ("Condition", "cond", "subject"),
    ("AllergyIntolerance", "allergy", "patient"),
    ("MedicationRequest", "med", "subject"),
    ("MedicationStatement", "med", "subject"),
    ("Observation", "obs", "subject"),
    ("Immunization", "imm", "patient"),
    ("Encounter", "enc", "subject"),
    ("Procedure", "proc", "subject"),
    ("DocumentReference", "note", "subject"),
    ("Coverage", "coverage", "beneficiary"),
];

/// The routes of this module, each behind the API token.
pub(super) fn routes(state: ApiState) -> Router<ApiState> {
    let fhir = Router::new()
        .route("/fhir", post(transaction))
        .route("/fhir/", post(transaction))
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/Patient", get(search_patients))
        .route("/fhir/Patient/{id}", get(read_patient))
        .route("/fhir/Patient/{id}/$everything", get(everything))
        .route("/fhir/{rtype}", get(search_type).post(create))
        .route("/fhir/{rtype}/{id}", get(read_resource))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_IMPORT_BODY))
        .layer(middleware::from_fn(super::check_actor))
        // The JSON API's token check; its refusal becomes an OperationOutcome below.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            super::require_token,
        ))
        .layer(middleware::map_response(as_outcome));
    let import = Router::new()
        .route(
            "/api/v1/import/fhir",
            post(import_fhir).layer(DefaultBodyLimit::max(MAX_IMPORT_BODY)),
        )
        .route("/api/v1/import/review", get(import_review))
        .layer(middleware::from_fn(super::check_actor))
        .layer(middleware::from_fn_with_state(state, super::require_token));
    fhir.merge(import)
}

/// An error as FHIR says: an OperationOutcome with an issue.
struct Outcome {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Outcome {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Outcome {
            status,
            code,
            message: message.into(),
        }
    }
}

fn outcome_body(severity: &str, code: &str, message: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": severity, "code": code, "diagnostics": message }],
    })
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        fhir_response(
            self.status,
            &outcome_body("error", self.code, &self.message),
        )
    }
}

impl From<NodeError> for Outcome {
    fn from(e: NodeError) -> Self {
        let msg = e.to_string();
        let (status, code) = match &e {
            NodeError::NotFound(_) | NodeError::Missing(_) => (StatusCode::NOT_FOUND, "not-found"),
            NodeError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            NodeError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            NodeError::Refused(_) | NodeError::Alerts(_) => (StatusCode::FORBIDDEN, "forbidden"),
            NodeError::Store(StoreError::Closed) | NodeError::Store(StoreError::Locked) => {
                (StatusCode::SERVICE_UNAVAILABLE, "transient")
            }
            NodeError::Store(StoreError::DiskFull) => {
                (StatusCode::INSUFFICIENT_STORAGE, "exception")
            }
            NodeError::Store(_) => {
                tracing::error!(error = %msg, "store error (FHIR API)");
                (StatusCode::INTERNAL_SERVER_ERROR, "exception")
            }
        };
        Outcome::new(status, code, msg)
    }
}

fn fhir_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        fhir::json::to_string(body),
    )
        .into_response()
}

/// Any error response that is not already FHIR (a rejected body, a wrong method) becomes an
/// OperationOutcome.
async fn as_outcome(resp: Response) -> Response {
    let status = resp.status();
    let is_fhir = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(FHIR_JSON));
    if status.as_u16() < 400 || is_fhir {
        return resp;
    }
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    // The JSON API's error shape gives its message; anything else is quoted as it is.
    let text = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    let code = match status {
        StatusCode::UNAUTHORIZED => "login",
        StatusCode::PAYLOAD_TOO_LARGE => "too-costly",
        StatusCode::METHOD_NOT_ALLOWED => "not-supported",
        StatusCode::NOT_FOUND => "not-found",
        _ => "invalid",
    };
    let msg = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text.trim().to_string()
    };
    fhir_response(status, &outcome_body("error", code, &msg))
}

async fn not_found() -> Outcome {
    Outcome::new(
        StatusCode::NOT_FOUND,
        "not-supported",
        "no such FHIR endpoint: see GET /fhir/metadata for what this server supports",
    )
}

fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}/fhir")
}

async fn metadata(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    let search = |names: &[(&str, &str)]| -> Value {
        Value::Array(
            names
                .iter()
                .map(|(n, t)| json!({ "name": n, "type": t }))
                .collect(),
        )
    };
    let mut resources = vec![json!({
        "type": "Patient",
        "interaction": [{ "code": "read" }, { "code": "search-type" }, { "code": "create" }],
        "searchParam": search(&[("_id", "token"), ("identifier", "token"), ("family", "string"), ("given", "string"), ("name", "string"), ("birthdate", "date")]),
        "operation": [{ "name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything" }],
    })];
    for (t, _, field) in TYPES {
        resources.push(json!({
            "type": t,
            "interaction": [{ "code": "read" }, { "code": "search-type" }, { "code": "create" }],
            "searchParam": search(&[("patient", "reference"), (field, "reference")]),
        }));
    }
    let cap = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": crate::rfc3339(crate::now_ms()),
        "publisher": st.node.config.practice.name,
        "kind": "instance",
        "software": { "name": "chartmesh", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": format!("chartmesh at {}", st.node.config.practice.name), "url": base_url(&headers) },
        "fhirVersion": "4.0.1",
        "format": ["json", FHIR_JSON],
        "rest": [{
            "mode": "server",
            "security": { "description": "Bearer token from the data directory's api-token file; loopback only." },
            "resource": resources,
            "interaction": [{ "code": "transaction" }, { "code": "batch" }],
        }],
    });
    fhir_response(StatusCode::OK, &cap)
}

/// A chart's FHIR resources with relative references (`Type/id`), by type.
struct ChartResources {
    chart: String,
    resources: Vec<Value>,
}

/// The chart a FHIR Patient id names (the chart id, as the export uses it). Revoked copies
/// are not served.
async fn chart_resources(
    st: &ApiState,
    patient: &str,
) -> Result<Option<ChartResources>, NodeError> {
    let id = patient.to_string();
    st.node
        .read(move |store| {
            let Some(mut rec) = store.get(&id)? else {
                return Ok(None);
            };
            if !consent::serves_as_current(rec.revoked_ms) || fhir::patient_id(&rec.id) != id {
                return Ok(None);
            }
            let chart = rec.doc.to_chart()?;
            let history = rec.doc.history();
            let bundle = fhir::chart_to_bundle(&chart, &history);
            Ok(Some(ChartResources {
                chart: rec.id,
                resources: fhir::bundle_resources(&bundle),
            }))
        })
        .await
}

/// [`chart_resources`], or a 404 OperationOutcome.
async fn patient_chart(st: &ApiState, id: &str) -> Result<ChartResources, Outcome> {
    chart_resources(st, id).await?.ok_or_else(|| {
        Outcome::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("Patient/{id} is not known here"),
        )
    })
}

async fn audit_read(
    st: &ApiState,
    actor: &str,
    chart: Option<&str>,
    detail: String,
) -> Result<(), NodeError> {
    let mut ev = AuditEvent::new(crate::now_ms(), actor, "read").detail(detail);
    if let Some(c) = chart {
        ev = ev.chart(c);
    }
    st.node.audit(vec![ev]).await
}

fn searchset(base: &str, resources: Vec<Value>) -> Value {
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| {
            let url = format!(
                "{base}/{}/{}",
                r["resourceType"].as_str().unwrap_or(""),
                r["id"].as_str().unwrap_or("")
            );
            json!({ "fullUrl": url, "resource": r, "search": { "mode": "match" } })
        })
        .collect();
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": entries.len(),
        "entry": entries,
    })
}

async fn read_patient(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Outcome> {
    let c = patient_chart(&st, &id).await?;
    audit_read(
        &st,
        &user(&headers),
        Some(&c.chart),
        "fhir Patient read".into(),
    )
    .await?;
    let p = c
        .resources
        .into_iter()
        .find(|r| r["resourceType"] == "Patient")
        .expect("a chart's bundle has its Patient");
    Ok(fhir_response(StatusCode::OK, &p))
}

async fn everything(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Outcome> {
    let c = patient_chart(&st, &id).await?;
    audit_read(
        &st,
        &user(&headers),
        Some(&c.chart),
        "fhir Patient $everything".into(),
    )
    .await?;
    Ok(fhir_response(
        StatusCode::OK,
        &searchset(&base_url(&headers), c.resources),
    ))
}

fn known_type(t: &str) -> Result<(), Outcome> {
    if t == "Patient" || TYPES.iter().any(|(x, _, _)| *x == t) {
        Ok(())
    } else if fhir::is_r4_resource(t) {
        Err(Outcome::new(
            StatusCode::NOT_FOUND,
            "not-supported",
            format!("{t} is not served by chartmesh (see GET /fhir/metadata)"),
        ))
    } else {
        Err(Outcome::new(
            StatusCode::NOT_FOUND,
            "not-supported",
            format!("{t:?} is not an R4 resource type"),
        ))
    }
}

async fn read_resource(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((rtype, id)): Path<(String, String)>,
) -> Result<Response, Outcome> {
    known_type(&rtype)?;
    let missing = || {
        Outcome::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("{rtype}/{id} is not known here"),
        )
    };
    let key = TYPES
        .iter()
        .find(|(t, _, _)| *t == rtype)
        .map(|(_, k, _)| *k)
        .ok_or_else(missing)?;
    // Ids are `<patient id>-<key>-<n>` (`<patient id>-coverage` for the coverage).
    let patient = if key == "coverage" {
        id.strip_suffix("-coverage").map(str::to_string)
    } else {
        id.rsplit_once('-')
            .filter(|(_, n)| n.parse::<usize>().is_ok())
            .and_then(|(rest, _)| rest.strip_suffix(&format!("-{key}")))
            .map(str::to_string)
    }
    .ok_or_else(missing)?;
    let c = chart_resources(&st, &patient).await?.ok_or_else(missing)?;
    let r = c
        .resources
        .into_iter()
        .find(|r| r["resourceType"] == rtype.as_str() && r["id"] == id.as_str())
        .ok_or_else(missing)?;
    audit_read(
        &st,
        &user(&headers),
        Some(&c.chart),
        format!("fhir {rtype} read"),
    )
    .await?;
    Ok(fhir_response(StatusCode::OK, &r))
}

/// The patient id a `patient=` (or `subject=`) search names.
fn patient_param(q: &HashMap<String, String>, field: &str) -> Option<String> {
    let v = q
        .get("patient")
        .or_else(|| q.get(field))
        .or_else(|| q.get(&format!("{field}:Patient")))?;
    Some(v.rsplit('/').next().unwrap_or(v).to_string())
}

async fn search_type(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, Outcome> {
    known_type(&rtype)?;
    let field = TYPES
        .iter()
        .find(|(t, _, _)| *t == rtype)
        .map(|(_, _, f)| *f)
        .unwrap_or("subject");
    let Some(patient) = patient_param(&q, field) else {
        return Err(Outcome::new(
            StatusCode::BAD_REQUEST,
            "not-supported",
            format!("search {rtype} by patient: {rtype}?patient=ID (or Patient/ID/$everything)"),
        ));
    };
    let base = base_url(&headers);
    let resources = match chart_resources(&st, &patient).await? {
        Some(c) => {
            audit_read(
                &st,
                &user(&headers),
                Some(&c.chart),
                format!("fhir {rtype} search"),
            )
            .await?;
            c.resources
                .into_iter()
                .filter(|r| r["resourceType"] == rtype.as_str())
                .collect()
        }
        None => {
            audit_read(
                &st,
                &user(&headers),
                None,
                format!("fhir {rtype} search results=0"),
            )
            .await?;
            Vec::new()
        }
    };
    Ok(fhir_response(StatusCode::OK, &searchset(&base, resources)))
}

async fn search_patients(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, Outcome> {
    const PARAMS: &[&str] = &[
        "_id",
        "identifier",
        "family",
        "given",
        "name",
        "birthdate",
        "_count",
        "_format",
    ];
    if let Some(k) = q.keys().find(|k| !PARAMS.contains(&k.as_str())) {
        return Err(Outcome::new(
            StatusCode::BAD_REQUEST,
            "not-supported",
            format!(
                "Patient search parameter {k:?} is not supported: use _id, identifier (system|value), family, given, name or birthdate"
            ),
        ));
    }
    let count: usize = q
        .get("_count")
        .and_then(|c| c.parse().ok())
        .unwrap_or(50)
        .min(500);
    let q2 = q.clone();
    let ids: Vec<String> = st
        .node
        .read(move |store| {
            let lower = |s: &str| s.to_lowercase();
            // The store's index narrows the search; the full conditions are checked on the charts.
            let probe = q2
                .get("_id")
                .cloned()
                .or_else(|| {
                    q2.get("identifier")
                        .map(|i| i.rsplit('|').next().unwrap_or(i).to_string())
                })
                .or_else(|| {
                    q2.get("birthdate")
                        .map(|d| d.trim_start_matches("eq").to_string())
                })
                .or_else(|| q2.get("family").cloned())
                .or_else(|| q2.get("name").cloned())
                .or_else(|| q2.get("given").cloned())
                .unwrap_or_default();
            let mut out = Vec::new();
            for h in store.search(&probe, 5000)? {
                if out.len() >= count {
                    break;
                }
                let Some(rec) = store.get(&h.id)? else {
                    continue;
                };
                if !consent::serves_as_current(rec.revoked_ms) {
                    continue;
                }
                let c = rec.doc.to_chart()?;
                let p = &c.patient;
                let ok_id = q2.get("_id").is_none_or(|i| fhir::patient_id(&c.id) == *i);
                let ok_ident = q2.get("identifier").is_none_or(|i| {
                    let (sys, val) = match i.split_once('|') {
                        Some((s, v)) => (Some(s).filter(|s| !s.is_empty()), v),
                        None => (None, i.as_str()),
                    };
                    p.all_identifiers()
                        .any(|(s, v)| v == val && (sys.is_none() || s == sys))
                        || (val == c.id
                            && sys.is_none_or(|s| s == "https://chartmesh.org/fhir/chart-id"))
                });
                let ok_family = q2
                    .get("family")
                    .is_none_or(|f| lower(&p.name.family).starts_with(&lower(f)));
                let ok_given = q2
                    .get("given")
                    .is_none_or(|g| p.name.given.iter().any(|x| lower(x).starts_with(&lower(g))));
                let ok_name = q2.get("name").is_none_or(|n| {
                    let n = lower(n);
                    lower(&p.name.family).starts_with(&n)
                        || p.name.given.iter().any(|x| lower(x).starts_with(&n))
                });
                let ok_birth = q2
                    .get("birthdate")
                    .is_none_or(|d| p.birth_date == d.trim_start_matches("eq"));
                if ok_id && ok_ident && ok_family && ok_given && ok_name && ok_birth {
                    out.push(c.id);
                }
            }
            Ok(out)
        })
        .await?;
    let actor = user(&headers);
    let mut events = vec![
        AuditEvent::new(crate::now_ms(), &actor, "search")
            .detail(format!("fhir Patient search results={}", ids.len())),
    ];
    // Each chart a search discloses is audited as a read of it, as the JSON API's search does.
    events.extend(crate::guard::disclosed(
        &actor,
        "read",
        "listed in FHIR search results",
        ids.iter().map(String::as_str),
    ));
    st.node.audit(events).await?;
    let mut patients = Vec::new();
    for id in &ids {
        if let Some(c) = chart_resources(&st, &fhir::patient_id(id)).await? {
            patients.extend(
                c.resources
                    .into_iter()
                    .filter(|r| r["resourceType"] == "Patient"),
            );
        }
    }
    Ok(fhir_response(
        StatusCode::OK,
        &searchset(&base_url(&headers), patients),
    ))
}

fn parse_body(body: &[u8]) -> Result<Value, Outcome> {
    fhir::json::parse(body).map_err(|e| {
        Outcome::new(
            StatusCode::BAD_REQUEST,
            "structure",
            format!("the request body is not JSON: {e}"),
        )
    })
}

/// `POST /fhir`: a transaction or batch Bundle, through the import path (the same patient
/// matching as `chartmesh import`). A transaction is all or nothing: when any entry cannot be
/// read, nothing is written and the OperationOutcome lists the entries at fault.
async fn transaction(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Outcome> {
    let v = parse_body(&body)?;
    if v["resourceType"] != "Bundle" {
        return Err(Outcome::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "POST /fhir takes a Bundle of type transaction or batch; to add one resource, POST it to /fhir/TYPE",
        ));
    }
    let kind = v["type"].as_str().unwrap_or("").to_string();
    if kind != "transaction" && kind != "batch" {
        return Err(Outcome::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("Bundle.type must be transaction or batch, not {kind:?}"),
        ));
    }
    let author = user(&headers);
    if kind == "transaction" {
        let body2 = body.clone();
        let dry = st
            .node
            .on_cpu(move || fhir::import(&body2, "1970-01-01T00:00:00Z"))
            .await;
        let bad: Vec<String> = dry
            .resources
            .iter()
            .filter(|r| r.outcome == fhir::Outcome::Error)
            .map(|r| {
                format!(
                    "{} ({}): {}",
                    r.at,
                    r.resource_type,
                    r.reason.clone().unwrap_or_default()
                )
            })
            .collect();
        if let Some(f) = dry.fatal {
            return Err(Outcome::new(StatusCode::BAD_REQUEST, "invalid", f));
        }
        if !bad.is_empty() {
            let issues: Vec<Value> = bad
                .iter()
                .take(100)
                .map(|m| json!({ "severity": "error", "code": "invalid", "diagnostics": m }))
                .collect();
            return Ok(fhir_response(
                StatusCode::BAD_REQUEST,
                &json!({ "resourceType": "OperationOutcome", "issue": issues }),
            ));
        }
    }
    let report = st.node.import_fhir(body, &author, 0).await?;
    if let Some(f) = &report.fatal {
        return Err(Outcome::new(StatusCode::BAD_REQUEST, "invalid", f.clone()));
    }
    // One response per entry of the request, in order.
    let n = v["entry"].as_array().map_or(0, |a| a.len());
    let by_at: HashMap<String, &fhir::ResourceReport> =
        report.resources.iter().map(|r| (r.at.clone(), r)).collect();
    let mut patients = report.patients.iter();
    let mut entries = Vec::with_capacity(n);
    for (i, e) in v["entry"].as_array().into_iter().flatten().enumerate() {
        let rt = e["resource"]["resourceType"].as_str().unwrap_or("");
        let resp = match by_at.get(&format!("entry[{i}]")) {
            Some(r) if r.outcome == fhir::Outcome::Error => json!({
                "status": "400 Bad Request",
                "outcome": outcome_body("error", "invalid", r.reason.as_deref().unwrap_or("")),
            }),
            Some(r) => json!({
                "status": "200 OK",
                "outcome": outcome_body("information", "informational", &format!("not kept: {}", r.reason.as_deref().unwrap_or(""))),
            }),
            None if rt == "Patient" => match patients.next() {
                Some(p) => json!({
                    "status": if p.outcome == "created" || p.outcome == "review" { "201 Created" } else { "200 OK" },
                    "location": format!("Patient/{}", fhir::patient_id(&p.chart)),
                    "outcome": outcome_body("information", "informational", &format!("chart {}: {}", p.chart, p.outcome)),
                }),
                None => json!({ "status": "200 OK" }),
            },
            None => json!({ "status": "201 Created" }),
        };
        entries.push(json!({ "response": resp }));
    }
    Ok(fhir_response(
        StatusCode::OK,
        &json!({
            "resourceType": "Bundle",
            "type": format!("{kind}-response"),
            "entry": entries,
        }),
    ))
}

/// `POST /fhir/TYPE`: one resource, through the import path. A Patient becomes a chart (or is
/// matched); any other resource is added to the chart its subject names.
async fn create(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    body: Bytes,
) -> Result<Response, Outcome> {
    known_type(&rtype)?;
    let v = parse_body(&body)?;
    if v["resourceType"] != rtype.as_str() {
        return Err(Outcome::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!(
                "the body is not a {rtype} (resourceType is {})",
                v["resourceType"]
            ),
        ));
    }
    let report = st.node.import_fhir(body, &user(&headers), 0).await?;
    if let Some(f) = &report.fatal {
        return Err(Outcome::new(StatusCode::BAD_REQUEST, "invalid", f.clone()));
    }
    if let Some(r) = report.resources.first() {
        let status = if r.outcome == fhir::Outcome::Error {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        return Err(Outcome::new(
            status,
            "processing",
            r.reason.clone().unwrap_or_else(|| "not kept".into()),
        ));
    }
    if let Some(e) = report.chart_errors.first() {
        return Err(Outcome::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            e["error"].as_str().unwrap_or("").to_string(),
        ));
    }
    let chart = report.patients.first().map(|p| p.chart.clone());
    // The resource as stored: the chart's export form.
    let mut out = v.clone();
    fhir::json::unmark(&mut out);
    let location = match (&chart, rtype.as_str()) {
        (Some(c), "Patient") => {
            let pid = fhir::patient_id(c);
            if let Some(cr) = chart_resources(&st, &pid).await?
                && let Some(p) = cr
                    .resources
                    .into_iter()
                    .find(|r| r["resourceType"] == "Patient")
            {
                out = p;
            }
            format!("Patient/{pid}")
        }
        (Some(c), _) => format!("Patient/{}", fhir::patient_id(c)),
        _ => String::new(),
    };
    let mut resp = fhir_response(StatusCode::CREATED, &out);
    if let Ok(l) = location.parse() {
        resp.headers_mut().insert(header::LOCATION, l);
    }
    Ok(resp)
}

#[derive(Deserialize)]
pub(super) struct ImportQuery {
    author: Option<String>,
    /// How many leading resources are context only (sent again with a later part of a large
    /// input so that its references resolve; not reported again).
    context: Option<usize>,
}

/// `POST /api/v1/import/fhir`: a Bundle, a resource or NDJSON; the per-resource account.
pub(super) async fn import_fhir(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<ImportQuery>,
    body: Bytes,
) -> Result<Json<Value>, NodeError> {
    let author = match q.author {
        Some(a) => {
            crate::guard::check_name("author", &a).map_err(NodeError::Invalid)?;
            a
        }
        None => user(&headers),
    };
    let report = st
        .node
        .import_fhir(body, &author, q.context.unwrap_or(0))
        .await?;
    Ok(Json(
        serde_json::to_value(report).expect("report serializes"),
    ))
}

/// `GET /api/v1/import/review`: patients held for review by FHIR imports.
async fn import_review(
    State(st): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<Value>, NodeError> {
    let items = st.node.import_review(&user(&headers)).await?;
    Ok(Json(json!({ "review": items })))
}
