//! The console (pages, sessions, and the few routes only the console needs) and what keeps
//! a browser from being turned against the local API:
//!
//! - Only requests addressed to a loopback name (`Host: 127.0.0.1`, `localhost`, `[::1]`)
//!   are answered, so a web page whose DNS name rebinds to 127.0.0.1 gets nothing.
//! - A request carrying an `Origin` must come from this very origin (`http://` + its
//!   `Host`): another site, or another program's page on another loopback port, is refused.
//! - The page never holds the API token: the token is exchanged once (`POST
//!   /api/v1/session`, or a single-use sign-in link from `chartmesh console`) for an
//!   `HttpOnly; SameSite=Strict` session cookie, which scripts cannot read.
//! - A change made with the session cookie (any method but GET and HEAD) needs the
//!   session's CSRF token in `X-Chartmesh-Csrf` and a same-origin `Origin` header.
//! - Every answer has a strict Content-Security-Policy (scripts and styles from this origin
//!   only, no inline code, no framing) and no-store caching.
//! - The session carries the acting user's name: changes and reads made through the console
//!   are recorded under it.
//!
//! Owns: sessions, the security headers, the console's assets and its own routes (practice
//! summary and QR code, pending peers, audit search, disclosures, live events). Must not
//! touch: chart or consent rules (`Node`), SQL (`chartmesh_store`).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{ApiState, error, json_body, user};
use crate::node::NodeError;
use chartmesh_store::{AuditFilter, StoreError};

/// The session cookie's name.
pub const COOKIE: &str = "chartmesh_session";
/// The request header carrying the session's CSRF token.
pub const CSRF_HEADER: &str = "x-chartmesh-csrf";
/// How long a console session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How long a sign-in link from `chartmesh console` stays usable (once).
const LINK_TTL: Duration = Duration::from_secs(120);
/// The most sessions and unused sign-in links kept (the oldest go first).
const MAX_SESSIONS: usize = 32;
const MAX_LINKS: usize = 16;
/// The user recorded for a session opened without a name.
const DEFAULT_USER: &str = "console";
/// How often the live-event stream looks for changes.
const EVENT_POLL: Duration = Duration::from_secs(1);

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

#[derive(Clone)]
struct Session {
    until: Instant,
    csrf: String,
    user: String,
}

/// Console sessions and single-use sign-in codes, by the SHA-256 of their secret.
#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    /// Sign-in codes: when they expire, and the user who asked for the link.
    links: Mutex<HashMap<[u8; 32], (Instant, String)>>,
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Keeps at most `max` live entries (expiry in the future), dropping the soonest to expire.
fn insert_bounded<V>(
    map: &mut HashMap<[u8; 32], V>,
    key: [u8; 32],
    value: V,
    max: usize,
    until: impl Fn(&V) -> Instant,
) {
    let now = Instant::now();
    map.retain(|_, v| until(v) > now);
    while map.len() >= max {
        let Some(k) = map.iter().min_by_key(|(_, v)| until(v)).map(|(k, _)| *k) else {
            break;
        };
        map.remove(&k);
    }
    map.insert(key, value);
}

/// Equal strings, compared without an early exit.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    /// A new session for `user`: its cookie secret.
    fn new_session(&self, user: &str) -> String {
        let s = secret();
        insert_bounded(
            &mut self.sessions.lock().unwrap(),
            digest(&s),
            Session {
                until: Instant::now() + SESSION_TTL,
                csrf: secret(),
                user: user.to_string(),
            },
            MAX_SESSIONS,
            |v| v.until,
        );
        s
    }

    fn get(&self, session: &str) -> Option<Session> {
        self.sessions
            .lock()
            .unwrap()
            .get(&digest(session))
            .filter(|s| s.until > Instant::now())
            .cloned()
    }

    pub fn valid(&self, session: &str) -> bool {
        self.get(session).is_some()
    }

    fn set_user(&self, session: &str, user: &str) -> bool {
        match self.sessions.lock().unwrap().get_mut(&digest(session)) {
            Some(s) => {
                s.user = user.to_string();
                true
            }
            None => false,
        }
    }

    fn end(&self, session: &str) {
        self.sessions.lock().unwrap().remove(&digest(session));
    }

    fn new_link(&self, user: &str) -> String {
        let s = secret();
        insert_bounded(
            &mut self.links.lock().unwrap(),
            digest(&s),
            (Instant::now() + LINK_TTL, user.to_string()),
            MAX_LINKS,
            |v| v.0,
        );
        s
    }

    /// Uses up a sign-in code: the user it was made for, once, if it was issued and has not
    /// expired.
    fn redeem(&self, code: &str) -> Option<String> {
        self.links
            .lock()
            .unwrap()
            .remove(&digest(code))
            .filter(|(t, _)| *t > Instant::now())
            .map(|(_, u)| u)
    }
}

