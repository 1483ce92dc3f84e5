//! The endpoint's socket: real UDP, plus *relayed paths* — byte streams through a relay
//! server, each standing in for one peer under a virtual address (240.0.x.y, a reserved
//! range that never appears on a real network). quinn sees one socket and ordinary
//! datagrams; TLS, pinning and everything above it are the same on every path, so the relay
//! only ever carries QUIC packets it cannot read.
//!
//! A relayed path carries each datagram as a 2-byte big-endian length and the datagram.
//!
//! The real UDP socket also carries STUN (RFC 8489) to and from a STUN server, so this
//! practice learns the public address its QUIC packets leave from: answers are taken out
//! of what quinn receives ([`crate::stun::is_stun`]) and handed to whoever waits for them.

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use chartmesh_core::PracticeId;

/// Datagrams queued for one relayed path before new ones are dropped (like a full UDP
/// buffer: QUIC's loss recovery resends them).
const PATH_QUEUE: usize = 1024;
/// Datagrams received over relayed paths not yet read by quinn.
const INCOMING_QUEUE: usize = 4096;

/// Whether `addr` is a virtual (relayed) address.
pub fn is_relayed(addr: SocketAddr) -> bool {
    matches!(normal(addr).ip(), IpAddr::V4(ip) if ip.octets()[0] == 240)
}

/// IPv4-mapped IPv6 addresses (a dual-stack socket's view) as plain IPv4.
fn normal(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        a => a,
    }
}

struct Path {
    peer: PracticeId,
    out: mpsc::Sender<Vec<u8>>,
    closed: watch::Sender<bool>,
}

#[derive(Default)]
struct Inner {
    paths: HashMap<SocketAddr, Path>,
    incoming: VecDeque<(SocketAddr, Vec<u8>)>,
    waker: Option<Waker>,
    next: u32,
}

/// The relayed paths of one endpoint.
#[derive(Default, Clone)]
pub struct Paths {
    inner: Arc<Mutex<Inner>>,
}

impl Paths {
    /// Carries datagrams to and from `peer` over `stream` (a joined relay session) under a
    /// new virtual address, until the stream ends. Returns the address.
    pub fn add<S>(&self, peer: PracticeId, stream: S) -> SocketAddr
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(PATH_QUEUE);
        let (closed, _) = watch::channel(false);
        let addr = {
            let mut inner = self.inner.lock().unwrap();
            inner.next = inner.next.wrapping_add(1);
            let n = inner.next;
            let addr = SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(240, (n >> 16) as u8, (n >> 8) as u8, n as u8)),
                (n % 60_000) as u16 + 1024,
            );
            inner.paths.insert(
                addr,
                Path {
                    peer,
                    out: out_tx,
                    closed,
                },
            );
            addr
        };
        let (mut rd, mut wr) = tokio::io::split(stream);
        let paths = self.clone();
        let writer = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Some(d) = out_rx.recv().await {
                buf.clear();
                push_frame(&mut buf, &d);
                // Everything queued goes out in one write.
                while buf.len() < 60 * 1024 {
                    match out_rx.try_recv() {
                        Ok(d) => push_frame(&mut buf, &d),
                        Err(_) => break,
                    }
                }
                if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        tokio::spawn(async move {
            let mut len = [0u8; 2];
            loop {
                if rd.read_exact(&mut len).await.is_err() {
                    break;
                }
                let mut d = vec![0u8; u16::from_be_bytes(len) as usize];
                if rd.read_exact(&mut d).await.is_err() {
                    break;
                }
                paths.deliver(addr, d);
            }
            writer.abort();
            paths.remove(addr);
        });
        addr
    }

    fn deliver(&self, from: SocketAddr, d: Vec<u8>) {
        let mut inner = self.inner.lock().unwrap();
        if inner.incoming.len() < INCOMING_QUEUE {
            inner.incoming.push_back((from, d));
        }
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
    }

    /// Ends the path at `addr` (its stream is dropped once the writer sees the end).
    pub fn remove(&self, addr: SocketAddr) {
        if let Some(p) = self.inner.lock().unwrap().paths.remove(&normal(addr)) {
            let _ = p.closed.send(true);
            tracing::debug!(peer = %p.peer.short(), %addr, "relayed path closed");
        }
    }

    /// A receiver that turns true when the relayed path at `addr` ends; None for an address
    /// that is not a live relayed path.
    pub fn watch_closed(&self, addr: SocketAddr) -> Option<watch::Receiver<bool>> {
        self.inner
            .lock()
            .unwrap()
            .paths
            .get(&normal(addr))
            .map(|p| p.closed.subscribe())
    }

    /// The practice a relayed path was opened for.
    pub fn peer_of(&self, addr: SocketAddr) -> Option<PracticeId> {
        self.inner
            .lock()
            .unwrap()
            .paths
            .get(&normal(addr))
            .map(|p| p.peer)
    }

    /// Live relayed paths.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn push_frame(buf: &mut Vec<u8>, d: &[u8]) {
    buf.extend_from_slice(&(d.len() as u16).to_be_bytes());
    buf.extend_from_slice(d);
}

