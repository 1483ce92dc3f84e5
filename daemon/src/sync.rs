//! Sync with paired practices: the driver of `chartmesh_core::sync`. One task per paired
//! practice owns its `PeerSession` and carries out what the session asks — dial, open and
//! write streams, ask and write the store, audit, close — feeding back what happened. Every
//! protocol and consent decision is the session's (and `chartmesh_core::consent`'s); this
//! module only moves bytes between it, quinn streams, the store and tokio timers.
//!
//! Owns: the QUIC endpoint's accept loop (a task per handshake, bounded, address validation
//! under load), the per-peer tasks, stream reader/writer tasks, per-peer status for
//! `chartmesh status`: besides the session's, the bytes of every connection (quinn's
//! statistics, kept when a connection ends so the counts never go down) and the peer's clock
//! skew (read from the wall-clock time its `Pull` carries, with half the round trip).
//! Must not touch: SQL (the store) or consent rules (core); no protocol decisions.

use chartmesh_core::PracticeId;
use chartmesh_core::audit::AuditEvent;
use chartmesh_core::sync::throttle::RefusalThrottle;
use chartmesh_core::sync::{
    Answer, CloseCode, Closed, ConnId, LinkState, MAX_CONTROL, Msg, Output, PeerSession, Persist,
    ProtocolError, SessionStatus, StreamId, TaskId, Time,
};
use chartmesh_net::quinn;
use chartmesh_net::{Credentials, Endpoint, FrameReader, FrameWriter, PeerConnection, PinSet};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::node::Node;
use crate::now_ms;

/// Handshakes in progress at once; past this, new attempts are refused.
/// How long closing waits for the endpoint to tell connected peers we are leaving.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(100);
const MAX_HANDSHAKES: usize = 64;
/// Past this many handshakes in progress, a client must first prove its address (a QUIC
/// retry), which a spoofed or bare Initial packet cannot.
const VALIDATE_ABOVE: usize = 8;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the STUN server is asked for this practice's public address (a NAT that
/// restarted maps it anew), and how soon again while it has not answered.
const STUN_EVERY: Duration = Duration::from_secs(30);
const STUN_RETRY: Duration = Duration::from_secs(5);
/// One hole-punching dial: quinn resends its Initial packets meanwhile (about 1 s and 3 s
/// in), so the peer's NAT has time to open. Shorter than the engine's `SETTLED_MS`, so two
/// punched connections are always judged as one race.
const PUNCH_DIAL: Duration = Duration::from_secs(4);
/// Candidates are dialled one after another this far apart (the first that answers wins).
const PUNCH_STAGGER: Duration = Duration::from_millis(250);
/// A direct connection to a peer also reachable through the relay is given up after this
/// long without a packet from it (keep-alives go every 5 s), so a dead direct path (a NAT
/// restart) falls back to the relay in seconds, not at the 30 s idle timeout.
const DIRECT_SILENCE: Duration = Duration::from_secs(15);

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
    /// While not connected: the current base of the redial back-off (ms).
    pub backoff_ms: u64,
    /// How the live connection reaches the peer: `direct`, `lan` (an address it announced
    /// on the local network) or `relayed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'static str>,
    /// The live connection's smoothed round-trip time (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<u64>,
    /// Share of the live connection's packets lost so far (percent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_pct: Option<f64>,
    /// While not connected: why it cannot be reached, and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
    /// The peer's wall clock minus ours (ms), measured from its last pull of us (corrected
    /// by half the round-trip time); None until one arrived or from a build that does not
    /// send its time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_skew_ms: Option<i64>,
    /// Bytes sent to and received from the peer over every connection since the daemon
    /// started (QUIC datagrams, as counted by the transport; never goes down).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// When a connection with the peer was last up (now while connected); None: not since
    /// the daemon started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<i64>,
}

/// Per peer, what the transport and the clock say beyond the session: the bytes of its
/// connections (those that ended, and the live ones), the clock skew, when last seen.
#[derive(Default)]
struct Traffic {
    /// Bytes of the connections that ended: (sent, received).
    ended: (u64, u64),
    conns: HashMap<ConnId, quinn::Connection>,
    skew_ms: Option<i64>,
    last_seen_ms: Option<i64>,
}

impl Traffic {
    /// (sent, received) bytes: those of ended connections plus the live ones' so far.
    fn bytes(&self) -> (u64, u64) {
        self.conns.values().fold(self.ended, |(tx, rx), c| {
            let st = c.stats();
            (tx + st.udp_tx.bytes, rx + st.udp_rx.bytes)
        })
    }

    /// A connection ended: its bytes move to the ended total (so the sum never goes down).
    fn retire(&mut self, id: ConnId) {
        if let Some(c) = self.conns.remove(&id) {
            let st = c.stats();
            self.ended.0 += st.udp_tx.bytes;
            self.ended.1 += st.udp_rx.bytes;
            self.last_seen_ms = Some(now_ms());
        }
    }
}