/// The session cookie's name for the address a request was sent to: browsers keep cookies
/// by host, not by port, so two daemons on one machine (two practices, or a test) would
/// otherwise overwrite each other's session. `chartmesh_session_7360`.
fn cookie_name(headers: &HeaderMap) -> String {
    let host = host_of(headers);
    let port = host
        .rsplit_once(':')
        .filter(|(h, p)| !p.is_empty() && (!h.starts_with('[') || h.ends_with(']')))
        .map(|(_, p)| p)
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()));
    match port {
        Some(p) => format!("{COOKIE}_{p}"),
        None => COOKIE.to_string(),
    }
}

/// The session cookie's value in a request, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    let name = cookie_name(headers);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(headers: &HeaderMap, session: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}",
        cookie_name(headers)
    ))
    .expect("cookie is ASCII")
}

/// The host part of a `Host` header or an origin's authority, without the port.
fn host_name(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h).unwrap_or(rest);
    }
    authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority)
}

fn is_loopback_name(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether an `Origin` header names this very origin: `http://` and the request's `Host`.
fn same_origin(origin: &str, host: &str) -> bool {
    origin
        .strip_prefix("http://")
        .is_some_and(|auth| auth.eq_ignore_ascii_case(host))
}

fn host_of(headers: &HeaderMap) -> &str {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Outermost layer: answers only requests addressed to a loopback name, refuses requests
/// from any other origin, and adds the security headers to every answer.
pub async fn loopback_only(req: Request, next: Next) -> Response {
    let host = host_of(req.headers());
    let mut resp = if !is_loopback_name(host_name(host)) {
        error(
            StatusCode::MISDIRECTED_REQUEST,
            "refused",
            &format!(
                "this API answers only requests addressed to 127.0.0.1 or localhost (Host: {host:?}); open the address `chartmesh console` prints"
            ),
        )
    } else if let Some(origin) = req.headers().get(header::ORIGIN)
        && !origin.to_str().is_ok_and(|o| same_origin(o, host))
    {
        error(
            StatusCode::FORBIDDEN,
            "refused",
            "a request from another web origin is refused",
        )
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A request that came with a session cookie: `None` if the session is unknown or ended
/// (the caller answers 401); otherwise the request to run, with the session's user as the
/// actor, or the refusal of a change without the CSRF token or from another origin.
pub fn cookie_request(st: &ApiState, mut req: Request) -> Option<Result<Request, Response>> {
    let session = st.sessions.get(session_cookie(req.headers())?)?;
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let host = host_of(req.headers());
        let origin_ok = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .is_some_and(|o| same_origin(o, host));
        let csrf_ok = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| same_secret(t, &session.csrf));
        if !origin_ok || !csrf_ok {
            return Some(Err(error(
                StatusCode::FORBIDDEN,
                "refused",
                "a change through the console must come from the console page itself (same origin, with the session's CSRF token); reload the console",
            )));
        }
    }
    // The session may open another session, never a sign-in link.
    if req.uri().path() == "/session/link" {
        return None;
    }
    match HeaderValue::from_str(&session.user) {
        Ok(v) => {
            req.headers_mut().insert("x-chartmesh-user", v);
        }
        Err(_) => {
            req.headers_mut().remove("x-chartmesh-user");
        }
    }
    Some(Ok(req))
}

#[derive(Deserialize, Default)]
pub struct OpenSession {
    user: Option<String>,
}

fn session_user(given: Option<String>, headers: &HeaderMap) -> Result<String, NodeError> {
    match given.filter(|u| !u.trim().is_empty()) {
        Some(u) => {
            crate::guard::check_name("the user name", &u).map_err(NodeError::Invalid)?;
            Ok(u.trim().to_string())
        }
        None => Ok(match user(headers) {
            u if u == "api" => DEFAULT_USER.to_string(),
            u => u,
        }),
    }
}

/// `POST /api/v1/session` (with the bearer token; body `{user}` optional): a console session
/// cookie, and `{user, csrf}`.
pub async fn open_session(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, NodeError> {
    let b: OpenSession = if body.is_empty() {
        OpenSession::default()
    } else {
        json_body(&body)?
    };
    let name = session_user(b.user, &headers)?;
    let s = st.sessions.new_session(&name);
    let csrf = st.sessions.get(&s).map(|x| x.csrf).unwrap_or_default();
    let mut resp = Json(json!({ "session": "opened", "user": name, "csrf": csrf })).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&headers, &s, SESSION_TTL.as_secs()),
    );
    Ok(resp)
}

/// `GET /api/v1/session` (with the cookie): `{user, csrf}`, what the page needs to act.
pub async fn session_info(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    match session_cookie(&headers).and_then(|s| st.sessions.get(s)) {
        Some(s) => Json(json!({ "user": s.user, "csrf": s.csrf })).into_response(),
        None => Json(json!({ "user": user(&headers), "csrf": null })).into_response(),
    }
}

/// `POST /api/v1/session/user` `{user}`: who is acting in this console session from now on.
pub async fn set_session_user(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, NodeError> {
    let b: OpenSession = json_body(&body)?;
    let name = session_user(b.user, &HeaderMap::new())?;
    let changed = session_cookie(&headers).is_some_and(|s| st.sessions.set_user(s, &name));
    if !changed {
        return Err(NodeError::Invalid(
            "only a console session has a user to change; the CLI gives it with --user".into(),
        ));
    }
    Ok(Json(json!({ "user": name })))
}

/// `POST /api/v1/session/end`: signs the console out.
pub async fn end_session(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(s) = session_cookie(&headers) {
        st.sessions.end(s);
    }
    let mut resp = Json(json!({ "session": "ended" })).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&headers, "", 0));
    resp
}

