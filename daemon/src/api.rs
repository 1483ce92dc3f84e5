//! The local JSON API and console page, on 127.0.0.1 only. Every `/api` route needs the
//! bearer token kept in the data directory (`api-token`, mode 0600), or the console's
//! session cookie (`console`: loopback `Host` only, origin checks, strict CSP). The caller's
//! user name (`X-Chartmesh-User`) is recorded as the actor in the audit log and as the
//! author of edits; names and other free text are bounded and plain (`crate::guard`).

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chartmesh_api::{AddPeer, BackupRequest, ErrorBody, ErrorKind, PeerRef};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::sync::Arc;

use crate::node::{Node, NodeError};
use chartmesh_store::StoreError;

mod console;
mod fhir;
mod workflow;

/// The largest import request: a few thousand charts. The CLI sends smaller chunks.
pub const MAX_IMPORT_BODY: usize = 64 * 1024 * 1024;
/// A JSONL import is taken in parts of this many records, so memory stays bounded by the
/// part, whatever the body holds (a body of millions of bad one-byte lines included).
const IMPORT_PART: usize = 512;
/// The most record errors listed in an import's answer; the rest are counted
/// (`errorsNotListed`).
pub const MAX_LISTED_ERRORS: usize = 1000;

#[derive(Clone)]
pub struct ApiState {
    pub node: Arc<Node>,
    pub token_hash: [u8; 32],
    pub sessions: Arc<console::Sessions>,
}

pub fn router(node: Arc<Node>, token: &str) -> Router {
    let state = ApiState {
        node,
        token_hash: Sha256::digest(token.as_bytes()).into(),
        sessions: Arc::default(),
    };
    let api = Router::new()
        .route(
            "/session",
            post(console::open_session).get(console::session_info),
        )
        .route("/session/link", post(console::sign_in_link))
        .route("/session/user", post(console::set_session_user))
        .route("/session/end", post(console::end_session))
        .route("/practice", get(console::practice))
        .route("/practice/qr.svg", get(console::practice_qr))
        .route("/peers/pending", get(console::pending_peers))
        .route("/peers/pending/{id}/accept", post(console::accept_pending))
        .route(
            "/peers/pending/{id}/dismiss",
            post(console::dismiss_pending),
        )
        .route("/audit/search", get(console::audit_search))
        .route("/charts/{id}/disclosures", get(console::disclosures))
        .route("/events", get(console::events))
        .route("/status", get(status))
        .route(
            "/import",
            post(import).layer(DefaultBodyLimit::max(MAX_IMPORT_BODY)),
        )
        .route("/export", get(export))
        .route("/charts", get(search).post(create))
        .route("/charts/{id}", get(show))
        .route("/charts/{id}/history", get(history))
        .route("/charts/{id}/custody", get(custody))
        .route("/charts/{id}/patient-copy", get(workflow::patient_copy))
        .route("/charts/{id}/{section}", post(append))
        .route("/charts/{id}/{section}/{action}", post(workflow::correct))
        .route("/referrals", get(workflow::referrals).post(workflow::refer))
        .route("/referrals/{id}/{step}", post(workflow::referral_step))
        .route("/conflicts", get(workflow::conflicts))
        .route("/emergency/request", post(workflow::emergency_request))
        .route("/emergency/log", get(workflow::emergency_log))
        .route("/conflicts/{id}/resolve", post(workflow::resolve_conflict))
        .route("/peers", get(peers).post(add_peer))
        .route("/sync", get(sync_status))
        .route("/sync/pause", post(sync_pause))
        .route("/sync/resume", post(sync_resume))
        .route("/peers/{id}", axum::routing::delete(remove_peer))
        .route("/shares", get(shares).post(share))
        .route("/revoke", post(revoke))
        .route("/audit", get(audit_list))
        .route("/audit/verify", get(audit_verify))
        .route("/backup", post(backup))
        .route("/alerts", get(alerts))
        .route("/due", get(due))
        .layer(middleware::from_fn(check_actor))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(console::page))
        .route("/console.js", get(console::script))
        .route("/console.css", get(console::style))
        .route("/vendor/jsQR.js", get(console::qr_decoder))
        .route("/login", get(console::login))
        .merge(fhir::routes(state.clone()))
        .nest("/api/v1", api)
        .layer(middleware::from_fn(console::loopback_only))
        .with_state(state)
}