/// What `chartmesh status` shows of the relay.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayView {
    pub addr: String,
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What happened, for a peer's task to hand to its session.
enum Event {
    Connected {
        pc: PeerConnection,
        dialed: bool,
    },
    DialFailed(String),
    ConnectionLost {
        conn: ConnId,
        why: Closed,
    },
    StreamAccepted {
        conn: ConnId,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    Message {
        stream: StreamId,
        msg: Msg,
    },
    StreamError {
        stream: StreamId,
        err: ProtocolError,
    },
    StreamEnd {
        stream: StreamId,
        why: Option<String>,
    },
    Sent {
        stream: StreamId,
    },
    Control(Msg),
    Answer {
        task: TaskId,
        answer: Answer,
    },
    Applied {
        task: TaskId,
        result: Result<(), String>,
    },
    LocalCommit,
    Incarnation(u64),
    Pause(bool),
    DialSoon,
    /// This practice's candidate addresses (for hole punching) changed.
    Candidates(Vec<SocketAddr>),
    Stop(CloseCode),
    Emergency {
        request: chartmesh_core::emergency::Request,
        reply: oneshot::Sender<Result<chartmesh_core::emergency::Answer, String>>,
    },
    EmergencyDecision {
        stream: StreamId,
        answer: chartmesh_core::emergency::Answer,
    },
}

struct PeerHandle {
    tx: mpsc::UnboundedSender<Event>,
    status: Arc<Mutex<SessionStatus>>,
    /// The connection the session uses now, for its path and statistics.
    live: Arc<Mutex<Option<quinn::Connection>>>,
    traffic: Arc<Mutex<Traffic>>,
}

pub struct SyncService {
    node: Arc<Node>,
    endpoint: Arc<Endpoint>,
    me: PracticeId,
    peers: Mutex<HashMap<PracticeId, PeerHandle>>,
    shutdown: CancellationToken,
    refusals: Mutex<RefusalThrottle>,
    next_conn: AtomicU64,
    started: Instant,
    /// LAN discovery, when it runs (sync.lan_discovery, a non-loopback sync.listen).
    lan: std::sync::OnceLock<crate::lan::Lan>,
    /// Bytes (sent, received) with peers since unpaired, so the totals never go down.
    unpaired_bytes: Mutex<(u64, u64)>,
    /// This practice's public address as the STUN server (sync.stun) last saw it.
    observed: Mutex<Option<SocketAddr>>,
    /// The candidates last handed to the sessions.
    candidates: Mutex<Vec<SocketAddr>>,
    /// Asks the STUN loop to ask again now (a direct path was lost).
    restun: tokio::sync::Notify,
    /// Port mapping on the default gateway (sync.port_mapping), set once at start.
    portmap: std::sync::OnceLock<Arc<crate::portmap::PortMapper>>,
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
        let transport = node
            .config
            .sync
            .transport()
            .map_err(|e| anyhow::anyhow!(e))?;
        let endpoint = Arc::new(Endpoint::bind_with(listen, &creds, pins, &transport)?);
        if let Some(relay) = node
            .config
            .sync
            .relay_config()
            .map_err(|e| anyhow::anyhow!(e))?
        {
            tracing::info!(relay = %relay.addr, pinned = relay.pin.is_some(), "using a relay");
            endpoint.start_relay(relay)?;
        }
        let me = node.identity.id;
        let svc = Arc::new(SyncService {
            node: node.clone(),
            endpoint,
            me,
            peers: Mutex::new(HashMap::new()),
            shutdown,
            refusals: Mutex::new(RefusalThrottle::default()),
            next_conn: AtomicU64::new(0),
            started: Instant::now(),
            lan: std::sync::OnceLock::new(),
            unpaired_bytes: Mutex::new((0, 0)),
            observed: Mutex::new(None),
            candidates: Mutex::new(Vec::new()),
            restun: tokio::sync::Notify::new(),
            portmap: std::sync::OnceLock::new(),
        });
        if node.config.sync.lan_discovery && !listen.ip().is_loopback() {
            let weak = Arc::downgrade(&svc);
            match crate::lan::Lan::start(me, svc.local_addr().port(), move |peer| {
                if let Some(svc) = weak.upgrade() {
                    svc.send_to(&peer, Event::DialSoon);
                }
            }) {
                Ok(lan) => {
                    let _ = svc.lan.set(lan);
                }
                Err(e) => tracing::warn!(error = %e, "LAN discovery is off"),
            }
        }
        let portmap = if !node.config.sync.port_mapping {
            crate::portmap::PortMapper::off("off (sync.port_mapping = \"off\")")
        } else if listen.ip().is_loopback() {
            crate::portmap::PortMapper::off(
                "sync.listen is a loopback address: nothing outside this machine can reach it",
            )
        } else {
            let weak = Arc::downgrade(&svc);
            crate::portmap::PortMapper::start(
                svc.local_addr().port(),
                svc.shutdown.clone(),
                move || {
                    if let Some(svc) = weak.upgrade() {
                        svc.update_candidates();
                    }
                },
            )
        };
        let _ = svc.portmap.set(portmap);
        svc.update_candidates();
        svc.reload_peers();
        if let Some(server) = node
            .config
            .sync
            .stun_server()
            .map_err(|e| anyhow::anyhow!(e))?
        {
            tracing::info!(stun = %server, "learning the public address from a STUN server");
            tokio::spawn(svc.clone().stun_loop(server));
        }
        tokio::spawn(svc.clone().accept_loop());
        tokio::spawn(svc.clone().commit_loop());
        tokio::spawn(svc.clone().peers_loop());
        tokio::spawn(svc.clone().refusal_loop());
        tokio::spawn(svc.clone().expiry_loop());
        Ok(svc)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    fn now(&self) -> Time {
        Time {
            mono_ms: self.started.elapsed().as_millis() as u64,
            wall_ms: now_ms(),
        }
    }

    fn instant_of(&self, mono_ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.started + Duration::from_millis(mono_ms))
    }