/// `POST /api/v1/session/link` (with the bearer token): a single-use sign-in code for the
/// console, valid for two minutes (`chartmesh console` prints it as a link); the session it
/// opens acts as the user who asked for it.
pub async fn sign_in_link(State(st): State<ApiState>, headers: HeaderMap) -> Json<Value> {
    let name = session_user(None, &headers).unwrap_or_else(|_| DEFAULT_USER.into());
    let code = st.sessions.new_link(&name);
    Json(json!({ "path": format!("/login?code={code}"), "expiresInSeconds": LINK_TTL.as_secs() }))
}

#[derive(Deserialize)]
pub struct LoginQuery {
    code: Option<String>,
}

/// `GET /login?code=…`: redeems a sign-in code for a session cookie and goes to the console.
pub async fn login(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    let Some(name) = q.code.as_deref().and_then(|c| st.sessions.redeem(c)) else {
        return (
            StatusCode::UNAUTHORIZED,
            Html("<!doctype html><title>chartmesh</title><p>This sign-in link was already used or has expired. Run <code>chartmesh console</code> again for a new one, or <a href=\"/\">sign in with the API token</a>.</p>"),
        )
            .into_response();
    };
    let s = st.sessions.new_session(&name);
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&headers, &s, SESSION_TTL.as_secs()),
    );
    resp
}

pub async fn page() -> Html<&'static str> {
    Html(include_str!("../console.html"))
}

pub async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../console.js"),
    )
}

/// The QR decoder the pairing form uses (jsQR 1.4.0, Apache-2.0; `src/vendor/README.md`).
pub async fn qr_decoder() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../vendor/jsQR.js"),
    )
}

pub async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../console.css"),
    )
}

fn closed<E>(_: E) -> NodeError {
    NodeError::Store(StoreError::Closed)
}