/// STUN transactions waiting for their answer: transaction id → (server, waiter).
#[derive(Default, Clone)]
pub(crate) struct StunWaiters {
    inner: Arc<Mutex<HashMap<crate::stun::TransactionId, StunWaiter>>>,
}

type StunWaiter = (SocketAddr, tokio::sync::oneshot::Sender<SocketAddr>);

/// At most this many STUN transactions wait at once (a few per configured server).
const MAX_STUN_WAITERS: usize = 16;

impl StunWaiters {
    /// Waits for the answer to transaction `id` from `server`; None when too many wait.
    pub(crate) fn expect(
        &self,
        id: crate::stun::TransactionId,
        server: SocketAddr,
    ) -> Option<tokio::sync::oneshot::Receiver<SocketAddr>> {
        let mut w = self.inner.lock().unwrap();
        w.retain(|_, (_, tx)| !tx.is_closed());
        if w.len() >= MAX_STUN_WAITERS {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        w.insert(id, (normal(server), tx));
        Some(rx)
    }

    pub(crate) fn forget(&self, id: &crate::stun::TransactionId) {
        self.inner.lock().unwrap().remove(id);
    }

    /// A STUN datagram arrived from `from`: an answer to a waiting transaction from the
    /// server it was sent to is delivered; anything else is dropped.
    fn deliver(&self, from: SocketAddr, d: &[u8]) {
        let Some((id, mapped)) = crate::stun::parse_binding_response(d) else {
            return;
        };
        let mut w = self.inner.lock().unwrap();
        if w.get(&id)
            .is_some_and(|(server, _)| *server == normal(from))
            && let Some((_, tx)) = w.remove(&id)
        {
            let _ = tx.send(normal(mapped));
        }
    }
}

/// The socket quinn drives: real UDP and the relayed paths.
pub(crate) struct MuxSocket {
    udp: Arc<dyn AsyncUdpSocket>,
    paths: Paths,
    stun: StunWaiters,
}

impl fmt::Debug for MuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxSocket")
            .field("udp", &self.udp)
            .field("relayed", &self.paths.len())
            .finish()
    }
}

impl MuxSocket {
    pub(crate) fn new(udp: Arc<dyn AsyncUdpSocket>, paths: Paths, stun: StunWaiters) -> MuxSocket {
        MuxSocket { udp, paths, stun }
    }

    /// Takes the STUN datagrams out of the `n` received ones (delivering them to their
    /// waiters), moving the others to the front. Returns how many are left for quinn.
    fn take_stun(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) -> usize {
        let mut kept = 0;
        for i in 0..n {
            let len = meta[i].len.min(bufs[i].len());
            if crate::stun::is_stun(&bufs[i][..len]) {
                let stride = meta[i].stride.max(1);
                for d in bufs[i][..len].chunks(stride) {
                    self.stun.deliver(meta[i].addr, d);
                }
                continue;
            }
            if kept != i {
                let (front, back) = bufs.split_at_mut(i);
                if front[kept].len() < len {
                    continue;
                }
                front[kept][..len].copy_from_slice(&back[0][..len]);
                meta[kept] = meta[i];
            }
            kept += 1;
        }
        kept
    }
}

impl AsyncUdpSocket for MuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.udp.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let to = normal(transmit.destination);
        if !is_relayed(to) {
            return self.udp.try_send(transmit);
        }
        let inner = self.paths.inner.lock().unwrap();
        // A path that has gone: the datagram is lost, as on a dead UDP route.
        let Some(path) = inner.paths.get(&to) else {
            return Ok(());
        };
        let size = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for d in transmit.contents.chunks(size) {
            let _ = path.out.try_send(d.to_vec());
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        {
            let mut inner = self.paths.inner.lock().unwrap();
            let mut n = 0;
            while n < bufs.len().min(meta.len()) {
                let Some((from, d)) = inner.incoming.pop_front() else {
                    break;
                };
                if d.len() > bufs[n].len() {
                    continue;
                }
                bufs[n][..d.len()].copy_from_slice(&d);
                meta[n] = RecvMeta {
                    addr: from,
                    len: d.len(),
                    stride: d.len(),
                    ecn: None,
                    dst_ip: None,
                };
                n += 1;
            }
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            inner.waker = Some(cx.waker().clone());
        }
        loop {
            match self.udp.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => {
                    let kept = self.take_stun(bufs, meta, n);
                    // Only STUN arrived: read on (until the socket has nothing more).
                    if kept > 0 || n == 0 {
                        return Poll::Ready(Ok(kept));
                    }
                }
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// As the UDP socket's (segmentation offload on direct paths); a batch for a relayed
    /// path is split into its datagrams in `try_send`.
    fn max_transmit_segments(&self) -> usize {
        self.udp.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.udp.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.udp.may_fragment()
    }
}