    /// Closes every connection (telling peers we are leaving) and the endpoint.
    pub async fn close(&self) {
        let handles: Vec<mpsc::UnboundedSender<Event>> = {
            let peers = self.peers.lock().unwrap();
            peers.values().map(|h| h.tx.clone()).collect()
        };
        for tx in handles {
            let _ = tx.send(Event::Stop(CloseCode::Shutdown));
        }
        // The peers' tasks close their connections as they stop; closing the endpoint
        // closes whatever is left. The CONNECTION_CLOSE leaves on the connection's next poll,
        // so a short wait is enough for it to go out; waiting for the endpoint to become idle
        // would also wait out the draining period of every connection, and the handshake
        // timeout of a dial to an offline peer (half a second of an idle daemon's exit).
        tokio::task::yield_now().await;
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.endpoint.shutdown()).await;
        // The shutdown token has fired: the port mapping is being deleted on the gateway.
        if let Some(pm) = self.portmap.get() {
            pm.stopped().await;
        }
    }

    /// Brings the per-peer tasks and pins in line with the paired peers in the store.
    fn reload_peers(self: &Arc<Self>) {
        let Ok(stored) = self.node.store.peers() else {
            return;
        };
        let pins = self.endpoint.pins();
        let mut peers = self.peers.lock().unwrap();
        peers.retain(|id, h| {
            if stored.iter().any(|p| &p.id == id) {
                return true;
            }
            pins.remove(id);
            let _ = h.tx.send(Event::Stop(CloseCode::Unpaired));
            let (tx, rx) = h.traffic.lock().unwrap().bytes();
            let mut gone = self.unpaired_bytes.lock().unwrap();
            gone.0 += tx;
            gone.1 += rx;
            false
        });
        for p in stored {
            pins.add(p.id);
            match peers.get(&p.id) {
                // Its address may have changed: try at once.
                Some(h) => {
                    let _ = h.tx.send(Event::DialSoon);
                }
                None => {
                    let record = self
                        .node
                        .store
                        .peer_record(&p.id.to_string())
                        .unwrap_or_default();
                    let incarnation = self.node.store.incarnation().unwrap_or(0);
                    let mut session = PeerSession::new(
                        self.me,
                        p.id,
                        record,
                        incarnation,
                        rand::random(),
                        self.now(),
                    );
                    session
                        .set_local_candidates(self.now(), self.candidates.lock().unwrap().clone());
                    let status = Arc::new(Mutex::new(session.status()));
                    let live = Arc::new(Mutex::new(None));
                    let traffic = Arc::new(Mutex::new(Traffic::default()));
                    let (tx, rx) = mpsc::unbounded_channel();
                    peers.insert(
                        p.id,
                        PeerHandle {
                            tx: tx.clone(),
                            status: status.clone(),
                            live: live.clone(),
                            traffic: traffic.clone(),
                        },
                    );
                    let task = PeerTask {
                        svc: self.clone(),
                        peer: p.id,
                        key: p.id.to_string(),
                        session,
                        tx,
                        conns: HashMap::new(),
                        streams: HashMap::new(),
                        emergencies: HashMap::new(),
                        status,
                        live,
                        traffic,
                        punching: None,
                    };
                    tokio::spawn(
                        task.run(rx)
                            .instrument(tracing::info_span!("peer", peer = %p.id.short())),
                    );
                }
            }
        }
    }

    fn send_to(&self, peer: &PracticeId, ev: Event) -> bool {
        let peers = self.peers.lock().unwrap();
        peers.get(peer).is_some_and(|h| h.tx.send(ev).is_ok())
    }

    fn broadcast(&self, ev: impl Fn() -> Event) {
        let peers = self.peers.lock().unwrap();
        for h in peers.values() {
            let _ = h.tx.send(ev());
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

    /// Asks the STUN server for this practice's public address every 30 s (every 5 s while
    /// it has not answered, and at once when a direct path was lost), so a NAT that restarted
    /// with a new mapping is noticed and the peers are told.
    async fn stun_loop(self: Arc<Self>, server: String) {
        loop {
            let wait = match self.ask_stun(&server).await {
                Ok(addr) => {
                    let changed = self.observed.lock().unwrap().replace(addr) != Some(addr);
                    if changed {
                        tracing::info!(public = %addr, "public address (STUN)");
                        self.update_candidates();
                    }
                    STUN_EVERY
                }
                Err(e) => {
                    tracing::debug!(error = %e, "no public address from STUN");
                    STUN_RETRY
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.restun.notified() => {}
            }
        }
    }

    async fn ask_stun(&self, server: &str) -> Result<SocketAddr, String> {
        let local = self.endpoint.local_addr();
        let addr = tokio::net::lookup_host(server)
            .await
            .map_err(|e| format!("cannot resolve the STUN server {server}: {e}"))?
            .find(|a| a.is_ipv4() == local.is_ipv4() || local.is_ipv6())
            .ok_or_else(|| format!("the STUN server {server} has no usable address"))?;
        self.endpoint
            .observe_public_addr(addr)
            .await
            .map_err(|e| e.to_string())
    }

    /// Where peers may reach this practice directly: the port the gateway maps to it (port
    /// mapping: reachable whatever the NAT does), the public address (STUN), then the
    /// addresses of its interfaces with the sync port (a peer on the same network, or
    /// behind the same NAT); at most `MAX_CANDIDATES`.
    fn update_candidates(&self) {
        let local = self.endpoint.local_addr();
        let mut c: Vec<SocketAddr> = self
            .portmap
            .get()
            .and_then(|pm| pm.candidate())
            .into_iter()
            .collect();
        c.extend(self.observed.lock().unwrap().iter().copied());
        if local.ip().is_unspecified() {
            if let Ok(ifs) = if_addrs::get_if_addrs() {
                c.extend(
                    ifs.iter()
                        .filter(|i| !i.is_loopback() && i.ip().is_ipv4() == local.is_ipv4())
                        .map(|i| SocketAddr::new(i.ip(), local.port())),
                );
            }
        } else {
            c.push(local);
        }
        let mut seen = std::collections::HashSet::new();
        c.retain(|a| chartmesh_core::sync::dialable(a) && seen.insert(*a));
        c.truncate(chartmesh_core::sync::MAX_CANDIDATES);
        let changed = {
            let mut cur = self.candidates.lock().unwrap();
            let changed = *cur != c;
            *cur = c.clone();
            changed
        };
        if changed {
            self.broadcast(|| Event::Candidates(c.clone()));
        }
    }

    /// Accepts connection attempts, each handshake on a task of its own (bounded, with a
    /// deadline), so no attempt waits behind another.
    async fn accept_loop(self: Arc<Self>) {
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let incoming = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                i = self.endpoint.incoming() => match i {
                    Some(i) => i,
                    None => return,
                },
            };
            let busy = MAX_HANDSHAKES - slots.available_permits();
            if busy >= VALIDATE_ABOVE && !incoming.remote_address_validated() {
                // Under load, a client must prove it owns its address first (stateless).
                let _ = incoming.retry();
                continue;
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                incoming.refuse();
                continue;
            };
            let svc = self.clone();
            let from = incoming.remote_address();
            tokio::spawn(async move {
                let r = Endpoint::handshake(incoming, HANDSHAKE_TIMEOUT).await;
                drop(permit);
                if let Err(e) = &r {
                    // Failed before any certificate was checked (no client certificate, another
                    // protocol, an old TLS version, a stalled client): audited by address,
                    // once per interval with a count.
                    svc.audit_failed_handshake(from, &e.to_string()).await;
                }
                svc.audit_handshake_refusals(r.is_err().then_some(from))
                    .await;
                match r {
                    Ok(pc) => {
                        svc.endpoint.track(&pc);
                        let peer = pc.peer;
                        let conn = pc.connection.clone();
                        if !svc.send_to(&peer, Event::Connected { pc, dialed: false }) {
                            conn.close(
                                quinn::VarInt::from_u32(CloseCode::Unpaired.code()),
                                CloseCode::Unpaired.reason(),
                            );
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "incoming handshake failed"),
                }
            });
        }
    }

    /// Refused handshakes (certificates that are not a paired practice's), audited once per
    /// interval per practice with a count. An unpaired practice that dialled us (from
    /// `from`, when the caller knows) is listed for the console's pairing prompt.
    async fn audit_handshake_refusals(&self, from: Option<SocketAddr>) {
        let refused = self.endpoint.pins().take_refusals();
        let now = self.now();
        for r in refused
            .iter()
            .filter(|r| r.role == "client" && r.reason == "not-paired")
        {
            self.node
                .pending_peers
                .note(&r.practice.to_string(), from, now.wall_ms);
        }
        let reports = {
            let mut th = self.refusals.lock().unwrap();
            let mut out = Vec::new();
            for r in &refused {
                out.extend(
                    th.note(&r.practice.to_string(), now.mono_ms)
                        .into_iter()
                        .map(|rep| (rep, r.role, r.describe())),
                );
            }
            out.extend(
                th.flush(now.mono_ms)
                    .into_iter()
                    .map(|rep| (rep, "repeat", "")),
            );
            out
        };
        if reports.is_empty() {
            return;
        }
        let events = reports
            .into_iter()
            .map(|(rep, role, why)| {
                let ev = AuditEvent::new(now.wall_ms, "sync", "refuse").peer(rep.key.clone());
                if rep.first {
                    tracing::warn!(practice = %rep.key.get(..9).unwrap_or(""), role, why, "refused a handshake");
                    ev.detail(format!("handshake ({role}): {why}"))
                } else {
                    ev.detail(format!(
                        "handshake: {} more refusals of this practice in the last {} min",
                        rep.count,
                        chartmesh_core::sync::throttle::REFUSAL_INTERVAL_MS / 60_000
                    ))
                }
            })
            .collect();
        let _ = self.node.audit(events).await;
    }

    async fn audit_failed_handshake(&self, from: SocketAddr, why: &str) {
        // Refusals of a certificate are audited by practice (audit_handshake_refusals).
        if why.contains("not paired")
            || why.contains("certificate has expired")
            || why.contains("not valid yet")
        {
            return;
        }
        let now = self.now();
        let key = format!("address {}", from.ip());
        let reports = self.refusals.lock().unwrap().note(&key, now.mono_ms);
        let events: Vec<AuditEvent> = reports
            .into_iter()
            .map(|rep| {
                let ev = AuditEvent::new(now.wall_ms, "sync", "refuse");
                if rep.first {
                    ev.detail(format!("handshake from {}: {why}", from.ip()))
                } else {
                    ev.detail(format!(
                        "handshake from {}: {} more refusals in the last {} min",
                        from.ip(),
                        rep.count,
                        chartmesh_core::sync::throttle::REFUSAL_INTERVAL_MS / 60_000
                    ))
                }
            })
            .collect();
        if !events.is_empty() {
            let _ = self.node.audit(events).await;
        }
    }

    async fn refusal_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => self.audit_handshake_refusals(None).await,
            }
        }
    }

    /// Tells every peer's session after each local commit.
    async fn commit_loop(self: Arc<Self>) {
        let Some(mut changes) = self.node.store.subscribe_changes() else {
            return;
        };
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            self.broadcast(|| Event::LocalCommit);
        }
    }

    /// Records grant expiries as events (each takes a sequence number, so peers learn of it
    /// on their next pull), within a second of the expiry.
    async fn expiry_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let store = self.node.store.clone();
            let now = now_ms();
            let due = tokio::task::spawn_blocking(move || store.next_expiry())
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
                .is_some_and(|e| e <= now);
            if due && let Ok(rx) = self.node.store.record_expiries(now) {
                match rx.await {
                    Ok(Ok(n)) if n > 0 => tracing::info!(grants = n, "grants expired"),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "recording grant expiry failed; retrying")
                    }
                    _ => {}
                }
            }
        }
    }

    /// The port mapping on the gateway (protocol, external address, lease left), or why
    /// there is none.
    pub fn port_mapping(&self) -> Option<chartmesh_core::sync::portmap::PortMapStatus> {
        self.portmap.get().map(|pm| pm.status())
    }

    /// This practice's public address as the STUN server (sync.stun) last saw it.
    pub fn public_addr(&self) -> Option<SocketAddr> {
        *self.observed.lock().unwrap()
    }

    /// The relay server and whether this practice is joined to it (None: no relay set).
    pub fn relay(&self) -> Option<RelayView> {
        self.endpoint.relay_status().map(|r| RelayView {
            addr: r.addr,
            connected: r.connected,
            last_error: r.last_error,
        })
    }

    /// Bytes (sent, received) with every peer since the daemon started, unpaired ones
    /// included (never goes down).
    pub fn bytes_total(&self) -> (u64, u64) {
        let peers = self.peers.lock().unwrap();
        let gone = *self.unpaired_bytes.lock().unwrap();
        peers.values().fold(gone, |(tx, rx), h| {
            let (a, b) = h.traffic.lock().unwrap().bytes();
            (tx + a, rx + b)
        })
    }

    /// Whether LAN discovery runs (announcing this practice and listening for peers).
    pub fn lan_discovery(&self) -> bool {
        self.lan.get().is_some()
    }

    /// The peers connected now.
    pub fn connected(&self) -> Vec<PracticeId> {
        let peers = self.peers.lock().unwrap();
        peers
            .iter()
            .filter(|(_, h)| h.status.lock().unwrap().link == LinkState::Up)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Sends an emergency request to a connected peer and waits for its answer.
    pub async fn ask_emergency(
        &self,
        peer: &PracticeId,
        request: chartmesh_core::emergency::Request,
    ) -> Result<chartmesh_core::emergency::Answer, String> {
        let (reply, rx) = oneshot::channel();
        if !self.send_to(peer, Event::Emergency { request, reply }) {
            return Err("not paired".into());
        }
        rx.await.unwrap_or_else(|_| Err("sync stopped".into()))
    }

    /// Pauses sync with a peer (closes the connection, stops dialling, refuses its
    /// connections) or resumes it (dials at once). Returns false for an unknown peer.
    pub fn set_paused(&self, peer: &PracticeId, paused: bool) -> bool {
        let ok = self.send_to(peer, Event::Pause(paused));
        if ok {
            // Reflect it at once for the caller's next status read.
            if let Some(h) = self.peers.lock().unwrap().get(peer) {
                h.status.lock().unwrap().paused = paused;
            }
        }
        ok
    }

    /// Status of every paired peer. `counts`: also count the charts shared each way (a scan
    /// of the chart index; `sync wait` polls without them).
    pub fn status(&self, counts: bool) -> Vec<PeerStatus> {
        let store = &self.node.store;
        let peers = store.peers().unwrap_or_default();
        let seq = store.seq().unwrap_or(0);
        let now = now_ms();
        let relay = match self.endpoint.relay_status() {
            None => chartmesh_core::sync::RelayState::None,
            Some(r) if r.connected => chartmesh_core::sync::RelayState::Up,
            Some(r) => chartmesh_core::sync::RelayState::Down(r.last_error),
        };
        peers
            .into_iter()
            .map(|p| {
                let key = p.id.to_string();
                let has_addr = !p.addr.trim().is_empty();
                let (s, live, (bytes_sent, bytes_received), skew, seen) = {
                    let handles = self.peers.lock().unwrap();
                    match handles.get(&p.id) {
                        Some(h) => {
                            let t = h.traffic.lock().unwrap();
                            (
                                Some(h.status.lock().unwrap().clone()),
                                h.live.lock().unwrap().clone(),
                                t.bytes(),
                                t.skew_ms,
                                t.last_seen_ms,
                            )
                        }
                        None => (None, None, (0, 0), None, None),
                    }
                };
                let connected = s.as_ref().is_some_and(|s| s.link == LinkState::Up);
                let served = s.as_ref().map(|s| s.served_upto as i64).unwrap_or(0).max(
                    store
                        .sync_peer_state(&key)
                        .map(|x| x.served_upto)
                        .unwrap_or(0),
                );
                // In sync: our last pull is complete and nothing it could need changed here
                // since its last complete pull (our own writes of its changes do not count).
                let in_sync = connected
                    && s.as_ref().is_some_and(|s| s.pulled)
                    && (served >= seq || !store.sync_pending(&key, served).unwrap_or(true));
                let shared_to = if counts {
                    let grants = store.grants(Some(&p.id)).unwrap_or_default();
                    shared_count(store, &grants, now)
                } else {
                    0
                };
                PeerStatus {
                    id: key.clone(),
                    name: p.name,
                    addr: p.addr,
                    connected,
                    paused: s.as_ref().is_some_and(|s| s.paused),
                    in_sync,
                    last_sync_ms: s.as_ref().and_then(|s| s.last_pull_ms),
                    shared_to,
                    shared_from: if counts {
                        store.received_count(&key).unwrap_or(0)
                    } else {
                        0
                    },
                    pending_changes: (seq - served).max(0),
                    backoff_ms: s.as_ref().map_or(0, |s| s.backoff_ms),
                    path: live.as_ref().map(|c| {
                        let remote = c.remote_address();
                        match chartmesh_net::PathKind::of(remote) {
                            chartmesh_net::PathKind::Direct
                                if self.lan.get().is_some_and(|l| l.is_lan(&p.id, remote)) =>
                            {
                                "lan"
                            }
                            k => k.name(),
                        }
                    }),
                    rtt_ms: live.as_ref().map(|c| c.rtt().as_millis() as u64),
                    loss_pct: live.as_ref().map(|c| {
                        let st = c.stats().path;
                        if st.sent_packets == 0 {
                            0.0
                        } else {
                            (st.lost_packets as f64 * 1000.0 / st.sent_packets as f64).round()
                                / 10.0
                        }
                    }),
                    unreachable: chartmesh_core::sync::unreachable_reason(
                        connected,
                        has_addr || self.lan.get().is_some_and(|l| !l.addrs(&p.id).is_empty()),
                        &relay,
                        s.as_ref().is_some_and(|s| s.last_pull_ms.is_some()),
                    ),
                    last_error: s.and_then(|s| s.last_error),
                    clock_skew_ms: skew,
                    bytes_sent,
                    bytes_received,
                    last_seen_ms: if connected { Some(now) } else { seen },
                }
            })
            .collect()
    }
}

