//! The console page and what keeps a browser from being turned against the local API:
//!
//! - Only requests addressed to a loopback name (`Host: 127.0.0.1`, `localhost`, `[::1]`)
//!   are answered, so a web page whose DNS name rebinds to 127.0.0.1 gets nothing.
//! - A request carrying an `Origin` must come from such an address; state-changing requests
//!   made with the session cookie must carry one.
//! - The page never holds the API token: the token is exchanged once (`POST
//!   /api/v1/session`, or a single-use sign-in link from `chartmesh console`) for an
//!   `HttpOnly; SameSite=Strict` session cookie, which scripts cannot read.
//! - Every answer has a strict Content-Security-Policy (scripts and styles from this origin
//!   only, no inline code, no framing) and no-store caching.

use axum::Json;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{ApiState, error};

/// The session cookie's name.
pub const COOKIE: &str = "chartmesh_session";
/// How long a console session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How long a sign-in link from `chartmesh console` stays usable (once).
const LINK_TTL: Duration = Duration::from_secs(120);
/// The most sessions and unused sign-in links kept (the oldest go first).
const MAX_SESSIONS: usize = 32;
const MAX_LINKS: usize = 16;

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// Console sessions and single-use sign-in codes, by the SHA-256 of their secret.
#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<[u8; 32], Instant>>,
    links: Mutex<HashMap<[u8; 32], Instant>>,
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Keeps at most `max` live entries (expiry in the future), dropping the soonest to expire.
fn insert_bounded(map: &mut HashMap<[u8; 32], Instant>, key: [u8; 32], until: Instant, max: usize) {
    let now = Instant::now();
    map.retain(|_, t| *t > now);
    while map.len() >= max {
        let Some(k) = map.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) else {
            break;
        };
        map.remove(&k);
    }
    map.insert(key, until);
}

impl Sessions {
    fn new_session(&self) -> String {
        let s = secret();
        insert_bounded(
            &mut self.sessions.lock().unwrap(),
            digest(&s),
            Instant::now() + SESSION_TTL,
            MAX_SESSIONS,
        );
        s
    }

    pub fn valid(&self, session: &str) -> bool {
        self.sessions
            .lock()
            .unwrap()
            .get(&digest(session))
            .is_some_and(|t| *t > Instant::now())
    }

    fn new_link(&self) -> String {
        let s = secret();
        insert_bounded(
            &mut self.links.lock().unwrap(),
            digest(&s),
            Instant::now() + LINK_TTL,
            MAX_LINKS,
        );
        s
    }

    /// Uses up a sign-in code: true once, if it was issued and has not expired.
    fn redeem(&self, code: &str) -> bool {
        self.links
            .lock()
            .unwrap()
            .remove(&digest(code))
            .is_some_and(|t| t > Instant::now())
    }
}

/// The session cookie's value in a request, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

fn set_cookie(session: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
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

/// Whether an `Origin` header names this machine's loopback over http.
fn loopback_origin(origin: &str) -> bool {
    origin
        .strip_prefix("http://")
        .is_some_and(|auth| !auth.contains('/') && is_loopback_name(host_name(auth)))
}

/// Outermost layer: answers only requests addressed to a loopback name, refuses requests
/// from other origins, and adds the security headers to every answer.
pub async fn loopback_only(req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut resp = if !is_loopback_name(host_name(host)) {
        error(
            StatusCode::MISDIRECTED_REQUEST,
            "refused",
            &format!(
                "this API answers only requests addressed to 127.0.0.1 or localhost (Host: {host:?}); open the address `chartmesh console` prints"
            ),
        )
    } else if let Some(origin) = req.headers().get(header::ORIGIN)
        && !origin.to_str().is_ok_and(loopback_origin)
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

/// Whether a request authenticated by the session cookie may go on: a state-changing one
/// must say (Origin) that it comes from the console's own origin.
pub fn cookie_request_allowed(method: &Method, headers: &HeaderMap) -> bool {
    if matches!(*method, Method::GET | Method::HEAD) {
        return true;
    }
    headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .is_some_and(loopback_origin)
}

/// `POST /api/v1/session` (with the bearer token): a console session cookie.
pub async fn open_session(State(st): State<ApiState>) -> Response {
    let s = st.sessions.new_session();
    let mut resp = Json(json!({ "session": "opened" })).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&s));
    resp
}

/// `POST /api/v1/session/link` (with the bearer token): a single-use sign-in code for the
/// console, valid for two minutes (`chartmesh console` prints it as a link).
pub async fn sign_in_link(State(st): State<ApiState>) -> Json<serde_json::Value> {
    let code = st.sessions.new_link();
    Json(json!({ "path": format!("/login?code={code}"), "expiresInSeconds": LINK_TTL.as_secs() }))
}

#[derive(Deserialize)]
pub struct LoginQuery {
    code: Option<String>,
}

/// `GET /login?code=…`: redeems a sign-in code for a session cookie and goes to the console.
pub async fn login(State(st): State<ApiState>, Query(q): Query<LoginQuery>) -> Response {
    if !q.code.as_deref().is_some_and(|c| st.sessions.redeem(c)) {
        return (
            StatusCode::UNAUTHORIZED,
            Html("<!doctype html><title>chartmesh</title><p>This sign-in link was already used or has expired. Run <code>chartmesh console</code> again for a new one.</p>"),
        )
            .into_response();
    }
    let s = st.sessions.new_session();
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&s));
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

pub async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../console.css"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_and_origins_pass() {
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
        assert!(loopback_origin("http://127.0.0.1:7360"));
        assert!(loopback_origin("http://localhost:7360"));
        for bad in [
            "null",
            "http://evil.example",
            "https://127.0.0.1.evil.example",
            "file://",
        ] {
            assert!(!loopback_origin(bad), "{bad}");
        }
    }

    #[test]
    fn a_sign_in_code_works_once() {
        let s = Sessions::default();
        let code = s.new_link();
        assert!(s.redeem(&code));
        assert!(!s.redeem(&code));
        assert!(!s.redeem("made-up"));
        let session = s.new_session();
        assert!(s.valid(&session));
        assert!(!s.valid("made-up"));
    }
}
