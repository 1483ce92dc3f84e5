//! Sync with paired practices: the QUIC endpoint, one connection per peer (dialled with
//! backoff, or accepted), and on it the two pulls of docs/PROTOCOL.md. The puller's state
//! machine is `chartmesh_core::sync`; this module carries its messages over `chartmesh_net`
//! streams, answers pulls from the store, and applies what arrives through the store's
//! consent-checked `apply_sync`.
//!
//! Owns: connections, sessions, the per-peer status shown by `chartmesh status`.
//! Must not touch: SQL (the store) or the consent rules (`chartmesh_core::consent`, asked for
//! every chart offered, every chart sent and every change applied).

use chartmesh_core::ChartDoc;
use chartmesh_core::PracticeId;
use chartmesh_core::audit::AuditEvent;
use chartmesh_core::consent::{self, Access, Grant};
use chartmesh_core::sync::{
    Action, CHANGES_TARGET, Delivery, Incoming, LocalChart, MAX_MESSAGE, Msg, OFFER_CHUNK,
    OfferItem, Offered, PROTOCOL_VERSION, Puller, heads_digest,
};
use chartmesh_net::quinn;
use chartmesh_net::{Credentials, Endpoint, FrameReader, FrameWriter, PeerConnection, PinSet};
use chartmesh_store::{IndexFields, NewChart, Store, SyncChart, SyncItem, SyncOutcome};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::node::Node;
use crate::now_ms;

/// Application close codes.
const CLOSE_DUPLICATE: u32 = 2;
const CLOSE_UNPAIRED: u32 = 3;
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_PAUSED: u32 = 4;

/// Apply batches in flight per pull: beyond this the puller stops reading, and QUIC flow
/// control holds the sender back.
const APPLY_IN_FLIGHT: usize = 3;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What `chartmesh status` shows of one peer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub id: String,
    pub name: String,
    pub addr: String,
    pub connected: bool,
    pub paused: bool,
    /// Both directions are complete and nothing is pending.
    pub in_sync: bool,
    pub last_sync_ms: Option<i64>,
    /// Charts of ours it may receive under an active grant.
    pub shared_to: usize,
    /// Charts received from it (not revoked).
    pub shared_from: u64,
    /// Local changes (to any chart) since the peer last confirmed it is up to date.
    pub pending_changes: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Link {
    conn: Option<quinn::Connection>,
    /// Whether we dialled the live connection.
    dialed: bool,
    pulling: bool,
    pull_again: bool,
    /// The last pull over the live connection completed.
    pulled: bool,
    served_upto: i64,
    /// The served sequence last written to the store (written only when it moves).
    served_persisted: i64,
    last_error: Option<String>,
    /// When the last pull completed (also kept in the store when the checkpoint moves).
    last_pull_ms: Option<i64>,
    /// Wakes the dialler (peer changed, connection lost).
    kick: Arc<Notify>,
    /// Wakes the puller.
    pull: Arc<Notify>,
    /// Sync with this peer paused by an administrator: no dialling, connections refused.
    paused: bool,
    /// The last connection was closed deliberately by the peer (it shut down or paused):
    /// it dials us when it is back, so we only retry at the slow pace.
    peer_closed: bool,
    dialer: Option<CancellationToken>,
}

pub struct SyncService {
    node: Arc<Node>,
    endpoint: Endpoint,
    me: PracticeId,
    links: Mutex<HashMap<PracticeId, Link>>,
    shutdown: CancellationToken,
}