/// `GET /api/v1/practice`: this practice at a glance (id, name, addresses, store size,
/// charts, the last backup, unpaired practices waiting).
pub async fn practice(State(st): State<ApiState>) -> Result<Json<Value>, NodeError> {
    let n = st.node.clone();
    tokio::task::spawn_blocking(move || {
        let last_backup = n
            .store
            .audit_search(&AuditFilter {
                action: Some("backup".into()),
                limit: 1,
                ..Default::default()
            })?
            .into_iter()
            .next()
            .map(|e| json!({ "timeMs": e.event.time_ms, "by": e.event.actor, "detail": e.event.detail }));
        let sync = n.sync.get();
        let sync_addr = sync
            .map(|s| s.local_addr().to_string())
            .unwrap_or_else(|| n.config.sync.listen.to_string());
        let loopback = sync.map_or(n.config.sync.listen.ip().is_loopback(), |s| {
            s.local_addr().ip().is_loopback()
        });
        // How other practices reach this one: the sync address (unless loopback only), the
        // relay (configured, joined, its last error), LAN discovery and port mapping.
        let reachability = json!({
            "listen": sync_addr,
            "loopbackOnly": loopback,
            "relay": n.config.sync.relay.as_ref().map(|addr| {
                let view = sync.and_then(|s| s.relay());
                json!({
                    "addr": addr,
                    "joined": view.as_ref().is_some_and(|v| v.connected),
                    "lastError": view.and_then(|v| v.last_error),
                })
            }),
            "lanDiscovery": {
                "configured": n.config.sync.lan_discovery,
                "running": sync.is_some_and(|s| s.lan_discovery()),
            },
            // The router's mapping of the sync port, or why there is none.
            "portMapping": sync.and_then(|s| s.port_mapping()),
        });
        Ok(Json(json!({
            "id": n.practice_id(),
            "name": n.config.practice.name,
            "version": env!("CARGO_PKG_VERSION"),
            "dataDir": n.data_dir.display().to_string(),
            "addresses": { "sync": sync_addr, "api": n.config.api.listen.to_string() },
            "reachability": reachability,
            "storeBytes": n.store.disk_bytes(),
            "charts": n.store.count()?,
            "lastBackup": last_backup,
            "pendingPeers": n.pending_peers.list().len(),
        })))
    })
    .await
    .map_err(closed)?
}

/// `GET /api/v1/practice/qr.svg`: the practice id as a QR code (SVG), to scan at the other
/// practice.
pub async fn practice_qr(State(st): State<ApiState>) -> Response {
    let id = st.node.practice_id();
    match qrcode::QrCode::new(id.as_bytes()) {
        Ok(code) => (
            [(header::CONTENT_TYPE, "image/svg+xml")],
            code.render::<qrcode::render::svg::Color<'_>>()
                .min_dimensions(200, 200)
                .quiet_zone(true)
                .build(),
        )
            .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("the practice id could not be drawn as a QR code: {e}"),
        ),
    }
}

/// `GET /api/v1/peers/pending`: unpaired practices that tried to connect, most recent first.
pub async fn pending_peers(State(st): State<ApiState>) -> Result<Json<Value>, NodeError> {
    let paired: Vec<String> = st
        .node
        .read(|s| Ok(s.peers()?))
        .await?
        .into_iter()
        .map(|p| p.id.to_string())
        .collect();
    let list: Vec<_> = st
        .node
        .pending_peers
        .list()
        .into_iter()
        .filter(|p| !paired.contains(&p.id))
        .collect();
    Ok(Json(json!({ "pending": list })))
}

#[derive(Deserialize)]
pub struct AcceptPending {
    addr: Option<String>,
    name: Option<String>,
}

/// `POST /api/v1/peers/pending/{id}/accept` `{addr, name}`: pairs a practice that tried to
/// connect (the address defaults to where its attempt came from).
pub async fn accept_pending(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), NodeError> {
    let b: AcceptPending = json_body(&body)?;
    let listed = st
        .node
        .pending_peers
        .list()
        .into_iter()
        .find(|p| p.id == id);
    let Some(listed) = listed else {
        return Err(NodeError::NotFound(format!(
            "practice {id} is not waiting to connect; pair it by its id and address instead"
        )));
    };
    let addr = b
        .addr
        .filter(|a| !a.trim().is_empty())
        .or(listed.addr)
        .ok_or_else(|| {
            NodeError::Invalid(
                "the address its attempt came from is not known: give its sync address (HOST:PORT)"
                    .into(),
            )
        })?;
    crate::guard::check_name("the address", &addr).map_err(NodeError::Invalid)?;
    let name = b.name.filter(|n| !n.trim().is_empty());
    if let Some(n) = &name {
        crate::guard::check_name("the name", n).map_err(NodeError::Invalid)?;
    }
    let p = st
        .node
        .add_peer(&id, addr.trim(), name, &user(&headers))
        .await?;
    st.node.pending_peers.remove(&id);
    Ok((
        StatusCode::CREATED,
        Json(serde_json::to_value(p).expect("peer serializes")),
    ))
}