fn shared_count(
    store: &chartmesh_store::Store,
    grants: &[chartmesh_core::consent::Grant],
    now: i64,
) -> usize {
    use chartmesh_core::consent::ALL_CHARTS;
    let active = |g: &&chartmesh_core::consent::Grant| g.is_active(now);
    if grants
        .iter()
        .filter(active)
        .any(|g| g.chart_id == ALL_CHARTS)
    {
        // Every own chart, less those whose own grant (which wins over `*`) has ended.
        let ended = grants
            .iter()
            .filter(|g| g.chart_id != ALL_CHARTS && !g.is_active(now))
            .count();
        return (store.own_count().unwrap_or(0) as usize).saturating_sub(ended);
    }
    grants.iter().filter(active).count()
}

/// What a stream's writer task is told.
enum WriteCmd {
    Send(Vec<u8>),
    SendAudited(Vec<u8>, Vec<AuditEvent>),
    Finish,
    Reset,
}

/// A command in a stream writer's queue, its audit (if any) already submitted.
enum Queued {
    Send(Vec<u8>),
    Audited(
        Vec<u8>,
        Option<oneshot::Receiver<Result<bool, chartmesh_store::StoreError>>>,
    ),
    Finish,
    Reset,
}

impl Queued {
    fn of(cmd: WriteCmd, node: &Node, peer: &str) -> Queued {
        match cmd {
            WriteCmd::Send(b) => Queued::Send(b),
            WriteCmd::SendAudited(b, audit) => {
                Queued::Audited(b, node.store.audit_sends(peer, audit, now_ms()).ok())
            }
            WriteCmd::Finish => Queued::Finish,
            WriteCmd::Reset => Queued::Reset,
        }
    }
}

