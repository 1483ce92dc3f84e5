//! `/metrics` (Prometheus/OpenMetrics text) and `/healthz`, served beside the local API on
//! its loopback address, without the API token (counts and peer ids only: no chart content,
//! no patient). Requests addressed to another host name are refused (DNS rebinding).
//!
//! What is measured: peers paired and connected; per peer its sync lag (seconds since the
//! last complete sync), pending local changes, clock skew and the bytes sent to and received
//! from it (and in total, unpaired peers included); the port mapping on the gateway and its
//! lease; audit entries by action (refusals among
//! them); the store's size on disk; the latency of the local API's writes (a histogram).
//!
//! Owns: the metric names and their computation at scrape time. Must not touch: sync or the
//! store's writes (it only reads their public state).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::node::Node;

type Labels = Vec<(String, String)>;

/// What the scrape reads, and the write-latency histogram the API fills.
#[derive(Clone)]
pub struct Metrics {
    node: Arc<Node>,
    data_dir: PathBuf,
    write_seconds: Histogram,
}

impl Metrics {
    pub fn new(node: Arc<Node>) -> Metrics {
        let data_dir = node.data_dir.clone();
        Metrics {
            node,
            data_dir,
            // 1 ms … ~16 s.
            write_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }

    /// The OpenMetrics text of every metric, computed now.
    fn render(&self) -> Result<String, String> {
        let mut reg = Registry::default();
        let now = crate::now_ms();
        let peers = self
            .node
            .sync
            .get()
            .map(|s| s.status(false))
            .unwrap_or_default();
        let paired = Gauge::<i64>::default();
        paired.set(peers.len() as i64);
        reg.register(
            "chartmesh_peers_paired",
            "Practices paired with this one",
            paired,
        );
        let connected = Gauge::<i64>::default();
        connected.set(peers.iter().filter(|p| p.connected).count() as i64);
        reg.register(
            "chartmesh_peers_connected",
            "Paired practices connected now",
            connected,
        );
        let up = Family::<Labels, Gauge>::default();
        let skew = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let sent = Family::<Labels, Counter>::default();
        let received = Family::<Labels, Counter>::default();
        let lag = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let pending = Family::<Labels, Gauge>::default();
        for p in &peers {
            let l: Labels = vec![
                ("peer".into(), p.id.chars().take(9).collect()),
                ("name".into(), p.name.clone()),
            ];
            up.get_or_create(&l).set(i64::from(p.connected));
            sent.get_or_create(&l).inc_by(p.bytes_sent);
            received.get_or_create(&l).inc_by(p.bytes_received);
            if let Some(ms) = p.clock_skew_ms {
                skew.get_or_create(&l).set(ms as f64 / 1000.0);
            }
            pending.get_or_create(&l).set(p.pending_changes);
            if let Some(t) = p.last_sync_ms {
                let s = if p.in_sync {
                    0.0
                } else {
                    (now - t).max(0) as f64 / 1000.0
                };
                lag.get_or_create(&l).set(s);
            }
        }
        reg.register(
            "chartmesh_peer_connected",
            "1 while the peer is connected",
            up,
        );
        reg.register(
            "chartmesh_peer_sync_lag_seconds",
            "0 while in sync, else seconds since the last complete sync with the peer",
            lag,
        );
        reg.register(
            "chartmesh_peer_pending_changes",
            "Local changes the peer has not confirmed yet",
            pending,
        );
        reg.register(
            "chartmesh_peer_clock_skew_seconds",
            "The peer's wall clock minus this practice's, measured at its last pull",
            skew,
        );
        reg.register(
            "chartmesh_sync_bytes_sent",
            "Bytes sent to the peer (QUIC datagrams) since the daemon started",
            sent,
        );
        reg.register(
            "chartmesh_sync_bytes_received",
            "Bytes received from the peer (QUIC datagrams) since the daemon started",
            received,
        );
        let (all_tx, all_rx) = self
            .node
            .sync
            .get()
            .map(|s| s.bytes_total())
            .unwrap_or((0, 0));
        let total_tx = Counter::<u64>::default();
        total_tx.inc_by(all_tx);
        reg.register(
            "chartmesh_sync_all_bytes_sent",
            "Bytes sent to all peers, unpaired ones included, since the daemon started",
            total_tx,
        );
        let total_rx = Counter::<u64>::default();
        total_rx.inc_by(all_rx);
        reg.register(
            "chartmesh_sync_all_bytes_received",
            "Bytes received from all peers, unpaired ones included, since the daemon started",
            total_rx,
        );
        // The gateway's mapping of the sync port: 1 with its protocol and external address
        // while held, and the seconds its lease has left (0 without one).
        let mapped = Family::<Labels, Gauge>::default();
        let lease_left = Gauge::<i64>::default();
        if let Some(pm) = self.node.sync.get().and_then(|s| s.port_mapping())
            && let (Some(protocol), Some(external)) = (pm.protocol, pm.external)
        {
            mapped
                .get_or_create(&vec![
                    ("protocol".into(), protocol.name().into()),
                    ("external".into(), external.to_string()),
                ])
                .set(1);
            lease_left.set(pm.lease_left_s.unwrap_or(0) as i64);
        }
        reg.register(
            "chartmesh_port_mapping",
            "1 while the gateway maps a public port to the sync port (by protocol and external address)",
            mapped,
        );
        reg.register(
            "chartmesh_port_mapping_lease_seconds",
            "Seconds the port mapping's lease has left (renewed at half-life; 0 without one)",
            lease_left,
        );
        let counts = self.node.store.audit_counts().map_err(|e| e.to_string())?;
        let audit = Family::<Labels, Counter>::default();
        let refusals = Counter::<u64>::default();
        for (action, n) in &counts {
            audit
                .get_or_create(&vec![("action".into(), action.clone())])
                .inc_by(*n);
            if action == "refuse" {
                refusals.inc_by(*n);
            }
        }
        reg.register(
            "chartmesh_audit_entries",
            "Audit log entries by action",
            audit,
        );
        reg.register(
            "chartmesh_refusals",
            "Refusals recorded in the audit log (consent, policy, handshakes)",
            refusals,
        );
        let size = Gauge::<i64>::default();
        let store = crate::datadir::store_path(&self.data_dir);
        let mut bytes = 0u64;
        for suffix in ["", "-wal"] {
            let mut p = store.as_os_str().to_owned();
            p.push(suffix);
            bytes += std::fs::metadata(PathBuf::from(p))
                .map(|m| m.len())
                .unwrap_or(0);
        }
        size.set(bytes as i64);
        reg.register(
            "chartmesh_store_bytes",
            "Size of the store on disk (database and write-ahead log)",
            size,
        );
        let charts = Gauge::<i64>::default();
        charts.set(self.node.store.count().map_err(|e| e.to_string())? as i64);
        reg.register("chartmesh_charts", "Charts held", charts);
        reg.register(
            "chartmesh_api_write_seconds",
            "Latency of the local API's writes (POST and DELETE requests)",
            self.write_seconds.clone(),
        );
        let mut out = String::new();
        encode(&mut out, &reg).map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// Times every write through the local API (POST, PUT, DELETE, PATCH) into the histogram.
pub async fn time_writes(State(m): State<Metrics>, req: Request, next: Next) -> Response {
    let write = !matches!(req.method().as_str(), "GET" | "HEAD" | "OPTIONS");
    let t = Instant::now();
    let resp = next.run(req).await;
    if write {
        m.write_seconds.observe(t.elapsed().as_secs_f64());
    }
    resp
}

/// `/metrics` and `/healthz`.
pub fn router(m: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .layer(axum::middleware::from_fn(loopback_host))
        .with_state(m)
}

async fn metrics(State(m): State<Metrics>) -> Response {
    let r = tokio::task::spawn_blocking(move || m.render()).await;
    match r {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("# metrics unavailable: {e}\n"),
        )
            .into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// 200 `ok` while the store answers and sync runs; 503 with the reason otherwise.
async fn healthz(State(m): State<Metrics>) -> Response {
    let node = m.node.clone();
    let store_ok = tokio::task::spawn_blocking(move || node.store.count())
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
    let sync_ok = m.node.sync.get().is_some();
    match (store_ok, sync_ok) {
        (true, true) => (StatusCode::OK, "ok\n").into_response(),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "store not answering\n").into_response(),
        (_, false) => (StatusCode::SERVICE_UNAVAILABLE, "sync not running\n").into_response(),
    }
}

/// Only requests addressed to a loopback name (the server listens on loopback only; this
/// stops a web page that rebinds its own name to 127.0.0.1 from reading the metrics).
async fn loopback_host(req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    if matches!(name, "127.0.0.1" | "localhost" | "::1") {
        next.run(req).await
    } else {
        (
            StatusCode::MISDIRECTED_REQUEST,
            "only requests to 127.0.0.1 or localhost are answered\n",
        )
            .into_response()
    }
}