/// `POST /api/v1/peers/pending/{id}/dismiss`: forgets a practice's attempt (it is listed
/// again if it tries again).
pub async fn dismiss_pending(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, NodeError> {
    if !st.node.pending_peers.remove(&id) {
        return Err(NodeError::NotFound(format!(
            "practice {id} is not waiting to connect"
        )));
    }
    st.node
        .audit(vec![
            chartmesh_core::audit::AuditEvent::new(
                crate::now_ms(),
                user(&headers),
                "pending-dismiss",
            )
            .peer(id.clone()),
        ])
        .await?;
    Ok(Json(json!({ "dismissed": id })))
}

#[derive(Deserialize)]
pub struct AuditSearch {
    chart: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    /// YYYY-MM-DD (from the start of that day, UTC) or RFC 3339.
    from: Option<String>,
    /// YYYY-MM-DD (to the end of that day, UTC) or RFC 3339.
    to: Option<String>,
    limit: Option<usize>,
}

/// A time given as a date (`end`: the end of that day) or RFC 3339, in ms.
fn parse_when(what: &str, s: &str, end: bool) -> Result<i64, NodeError> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let date = chartmesh_core::due::parse_date(s)
        .filter(|_| s.len() == 10)
        .ok_or_else(|| {
            NodeError::Invalid(format!(
                "{what}={s:?} is neither a date such as 2026-06-01 nor an RFC 3339 time"
            ))
        })?;
    let day = date.midnight().assume_utc().unix_timestamp() * 1000;
    Ok(if end { day + 86_400_000 } else { day })
}

/// `GET /api/v1/audit/search?chart=&actor=&action=&from=&to=&limit=`: audit entries matching
/// every filter given, newest first (at most `limit`, default 200, at most 5,000).
pub async fn audit_search(
    State(st): State<ApiState>,
    Query(q): Query<AuditSearch>,
) -> Result<Json<Value>, NodeError> {
    let blank = |o: Option<String>| o.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let chart = match blank(q.chart) {
        Some(c) => Some(st.node.resolve(&c).await.unwrap_or(c)),
        None => None,
    };
    let filter = AuditFilter {
        chart,
        actor: blank(q.actor),
        action: blank(q.action),
        since_ms: blank(q.from)
            .map(|s| parse_when("from", &s, false))
            .transpose()?,
        until_ms: blank(q.to)
            .map(|s| parse_when("to", &s, true))
            .transpose()?,
        limit: q.limit.unwrap_or(200).clamp(1, 5000),
    };
    let entries = st.node.read(move |s| Ok(s.audit_search(&filter)?)).await?;
    Ok(Json(json!({ "entries": entries })))
}

/// `GET /api/v1/charts/{id}/disclosures`: what left this practice of a chart, and the consent
/// recorded for it: the audit entries of the chart that name another practice, and its
/// exports, newest first.
pub async fn disclosures(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, NodeError> {
    let key = st.node.resolve(&id).await?;
    let filter = AuditFilter {
        chart: Some(key.clone()),
        limit: 5000,
        ..Default::default()
    };
    let entries: Vec<_> = st
        .node
        .read(move |s| Ok(s.audit_search(&filter)?))
        .await?
        .into_iter()
        .filter(|e| e.event.peer.is_some() || e.event.action == "export")
        .take(500)
        .collect();
    Ok(Json(json!({ "chart": key, "disclosures": entries })))
}

/// What the live-event stream compares between polls: the store's change counter, each
/// peer's link, and the unpaired practices waiting.
fn snapshot(st: &ApiState) -> Value {
    let n = &st.node;
    let seq = n.store.seq().unwrap_or(0);
    let peers: Vec<Value> = n
        .sync
        .get()
        .map(|s| s.status(false))
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            json!({ "id": p.id, "connected": p.connected, "inSync": p.in_sync,
                    "lastSyncMs": p.last_sync_ms, "pending": p.pending_changes,
                    "paused": p.paused, "error": p.last_error })
        })
        .collect();
    let pending: Vec<Value> = n
        .pending_peers
        .list()
        .into_iter()
        .map(|p| json!([p.id, p.attempts]))
        .collect();
    json!({ "seq": seq, "peers": peers, "pendingPeers": pending })
}