struct StreamIo {
    write: mpsc::UnboundedSender<WriteCmd>,
    /// One permit = read one more frame.
    read: Arc<Semaphore>,
    reading: bool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for StreamIo {
    fn drop(&mut self) {
        // The reader stops at once (its stream is stopped when dropped); the writer finishes
        // what it was told, so a final message and the end of the stream still go out.
        if let Some(r) = self.tasks.first() {
            r.abort();
        }
    }
}

/// One paired practice: its session and the I/O it asks for.
struct PeerTask {
    svc: Arc<SyncService>,
    peer: PracticeId,
    key: String,
    session: PeerSession,
    tx: mpsc::UnboundedSender<Event>,
    conns: HashMap<ConnId, quinn::Connection>,
    streams: HashMap<StreamId, StreamIo>,
    emergencies: HashMap<u64, oneshot::Sender<Result<chartmesh_core::emergency::Answer, String>>>,
    status: Arc<Mutex<SessionStatus>>,
    live: Arc<Mutex<Option<quinn::Connection>>>,
    traffic: Arc<Mutex<Traffic>>,
    /// Hole-punching dials in progress.
    punching: Option<tokio::task::JoinHandle<()>>,
}

impl PeerTask {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        let mut stopping = false;
        self.session.handle_timeout(self.svc.now());
        loop {
            self.drive();
            if stopping && self.conns.is_empty() {
                return;
            }
            let wake = self.session.poll_timeout().map(|t| self.svc.instant_of(t));
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = async { tokio::time::sleep_until(wake.expect("a timer")).await }, if wake.is_some() => {
                    self.session.handle_timeout(self.svc.now());
                    continue;
                }
                _ = self.svc.shutdown.cancelled(), if !stopping => Some(Event::Stop(CloseCode::Shutdown)),
            };
            let Some(ev) = ev else { return };
            let now = self.svc.now();
            match ev {
                Event::Stop(code) => {
                    stopping = true;
                    self.session.stop(now, code);
                    self.drive();
                    for c in self.conns.values() {
                        c.close(quinn::VarInt::from_u32(code.code()), code.reason());
                    }
                    let mut traffic = self.traffic.lock().unwrap();
                    for id in self.conns.keys() {
                        traffic.retire(*id);
                    }
                    self.conns.clear();
                }
                ev => self.handle(now, ev),
            }
        }
    }

    fn handle(&mut self, now: Time, ev: Event) {
        match ev {
            Event::Connected { pc, dialed } => {
                let id = self.svc.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
                let conn = pc.connection;
                let path = chartmesh_net::PathKind::of(conn.remote_address());
                let relayed = path == chartmesh_net::PathKind::Relayed;
                self.conns.insert(id, conn.clone());
                {
                    let mut traffic = self.traffic.lock().unwrap();
                    traffic.conns.insert(id, conn.clone());
                    traffic.last_seen_ms = Some(now.wall_ms);
                }
                self.watch(id, conn);
                tracing::info!(dialed, path = path.name(), "connected");
                self.session.handle_connected_via(now, id, dialed, relayed);
            }
            Event::DialFailed(e) => {
                tracing::debug!(error = %e, "dial failed");
                self.session.handle_dial_failed(now, e);
            }
            Event::ConnectionLost { conn, why } => {
                if let Some(c) = self.conns.remove(&conn) {
                    tracing::info!(reason = ?why, "disconnected");
                    // A direct path lost: the NAT may have a new mapping; learn it now.
                    if self.session.conn() == Some(conn)
                        && !chartmesh_net::mux::is_relayed(c.remote_address())
                    {
                        self.svc.restun.notify_one();
                    }
                }
                self.traffic.lock().unwrap().retire(conn);
                if self.session.conn() == Some(conn) {
                    self.streams.clear();
                }
                self.session.handle_connection_lost(now, conn, why);
            }
            Event::StreamAccepted { conn, send, recv } => {
                if self.session.conn() != Some(conn) {
                    return;
                }
                match self.session.handle_stream_accepted(now) {
                    Some(stream) => {
                        let limit = self.session.read_limit(stream);
                        let io = self.spawn_stream(stream, limit, async move { Ok((send, recv)) });
                        self.streams.insert(stream, io);
                    }
                    None => {
                        let mut send = send;
                        let mut recv = recv;
                        let _ = send.reset(quinn::VarInt::from_u32(1));
                        let _ = recv.stop(quinn::VarInt::from_u32(1));
                    }
                }
            }
            Event::Message { stream, msg } => {
                if let Some(io) = self.streams.get_mut(&stream) {
                    io.reading = false;
                }
                if let Msg::Pull {
                    wall_ms: Some(sent),
                    ..
                } = msg
                {
                    // The peer's clock when this arrived is about its send time plus half the
                    // round trip.
                    let rtt = self
                        .session
                        .conn()
                        .and_then(|c| self.conns.get(&c))
                        .map_or(0, |c| c.rtt().as_millis() as i64);
                    let skew = sent.saturating_add(rtt / 2) - now.wall_ms;
                    self.traffic.lock().unwrap().skew_ms = Some(skew);
                }
                self.session.handle_message(now, stream, msg);
            }
            Event::StreamError { stream, err } => {
                tracing::info!(error = %err, "refused a malformed message from the peer");
                self.session.handle_stream_error(now, stream, err);
            }
            Event::StreamEnd { stream, why } => {
                self.streams.remove(&stream);
                self.session.handle_stream_end(now, stream, why);
            }
            Event::Sent { stream } => self.session.handle_sent(now, stream),
            Event::Control(msg) => self.session.handle_control(now, msg),
            Event::Answer { task, answer } => self.session.handle_answer(now, task, answer),
            Event::Applied { task, result } => self.session.handle_applied(now, task, result),
            Event::LocalCommit => self.session.handle_local_commit(now),
            Event::Incarnation(i) => self.session.handle_new_incarnation(i),
            Event::Pause(p) => self.session.set_paused(now, p),
            Event::DialSoon => self.session.dial_soon(now),
            Event::Candidates(c) => self.session.set_local_candidates(now, c),
            Event::Stop(_) => {}
            Event::Emergency { request, reply } => {
                match self.session.request_emergency(now, request) {
                    Ok(id) => {
                        self.emergencies.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Event::EmergencyDecision { stream, answer } => {
                self.session.handle_emergency_decision(now, stream, answer)
            }
        }
    }

    /// Carries out everything the session asked for, then lets streams read on.
    fn drive(&mut self) {
        while let Some(o) = self.session.poll_output() {
            self.execute(o);
        }
        // Streams the session is done with: their readers stop; writers finish what they
        // were told (a last message, the end of the stream).
        let session = &self.session;
        self.streams.retain(|id, _| session.has_stream(*id));
        for (id, io) in self.streams.iter_mut() {
            if !io.reading && self.session.wants_read(*id) {
                io.reading = true;
                io.read.add_permits(1);
            }
        }
        let live = self
            .session
            .conn()
            .and_then(|id| self.conns.get(&id).cloned());
        *self.live.lock().unwrap() = live;
        // Direct now (or gone): dials still punching would only race the kept connection.
        if self.session.relayed() != Some(true)
            && let Some(p) = self.punching.take()
        {
            p.abort();
        }
        let status = self.session.status();
        let mut shown = self.status.lock().unwrap();
        if status.last_error.is_some() && status.last_error != shown.last_error {
            tracing::info!(
                error = status.last_error.as_deref().unwrap_or(""),
                "sync with the peer failed; retrying"
            );
        }
        *shown = status;
    }

    fn execute(&mut self, o: Output) {
        let svc = &self.svc;
        match o {
            Output::Dial => {
                let (svc, peer, tx) = (svc.clone(), self.peer, self.tx.clone());
                tokio::spawn(async move {
                    let r = dial(&svc, peer).await;
                    svc.audit_handshake_refusals(None).await;
                    let _ = tx.send(match r {
                        Ok(pc) => Event::Connected { pc, dialed: true },
                        Err(e) => Event::DialFailed(e),
                    });
                });
            }
            Output::Close { conn, code } => {
                if let Some(c) = self.conns.get(&conn) {
                    c.close(quinn::VarInt::from_u32(code.code()), code.reason());
                }
                self.conns.remove(&conn);
                self.traffic.lock().unwrap().retire(conn);
                if self.session.conn().is_none() {
                    self.streams.clear();
                }
            }
            Output::Open { stream } => {
                let Some(conn) = self
                    .session
                    .conn()
                    .and_then(|c| self.conns.get(&c))
                    .cloned()
                else {
                    let _ = self.tx.send(Event::StreamEnd {
                        stream,
                        why: Some("not connected".into()),
                    });
                    return;
                };
                let limit = self.session.read_limit(stream);
                let io = self.spawn_stream(stream, limit, async move {
                    conn.open_bi()
                        .await
                        .map_err(|e| format!("opening a stream: {e}"))
                });
                self.streams.insert(stream, io);
            }
            Output::Send { stream, msg } => self.write(stream, WriteCmd::Send(msg.encode())),
            Output::SendAudited { stream, msg, audit } => {
                self.write(stream, WriteCmd::SendAudited(msg.encode(), audit))
            }
            Output::Finish { stream } => self.write(stream, WriteCmd::Finish),
            Output::Reset { stream } => self.write(stream, WriteCmd::Reset),
            Output::Control { msg } => {
                let Some(conn) = self
                    .session
                    .conn()
                    .and_then(|c| self.conns.get(&c))
                    .cloned()
                else {
                    return;
                };
                tokio::spawn(async move {
                    if let Ok(mut s) = conn.open_uni().await {
                        let _ = chartmesh_net::write_frame(&mut s, &msg.encode()).await;
                        let _ = s.finish();
                    }
                });
            }
            Output::Query { task, query } => {
                let (store, key, tx) = (svc.node.store.clone(), self.key.clone(), self.tx.clone());
                tokio::task::spawn_blocking(move || {
                    let answer = store.answer(&key, &query);
                    let _ = tx.send(Event::Answer { task, answer });
                });
            }
            Output::Apply { task, plan } => {
                let (node, key, tx) = (svc.node.clone(), self.key.clone(), self.tx.clone());
                tokio::spawn(async move {
                    let result = apply(&node, key, plan).await;
                    let _ = tx.send(Event::Applied { task, result });
                });
            }
            Output::Persist(p) => {
                let now = now_ms();
                match self.svc.node.store.persist_sync(&self.key, p, now) {
                    Ok(rx) => {
                        tokio::spawn(async move {
                            if let Ok(Err(e)) = rx.await {
                                tracing::warn!(error = %e, "saving sync bookkeeping failed; the next pull starts earlier");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "saving sync bookkeeping failed"),
                }
                if let Persist::NewIncarnation { incarnation } = p {
                    tracing::warn!(
                        "this store was found rolled back: peers will pull everything again"
                    );
                    let me = self.peer;
                    let peers = self.svc.peers.lock().unwrap();
                    for (id, h) in peers.iter() {
                        if *id != me {
                            let _ = h.tx.send(Event::Incarnation(incarnation));
                        }
                    }
                }
            }
            Output::Audit(events) => {
                let node = svc.node.clone();
                tokio::spawn(async move {
                    let _ = node.audit(events).await;
                });
            }
            Output::DecideEmergency { stream, request } => {
                let (node, peer, tx) = (svc.node.clone(), self.peer, self.tx.clone());
                tokio::spawn(async move {
                    let answer = node.emergency_answer(&peer, request).await;
                    let _ = tx.send(Event::EmergencyDecision { stream, answer });
                });
            }
            Output::EmergencyDone { id, result } => {
                if let Some(reply) = self.emergencies.remove(&id) {
                    let _ = reply.send(result);
                }
            }
            Output::Punch { addrs } => {
                if let Some(p) = self.punching.take() {
                    p.abort();
                }
                tracing::info!(
                    candidates = addrs.len(),
                    "trying a direct connection (hole punching)"
                );
                let (svc, peer, tx) = (svc.clone(), self.peer, self.tx.clone());
                self.punching = Some(tokio::spawn(async move {
                    match punch(&svc, peer, addrs).await {
                        Ok(pc) => {
                            tracing::info!(addr = %pc.connection.remote_address(), "direct connection by hole punching");
                            let _ = tx.send(Event::Connected { pc, dialed: true });
                        }
                        Err(e) => {
                            tracing::info!(error = %e, "hole punching did not connect; staying relayed")
                        }
                    }
                }.in_current_span()));
            }
            Output::Pulled { stats } => {
                tracing::debug!(
                    offered = stats.offered,
                    wanted = stats.wanted,
                    delivered = stats.delivered,
                    unavailable = stats.unavailable,
                    "pull complete"
                );
            }
        }
    }

    fn write(&mut self, stream: StreamId, cmd: WriteCmd) {
        if let Some(io) = self.streams.get(&stream) {
            let _ = io.write.send(cmd);
        }
    }

    /// Starts the reader and writer tasks of a stream, once `open` yields it.
    fn spawn_stream(
        &self,
        stream: StreamId,
        limit: usize,
        open: impl std::future::Future<Output = Result<(quinn::SendStream, quinn::RecvStream), String>>
        + Send
        + 'static,
    ) -> StreamIo {
        let (wtx, mut wrx) = mpsc::unbounded_channel::<WriteCmd>();
        let read = Arc::new(Semaphore::new(0));
        let (recv_tx, recv_rx) = oneshot::channel::<quinn::RecvStream>();
        let tx = self.tx.clone();
        let node = self.svc.node.clone();
        let peer = self.key.clone();
        let writer = tokio::spawn(async move {
            let (send, recv) = match open.await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Event::StreamEnd {
                        stream,
                        why: Some(e),
                    });
                    return;
                }
            };
            let _ = recv_tx.send(recv);
            let mut out = FrameWriter::new(send);
            // Audits are submitted as soon as their messages are queued, so the audits of
            // the messages waiting here commit together (one fsync) while the message
            // before them is on the wire; each message still leaves only after its own
            // audit has committed, and in order.
            let mut queue: std::collections::VecDeque<Queued> = Default::default();
            loop {
                while let Ok(cmd) = wrx.try_recv() {
                    queue.push_back(Queued::of(cmd, &node, &peer));
                }
                let next = match queue.pop_front() {
                    Some(q) => q,
                    None => match wrx.recv().await {
                        Some(cmd) => {
                            queue.push_back(Queued::of(cmd, &node, &peer));
                            continue;
                        }
                        None => return,
                    },
                };
                let bytes = match next {
                    Queued::Send(b) => b,
                    Queued::Audited(b, audit) => {
                        // A chart never leaves unaudited, and the store decides each chart
                        // again as it audits: a grant revoked since the chart was read
                        // stops the message here.
                        let audited = match audit {
                            Some(rx) => rx.await.ok().and_then(Result::ok),
                            None => None,
                        };
                        if audited != Some(true) {
                            out.reset(1);
                            let _ = tx.send(Event::StreamEnd {
                                stream,
                                why: Some(match audited {
                                    Some(false) => "a grant changed before the message left".into(),
                                    _ => "the audit log could not be written".into(),
                                }),
                            });
                            return;
                        }
                        b
                    }
                    Queued::Finish => {
                        let _ = out.finish().await;
                        return;
                    }
                    Queued::Reset => {
                        out.reset(1);
                        return;
                    }
                };
                if let Err(e) = out.send(&bytes).await {
                    let _ = tx.send(Event::StreamEnd {
                        stream,
                        why: Some(e.to_string()),
                    });
                    return;
                }
                let _ = tx.send(Event::Sent { stream });
            }
        });
        let (tx, permits) = (self.tx.clone(), read.clone());
        let reader = tokio::spawn(async move {
            let Ok(recv) = recv_rx.await else { return };
            let mut inp = FrameReader::new(recv, limit);
            loop {
                let Ok(p) = permits.acquire().await else {
                    return;
                };
                p.forget();
                let ev = match inp.recv().await {
                    Ok(Some(b)) => match Msg::decode(&b, limit) {
                        Ok(msg) => Event::Message { stream, msg },
                        Err(err) => Event::StreamError { stream, err },
                    },
                    Ok(None) => Event::StreamEnd { stream, why: None },
                    Err(chartmesh_net::WireError::Frame(e)) => Event::StreamError {
                        stream,
                        err: match e {
                            chartmesh_net::FrameError::TooLarge { size, limit } => {
                                ProtocolError::TooLarge(size, limit)
                            }
                            other => ProtocolError::Malformed(other.to_string()),
                        },
                    },
                    Err(e) => Event::StreamEnd {
                        stream,
                        why: Some(e.to_string()),
                    },
                };
                let end = !matches!(ev, Event::Message { .. });
                if tx.send(ev).is_err() || end {
                    return;
                }
            }
        });
        StreamIo {
            write: wtx,
            read,
            reading: false,
            tasks: vec![reader, writer],
        }
    }

    /// Watches a connection: its end, the streams and control messages the peer opens.
    fn watch(&self, id: ConnId, conn: quinn::Connection) {
        let tx = self.tx.clone();
        let c = conn.clone();
        let svc = self.svc.clone();
        tokio::spawn(async move {
            let remote = c.remote_address();
            let watchdog =
                !chartmesh_net::mux::is_relayed(remote) && svc.endpoint.relay_status().is_some();
            let closed = tokio::select! {
                e = c.closed() => e,
                // A direct path to a peer also reachable through the relay: given up when
                // the peer has been silent for a while, so the relay takes over quickly.
                _ = silent(&c, DIRECT_SILENCE), if watchdog => {
                    c.close(quinn::VarInt::from_u32(CloseCode::Shutdown.code()), b"path lost");
                    let _ = tx.send(Event::ConnectionLost { conn: id, why: Closed::Lost(format!("no packet on the direct path for {} s", DIRECT_SILENCE.as_secs())) });
                    return;
                }
                // Its relayed path ended (the relay restarted, a NAT dropped the relay's
                // TCP connection): the connection is dead now, not after the idle timeout.
                _ = svc.endpoint.path_lost(remote) => {
                    c.close(quinn::VarInt::from_u32(CloseCode::Shutdown.code()), b"path lost");
                    let _ = tx.send(Event::ConnectionLost { conn: id, why: Closed::Lost("the relayed path ended".into()) });
                    return;
                }
            };
            let why = match closed {
                quinn::ConnectionError::ApplicationClosed(a) => {
                    Closed::by_peer(a.error_code.into_inner())
                }
                quinn::ConnectionError::LocallyClosed => Closed::Local,
                // A TLS alert after the handshake: the peer refused our certificate (it has
                // not paired us, or unpaired us).
                quinn::ConnectionError::ConnectionClosed(c)
                    if (0x100..0x200).contains(&u64::from(c.error_code)) =>
                {
                    Closed::Refused
                }
                e => Closed::Lost(e.to_string()),
            };
            let _ = tx.send(Event::ConnectionLost { conn: id, why });
        });
        let tx = self.tx.clone();
        let c = conn.clone();
        tokio::spawn(async move {
            while let Ok((send, recv)) = c.accept_bi().await {
                if tx
                    .send(Event::StreamAccepted {
                        conn: id,
                        send,
                        recv,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
        let tx = self.tx.clone();
        tokio::spawn(async move {
            while let Ok(mut recv) = conn.accept_uni().await {
                // A nudge or a catch-up: one tiny frame. Anything else is ignored.
                let tx = tx.clone();
                tokio::spawn(async move {
                    let read = tokio::time::timeout(
                        Duration::from_secs(10),
                        chartmesh_net::read_frame(&mut recv, MAX_CONTROL),
                    )
                    .await;
                    if let Ok(Ok(Some(bytes))) = read
                        && let Ok(
                            msg @ (Msg::Nudge { .. } | Msg::Caught { .. } | Msg::Candidates { .. }),
                        ) = Msg::decode(&bytes, MAX_CONTROL)
                    {
                        let _ = tx.send(Event::Control(msg));
                    }
                });
            }
        });
    }
}

async fn dial(svc: &SyncService, peer: PracticeId) -> Result<PeerConnection, String> {
    let addr = match svc.node.read(move |s| Ok(s.peer(&peer)?)).await {
        Ok(Some(p)) => p.addr,
        Ok(None) => return Err("not paired".into()),
        Err(e) => return Err(e.to_string()),
    };
    let addr = addr.trim().to_string();
    let lan = svc.lan.get().map(|l| l.addrs(&peer)).unwrap_or_default();
    let plan = chartmesh_core::sync::routes(
        !addr.is_empty(),
        !lan.is_empty(),
        svc.endpoint.relay_status().is_some(),
    );
    if plan.is_empty() {
        return Err(
            "no address and no relay: set its address (chartmesh peer add ID --addr HOST:PORT) or sync.relay"
                .into(),
        );
    }
    let mut errors = Vec::new();
    for route in plan {
        let r = match route {
            chartmesh_core::sync::Route::Direct => dial_direct(svc, peer, &addr).await,
            chartmesh_core::sync::Route::Lan => {
                let mut r = Err("not seen on the LAN".to_string());
                for a in &lan {
                    r = svc
                        .endpoint
                        .connect(*a, peer)
                        .await
                        .map_err(|e| e.to_string());
                    if r.is_ok() {
                        break;
                    }
                }
                r
            }
            chartmesh_core::sync::Route::Relay => svc
                .endpoint
                .connect_relayed(peer)
                .await
                .map_err(|e| e.to_string()),
        };
        match r {
            Ok(pc) => return Ok(pc),
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("; "))
}

async fn dial_direct(
    svc: &SyncService,
    peer: PracticeId,
    addr: &str,
) -> Result<PeerConnection, String> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?;
    let a = addrs
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))?;
    svc.endpoint
        .connect(a, peer)
        .await
        .map_err(|e| e.to_string())
}

/// Dials `peer` at each of its candidate addresses, one every 250 ms, each for 4 s; the
/// first to complete the pinned handshake wins and the others are dropped.
async fn punch(
    svc: &SyncService,
    peer: PracticeId,
    addrs: Vec<SocketAddr>,
) -> Result<PeerConnection, String> {
    let mut dials = tokio::task::JoinSet::new();
    let mut errors = Vec::new();
    for (i, a) in addrs.into_iter().enumerate() {
        let endpoint = svc.endpoint.clone();
        dials.spawn(async move {
            tokio::time::sleep(PUNCH_STAGGER * i as u32).await;
            match tokio::time::timeout(PUNCH_DIAL, endpoint.connect(a, peer)).await {
                Ok(Ok(pc)) => Ok(pc),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("{a}: no answer within {} s", PUNCH_DIAL.as_secs())),
            }
        });
    }
    while let Some(r) = dials.join_next().await {
        match r {
            Ok(Ok(pc)) => {
                dials.abort_all();
                return Ok(pc);
            }
            Ok(Err(e)) => errors.push(e),
            Err(_) => {}
        }
    }
    Err(errors.join("; "))
}

/// Resolves once `c` has received no datagram for `limit`.
async fn silent(c: &quinn::Connection, limit: Duration) {
    let step = Duration::from_secs(1);
    let mut last = c.stats().udp_rx.datagrams;
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now = c.stats().udp_rx.datagrams;
        if now == last {
            quiet += step;
            if quiet >= limit {
                return;
            }
        } else {
            last = now;
            quiet = Duration::ZERO;
        }
    }
}

/// Applies one batch durably: each item prepared on the CPU pool (loading a new copy,
/// merging changes from a read snapshot), then written in one transaction by the store,
/// which asks consent again inside it.
async fn apply(
    node: &Node,
    peer: String,
    plan: chartmesh_core::sync::ApplyPlan,
) -> Result<(), String> {
    let now = now_ms();
    let store = node.store.clone();
    let t = std::time::Instant::now();
    let items = node
        .on_cpu(move || {
            use rayon::prelude::*;
            plan.items
                .into_par_iter()
                .map(|it| store.prepare_sync(it, now))
                .collect::<Vec<_>>()
        })
        .await;
    tracing::debug!(
        prepare_us = t.elapsed().as_micros() as u64,
        "batch prepared"
    );
    let outcomes = node
        .store
        .apply_sync(peer, items, now)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|_| "the store stopped".to_string())?
        .map_err(|e| e.to_string())?;
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, chartmesh_store::SyncOutcome::Refused(_)))
        .count();
    if refused > 0 {
        tracing::warn!(refused, "refused changes from the peer (see the audit log)");
    }
    Ok(())
}