/// The bearer token, or the console's session cookie (with the origin and CSRF checks of
/// `console::cookie_request` on requests that change something).
async fn require_token(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(given) = given {
        let h: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        // Compare digests in constant time.
        let diff = h
            .iter()
            .zip(st.token_hash.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            return next.run(req).await;
        }
    } else if let Some(r) = console::cookie_request(&st, req) {
        return match r {
            Ok(req) => next.run(req).await,
            Err(refused) => refused,
        };
    }
    error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong API token: the token is in the data directory's api-token file",
    )
}

/// The acting user's name (`X-Chartmesh-User`) must be plain and bounded: it goes into the
/// audit log and into charts as an author.
async fn check_actor(req: Request, next: Next) -> Response {
    if let Some(v) = req.headers().get("x-chartmesh-user") {
        let checked = std::str::from_utf8(v.as_bytes())
            .map_err(|_| "the user name (--user, X-Chartmesh-User) is not UTF-8 text".to_string())
            .and_then(|s| crate::guard::check_name("the user name (--user, X-Chartmesh-User)", s));
        if let Err(m) = checked {
            return error(StatusCode::UNPROCESSABLE_ENTITY, "invalid", &m);
        }
    }
    next.run(req).await
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "kind": kind, "message": message } })),
    )
        .into_response()
}

/// An error answer of a kind (`chartmesh_api::ErrorKind`): its status follows from the kind.
fn api_error(kind: ErrorKind, body: ErrorBody) -> Response {
    let status = StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

impl IntoResponse for NodeError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        let kind = match &self {
            NodeError::NotFound(_) | NodeError::Missing(_) => ErrorKind::NotFound,
            NodeError::Invalid(_) => ErrorKind::Invalid,
            NodeError::Conflict(_) => ErrorKind::Conflict,
            NodeError::Refused(_) => ErrorKind::Refused,
            NodeError::Alerts(alerts) => {
                let mut body = ErrorBody::new(ErrorKind::Alerts, msg);
                body.error.alerts = serde_json::to_value(alerts).ok();
                return api_error(ErrorKind::Alerts, body);
            }
            NodeError::Store(StoreError::DiskFull) => ErrorKind::DiskFull,
            NodeError::Store(StoreError::Closed) => ErrorKind::ShuttingDown,
            // A chart edit that was not possible (a rule checked inside the write): the
            // caller's mistake, not the store's; not logged (it may name chart content).
            NodeError::Store(StoreError::Core(chartmesh_core::CoreError::NotAllowed(_))) => {
                ErrorKind::Refused
            }
            NodeError::Store(StoreError::Core(_)) => ErrorKind::Invalid,
            NodeError::Store(StoreError::Locked) => ErrorKind::Busy,
            NodeError::Store(StoreError::TooLarge { .. }) => ErrorKind::TooLarge,
            NodeError::Store(StoreError::Ambiguous(..)) => ErrorKind::Ambiguous,
            NodeError::Store(_) => {
                tracing::error!(error = %msg, "store error");
                ErrorKind::Store
            }
        };
        api_error(kind, ErrorBody::new(kind, msg))
    }
}

/// The acting user (checked by `check_actor`), else `api`.
fn user(headers: &HeaderMap) -> String {
    headers
        .get("x-chartmesh-user")
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or("api")
        .to_string()
}