/// `GET /api/v1/events`: server-sent events; `change` (with the store's change counter, the
/// peers' sync state and the practices waiting to pair) whenever one of them changes, e.g.
/// when a sync lands. Nothing of a chart is sent.
pub async fn events(
    State(st): State<ApiState>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let stream = futures_util::stream::unfold((st, Value::Null), |(st, last)| async move {
        loop {
            let s2 = st.clone();
            let now = tokio::task::spawn_blocking(move || snapshot(&s2))
                .await
                .unwrap_or(Value::Null);
            if now != last && !now.is_null() {
                let ev = Event::default().event("change").data(now.to_string());
                return Some((Ok(ev), (st, now)));
            }
            tokio::time::sleep(EVENT_POLL).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_and_this_origin_pass() {
        for ok in [
            "127.0.0.1:7360",
            "localhost:7360",
            "[::1]:7360",
            "127.0.0.1",
        ] {
            assert!(is_loopback_name(host_name(ok)), "{ok}");
        }
        for bad in [
            "evil.example:7360",
            "127.0.0.1.evil.example",
            "",
            "0.0.0.0:7360",
        ] {
            assert!(!is_loopback_name(host_name(bad)), "{bad}");
        }
        assert!(same_origin("http://127.0.0.1:7360", "127.0.0.1:7360"));
        assert!(same_origin("http://localhost:7360", "localhost:7360"));
        for bad in [
            "null",
            "http://evil.example",
            "http://127.0.0.1:8080",
            "http://localhost:7360",
            "https://127.0.0.1:7360",
            "http://127.0.0.1:7360/x",
            "file://",
        ] {
            assert!(!same_origin(bad, "127.0.0.1:7360"), "{bad}");
        }
    }

    #[test]
    fn a_sign_in_code_works_once_and_keeps_its_user() {
        let s = Sessions::default();
        let code = s.new_link("dr. who");
        assert_eq!(s.redeem(&code).as_deref(), Some("dr. who"));
        assert_eq!(s.redeem(&code), None);
        assert_eq!(s.redeem("made-up"), None);
        let session = s.new_session("nurse");
        assert!(s.valid(&session));
        assert!(!s.valid("made-up"));
        assert!(s.set_user(&session, "front desk"));
        assert_eq!(s.get(&session).unwrap().user, "front desk");
        let csrf = s.get(&session).unwrap().csrf;
        assert_eq!(csrf.len(), 64);
        assert!(same_secret(&csrf, &csrf.clone()));
        assert!(!same_secret(&csrf, &secret()));
        s.end(&session);
        assert!(!s.valid(&session));
    }

    #[test]
    fn each_daemon_port_has_its_own_cookie() {
        let with_host = |h: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, HeaderValue::from_str(h).unwrap());
            cookie_name(&m)
        };
        assert_eq!(with_host("127.0.0.1:7360"), "chartmesh_session_7360");
        assert_eq!(with_host("[::1]:7361"), "chartmesh_session_7361");
        assert_eq!(with_host("localhost"), "chartmesh_session");
        assert_eq!(with_host("[::1]"), "chartmesh_session");
    }

    #[test]
    fn dates_and_times_bound_an_audit_search() {
        assert_eq!(parse_when("from", "1970-01-02", false).unwrap(), 86_400_000);
        assert_eq!(
            parse_when("to", "1970-01-02", true).unwrap(),
            2 * 86_400_000
        );
        assert_eq!(
            parse_when("from", "1970-01-01T00:00:01Z", false).unwrap(),
            1000
        );
        assert!(parse_when("from", "yesterday", false).is_err());
    }
}