impl SyncService {
    /// Binds the sync endpoint and starts accepting, dialling and nudging.
    pub fn start(
        node: Arc<Node>,
        listen: SocketAddr,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<SyncService>> {
        let peers = node.store.peers()?;
        let pins = PinSet::new(peers.iter().map(|p| p.id));
        let creds = Credentials {
            cert_der: node.identity.cert_der.clone(),
            key_der: node.identity.key_der.clone(),
        };
        let endpoint = Endpoint::bind(listen, &creds, pins)?;
        let me = node.identity.id;
        let svc = Arc::new(SyncService {
            node: node.clone(),
            endpoint,
            me,
            links: Mutex::new(HashMap::new()),
            shutdown,
        });
        svc.reload_peers();
        tokio::spawn(svc.clone().accept_loop());
        tokio::spawn(svc.clone().nudge_loop());
        tokio::spawn(svc.clone().peers_loop());
        Ok(svc)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    pub async fn close(&self) {
        let conns: Vec<quinn::Connection> = {
            let links = self.links.lock().unwrap();
            links.values().filter_map(|l| l.conn.clone()).collect()
        };
        for c in conns {
            c.close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.shutdown()).await;
    }

    /// Brings links, pins and diallers in line with the paired peers in the store.
    fn reload_peers(self: &Arc<Self>) {
        let Ok(peers) = self.node.store.peers() else {
            return;
        };
        let mut links = self.links.lock().unwrap();
        let pins = self.endpoint.pins();
        let wanted: HashMap<PracticeId, String> =
            peers.iter().map(|p| (p.id, p.addr.clone())).collect();
        links.retain(|id, link| {
            if wanted.contains_key(id) {
                return true;
            }
            pins.remove(id);
            if let Some(c) = link.conn.take() {
                c.close(quinn::VarInt::from_u32(CLOSE_UNPAIRED), b"unpaired");
            }
            if let Some(d) = link.dialer.take() {
                d.cancel();
            }
            false
        });
        for (id, _addr) in wanted {
            pins.add(id);
            let link = links.entry(id).or_default();
            link.kick.notify_one();
            if link.dialer.is_none() {
                let token = self.shutdown.child_token();
                link.dialer = Some(token.clone());
                let svc = self.clone();
                tokio::spawn(
                    svc.clone()
                        .dial_loop(id, token.clone())
                        .instrument(tracing::info_span!("peer", peer = %id.short())),
                );
                tokio::spawn(
                    svc.pull_loop(id, token)
                        .instrument(tracing::info_span!("peer", peer = %id.short())),
                );
            }
        }
    }

    async fn peers_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.node.peers_changed.notified() => self.reload_peers(),
            }
        }
    }

    async fn accept_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                // Refused handshakes never reach accept: audit them as they are recorded.
                _ = tick.tick() => {
                    self.audit_handshake_refusals().await;
                    continue;
                }
                a = self.endpoint.accept() => a,
            };
            self.audit_handshake_refusals().await;
            match accepted {
                Some(pc) => self.register(pc, false),
                None => return,
            }
        }
    }

    async fn audit_handshake_refusals(&self) {
        let refused = self.endpoint.pins().take_refusals();
        if refused.is_empty() {
            return;
        }
        let now = now_ms();
        let events = refused
            .iter()
            .map(|r| {
                tracing::warn!(practice = %r.practice.short(), role = r.role, "refused a handshake from an unpaired practice");
                AuditEvent::new(now, "sync", "refuse")
                    .peer(r.practice.to_string())
                    .detail(format!("handshake ({}): certificate is not a paired practice", r.role))
            })
            .collect();
        let _ = self.node.audit(events).await;
    }

    async fn dial_loop(self: Arc<Self>, peer: PracticeId, token: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let (kick, idle, peer_closed) = {
                let links = self.links.lock().unwrap();
                let Some(link) = links.get(&peer) else { return };
                (
                    link.kick.clone(),
                    link.conn.is_some() || link.paused,
                    link.peer_closed,
                )
            };
            if idle {
                // Connected or paused: wait until that changes.
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = kick.notified() => {}
                }
                backoff = BACKOFF_MIN;
                continue;
            }
            if peer_closed {
                // The peer left on purpose and dials us when it is back; retry slowly
                // meanwhile (it may have come back at a new address).
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = kick.notified() => {}
                }
                let mut links = self.links.lock().unwrap();
                if let Some(l) = links.get_mut(&peer) {
                    l.peer_closed = false;
                }
                continue;
            }
            let addr = match self.node.store.peer(&peer) {
                Ok(Some(p)) => p.addr,
                _ => return,
            };
            let result = match tokio::net::lookup_host(&addr).await {
                Ok(mut addrs) => match addrs.next() {
                    Some(a) => self
                        .endpoint
                        .connect(a, peer)
                        .await
                        .map_err(|e| e.to_string()),
                    None => Err(format!("{addr} resolves to no address")),
                },
                Err(e) => Err(format!("cannot resolve {addr}: {e}")),
            };
            self.audit_handshake_refusals().await;
            match result {
                Ok(pc) => {
                    backoff = BACKOFF_MIN;
                    self.register(pc, true);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "dial failed");
                    let kick = {
                        let mut links = self.links.lock().unwrap();
                        let Some(link) = links.get_mut(&peer) else {
                            return;
                        };
                        link.last_error = Some(e);
                        link.kick.clone()
                    };
                    // Exponential backoff with jitter; a kick (e.g. the peer connected to
                    // us, or its address changed) cuts it short.
                    let jitter = rand::random::<f64>() * 0.5 + 0.75;
                    let wait = backoff.mul_f64(jitter);
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                        _ = kick.notified() => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Adopts a new connection, or closes it if a preferred one exists. Both sides prefer
    /// the connection dialled by the practice with the smaller id, so they keep the same one.
    fn register(self: &Arc<Self>, pc: PeerConnection, dialed: bool) {
        let peer = pc.peer;
        let conn = pc.connection;
        let preferred_dialer = std::cmp::min(self.me, peer);
        let is_preferred = |dialed: bool| {
            if dialed {
                self.me == preferred_dialer
            } else {
                peer == preferred_dialer
            }
        };
        let mut links = self.links.lock().unwrap();
        let Some(link) = links.get_mut(&peer) else {
            conn.close(quinn::VarInt::from_u32(CLOSE_UNPAIRED), b"unpaired");
            return;
        };
        if link.paused {
            conn.close(quinn::VarInt::from_u32(CLOSE_PAUSED), b"paused");
            return;
        }
        if let Some(existing) = &link.conn {
            if existing.close_reason().is_none() {
                if is_preferred(dialed) && !is_preferred(link.dialed) {
                    existing.close(quinn::VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate");
                } else {
                    conn.close(quinn::VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate");
                    return;
                }
            }
        }
        tracing::info!(peer = %peer.short(), dialed, "connected");
        link.conn = Some(conn.clone());
        link.peer_closed = false;
        link.dialed = dialed;
        link.pulled = false;
        link.last_error = None;
        link.pull_again = true;
        link.pull.notify_one();
        let span = tracing::info_span!("peer", peer = %peer.short());
        tokio::spawn(self.clone().serve_connection(peer, conn).instrument(span));
    }

    /// Answers the peer's pulls and nudges until the connection ends.
    async fn serve_connection(self: Arc<Self>, peer: PracticeId, conn: quinn::Connection) {
        let uni = {
            let conn = conn.clone();
            let svc = self.clone();
            tokio::spawn(async move {
                while let Ok(mut recv) = conn.accept_uni().await {
                    // A nudge or a catch-up: one tiny frame. Anything else is ignored.
                    if let Ok(Some(bytes)) = chartmesh_net::read_frame(&mut recv, 64).await {
                        match Msg::decode(&bytes) {
                            Ok(Msg::Nudge) => {
                                tracing::debug!("nudged");
                                svc.request_pull(&peer);
                            }
                            Ok(Msg::Caught { upto }) => svc.caught_up(&peer, upto as i64),
                            _ => {}
                        }
                    }
                }
            })
        };
        loop {
            let (send, recv) = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                s = conn.accept_bi() => match s {
                    Ok(s) => s,
                    Err(_) => break,
                },
            };
            let svc = self.clone();
            let c = conn.clone();
            tokio::spawn(
                async move {
                    if let Err(e) = svc.respond(peer, send, recv).await {
                        tracing::info!(error = %e, "pull from the peer ended early");
                        // A broken request on a live connection (garbage, an oversized or
                        // truncated frame, a message out of order) is a refusal: audit it.
                        if c.close_reason().is_none() && !matches!(e, SessionError::Connection(_)) {
                            svc.refuse_audit(&peer, None, &format!("protocol: {e}"))
                                .await;
                        }
                    }
                }
                .instrument(tracing::info_span!("respond")),
            );
        }
        uni.abort();
        let reason = conn.close_reason();
        let mut links = self.links.lock().unwrap();
        if let Some(link) = links.get_mut(&peer)
            && link
                .conn
                .as_ref()
                .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            tracing::info!(reason = ?reason, "disconnected");
            link.conn = None;
            link.pulled = false;
            // Closed on purpose by the peer (shut down or paused): it dials us when back.
            link.peer_closed = matches!(&reason, Some(quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code == quinn::VarInt::from_u32(CLOSE_SHUTDOWN) || c.error_code == quinn::VarInt::from_u32(CLOSE_PAUSED));
            link.kick.notify_one();
        }
    }

    /// The peers connected now.
    pub fn connected(&self) -> Vec<PracticeId> {
        let links = self.links.lock().unwrap();
        links
            .iter()
            .filter(|(_, l)| l.conn.as_ref().is_some_and(|c| c.close_reason().is_none()))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Sends an emergency request to a connected peer and waits for its answer.
    pub async fn ask_emergency(
        &self,
        peer: &PracticeId,
        request: chartmesh_core::emergency::Request,
    ) -> Result<chartmesh_core::emergency::Answer, String> {
        let conn = {
            let links = self.links.lock().unwrap();
            links.get(peer).and_then(|l| l.conn.clone())
        }
        .ok_or_else(|| "not connected".to_string())?;
        let exchange = async {
            let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let mut out = FrameWriter::new(send);
            let mut inp = FrameReader::new(recv, MAX_MESSAGE);
            out.send(
                &Msg::EmergencyRequest {
                    version: PROTOCOL_VERSION,
                    request,
                }
                .encode(),
            )
            .await
            .map_err(|e| e.to_string())?;
            out.finish().await.map_err(|e| e.to_string())?;
            match inp.recv().await.map_err(|e| e.to_string())? {
                Some(bytes) => match Msg::decode(&bytes) {
                    Ok(Msg::EmergencyAnswer { answer }) => Ok(answer),
                    Ok(Msg::Unsupported { version }) => Err(format!(
                        "the practice speaks protocol {version} and cannot answer emergency requests"
                    )),
                    Ok(other) => Err(format!("unexpected {} in answer", other.name())),
                    Err(e) => Err(e.to_string()),
                },
                None => Err("the practice closed the request without an answer".into()),
            }
        };
        tokio::time::timeout(Duration::from_secs(15), exchange)
            .await
            .map_err(|_| "no answer within 15 s".to_string())?
    }

    /// Pauses sync with a peer (closes the connection, stops dialling, refuses its
    /// connections) or resumes it (dials at once). Returns false for an unknown peer.
    pub fn set_paused(&self, peer: &PracticeId, paused: bool) -> bool {
        let mut links = self.links.lock().unwrap();
        let Some(link) = links.get_mut(peer) else {
            return false;
        };
        link.paused = paused;
        link.peer_closed = false;
        if paused && let Some(c) = link.conn.take() {
            c.close(quinn::VarInt::from_u32(CLOSE_PAUSED), b"paused");
            link.pulled = false;
        }
        link.kick.notify_one();
        true
    }

    fn note_pulled(&self, peer: &PracticeId) {
        let mut links = self.links.lock().unwrap();
        if let Some(l) = links.get_mut(peer) {
            l.last_pull_ms = Some(now_ms());
        }
    }

    /// The peer said nothing of its changes up to `upto` is for us: move our checkpoint of
    /// it there, unless a pull is running or due (which moves it anyway).
    fn caught_up(&self, peer: &PracticeId, upto: i64) {
        let idle = {
            let links = self.links.lock().unwrap();
            links
                .get(peer)
                .is_some_and(|l| !l.pulling && !l.pull_again && l.pulled)
        };
        if !idle {
            return;
        }
        tracing::debug!(upto, "caught up without a pull");
        if let Ok(rx) = self
            .node
            .store
            .set_checkpoint(&peer.to_string(), upto, now_ms())
        {
            tokio::spawn(async move {
                if let Ok(Err(e)) = rx.await {
                    tracing::warn!(error = %e, "saving the sync checkpoint failed; the next pull starts earlier");
                }
            });
        }
    }

    /// Nothing of ours up to `upto` is for this peer: it counts as served that far.
    fn note_served(&self, peer: &PracticeId, upto: i64) {
        let mut links = self.links.lock().unwrap();
        if let Some(l) = links.get_mut(peer) {
            l.served_upto = l.served_upto.max(upto);
        }
    }

    fn request_pull(&self, peer: &PracticeId) {
        let mut links = self.links.lock().unwrap();
        if let Some(link) = links.get_mut(peer) {
            link.pull_again = true;
            link.pull.notify_one();
        }
    }

    /// Tells every connected peer, after local changes, to pull.
    async fn nudge_loop(self: Arc<Self>) {
        let Some(mut changes) = self.node.store.subscribe_changes() else {
            return;
        };
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            let targets: Vec<(PracticeId, quinn::Connection, i64)> = {
                let links = self.links.lock().unwrap();
                links
                    .iter()
                    .filter_map(|(id, l)| l.conn.clone().map(|c| (*id, c, l.served_upto)))
                    .collect()
            };
            for (id, c, served) in targets {
                let store = self.node.store.clone();
                let svc = self.clone();
                tokio::spawn(async move {
                    // Nothing this peer may need since it last confirmed (e.g. only the
                    // changes it just sent us): instead of a nudge, which would make it pull
                    // for nothing, tell it so; it moves its checkpoint of us without a pull.
                    let key = id.to_string();
                    let state = blocking(move || {
                        let upto = store.seq()?;
                        // What it confirmed before this connection counts too.
                        let served = served.max(store.sync_peer_state(&key)?.served_upto);
                        Ok((upto, store.sync_pending(&key, served)?))
                    })
                    .await;
                    let msg = match state {
                        Ok((upto, false)) => {
                            svc.note_served(&id, upto);
                            Msg::Caught { upto: upto as u64 }
                        }
                        _ => Msg::Nudge,
                    };
                    if let Ok(mut s) = c.open_uni().await {
                        let _ = chartmesh_net::write_frame(&mut s, &msg.encode()).await;
                        let _ = s.finish();
                    }
                });
            }
        }
    }

    async fn pull_loop(self: Arc<Self>, peer: PracticeId, token: CancellationToken) {
        loop {
            let (notify, conn) = {
                let mut links = self.links.lock().unwrap();
                let Some(link) = links.get_mut(&peer) else {
                    return;
                };
                let conn = if link.pull_again {
                    link.conn.clone()
                } else {
                    None
                };
                if conn.is_some() {
                    link.pull_again = false;
                    link.pulling = true;
                }
                (link.pull.clone(), conn)
            };
            let Some(conn) = conn else {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = notify.notified() => continue,
                }
            };
            let result = self
                .pull(peer, &conn)
                .instrument(tracing::info_span!("pull"))
                .await;
            let retry = {
                let mut links = self.links.lock().unwrap();
                let Some(link) = links.get_mut(&peer) else {
                    return;
                };
                link.pulling = false;
                match result {
                    Ok(()) => {
                        if link
                            .conn
                            .as_ref()
                            .is_some_and(|c| c.stable_id() == conn.stable_id())
                        {
                            link.pulled = true;
                        }
                        None
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "pull failed; retried on the next connection");
                        link.last_error = Some(e.to_string());
                        // Retry while the connection lives, after a pause.
                        (conn.close_reason().is_none()).then(|| link.pull.clone())
                    }
                }
            };
            if let Some(pull) = retry {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                self.request_pull(&peer);
                pull.notify_one();
            }
        }
    }

    /// Status of every paired peer. `counts`: also count the charts shared each way (a scan
    /// of the chart index; `sync wait` polls without them).
    pub fn status(&self, counts: bool) -> Vec<PeerStatus> {
        let store = &self.node.store;
        let peers = store.peers().unwrap_or_default();
        let seq = store.seq().unwrap_or(0);
        let now = now_ms();
        peers
            .into_iter()
            .map(|p| {
                let key = p.id.to_string();
                let state = store.sync_peer_state(&key).unwrap_or_default();
                let shared_to = if counts {
                    let grants = store.grants(Some(&p.id)).unwrap_or_default();
                    shared_count(store, &grants, now)
                } else {
                    0
                };
                let links = self.links.lock().unwrap();
                let link = links.get(&p.id);
                let connected = link.is_some_and(|l| l.conn.is_some());
                let served = link
                    .map(|l| l.served_upto)
                    .unwrap_or(0)
                    .max(state.served_upto);
                // In sync: our last pull is complete and nothing it could need changed here
                // since its last complete pull (our own writes of its changes do not count).
                let in_sync = link
                    .is_some_and(|l| l.conn.is_some() && l.pulled && !l.pulling && !l.pull_again)
                    && (served >= seq || !store.sync_pending(&key, served).unwrap_or(true));
                PeerStatus {
                    id: key,
                    name: p.name,
                    addr: p.addr,
                    connected,
                    paused: link.is_some_and(|l| l.paused),
                    in_sync,
                    last_sync_ms: link.and_then(|l| l.last_pull_ms).max(state.last_pull_ms),
                    shared_to,
                    shared_from: if counts {
                        store.received_count(&p.id.to_string()).unwrap_or(0)
                    } else {
                        0
                    },
                    pending_changes: (seq - served).max(0),
                    last_error: link.and_then(|l| l.last_error.clone()),
                }
            })
            .collect()
    }
}