async fn status(State(st): State<ApiState>) -> Result<Json<Value>, NodeError> {
    // Store reads run off the async workers, so a slow disk never stalls the QUIC endpoint.
    let n = st.node.clone();
    tokio::task::spawn_blocking(move || {
        let (sync_addr, peers, relay, lan, (sent, received), public, mapping) = match n.sync.get() {
            Some(s) => (
                Some(s.local_addr().to_string()),
                serde_json::to_value(s.status(true)).unwrap_or_default(),
                serde_json::to_value(s.relay()).unwrap_or_default(),
                s.lan_discovery(),
                s.bytes_total(),
                s.public_addr().map(|a| a.to_string()),
                serde_json::to_value(s.port_mapping()).unwrap_or_default(),
            ),
            None => (
                None,
                Value::Array(vec![]),
                Value::Null,
                false,
                (0, 0),
                None,
                Value::Null,
            ),
        };
        Ok(Json(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "practice": { "id": n.practice_id(), "name": n.config.practice.name },
            "dataDir": n.data_dir.display().to_string(),
            "charts": n.store.count()?,
            "diskBytes": n.store.disk_bytes(),
            "api": n.config.api.listen.to_string(),
            "sync": {
                "listen": sync_addr.unwrap_or_else(|| n.config.sync.listen.to_string()),
                "relay": relay,
                "lanDiscovery": lan,
                "bytesSent": sent,
                "bytesReceived": received,
                "publicAddr": public,
                // The gateway's mapping of the sync port: protocol, external address,
                // leaseLeftS; or the reason there is none.
                "portMapping": mapping,
            },
            "peers": peers,
            "shares": n.store.grants(None)?.iter().filter(|g| g.is_active(crate::now_ms())).count(),
        })))
    })
    .await
    .map_err(|_| NodeError::Store(chartmesh_store::StoreError::Closed))?
}

/// Per-peer sync state, and whether every paired peer that is not paused is connected and
/// in sync (`chartmesh sync wait`); `connectedInSync` counts only the connected ones.
async fn sync_status(State(st): State<ApiState>) -> Result<Json<Value>, NodeError> {
    let n = st.node.clone();
    let peers = tokio::task::spawn_blocking(move || {
        n.sync.get().map(|s| s.status(false)).unwrap_or_default()
    })
    .await
    .map_err(|_| NodeError::Store(chartmesh_store::StoreError::Closed))?;
    let all = peers
        .iter()
        .filter(|p| !p.paused)
        .all(|p| p.connected && p.in_sync);
    let connected = peers.iter().filter(|p| p.connected).all(|p| p.in_sync);
    Ok(Json(
        json!({ "inSync": all, "connectedInSync": connected, "peers": peers }),
    ))
}

async fn set_paused(
    st: &ApiState,
    headers: &HeaderMap,
    body: &Bytes,
    paused: bool,
) -> Result<Json<Value>, NodeError> {
    let b: PeerRef = json_body(body)?;
    let id = st.node.peer_ref(&b.peer)?;
    let known = st
        .node
        .sync
        .get()
        .is_some_and(|s| s.set_paused(&id, paused));
    if !known {
        return Err(NodeError::NotFound(format!("practice {id} is not paired")));
    }
    st.node
        .audit(vec![
            chartmesh_core::audit::AuditEvent::new(
                crate::now_ms(),
                user(headers),
                if paused { "sync-pause" } else { "sync-resume" },
            )
            .peer(id.to_string()),
        ])
        .await?;
    Ok(Json(json!({ "peer": id.to_string(), "paused": paused })))
}

async fn sync_pause(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, NodeError> {
    set_paused(&st, &headers, &body, true).await
}

async fn sync_resume(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, NodeError> {
    set_paused(&st, &headers, &body, false).await
}

async fn peers(State(st): State<ApiState>) -> Result<Json<Value>, NodeError> {
    Ok(Json(
        json!({ "peers": st.node.read(|store| Ok(store.peers()?)).await? }),
    ))
}

async fn add_peer(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), NodeError> {
    let b: AddPeer = json_body(&body)?;
    if let Some(n) = &b.name {
        crate::guard::check_name("--name", n).map_err(NodeError::Invalid)?;
    }
    if !b.addr.is_empty() {
        crate::guard::check_name("--addr", &b.addr).map_err(NodeError::Invalid)?;
    }
    let p = st
        .node
        .add_peer(&b.id, &b.addr, b.name, &user(&headers))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::to_value(p).expect("peer serializes")),
    ))
}

