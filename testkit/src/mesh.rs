//! The simulated network, clock and driver. Time is virtual (milliseconds); every event is
//! taken from one ordered queue, so a run is a pure function of its seed and operations.
//!
//! Streams are reliable and ordered, as QUIC streams are; messages on different streams
//! overtake each other. Control messages (nudges) may be lost or duplicated. Connections
//! break, practices are partitioned and healed, crash (losing whatever was not yet written)
//! and restart.

use chartmesh_core::consent::{self, Access, Grant, Purpose};
use chartmesh_core::ids::{PracticeId, copy_key};
use chartmesh_core::sync::{
    Closed, ConnId, Msg, Output, PeerSession, Persist, Rng, StreamId, Time,
};
use chartmesh_core::{ChangeMeta, Chart, ChartDoc};
use chartmesh_store::{IndexFields, NewChart, Store, StoreOptions};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Wall-clock time at virtual time 0.
pub const EPOCH_MS: i64 = 1_800_000_000_000;

/// Network behaviour.
#[derive(Debug, Clone)]
pub struct Faults {
    /// One-way latency of a message, drawn uniformly.
    pub latency_ms: (u64, u64),
    /// Probability that a control message (nudge, caught-up) is lost (with the connection,
    /// as in QUIC) / delivered twice.
    pub control_drop: f64,
    pub control_dup: f64,
    /// Delay of a store answer or write after it is asked, drawn uniformly.
    pub store_ms: (u64, u64),
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency_ms: (2, 40),
            control_drop: 0.05,
            control_dup: 0.05,
            store_ms: (0, 8),
        }
    }
}

/// What the mesh counted.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub messages: u64,
    pub charts_sent: u64,
    pub pulls: u64,
    pub crashes: u64,
    pub connections: u64,
    /// Invariant violations, with what happened (empty in a correct run).
    pub violations: Vec<String>,
}

/// A practice of the mesh.
pub struct Node {
    pub id: PracticeId,
    pub key: String,
    dir: tempfile::TempDir,
    pub store: Option<Store>,
    sessions: BTreeMap<usize, PeerSession>,
    timers: BTreeMap<usize, u64>,
    epoch: u64,
    /// Notes written here and acknowledged by the store: chart key → note ids.
    pub acked: BTreeMap<String, BTreeSet<String>>,
    /// Messages waiting on a stream the session does not read yet: (conn, stream) → queue.
    inbox: BTreeMap<(ConnId, StreamId), VecDeque<Inbound>>,
    /// The store's change sequence as the sessions were last told of it.
    seen_seq: i64,
    /// The sequence the store's writer publishes after each commit (before it answers).
    changes: Option<tokio::sync::watch::Receiver<i64>>,
}

enum Inbound {
    Msg(Msg),
    End(Option<String>),
}

struct Conn {
    a: usize,
    b: usize,
    alive: bool,
    /// (node, its stream id) → (other node, its stream id), once the other side accepted.
    streams: BTreeMap<(usize, StreamId), Option<StreamId>>,
    /// The last delivery time of each (node, stream) direction, so a stream stays ordered.
    fifo: BTreeMap<(usize, StreamId), u64>,
    reset: BTreeSet<(usize, StreamId)>,
}

#[derive(Debug)]
enum Ev {
    Timer {
        node: usize,
        peer: usize,
        epoch: u64,
    },
    Connect {
        dialer: usize,
        target: usize,
        epoch: u64,
    },
    DialFailed {
        node: usize,
        peer: usize,
        epoch: u64,
    },
    Deliver {
        conn: ConnId,
        from: usize,
        stream: StreamId,
        msg: Box<Msg>,
    },
    End {
        conn: ConnId,
        from: usize,
        stream: StreamId,
        why: Option<String>,
    },
    Control {
        conn: ConnId,
        to: usize,
        msg: Msg,
    },
    Lost {
        conn: ConnId,
        node: usize,
        why: Closed,
    },
    Answer {
        node: usize,
        peer: usize,
        epoch: u64,
        task: u64,
        query: chartmesh_core::sync::Query,
    },
    Apply {
        node: usize,
        peer: usize,
        epoch: u64,
        task: u64,
        plan: chartmesh_core::sync::ApplyPlan,
    },
    Persist {
        node: usize,
        peer: usize,
        epoch: u64,
        p: Persist,
    },
}

pub struct Mesh {
    pub seed: u64,
    rng: Rng,
    pub now: u64,
    pub nodes: Vec<Node>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    queue: BTreeMap<(u64, u64), Ev>,
    next_ev: u64,
    partitions: BTreeSet<(usize, usize)>,
    pub faults: Faults,
    pub stats: Stats,
    /// Charts created in the mesh: (custodian, chart id), in order.
    pub charts: Vec<(usize, String)>,
    /// Charts never to be shared with anyone: any of their bytes on the wire is a leak.
    pub canaries: BTreeSet<(usize, String)>,
    /// Practices that recorded an all-charts grant (they hold no canaries).
    shares_all: BTreeSet<usize>,
    trace: VecDeque<String>,
    _template: tempfile::TempDir,
}

/// A temporary directory, in memory where the machine has one (fsync is then free: the
/// mesh is about the protocol, not the disk).
fn tempdir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new()
            .prefix("chartmesh-sim")
            .tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}

fn dir_path(nodes: &[Node]) -> std::path::PathBuf {
    nodes.last().unwrap().dir.path().join("store.db")
}

/// An empty store of the current schema, made once per process (migrating a new store
/// parses every migration's SQL: a tenth of a scenario's time).
fn template_store() -> &'static [u8] {
    static TEMPLATE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = tempdir();
        let path = dir.path().join("template.db");
        let store = Store::open(&path, &key(), StoreOptions::default()).unwrap();
        store.close();
        drop(store);
        // Closed: its write-ahead log is folded into the file.
        std::fs::read(&path).unwrap()
    })
}

fn key() -> chartmesh_store::StoreKey {
    chartmesh_store::StoreKey::from_bytes([0x5a; 32])
}