fn shared_count(store: &Store, grants: &[Grant], now: i64) -> usize {
    let active: Vec<&Grant> = grants.iter().filter(|g| g.is_active(now)).collect();
    if active.iter().any(|g| g.chart_id == consent::ALL_CHARTS) {
        return store.own_count().unwrap_or(0) as usize;
    }
    active.len()
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Wire(#[from] chartmesh_net::WireError),
    #[error(transparent)]
    Protocol(#[from] chartmesh_core::sync::ProtocolError),
    #[error(transparent)]
    Store(#[from] chartmesh_store::StoreError),
    #[error("opening a stream: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the peer ended the pull before it was complete")]
    Ended,
    #[error("the store stopped")]
    Closed,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, chartmesh_store::StoreError> + Send + 'static,
) -> Result<T, SessionError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| SessionError::Closed)?
        .map_err(SessionError::from)
}

impl SyncService {
    // ---- the responder: answers one pull from `peer` ----

    async fn respond(
        self: &Arc<Self>,
        peer: PracticeId,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<(), SessionError> {
        let mut out = FrameWriter::new(send);
        let mut inp = FrameReader::new(recv, MAX_MESSAGE);
        let Some(first) = inp.recv().await? else {
            return Ok(());
        };
        let since = match Msg::decode(&first) {
            Ok(Msg::Pull { version, since }) if version == PROTOCOL_VERSION => since,
            Ok(Msg::EmergencyRequest { version, request }) if version == PROTOCOL_VERSION => {
                let answer = self.node.emergency_answer(&peer, request).await;
                out.send(&Msg::EmergencyAnswer { answer }.encode()).await?;
                out.finish().await?;
                return Ok(());
            }
            // Another version of either request: say which this build speaks.
            Ok(Msg::Pull { .. } | Msg::EmergencyRequest { .. }) => {
                out.send(
                    &Msg::Unsupported {
                        version: PROTOCOL_VERSION,
                    }
                    .encode(),
                )
                .await?;
                out.finish().await?;
                return Ok(());
            }
            Ok(other) => {
                return Err(chartmesh_core::sync::ProtocolError::Unexpected {
                    got: other.name(),
                    state: "waiting for Pull",
                }
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        let store = self.node.store.clone();
        let key = peer.to_string();
        let (upto, items) = {
            let key = key.clone();
            blocking(move || offer(&store, &key, since as i64, now_ms())).await?
        };
        tracing::debug!(items = items.len(), since, upto, "offer ready");
        for chunk in items.chunks(OFFER_CHUNK) {
            out.send(
                &Msg::Offer {
                    items: chunk.to_vec(),
                }
                .encode(),
            )
            .await?;
        }
        out.send(&Msg::OfferEnd { upto: upto as u64 }.encode())
            .await?;
        loop {
            let Some(bytes) = inp.recv().await? else {
                out.finish().await?;
                return Ok(());
            };
            match Msg::decode(&bytes) {
                Ok(Msg::Want { items }) => {
                    let n = items.len();
                    let msgs = self.answer_want(&peer, items).await?;
                    tracing::debug!(charts = n, "want answered");
                    for m in msgs {
                        out.send(&m.encode()).await?;
                    }
                }
                Ok(Msg::Done { upto: done }) => {
                    let done = (done as i64).min(upto);
                    {
                        let mut links = self.links.lock().unwrap();
                        if let Some(l) = links.get_mut(&peer) {
                            l.served_upto = l.served_upto.max(done);
                        }
                    }
                    let changed = {
                        let mut links = self.links.lock().unwrap();
                        links.get_mut(&peer).is_some_and(|l| {
                            let c = l.served_persisted < done;
                            l.served_persisted = l.served_persisted.max(done);
                            c
                        })
                    };
                    if changed && let Ok(rx) = self.node.store.set_served(&key, done, now_ms()) {
                        let _ = rx.await;
                    }
                    // The puller may already have closed its side; nothing more is owed.
                    let _ = out.finish().await;
                    return Ok(());
                }
                Ok(other) => {
                    return Err(chartmesh_core::sync::ProtocolError::Unexpected {
                        got: other.name(),
                        state: "answering a pull",
                    }
                    .into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn refuse_audit(&self, peer: &PracticeId, chart: Option<&str>, why: &str) {
        let mut e = AuditEvent::new(now_ms(), "sync", "refuse")
            .peer(peer.to_string())
            .detail(why);
        if let Some(c) = chart {
            e = e.chart(c);
        }
        let _ = self.node.audit(vec![e]).await;
    }

    /// Sends what the peer lacks of each wanted chart it may have; anything else is answered
    /// as unknown and audited as a refusal. The sends are audited before they leave.
    async fn answer_want(
        &self,
        peer: &PracticeId,
        items: Vec<chartmesh_core::sync::WantItem>,
    ) -> Result<Vec<Msg>, SessionError> {
        let store = self.node.store.clone();
        let key = peer.to_string();
        let (deliveries, events) = blocking(move || {
            let now = now_ms();
            let grants = store.grants(Some(&key.parse().expect("peer id")))?;
            let ids: Vec<&str> = items.iter().map(|w| w.chart.as_str()).collect();
            let held = store.sync_charts(&ids)?;
            let mut deliveries = Vec::with_capacity(items.len());
            let mut events = Vec::new();
            for w in items {
                let visible = held.get(&w.chart).is_some_and(|c| match &c.origin {
                    None => {
                        consent::may_send(consent::applicable(&grants, &w.chart), None, now).is_ok()
                    }
                    Some(o) => {
                        o == &key && c.access == Some(Access::ReadWrite) && c.revoked_ms.is_none()
                    }
                });
                let data = if visible {
                    if w.have.is_empty() {
                        store.chart_bytes(&w.chart)?
                    } else {
                        store.chart_changes_after(&w.chart, &w.have)?
                    }
                } else {
                    None
                };
                let ev = AuditEvent::new(
                    now,
                    "sync",
                    if data.is_some() {
                        "sync-send"
                    } else {
                        "refuse"
                    },
                )
                .chart(&w.chart)
                .peer(&key);
                events.push(match &data {
                    Some(d) => ev.detail(format!("{} bytes", d.len())),
                    None => ev.detail("requested a chart that is not shared with it"),
                });
                deliveries.push(Delivery {
                    chart: w.chart,
                    data,
                });
            }
            Ok((deliveries, events))
        })
        .await?;
        let t = std::time::Instant::now();
        self.node
            .audit(events)
            .await
            .map_err(|_| SessionError::Closed)?;
        tracing::debug!(audit_us = t.elapsed().as_micros() as u64, "sends audited");
        let mut msgs = Vec::new();
        let mut batch = Vec::new();
        let mut size = 0;
        for d in deliveries {
            size += d.data.as_ref().map_or(0, |x| x.len()) + d.chart.len() + 8;
            batch.push(d);
            if size >= CHANGES_TARGET {
                msgs.push(Msg::Changes {
                    items: std::mem::take(&mut batch),
                });
                size = 0;
            }
        }
        if !batch.is_empty() {
            msgs.push(Msg::Changes { items: batch });
        }
        Ok(msgs)
    }

    // ---- the puller: one pull from `peer` over `conn` ----

    async fn pull(
        self: &Arc<Self>,
        peer: PracticeId,
        conn: &quinn::Connection,
    ) -> Result<(), SessionError> {
        let key = peer.to_string();
        let checkpoint = {
            let store = self.node.store.clone();
            let key = key.clone();
            blocking(move || store.sync_peer_state(&key))
                .await?
                .checkpoint
        };
        let (send, recv) = conn.open_bi().await?;
        let mut out = FrameWriter::new(send);
        let (mut puller, first) = Puller::start(checkpoint as u64);
        out.send(&first.encode()).await?;

        // Messages are read by their own task so a slow apply never loses a half-read frame.
        let (msg_tx, mut msg_rx) = mpsc::channel::<Result<Msg, SessionError>>(4);
        let reader = tokio::spawn(async move {
            let mut inp = FrameReader::new(recv, MAX_MESSAGE);
            loop {
                let r = match inp.recv().await {
                    Ok(Some(b)) => Msg::decode(&b).map_err(SessionError::from),
                    Ok(None) => Err(SessionError::Ended),
                    Err(e) => Err(e.into()),
                };
                let stop = r.is_err();
                if msg_tx.send(r).await.is_err() || stop {
                    return;
                }
            }
        });
        let (applied_tx, mut applied_rx) = mpsc::unbounded_channel::<Result<usize, SessionError>>();
        let permits = Arc::new(Semaphore::new(APPLY_IN_FLIGHT));
        let result = async {
            loop {
                let actions = tokio::select! {
                    m = msg_rx.recv(), if permits.available_permits() > 0 => {
                        let msg = m.ok_or(SessionError::Ended)??;
                        tracing::debug!(msg = msg.name(), "received");
                        let local = if let Msg::Offer { items } = &msg {
                            let ids: Vec<String> = items.iter().map(|i| i.chart.clone()).collect();
                            let store = self.node.store.clone();
                            blocking(move || {
                                let refs: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
                                store.sync_charts(&refs)
                            })
                            .await?
                        } else {
                            HashMap::new()
                        };
                        puller.on_message(msg, &mut |id: &str| local.get(id).map(local_chart))?
                    }
                    a = applied_rx.recv() => {
                        let n = a.expect("sender held")?;
                        tracing::debug!(items = n, "applied");
                        puller.applied(n)
                    }
                };
                for action in actions {
                    match action {
                        Action::Send(m) => out.send(&m.encode()).await?,
                        Action::Apply(items) => {
                            let permit = permits.clone().acquire_owned().await.expect("open");
                            let svc = self.clone();
                            let tx = applied_tx.clone();
                            let key = key.clone();
                            tokio::spawn(async move {
                                let n = items.len();
                                let r = svc.apply(&key, items).await.map(|_| n);
                                drop(permit);
                                let _ = tx.send(r);
                            });
                        }
                        Action::Complete { upto } => {
                            // Everything applied is durable by now (each apply was awaited),
                            // so the peer may hear it at once. The checkpoint is only a
                            // shortcut for the next pull: it is queued, not awaited; if it is
                            // lost in a crash, the next pull offers these charts again and
                            // their digests match, so nothing is applied twice.
                            out.send(&Msg::Done { upto }.encode()).await?;
                            if upto as i64 != checkpoint {
                                let rx = self.node.store.set_checkpoint(&key, upto as i64, now_ms())?;
                                tokio::spawn(async move {
                                    if let Ok(Err(e)) = rx.await {
                                        tracing::warn!(error = %e, "saving the sync checkpoint failed; the next pull starts earlier");
                                    }
                                });
                            }
                            self.note_pulled(&peer);
                            let stats = puller.stats().clone();
                            tracing::debug!(offered = stats.offered, wanted = stats.wanted, delivered = stats.delivered, upto, "pull complete");
                            return Ok(());
                        }
                    }
                }
            }
        }
        .await;
        reader.abort();
        let _ = out.finish().await;
        result
    }

    /// Applies one batch durably: new charts are loaded and validated on the CPU pool first.
    async fn apply(&self, peer: &str, items: Vec<Incoming>) -> Result<(), SessionError> {
        let store = self.node.store.clone();
        let ids: Vec<String> = items.iter().map(|i| i.chart.clone()).collect();
        let reader = store.clone();
        let held = blocking(move || {
            let refs: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
            store.sync_charts(&refs)
        })
        .await?;
        let now = now_ms();
        let t_prep = std::time::Instant::now();
        let prepared: Vec<SyncItem> = self
            .node
            .on_cpu(move || {
                use rayon::prelude::*;
                items
                    .into_par_iter()
                    .map(|it| {
                        let prepared = match (&it.kind, &it.data, held.contains_key(&it.chart)) {
                            (Offered::Shared { .. }, Some(data), false) => {
                                prepare_new(&it.chart, data, now).ok()
                            }
                            _ => None,
                        };
                        // Changes to a chart held here: merged now, on all cores, from a
                        // read snapshot; the writer only checks consent and stores the
                        // result (or merges again if the chart was written meanwhile).
                        let merge = match (&it.kind, &it.data, held.get(&it.chart)) {
                            (
                                Offered::Shared { .. } | Offered::Returned { .. },
                                Some(data),
                                Some(h),
                            ) => reader
                                .prepare_merge(&it.chart, data, h.origin.is_none())
                                .ok()
                                .flatten(),
                            _ => None,
                        };
                        let data = if prepared.is_some() { None } else { it.data };
                        SyncItem {
                            chart: it.chart,
                            kind: it.kind,
                            data,
                            prepared,
                            merge,
                        }
                    })
                    .collect()
            })
            .await;
        let me = self.me;
        let peer_id: PracticeId = peer.parse().expect("peer id");
        let check: chartmesh_store::ChangeCheck = Box::new(move |grants, chart, actors| {
            let _ = me;
            consent::may_apply_change(
                consent::applicable(grants, chart),
                &peer_id,
                actors,
                now_ms(),
            )
        });
        tracing::debug!(
            prepare_us = t_prep.elapsed().as_micros() as u64,
            "batch prepared"
        );
        let t = std::time::Instant::now();
        let outcomes = self
            .node
            .store
            .apply_sync(peer.to_string(), prepared, check, now)?
            .await
            .map_err(|_| SessionError::Closed)??;
        tracing::debug!(write_us = t.elapsed().as_micros() as u64, "batch written");
        let refused = outcomes
            .iter()
            .filter(|o| matches!(o, SyncOutcome::Refused(_)))
            .count();
        if refused > 0 {
            tracing::warn!(refused, "refused changes from the peer (see the audit log)");
        }
        Ok(())
    }
}

fn local_chart(c: &SyncChart) -> LocalChart {
    LocalChart {
        heads: c.heads.clone(),
        revoked: c.revoked_ms.is_some(),
        access: c.access,
        expires_ms: c.expires_ms,
    }
}

/// Loads a chart received whole from its custodian and checks what filing it needs: a
/// complete automerge document (every change hash verified by the load), the chart id it was
/// offered under, `type` chart, `schemaVersion` 1, and the demographic fields of the search
/// index. The full schema was validated where the chart was written; received copies are
/// stored as sent and never merged into this practice's own charts (every change to those is
/// validated in full). Measured: this check costs ~30 µs after the ~100 µs load, a full
/// conversion and validation ~135 µs (core/examples/receive_cost.rs). An invalid document is
/// left out and the store refuses and audits the item.
fn prepare_new(chart: &str, data: &[u8], now: i64) -> Result<NewChart, String> {
    let mut doc = ChartDoc::load(data, []).map_err(|e| e.to_string())?;
    if !doc.automerge().get_missing_deps(&[]).is_empty() {
        return Err("incomplete document".into());
    }
    let h = doc.header().map_err(|e| e.to_string())?;
    if h.id != chart {
        return Err("the document is another chart".into());
    }
    Ok(NewChart {
        id: chart.to_string(),
        doc: data.to_vec(),
        index: IndexFields {
            mrn: h.mrn,
            family: h.family,
            given: h.given,
            birth_date: h.birth_date,
        },
        origin: None,
        time_ms: now,
        heads: doc.head_bytes(),
        referrals: doc.referral_ids(),
        due_facts: doc.due_view().ok().map(|c| {
            serde_json::to_string(&chartmesh_core::due::facts(&c)).expect("facts serialize")
        }),
    })
}

/// The offer for a pull from `peer` since `since`: every chart it may need, each checked
/// against consent now. Returns the sequence it covers.
fn offer(
    store: &Store,
    peer: &str,
    since: i64,
    now: i64,
) -> Result<(i64, Vec<OfferItem>), chartmesh_store::StoreError> {
    // Read the sequence first: whatever is written meanwhile is offered again next time.
    let upto = store.seq()?;
    let peer_id: PracticeId = peer.parse().expect("peer id");
    let grants = store.grants(Some(&peer_id))?;
    let state = store.sync_peer_state(peer)?;
    let mut candidates: BTreeMap<String, SyncChart> = BTreeMap::new();
    for c in store.sync_changed_since(peer, since)? {
        candidates.insert(c.id.clone(), c);
    }
    // Grants recorded, changed or revoked since, and grants that expired since the peer's
    // last completed pull, bring their charts into the offer.
    let mut ids: Vec<String> = store.grants_changed_since(peer, since)?;
    for g in &grants {
        if let Some(e) = g.expires_ms
            && e <= now
            && g.revoked_ms.is_none()
            && state.last_served_ms.is_none_or(|t| e > t - 60_000)
        {
            ids.push(g.chart_id.clone());
        }
    }
    if ids.iter().any(|i| i == consent::ALL_CHARTS) {
        for c in store.sync_own_charts(None)? {
            candidates.entry(c.id.clone()).or_insert(c);
        }
    } else if !ids.is_empty() {
        for c in store.sync_own_charts(Some(&ids))? {
            candidates.entry(c.id.clone()).or_insert(c);
        }
    }
    let mut items = Vec::with_capacity(candidates.len());
    for (id, c) in candidates {
        let digest = heads_digest(&c.heads);
        match &c.origin {
            None => {
                let grant = consent::applicable(&grants, &id);
                match consent::may_send(grant, None, now) {
                    Ok(()) => {
                        let g = grant.expect("an active grant");
                        items.push(OfferItem {
                            chart: id,
                            kind: Offered::Shared {
                                digest,
                                access: g.access,
                                expires_ms: g.expires_ms,
                            },
                        })
                    }
                    // A chart it held under a grant that ended: tell it to mark its copy.
                    Err(_) if grant.is_some() => items.push(OfferItem {
                        chart: id,
                        kind: Offered::Revoked,
                    }),
                    Err(_) => {}
                }
            }
            Some(_) => items.push(OfferItem {
                chart: id,
                kind: Offered::Returned { digest },
            }),
        }
    }
    Ok((upto, items))
}