async fn remove_peer(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, NodeError> {
    st.node.remove_peer(&id, &user(&headers)).await?;
    Ok(Json(json!({ "removed": id })))
}

async fn shares(State(st): State<ApiState>) -> Result<Json<Value>, NodeError> {
    let now = crate::now_ms();
    let grants: Vec<Value> = st
        .node
        .store
        .grants(None)?
        .into_iter()
        .map(|g| {
            let active = g.is_active(now);
            let mut v = serde_json::to_value(&g).expect("grant serializes");
            v["active"] = active.into();
            v
        })
        .collect();
    Ok(Json(json!({ "shares": grants })))
}

async fn share(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), NodeError> {
    let g = st.node.share(json_body(&body)?, &user(&headers)).await?;
    Ok((StatusCode::CREATED, Json(json!({ "granted": g }))))
}

async fn revoke(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, NodeError> {
    let r = st.node.revoke(json_body(&body)?, &user(&headers)).await?;
    Ok(Json(
        serde_json::to_value(r).expect("revocation serializes"),
    ))
}

#[derive(Deserialize)]
struct ImportQuery {
    author: Option<String>,
}

/// The author recorded for imported charts: `?author=` (plain and bounded), else the
/// calling user.
fn import_author(q: ImportQuery, headers: &HeaderMap) -> Result<String, NodeError> {
    match q.author {
        Some(a) => {
            crate::guard::check_name("author", &a).map_err(NodeError::Invalid)?;
            Ok(a)
        }
        None => Ok(user(headers)),
    }
}

/// A JSONL import, taken in parts of [`IMPORT_PART`] records (each part's good records
/// durable before the next part is read), with at most [`MAX_LISTED_ERRORS`] errors listed
/// and the rest counted: memory and the answer stay bounded whatever the body holds.
async fn import(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<ImportQuery>,
    body: Bytes,
) -> Result<Json<Value>, NodeError> {
    let author = import_author(q, &headers)?;
    let mut report = crate::node::ImportReport::default();
    let mut not_listed = 0usize;
    let mut offset = 0usize;
    for (part, records) in import_parts(&body, IMPORT_PART) {
        let r = st.node.import_jsonl(part, &author).await?;
        report.imported += r.imported;
        report.unchanged += r.unchanged;
        report.failed += r.failed;
        for mut e in r.errors {
            if report.errors.len() >= MAX_LISTED_ERRORS {
                not_listed += 1;
                continue;
            }
            e.index += offset;
            e.duplicate_of = e.duplicate_of.map(|d| d + offset);
            report.errors.push(e);
        }
        offset += records;
    }
    let mut v = serde_json::to_value(report).expect("report serializes");
    v["errorsNotListed"] = not_listed.into();
    Ok(Json(v))
}

/// Splits a JSONL body into parts of at most `max` records (non-blank lines), without
/// copying; returns each part with its number of records.
fn import_parts(body: &Bytes, max: usize) -> Vec<(Bytes, usize)> {
    let mut parts = Vec::new();
    let (mut start, mut line_start, mut records) = (0usize, 0usize, 0usize);
    for (i, b) in body.iter().enumerate() {
        if *b != b'\n' {
            continue;
        }
        if !body[line_start..i].iter().all(|b| b.is_ascii_whitespace()) {
            records += 1;
        }
        line_start = i + 1;
        if records == max {
            parts.push((body.slice(start..line_start), records));
            start = line_start;
            records = 0;
        }
    }
    if !body[line_start..].iter().all(|b| b.is_ascii_whitespace()) {
        records += 1;
    }
    if records > 0 {
        parts.push((body.slice(start..), records));
    }
    parts
}

#[derive(Deserialize)]
struct ExportQuery {
    /// Comma-separated chart ids; all charts when absent.
    ids: Option<String>,
    format: Option<String>,
}

async fn export(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<ExportQuery>,
) -> Response {
    let fhir = match q.format.as_deref() {
        None | Some("jsonl") => false,
        Some("fhir") => true,
        Some(f) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                &format!("unknown export format {f:?}: use jsonl or fhir"),
            );
        }
    };
    let ids: Option<Vec<String>> = q.ids.map(|s| {
        s.split(',')
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect()
    });
    let ids = match ids {
        None => None,
        Some(ids) => {
            let mut keys = Vec::with_capacity(ids.len());
            for id in ids {
                match st.node.resolve(&id).await {
                    Ok(k) => keys.push(k),
                    Err(e) => return e.into_response(),
                }
            }
            Some(keys)
        }
    };
    let actor = user(&headers);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let node = st.node.clone();
    tokio::task::spawn_blocking(move || {
        let r = node.export_jsonl(ids.as_deref(), &actor, fhir, &mut |line| {
            tx.blocking_send(Ok(Bytes::from(line))).is_ok()
        });
        if let Err(e) = r {
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("response builds")
}

#[derive(Deserialize)]
struct SearchQuery {
    q: Option<String>,
    limit: Option<usize>,
}

async fn search(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<SearchQuery>,
) -> Result<Json<Value>, NodeError> {
    let res = st
        .node
        .search(
            q.q.as_deref().unwrap_or(""),
            q.limit.unwrap_or(50).min(1000),
            &user(&headers),
        )
        .await?;
    Ok(Json(json!({ "charts": res })))
}

/// Parses a JSON request body, with an error that says what was wrong.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, NodeError> {
    serde_json::from_slice(body).map_err(|e| {
        NodeError::Invalid(format!(
            "the request body is not valid JSON for this call: {e}"
        ))
    })
}

async fn create(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), NodeError> {
    let c = st
        .node
        .create_chart(json_body(&body)?, &user(&headers))
        .await?;
    Ok((StatusCode::CREATED, Json(c)))
}

async fn show(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, NodeError> {
    let id = st.node.resolve(&id).await?;
    Ok(Json(st.node.read_chart(&id, &user(&headers)).await?))
}

async fn custody(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, NodeError> {
    let id = st.node.resolve(&id).await?;
    let n = st.node.clone();
    tokio::task::spawn_blocking(move || n.custody(&id))
        .await
        .map_err(|_| NodeError::Store(chartmesh_store::StoreError::Closed))?
        .map(Json)
}

async fn history(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, NodeError> {
    let id = st.node.resolve(&id).await?;
    let h = st.node.history(&id, &user(&headers)).await?;
    Ok(Json(json!({ "chart": id, "changes": h })))
}

#[derive(Deserialize)]
struct AppendBody {
    author: Option<String>,
    entry: Value,
    /// For a medication that raises alerts: why it is added anyway (recorded in the chart).
    #[serde(rename = "override")]
    override_reason: Option<String>,
}

async fn append(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((id, section)): Path<(String, String)>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), NodeError> {
    let id = st.node.resolve(&id).await?;
    let body: AppendBody = json_body(&body)?;
    let author = body.author.unwrap_or_else(|| user(&headers));
    crate::guard::check_name("author", &author).map_err(NodeError::Invalid)?;
    if let Some(a) = body.entry.get("author").and_then(Value::as_str) {
        crate::guard::check_name("the entry's author", a).map_err(NodeError::Invalid)?;
    }
    let added = st
        .node
        .append(
            &id,
            &section,
            body.entry,
            &author,
            body.override_reason.as_deref(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "chart": id, "section": section, "entry": added })),
    ))
}

#[derive(Deserialize)]
struct AuditQuery {
    chart: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
    /// `fhir`: a Bundle of FHIR R4 AuditEvent resources.
    format: Option<String>,
}

async fn audit_list(
    State(st): State<ApiState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, NodeError> {
    let since = match q.since.as_deref() {
        Some(s) => Some(
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|_| {
                    NodeError::Invalid(format!(
                        "since={s:?} is not an RFC 3339 time such as 2025-01-31T00:00:00Z"
                    ))
                })?
                .unix_timestamp()
                * 1000,
        ),
        None => None,
    };
    // A chart as a person names it; the log keeps what it was given if it no longer resolves
    // (e.g. a copy since removed).
    let chart = match q.chart.clone() {
        Some(c) => Some(st.node.resolve(&c).await.unwrap_or(c)),
        None => None,
    };
    let limit = q.limit;
    let entries = st
        .node
        .read(move |store| Ok(store.audit_entries(chart.as_deref(), since, limit)?))
        .await?;
    match q.format.as_deref() {
        None | Some("json") => Ok(Json(json!({ "entries": entries }))),
        Some("fhir") => Ok(Json(chartmesh_core::fhir::audit_bundle(
            &entries,
            &st.node.practice_id(),
        ))),
        Some(f) => Err(NodeError::Invalid(format!(
            "unknown audit format {f:?}: use json or fhir"
        ))),
    }
}

#[derive(Deserialize)]
struct DueQuery {
    /// YYYY-MM-DD; default: today (UTC).
    today: Option<String>,
    within: Option<u32>,
    /// false: counts only (the population report), no patient listed.
    patients: Option<bool>,
}

async fn due(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<DueQuery>,
) -> Result<Json<crate::node::DueReport>, NodeError> {
    let today = match q.today.as_deref() {
        Some(t) => chartmesh_core::due::parse_date(t)
            .filter(|_| t.len() == 10)
            .ok_or_else(|| {
                NodeError::Invalid(format!("today={t:?} is not a date such as 2026-06-01"))
            })?,
        None => time::OffsetDateTime::now_utc().date(),
    };
    let within = q.within.unwrap_or(0);
    if within > 3660 {
        return Err(NodeError::Invalid("within is at most 3660 days".into()));
    }
    Ok(Json(
        st.node
            .due(today, within, q.patients.unwrap_or(true), &user(&headers))
            .await?,
    ))
}

#[derive(Deserialize)]
struct AlertsQuery {
    chart: Option<String>,
}

async fn alerts(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<AlertsQuery>,
) -> Result<Json<Value>, NodeError> {
    let node = st.node.clone();
    let actor = user(&headers);
    let chart = match q.chart {
        Some(c) => Some(st.node.resolve(&c).await?),
        None => None,
    };
    let charts = tokio::task::spawn_blocking(move || node.alerts(chart.as_deref(), &actor))
        .await
        .map_err(|_| NodeError::Store(StoreError::Closed))??;
    Ok(Json(json!({ "charts": charts })))
}

async fn backup(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, NodeError> {
    let req: BackupRequest = json_body(&body)?;
    let path = req.path.display().to_string();
    let bytes = st.node.backup(req.path, &user(&headers)).await?;
    Ok(Json(json!(chartmesh_api::BackupDone { path, bytes })))
}

pub use chartmesh_datadir::audit_verify_report;

async fn audit_verify(State(st): State<ApiState>) -> Result<Json<Value>, NodeError> {
    Ok(Json(
        st.node
            .read(|store| Ok(audit_verify_report(store)?))
            .await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_import_body_is_cut_into_parts_of_whole_records() {
        let body = Bytes::from_static(b"a\n\n  \nb\nc\nd");
        let parts = import_parts(&body, 2);
        let got: Vec<(&[u8], usize)> = parts.iter().map(|(b, n)| (&b[..], *n)).collect();
        assert_eq!(got, vec![(&b"a\n\n  \nb\n"[..], 2), (&b"c\nd"[..], 2)]);
        assert!(import_parts(&Bytes::from_static(b"\n \n"), 2).is_empty());
        let parts = import_parts(&Bytes::from_static(b"x\ny\n"), 512);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].1, 2);
    }
}