impl Mesh {
    /// `n` practices, all paired with each other, none connected yet.
    pub fn new(seed: u64, n: usize, faults: Faults) -> Mesh {
        let template_dir = tempdir();
        let template = template_dir.path().join("template.db");
        std::fs::write(&template, template_store()).unwrap();
        let mut rng = Rng::new(seed);
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = PracticeId::from_certificate_der(format!("practice-{seed}-{i}").as_bytes());
            let dir = tempdir();
            std::fs::copy(&template, dir.path().join("store.db")).unwrap();
            nodes.push(Node {
                key: id.to_string(),
                id,
                dir,
                store: None,
                sessions: BTreeMap::new(),
                timers: BTreeMap::new(),
                epoch: 0,
                acked: BTreeMap::new(),
                inbox: BTreeMap::new(),
                seen_seq: 0,
                changes: None,
            });
            // Each practice's store is its own incarnation.
            chartmesh_store::rotate_incarnation(&dir_path(&nodes), &key()).unwrap();
        }
        let _ = rng.next_u64();
        let mut m = Mesh {
            seed,
            rng,
            now: 0,
            nodes,
            conns: BTreeMap::new(),
            next_conn: 0,
            queue: BTreeMap::new(),
            next_ev: 0,
            partitions: BTreeSet::new(),
            faults,
            stats: Stats::default(),
            charts: Vec::new(),
            canaries: BTreeSet::new(),
            shares_all: BTreeSet::new(),
            trace: VecDeque::new(),
            _template: template_dir,
        };
        for i in 0..n {
            m.start_node(i);
        }
        m
    }

    fn time(&self) -> Time {
        Time {
            mono_ms: self.now,
            wall_ms: EPOCH_MS + self.now as i64,
        }
    }

    pub fn wall(&self) -> i64 {
        EPOCH_MS + self.now as i64
    }

    fn note(&mut self, s: String) {
        if self.trace.len() >= 200 {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>8} {s}", self.now));
    }

    /// The last events, for a failure report.
    pub fn trace(&self) -> String {
        self.trace.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn violation(&mut self, s: String) {
        self.note(format!("VIOLATION {s}"));
        // The first few say it all.
        if self.stats.violations.len() < 5 {
            self.stats.violations.push(s);
        }
    }

    fn draw(&mut self, range: (u64, u64)) -> u64 {
        range.0 + self.rng.below(range.1 - range.0 + 1)
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.next_ev += 1;
        self.queue.insert((at.max(self.now), self.next_ev), ev);
    }

    pub fn store(&self, node: usize) -> &Store {
        self.nodes[node].store.as_ref().expect("the practice is up")
    }

    pub fn is_up(&self, node: usize) -> bool {
        self.nodes[node].store.is_some()
    }

    fn start_node(&mut self, i: usize) {
        let path = self.nodes[i].dir.path().join("store.db");
        let store = Store::open(&path, &key(), StoreOptions::default()).unwrap();
        let incarnation = store.incarnation().unwrap();
        let now = self.time();
        let me = self.nodes[i].id;
        let mut sessions = BTreeMap::new();
        for j in 0..self.nodes.len() {
            if j == i {
                continue;
            }
            let peer = self.nodes[j].id;
            let record = store.peer_record(&peer.to_string()).unwrap();
            let seed = self.rng.next_u64();
            let mut s = PeerSession::new(me, peer, record, incarnation, seed, now);
            s.handle_timeout(now);
            sessions.insert(j, s);
        }
        let n = &mut self.nodes[i];
        n.seen_seq = store.seq().unwrap();
        n.changes = store.subscribe_changes();
        n.store = Some(store);
        n.sessions = sessions;
        n.timers.clear();
        n.inbox.clear();
        for j in 0..self.nodes.len() {
            if j != i {
                self.drive(i, j);
            }
        }
    }

    /// Stops a practice at once: whatever it had not written is lost, its connections die.
    pub fn crash(&mut self, i: usize) {
        if !self.is_up(i) {
            return;
        }
        self.note(format!("crash {i}"));
        self.stats.crashes += 1;
        let n = &mut self.nodes[i];
        n.epoch += 1;
        n.sessions.clear();
        n.timers.clear();
        n.inbox.clear();
        n.changes = None;
        if let Some(s) = n.store.take() {
            s.close();
        }
        let dead: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.alive && (c.a == i || c.b == i))
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            let c = self.conns.get_mut(&id).unwrap();
            c.alive = false;
            let other = if c.a == i { c.b } else { c.a };
            // The other side learns when its idle timeout fires (or a stateless reset).
            let at = self.now + 500;
            self.schedule(
                at,
                Ev::Lost {
                    conn: id,
                    node: other,
                    why: Closed::Lost("the peer vanished".into()),
                },
            );
        }
    }

    pub fn restart(&mut self, i: usize) {
        if self.is_up(i) {
            return;
        }
        self.note(format!("restart {i}"));
        self.start_node(i);
    }

    fn pair_key(a: usize, b: usize) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    pub fn partition(&mut self, a: usize, b: usize) {
        self.note(format!("partition {a} {b}"));
        self.partitions.insert(Self::pair_key(a, b));
        self.break_link(a, b, "partitioned");
    }

    pub fn heal(&mut self, a: usize, b: usize) {
        self.note(format!("heal {a} {b}"));
        self.partitions.remove(&Self::pair_key(a, b));
    }

    pub fn heal_all(&mut self) {
        self.partitions.clear();
    }

    /// Breaks the live connection between two practices (a network failure).
    pub fn break_link(&mut self, a: usize, b: usize, why: &str) {
        let live: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.alive && Self::pair_key(c.a, c.b) == Self::pair_key(a, b))
            .map(|(id, _)| *id)
            .collect();
        for id in live {
            self.conns.get_mut(&id).unwrap().alive = false;
            for node in [a, b] {
                let at = self.now + 1;
                self.schedule(
                    at,
                    Ev::Lost {
                        conn: id,
                        node,
                        why: Closed::Lost(why.into()),
                    },
                );
            }
        }
    }

    /// Runs events until virtual time `until`.
    pub fn run_until(&mut self, until: u64) {
        self.flush_commits();
        loop {
            let next = self.queue.keys().next().copied();
            match next {
                Some((at, seq)) if at <= until => {
                    let ev = self.queue.remove(&(at, seq)).unwrap();
                    self.now = self.now.max(at);
                    self.handle(ev);
                    self.flush_commits();
                }
                _ => break,
            }
        }
        self.now = self.now.max(until);
    }

    pub fn run_for(&mut self, ms: u64) {
        let until = self.now + ms;
        self.run_until(until);
    }

    fn session(&mut self, node: usize, peer: usize) -> Option<&mut PeerSession> {
        self.nodes[node].sessions.get_mut(&peer)
    }

    fn handle(&mut self, ev: Ev) {
        let now = self.time();
        match ev {
            Ev::Timer { node, peer, epoch } => {
                if self.nodes[node].epoch != epoch {
                    return;
                }
                self.nodes[node].timers.remove(&peer);
                if let Some(s) = self.session(node, peer) {
                    s.handle_timeout(now);
                }
                self.drive(node, peer);
            }
            Ev::Connect {
                dialer,
                target,
                epoch,
            } => {
                if self.nodes[dialer].epoch != epoch {
                    return;
                }
                if !self.is_up(target) || self.partitions.contains(&Self::pair_key(dialer, target))
                {
                    if let Some(s) = self.session(dialer, target) {
                        s.handle_dial_failed(now, "no answer".into());
                    }
                    self.drive(dialer, target);
                    return;
                }
                self.next_conn += 1;
                let id = self.next_conn;
                self.stats.connections += 1;
                self.conns.insert(
                    id,
                    Conn {
                        a: dialer,
                        b: target,
                        alive: true,
                        streams: BTreeMap::new(),
                        fifo: BTreeMap::new(),
                        reset: BTreeSet::new(),
                    },
                );
                self.note(format!("connect {id}: {dialer} -> {target}"));
                if let Some(s) = self.session(dialer, target) {
                    s.handle_connected(now, id, true);
                }
                if let Some(s) = self.session(target, dialer) {
                    s.handle_connected(now, id, false);
                }
                self.drive(dialer, target);
                self.drive(target, dialer);
            }
            Ev::DialFailed { node, peer, epoch } => {
                if self.nodes[node].epoch != epoch {
                    return;
                }
                if let Some(s) = self.session(node, peer) {
                    s.handle_dial_failed(now, "no answer".into());
                }
                self.drive(node, peer);
            }
            Ev::Deliver {
                conn,
                from,
                stream,
                msg,
            } => self.deliver(conn, from, stream, Inbound::Msg(*msg)),
            Ev::End {
                conn,
                from,
                stream,
                why,
            } => self.deliver(conn, from, stream, Inbound::End(why)),
            Ev::Control { conn, to, msg } => {
                let Some(c) = self.conns.get(&conn) else {
                    return;
                };
                if !c.alive {
                    return;
                }
                let from = if c.a == to { c.b } else { c.a };
                if let Some(s) = self.session(to, from) {
                    s.handle_control(now, msg);
                }
                self.drive(to, from);
            }
            Ev::Lost { conn, node, why } => {
                let other = match self.conns.get(&conn) {
                    Some(c) => {
                        if c.a == node {
                            c.b
                        } else {
                            c.a
                        }
                    }
                    None => return,
                };
                self.nodes[node].inbox.retain(|(c, _), _| *c != conn);
                if let Some(s) = self.session(node, other) {
                    s.handle_connection_lost(now, conn, why);
                }
                self.drive(node, other);
            }
            Ev::Answer {
                node,
                peer,
                epoch,
                task,
                query,
            } => {
                if self.nodes[node].epoch != epoch {
                    return;
                }
                let peer_key = self.nodes[peer].key.clone();
                let answer = self.store(node).answer(&peer_key, &query);
                if let Some(s) = self.session(node, peer) {
                    s.handle_answer(now, task, answer);
                }
                self.drive(node, peer);
            }
            Ev::Apply {
                node,
                peer,
                epoch,
                task,
                plan,
            } => {
                if self.nodes[node].epoch != epoch {
                    return;
                }
                let peer_key = self.nodes[peer].key.clone();
                let wall = self.wall();
                let store = self.store(node).clone();
                let kinds: Vec<String> = plan
                    .items
                    .iter()
                    .map(|i| format!("{}:{:?}", i.key.split('@').next().unwrap_or(""), i.kind))
                    .collect();
                self.note(format!("{node} applies from {peer}: {kinds:?}"));
                let items = plan
                    .items
                    .into_iter()
                    .map(|i| store.prepare_sync(i, wall))
                    .collect();
                let result = store
                    .apply_sync(peer_key, items, wall)
                    .unwrap()
                    .blocking_recv()
                    .unwrap()
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                if let Some(s) = self.session(node, peer) {
                    s.handle_applied(now, task, result);
                }
                self.drive(node, peer);
            }
            Ev::Persist {
                node,
                peer,
                epoch,
                p,
            } => {
                if self.nodes[node].epoch != epoch {
                    return;
                }
                if let Persist::Checkpoint { upto, .. } = p {
                    self.note(format!("{node} checkpoints {peer} at {upto}"));
                    self.check_checkpoint(node, peer, upto);
                }
                let peer_key = self.nodes[peer].key.clone();
                let wall = self.wall();
                self.store(node)
                    .persist_sync(&peer_key, p, wall)
                    .unwrap()
                    .blocking_recv()
                    .unwrap()
                    .unwrap();
                if let Persist::NewIncarnation { incarnation } = p {
                    for s in self.nodes[node].sessions.values_mut() {
                        s.handle_new_incarnation(incarnation);
                    }
                }
            }
        }
    }

    /// After writes: every session of a practice whose store's sequence moved hears of the
    /// commit (what the daemon's commit loop does).
    fn flush_commits(&mut self) {
        for i in 0..self.nodes.len() {
            self.committed(i);
        }
    }

    fn committed(&mut self, node: usize) {
        if !self.is_up(node) {
            return;
        }
        // Published by the writer before it acknowledges a write, so it is the same as
        // reading the sequence from the store here, without a read transaction per step.
        let seq = match &self.nodes[node].changes {
            Some(rx) => *rx.borrow(),
            None => self.store(node).seq().unwrap(),
        };
        if seq == self.nodes[node].seen_seq {
            return;
        }
        self.nodes[node].seen_seq = seq;
        let now = self.time();
        let peers: Vec<usize> = self.nodes[node].sessions.keys().copied().collect();
        for p in peers {
            if let Some(s) = self.session(node, p) {
                s.handle_local_commit(now);
            }
            self.drive(node, p);
        }
    }

    /// A message (or the end of a stream) arrives at the other side of `conn`.
    fn deliver(&mut self, conn: ConnId, from: usize, stream: StreamId, what: Inbound) {
        let now = self.time();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.alive || c.reset.contains(&(from, stream)) && matches!(what, Inbound::Msg(_)) {
            return;
        }
        let to = if c.a == from { c.b } else { c.a };
        let theirs = match c.streams.get(&(from, stream)).copied() {
            Some(Some(s)) => s,
            Some(None) => {
                // The first frame of a stream the peer opened.
                if matches!(what, Inbound::End(_)) {
                    return;
                }
                let accepted = self.nodes[to]
                    .sessions
                    .get_mut(&from)
                    .and_then(|s| s.handle_stream_accepted(now));
                let c = self.conns.get_mut(&conn).unwrap();
                match accepted {
                    Some(s) => {
                        c.streams.insert((from, stream), Some(s));
                        c.streams.insert((to, s), Some(stream));
                        s
                    }
                    None => {
                        // Refused: the opener sees its stream reset.
                        c.reset.insert((from, stream));
                        let at = self.now + 1;
                        self.schedule(
                            at,
                            Ev::End {
                                conn,
                                from: to,
                                stream: u64::MAX - stream,
                                why: Some("refused".into()),
                            },
                        );
                        if let Some(s) = self.nodes[from].sessions.get_mut(&to) {
                            s.handle_stream_end(now, stream, Some("stream refused".into()));
                        }
                        self.drive(from, to);
                        return;
                    }
                }
            }
            None => return,
        };
        self.nodes[to]
            .inbox
            .entry((conn, theirs))
            .or_default()
            .push_back(what);
        self.drive(to, from);
    }

    /// Carries out everything a session asked for, feeds it what it may read, and sets its
    /// timer: the simulated `daemon::sync` driver.
    fn drive(&mut self, node: usize, peer: usize) {
        loop {
            let mut progress = false;
            while let Some(o) = self.nodes[node]
                .sessions
                .get_mut(&peer)
                .and_then(|s| s.poll_output())
            {
                progress = true;
                self.execute(node, peer, o);
            }
            // Messages waiting for the session to read them.
            let conn = self.nodes[node].sessions.get(&peer).and_then(|s| s.conn());
            let keys: Vec<(ConnId, StreamId)> = self.nodes[node]
                .inbox
                .iter()
                .filter(|((c, _), q)| Some(*c) == conn && !q.is_empty())
                .map(|(k, _)| *k)
                .collect();
            for (c, s) in keys {
                let now = self.time();
                let n = &mut self.nodes[node];
                let Some(sess) = n.sessions.get_mut(&peer) else {
                    break;
                };
                if !sess.has_stream(s) {
                    n.inbox.remove(&(c, s));
                    continue;
                }
                let q = n.inbox.get_mut(&(c, s)).unwrap();
                match q.front() {
                    Some(Inbound::End(_)) => {
                        let Some(Inbound::End(why)) = q.pop_front() else {
                            unreachable!()
                        };
                        sess.handle_stream_end(now, s, why);
                        progress = true;
                    }
                    Some(Inbound::Msg(_)) if sess.wants_read(s) => {
                        let Some(Inbound::Msg(m)) = q.pop_front() else {
                            unreachable!()
                        };
                        self.stats.messages += 1;
                        sess.handle_message(now, s, m);
                        progress = true;
                    }
                    _ => {}
                }
            }
            if !progress {
                break;
            }
        }
        let epoch = self.nodes[node].epoch;
        if let Some(t) = self.nodes[node]
            .sessions
            .get(&peer)
            .and_then(|s| s.poll_timeout())
        {
            let scheduled = self.nodes[node].timers.get(&peer).copied();
            if scheduled.is_none_or(|x| x > t || x < self.now) {
                self.nodes[node].timers.insert(peer, t);
                self.schedule(t, Ev::Timer { node, peer, epoch });
            }
        }
    }

    fn conn_of(&self, node: usize, peer: usize) -> Option<ConnId> {
        self.nodes[node]
            .sessions
            .get(&peer)
            .and_then(|s| s.conn())
            .filter(|c| self.conns.get(c).is_some_and(|c| c.alive))
    }

    fn send_stream(&mut self, node: usize, peer: usize, stream: StreamId, msg: Msg) {
        let Some(conn) = self.conn_of(node, peer) else {
            return;
        };
        let lat = self.faults.latency_ms;
        let d = self.draw(lat);
        let c = self.conns.get_mut(&conn).unwrap();
        let at = (self.now + d).max(c.fifo.get(&(node, stream)).copied().unwrap_or(0));
        c.fifo.insert((node, stream), at);
        self.schedule(
            at,
            Ev::Deliver {
                conn,
                from: node,
                stream,
                msg: Box::new(msg),
            },
        );
    }

    fn execute(&mut self, node: usize, peer: usize, o: Output) {
        let now = self.time();
        let epoch = self.nodes[node].epoch;
        match o {
            Output::Dial => {
                let lat = self.faults.latency_ms;
                let d = self.draw(lat);
                if self.is_up(peer) && !self.partitions.contains(&Self::pair_key(node, peer)) {
                    self.schedule(
                        self.now + 2 * d,
                        Ev::Connect {
                            dialer: node,
                            target: peer,
                            epoch,
                        },
                    );
                } else {
                    self.schedule(self.now + 1_000, Ev::DialFailed { node, peer, epoch });
                }
            }
            Output::Close { conn, code } => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                if !c.alive {
                    return;
                }
                c.alive = false;
                let other = if c.a == node { c.b } else { c.a };
                let lat = self.faults.latency_ms;
                let d = self.draw(lat);
                self.schedule(
                    self.now + d,
                    Ev::Lost {
                        conn,
                        node: other,
                        why: Closed::by_peer(code.code() as u64),
                    },
                );
                self.schedule(
                    self.now,
                    Ev::Lost {
                        conn,
                        node,
                        why: Closed::Local,
                    },
                );
            }
            Output::Open { stream } => match self.conn_of(node, peer) {
                Some(conn) => {
                    self.conns
                        .get_mut(&conn)
                        .unwrap()
                        .streams
                        .insert((node, stream), None);
                }
                None => {
                    if let Some(s) = self.session(node, peer) {
                        s.handle_stream_end(now, stream, Some("not connected".into()));
                    }
                }
            },
            Output::Send { stream, msg } => {
                self.check_offer(node, peer, &msg);
                self.send_stream(node, peer, stream, msg);
                if let Some(s) = self.session(node, peer) {
                    s.handle_sent(now, stream);
                }
            }
            Output::SendAudited { stream, msg, audit } => {
                let peer_key = self.nodes[peer].key.clone();
                let wall = self.wall();
                let ok = self
                    .store(node)
                    .audit_sends(&peer_key, audit, wall)
                    .unwrap()
                    .blocking_recv()
                    .unwrap()
                    .unwrap();
                if !ok {
                    if let Some(conn) = self.conn_of(node, peer) {
                        self.conns
                            .get_mut(&conn)
                            .unwrap()
                            .reset
                            .insert((node, stream));
                        self.schedule(
                            self.now + 1,
                            Ev::End {
                                conn,
                                from: node,
                                stream,
                                why: Some("reset".into()),
                            },
                        );
                    }
                    if let Some(s) = self.session(node, peer) {
                        s.handle_stream_end(now, stream, Some("a grant changed".into()));
                    }
                    return;
                }
                self.check_disclosure(node, peer, &msg);
                self.send_stream(node, peer, stream, msg);
                if let Some(s) = self.session(node, peer) {
                    s.handle_sent(now, stream);
                }
            }
            Output::Finish { stream } => {
                if let Some(conn) = self.conn_of(node, peer) {
                    let c = self.conns.get_mut(&conn).unwrap();
                    let at = c
                        .fifo
                        .get(&(node, stream))
                        .copied()
                        .unwrap_or(0)
                        .max(self.now)
                        + 1;
                    self.schedule(
                        at,
                        Ev::End {
                            conn,
                            from: node,
                            stream,
                            why: None,
                        },
                    );
                }
            }
            Output::Reset { stream } => {
                if let Some(conn) = self.conn_of(node, peer) {
                    self.conns
                        .get_mut(&conn)
                        .unwrap()
                        .reset
                        .insert((node, stream));
                    self.schedule(
                        self.now + 1,
                        Ev::End {
                            conn,
                            from: node,
                            stream,
                            why: Some("reset".into()),
                        },
                    );
                }
            }
            Output::Control { msg } => {
                let Some(conn) = self.conn_of(node, peer) else {
                    return;
                };
                self.note(format!("{node} -> {peer} {msg:?}"));
                if self.rng.unit() < self.faults.control_drop {
                    // QUIC delivers a stream's bytes or loses the connection: a control
                    // message lost is a connection that died with it.
                    self.note(format!("{node} -> {peer} lost with its connection"));
                    self.break_link(node, peer, "lost a control message");
                    return;
                }
                let copies = if self.rng.unit() < self.faults.control_dup {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let lat = self.faults.latency_ms;
                    let d = self.draw(lat);
                    self.schedule(
                        self.now + d,
                        Ev::Control {
                            conn,
                            to: peer,
                            msg: msg.clone(),
                        },
                    );
                }
            }
            Output::Query { task, query } => {
                let st = self.faults.store_ms;
                let d = self.draw(st);
                self.schedule(
                    self.now + d,
                    Ev::Answer {
                        node,
                        peer,
                        epoch,
                        task,
                        query,
                    },
                );
            }
            Output::Apply { task, plan } => {
                let st = self.faults.store_ms;
                let d = self.draw(st);
                self.schedule(
                    self.now + d,
                    Ev::Apply {
                        node,
                        peer,
                        epoch,
                        task,
                        plan,
                    },
                );
            }
            Output::Persist(p) => {
                let st = self.faults.store_ms;
                let d = self.draw(st);
                self.schedule(
                    self.now + d,
                    Ev::Persist {
                        node,
                        peer,
                        epoch,
                        p,
                    },
                );
            }
            Output::Audit(events) => {
                self.store(node)
                    .audit(events)
                    .unwrap()
                    .blocking_recv()
                    .unwrap()
                    .unwrap();
            }
            Output::DecideEmergency { stream, request } => {
                let answer = self.decide_emergency(node, peer, &request);
                if let Some(s) = self.session(node, peer) {
                    s.handle_emergency_decision(now, stream, answer);
                }
            }
            Output::EmergencyDone { result, .. } => {
                if let Ok(chartmesh_core::emergency::Answer::Granted {
                    charts,
                    valid_for_ms,
                    ..
                }) = result
                {
                    let peer_key = self.nodes[peer].key.clone();
                    let wall = self.wall();
                    self.store(node)
                        .record_emergency_access(
                            &peer_key,
                            charts,
                            wall + valid_for_ms,
                            "sim",
                            wall,
                        )
                        .unwrap()
                        .blocking_recv()
                        .unwrap()
                        .unwrap();
                }
            }
            // The simulated network has no NATs: every connection is direct.
            Output::Punch { .. } => {}
            Output::Pulled { stats } => {
                self.stats.pulls += 1;
                self.note(format!(
                    "{node} pulled {peer}: offered {} wanted {} delivered {}",
                    stats.offered, stats.wanted, stats.delivered
                ));
            }
        }
    }

    /// The custodian's side of break-glass, as the daemon does it: allow for 30 s, read-only,
    /// never narrowing an existing grant.
    fn decide_emergency(
        &mut self,
        node: usize,
        peer: usize,
        request: &chartmesh_core::emergency::Request,
    ) -> chartmesh_core::emergency::Answer {
        let store = self.store(node).clone();
        let q = &request.query;
        let matches = store
            .find_own_charts(
                q.mrn.as_deref(),
                q.family.as_deref(),
                q.birth_date.as_deref(),
            )
            .unwrap_or_default();
        let wall = self.wall();
        let policy = chartmesh_core::emergency::Policy::Allow {
            duration_ms: 30_000,
        };
        let answer = chartmesh_core::emergency::decide(policy, request, &matches, wall);
        if let chartmesh_core::emergency::Answer::Granted {
            charts, expires_ms, ..
        } = &answer
        {
            let existing = store.grants(Some(&self.nodes[peer].id)).unwrap();
            let grants: Vec<Grant> = charts
                .iter()
                .filter(|c| consent::emergency_grant_needed(&existing, c, wall))
                .map(|c| Grant {
                    chart_id: c.clone(),
                    peer: self.nodes[peer].id,
                    access: Access::Read,
                    purpose: Purpose::Emergency,
                    expires_ms: Some(*expires_ms),
                    recorded_by: "emergency".into(),
                    recorded_ms: wall,
                    revoked_ms: None,
                })
                .collect();
            if !grants.is_empty() {
                store
                    .grant(grants)
                    .unwrap()
                    .blocking_recv()
                    .unwrap()
                    .unwrap();
            }
            self.note(format!("emergency {node} grants {charts:?} to {peer}"));
        }
        answer
    }

    /// Invariant: nothing leaves without consent, checked as the message is sent: against
    /// the sender's grants and copies as stored at that moment, with the consent rules; and
    /// no canary chart ever leaves.
    fn check_disclosure(&mut self, node: usize, peer: usize, msg: &Msg) {
        let Msg::Changes { items } = msg else {
            return;
        };
        let wall = self.wall();
        let peer_id = self.nodes[peer].id;
        let peer_key = self.nodes[peer].key.clone();
        let store = self.store(node).clone();
        let grants = store.grants(Some(&peer_id)).unwrap();
        for d in items.iter().filter(|d| d.data.is_some()) {
            self.stats.charts_sent += 1;
            if self.canaries.contains(&(node, d.chart.clone())) {
                self.violation(format!("canary {} of {node} sent to {peer}", d.chart));
            }
            let ok = if d.returned {
                let key = copy_key(&d.chart, &peer_key);
                let held = store.sync_charts(&[key.as_str()]).unwrap();
                held.get(&key)
                    .is_some_and(|c| oracle::may_return(c, &peer_key, wall))
            } else {
                let held = store.sync_charts(&[d.chart.as_str()]).unwrap();
                held.get(&d.chart).is_some_and(|c| c.origin.is_none())
                    && oracle::may_send(&grants, &d.chart, wall)
            };
            if !ok {
                self.violation(format!(
                    "{} sent by {node} to {peer} without consent (returned={})",
                    d.chart, d.returned
                ));
            }
        }
    }

    /// Invariant: an offer names a chart of the sender's own only under a grant in force (or,
    /// as revoked, one whose grant exists but ended), never a copy received from another
    /// practice, and a copy only to its custodian while held read-write: chart ids are not
    /// disclosed either.
    fn check_offer(&mut self, node: usize, peer: usize, msg: &Msg) {
        let Msg::Offer { items } = msg else {
            return;
        };
        let wall = self.wall();
        let peer_key = self.nodes[peer].key.clone();
        let store = self.store(node).clone();
        let grants = store.grants(Some(&self.nodes[peer].id)).unwrap();
        // The sender's own charts among those offered as its own (one query per offer).
        let named: Vec<&str> = items
            .iter()
            .filter(|i| !matches!(i.kind, chartmesh_core::sync::Offered::Returned { .. }))
            .map(|i| i.chart.as_str())
            .collect();
        let rows = store.sync_charts(&named).unwrap();
        let own = |chart: &str| rows.get(chart).is_some_and(|c| c.origin.is_none());
        for i in items {
            let ok = match i.kind {
                chartmesh_core::sync::Offered::Shared { .. } => {
                    own(&i.chart) && oracle::may_send(&grants, &i.chart, wall)
                }
                chartmesh_core::sync::Offered::Revoked => {
                    own(&i.chart) && oracle::grant(&grants, &i.chart).is_some()
                }
                chartmesh_core::sync::Offered::Returned { .. } => {
                    let key = copy_key(&i.chart, &peer_key);
                    store
                        .sync_charts(&[key.as_str()])
                        .unwrap()
                        .get(&key)
                        .is_some_and(|c| oracle::may_return(c, &peer_key, wall))
                }
            };
            if !ok {
                self.violation(format!(
                    "{} offered by {node} to {peer} as {:?} without consent",
                    i.chart, i.kind
                ));
            }
        }
    }

    /// Invariant: a checkpoint never moves past what is durable. When `node` records that it
    /// holds everything `peer` offered up to `upto`, every chart of `peer`'s shared with it
    /// (active grant) and last changed at or before `upto` must be here with all its heads.
    fn check_checkpoint(&mut self, node: usize, peer: usize, upto: u64) {
        if !self.is_up(peer) {
            return;
        }
        let wall = self.wall();
        let custodian = self.store(peer).clone();
        let holder = self.store(node).clone();
        let me = self.nodes[node].id;
        let peer_key = self.nodes[peer].key.clone();
        // Only for the peer's current incarnation's sequence (a restored peer restarts it).
        let grants = custodian.grants(Some(&me)).unwrap();
        let mut bad = Vec::new();
        for (owner, chart) in self.charts.clone() {
            if owner != peer {
                continue;
            }
            let held = custodian.sync_charts(&[chart.as_str()]).unwrap();
            let Some(c) = held.get(&chart) else { continue };
            let Some(g) = oracle::grant(&grants, &chart) else {
                continue;
            };
            // Only what the offer up to `upto` covered: the chart and its grant as they
            // were by then, and still in force.
            let grant_seq = custodian
                .grant_seq(&me.to_string(), &g.chart_id)
                .unwrap()
                .unwrap_or(i64::MAX);
            if c.seq as u64 > upto || grant_seq as u64 > upto || !oracle::in_force(g, wall) {
                continue;
            }
            let key = copy_key(&chart, &peer_key);
            let mine = holder.get(&key).unwrap();
            let has_all = mine.is_some_and(|mut r| {
                let heads = r.doc.head_bytes();
                c.heads.iter().all(|h| {
                    heads.contains(h)
                        || r.doc
                            .automerge()
                            .get_change_by_hash(&automerge_hash(h))
                            .is_some()
                })
            });
            if !has_all {
                bad.push(chart);
            }
        }
        for chart in bad {
            self.violation(format!(
                "{node} checkpointed {peer} at {upto} without {chart} durable"
            ));
        }
    }

    // ---- what people do at a practice ----

    /// Creates a chart at a practice; a canary is never to be shared.
    pub fn create_chart(&mut self, node: usize, canary: bool) -> Option<String> {
        if !self.is_up(node) {
            return None;
        }
        // A practice that shares all its charts with someone has no canaries.
        let canary = canary && !self.shares_all.contains(&node);
        let n = self.charts.len();
        let id = format!("c{n:04}");
        let mrn = if canary {
            format!("CANARY{n}")
        } else {
            format!("M{n}")
        };
        let json = format!(
            r#"{{"id":"{id}","type":"chart","schemaVersion":1,"patient":{{"mrn":"{mrn}","name":{{"given":["Pat"],"family":"Sim{n}"}},"birthDate":"1980-01-01"}},"notes":[],"createdAt":"2026-01-01T00:00:00Z","updatedAt":"2026-01-01T00:00:00Z"}}"#
        );
        let chart = Chart::from_json_slice(json.as_bytes()).unwrap();
        let meta = self.meta(node, "create");
        let mut doc = ChartDoc::create(&chart, &meta);
        let nc = NewChart {
            id: id.clone(),
            doc: doc.save(),
            index: IndexFields {
                mrn: mrn.clone(),
                family: format!("Sim{n}"),
                given: "Pat".into(),
                birth_date: "1980-01-01".into(),
            },
            origin: None,
            time_ms: meta.time_ms,
            heads: doc.head_bytes(),
            referrals: vec![],
            due_facts: None,
        };
        self.store(node)
            .insert_charts(vec![nc], "sim".into())
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        self.charts.push((node, id.clone()));
        if canary {
            self.canaries.insert((node, id.clone()));
        }
        self.note(format!(
            "create {id} at {node}{}",
            if canary { " (canary)" } else { "" }
        ));
        Some(id)
    }

    fn meta(&self, node: usize, action: &str) -> ChangeMeta {
        ChangeMeta {
            practice: self.nodes[node].id,
            author: "sim".into(),
            action: action.into(),
            time_ms: self.wall(),
        }
    }

    /// Adds a note to a chart as held at `node` (its own chart, or a copy it may edit, as
    /// the daemon allows). Returns whether it was written (and acknowledged).
    pub fn edit(&mut self, node: usize, key: &str) -> bool {
        if !self.is_up(node) {
            return false;
        }
        let store = self.store(node).clone();
        let Some(row) = store.sync_charts(&[key]).unwrap().remove(key) else {
            return false;
        };
        if let Some(h) = row.held()
            && consent::may_edit_held(&h, self.wall()).is_err()
        {
            return false;
        }
        let note_id = format!("n{}-{}-{}", node, self.now, self.rng.below(1_000_000));
        let entry = chartmesh_core::chart::Entry::Note(chartmesh_core::chart::Note {
            id: note_id.clone(),
            author: "sim".into(),
            date: "2026-01-01T00:00:00Z".into(),
            text: format!("note {note_id}"),
            ..Default::default()
        });
        let meta = self.meta(node, "add note");
        let r = store
            .edit(
                key.to_string(),
                Box::new(move |d| d.append(&entry, &meta)),
                vec![],
            )
            .unwrap()
            .blocking_recv()
            .unwrap();
        if r.is_ok() {
            self.nodes[node]
                .acked
                .entry(key.to_string())
                .or_default()
                .insert(note_id);
            self.note(format!("edit {key} at {node}"));
        }
        r.is_ok()
    }

    /// Records a grant of `chart` (or every chart) at `node` to `peer`.
    pub fn share(
        &mut self,
        node: usize,
        chart: Option<&str>,
        peer: usize,
        rw: bool,
        expires_in: Option<u64>,
    ) {
        if !self.is_up(node) {
            return;
        }
        let wall = self.wall();
        let chart_id = chart.unwrap_or(consent::ALL_CHARTS).to_string();
        if self
            .canaries
            .iter()
            .any(|(o, c)| *o == node && (c == &chart_id || chart_id == consent::ALL_CHARTS))
        {
            return;
        }
        if chart_id == consent::ALL_CHARTS {
            self.shares_all.insert(node);
        }
        let g = Grant {
            chart_id: chart_id.clone(),
            peer: self.nodes[peer].id,
            access: if rw { Access::ReadWrite } else { Access::Read },
            purpose: if rw {
                Purpose::Referral
            } else {
                Purpose::Continuity
            },
            expires_ms: expires_in.map(|e| wall + e as i64),
            recorded_by: "sim".into(),
            recorded_ms: wall,
            revoked_ms: None,
        };
        self.store(node)
            .grant(vec![g])
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        self.note(format!(
            "share {chart_id} {node} -> {peer} rw={rw} expires={expires_in:?}"
        ));
    }

    pub fn revoke(&mut self, node: usize, chart: Option<&str>, peer: usize) {
        if !self.is_up(node) {
            return;
        }
        let wall = self.wall();
        let charts = chart.map(|c| vec![c.to_string()]);
        self.store(node)
            .revoke(self.nodes[peer].id, charts, "sim", wall)
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        self.note(format!("revoke {chart:?} {node} -> {peer}"));
    }

    /// What the daemon's once-a-second housekeeping does: grant expiries become events, and
    /// ended emergency access removes its copies.
    pub fn housekeeping(&mut self) {
        let wall = self.wall();
        for i in 0..self.nodes.len() {
            if !self.is_up(i) {
                continue;
            }
            let store = self.store(i).clone();
            if store.next_expiry().unwrap().is_some_and(|e| e <= wall) {
                store
                    .record_expiries(wall)
                    .unwrap()
                    .blocking_recv()
                    .unwrap()
                    .unwrap();
            }
            if let Some(rx) = store.end_emergency_access(wall, self.nodes[i].id).unwrap() {
                rx.blocking_recv().unwrap().unwrap();
            }
        }
    }

    /// Asks `custodian` for emergency access to `chart` from `node`.
    pub fn emergency(&mut self, node: usize, custodian: usize, mrn: &str) {
        if !self.is_up(node) {
            return;
        }
        let now = self.time();
        let request = chartmesh_core::emergency::Request {
            query: chartmesh_core::emergency::Query {
                mrn: Some(mrn.into()),
                family: None,
                birth_date: None,
            },
            reason: "unconscious".into(),
            requester: "sim".into(),
        };
        if let Some(s) = self.session(node, custodian)
            && s.request_emergency(now, request).is_ok()
        {
            self.note(format!("emergency request {node} -> {custodian} {mrn}"));
        }
        self.drive(node, custodian);
    }

    /// Runs the clock with housekeeping every second.
    pub fn settle(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.run_for(1_000.min(end - self.now));
            self.housekeeping();
        }
    }

    /// The local keys of every chart `node` holds.
    pub fn keys(&self, node: usize) -> Vec<String> {
        self.store(node).chart_ids().unwrap()
    }

    // ---- invariants at quiescence ----

    /// Every chart under an active grant has the same heads at its custodian and at the
    /// holder; a copy whose grant ended is marked (or, for emergency access, removed); no
    /// acknowledged write is missing anywhere.
    pub fn check_quiescent(&mut self) {
        let wall = self.wall();
        let n = self.nodes.len();
        for (custodian, chart) in self.charts.clone() {
            let cstore = self.store(custodian).clone();
            let Some(mut c) = cstore.get(&chart).unwrap() else {
                continue;
            };
            let c_heads = sorted(c.doc.head_bytes());
            for holder in 0..n {
                if holder == custodian {
                    continue;
                }
                let grants = cstore.grants(Some(&self.nodes[holder].id)).unwrap();
                let g = oracle::grant(&grants, &chart);
                let key = copy_key(&chart, &self.nodes[custodian].key);
                let held = self.store(holder).get(&key).unwrap();
                match (g.filter(|g| oracle::in_force(g, wall)), held) {
                    (Some(g), Some(mut h)) => {
                        let h_heads = sorted(h.doc.head_bytes());
                        let holder_actor = self.nodes[holder].id.actor_bytes();
                        if h_heads != c_heads
                            && !refused_own_edits_only(g, &c_heads, &mut h.doc, &holder_actor)
                        {
                            self.violation(format!(
                                "{chart} of {custodian} differs at {holder} under an active grant"
                            ));
                        }
                        if h.revoked_ms.is_some() {
                            self.violation(format!(
                                "{chart} of {custodian} marked revoked at {holder} though shared"
                            ));
                        }
                    }
                    (Some(_), None) => self.violation(format!(
                        "{chart} of {custodian} never reached {holder} under an active grant"
                    )),
                    (None, Some(h)) if h.revoked_ms.is_none() => {
                        let held = self.store(holder).sync_charts(&[key.as_str()]).unwrap();
                        let expired_here = held
                            .get(&key)
                            .and_then(|x| x.expires_ms)
                            .is_some_and(|e| e <= wall);
                        if g.is_some() && !expired_here {
                            self.violation(format!(
                                "{chart} of {custodian} still live at {holder} after its grant ended"
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
        for i in 0..n {
            let store = self.store(i).clone();
            for (key, notes) in self.nodes[i].acked.clone() {
                let Some(rec) = store.get(&key).unwrap() else {
                    self.violation(format!("{key} with acknowledged notes is gone at {i}"));
                    continue;
                };
                let have: BTreeSet<String> = rec
                    .doc
                    .to_chart()
                    .map(|c| c.notes.into_iter().map(|n| n.id).collect())
                    .unwrap_or_default();
                for note in notes {
                    if !have.contains(&note) {
                        self.violation(format!("acknowledged note {note} of {key} lost at {i}"));
                    }
                }
            }
        }
    }

    /// Messages read by sessions so far (for the cost of a reconnect).
    pub fn messages(&self) -> u64 {
        self.stats.messages
    }

    /// Restarts every crashed practice and heals every partition.
    pub fn recover_all(&mut self) {
        self.heal_all();
        for i in 0..self.nodes.len() {
            self.restart(i);
        }
    }
}

/// The consent rules as the product brief states them, written here independently of
/// `chartmesh_core::consent` so that a bug there cannot hide from the checks: a grant of
/// the chart itself wins over an all-charts grant; it is in force if not revoked and not
/// past its expiry.
mod oracle {
    use chartmesh_core::consent::{Access, Grant};

    pub fn grant<'a>(grants: &'a [Grant], chart: &str) -> Option<&'a Grant> {
        grants
            .iter()
            .find(|g| g.chart_id == chart)
            .or_else(|| grants.iter().find(|g| g.chart_id == "*"))
    }

    pub fn in_force(g: &Grant, now: i64) -> bool {
        g.revoked_ms.is_none() && g.expires_ms.is_none_or(|e| now < e)
    }

    /// May the custodian send its chart to the peer whose grants these are?
    pub fn may_send(grants: &[Grant], chart: &str, now: i64) -> bool {
        grant(grants, chart).is_some_and(|g| in_force(g, now))
    }

    /// May the holder send its changes of a copy back to `to`?
    pub fn may_return(c: &chartmesh_store::SyncChart, to: &str, now: i64) -> bool {
        c.origin.as_deref() == Some(to)
            && c.access == Some(Access::ReadWrite)
            && c.revoked_ms.is_none()
            && c.expires_ms.is_none_or(|e| now < e)
    }
}

fn sorted(mut v: Vec<[u8; 32]>) -> Vec<[u8; 32]> {
    v.sort_unstable();
    v
}

/// A copy that differs from its custodian's chart under an active *read* grant only by
/// edits the holder wrote itself (under the read-write grant it held before): the custodian
/// refuses them once the grant is narrowed (it cannot tell when a change was written), and
/// the holder keeps them, read-only, like any entry written there. Everything of the
/// custodian's must still be in the copy.
fn refused_own_edits_only(
    g: &Grant,
    custodian_heads: &[[u8; 32]],
    copy: &mut ChartDoc,
    holder_actor: &[u8],
) -> bool {
    if g.access != Access::Read {
        return false;
    }
    let am = copy.automerge();
    let heads: Vec<automerge::ChangeHash> = custodian_heads.iter().map(automerge_hash).collect();
    if heads.iter().any(|h| am.get_change_by_hash(h).is_none()) {
        return false;
    }
    am.get_changes(&heads)
        .iter()
        .all(|c| c.actor_id().to_bytes() == holder_actor)
}

fn automerge_hash(h: &[u8; 32]) -> automerge::ChangeHash {
    automerge::ChangeHash(*h)
}
