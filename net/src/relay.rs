//! Reaching practices through a relay server: Syncthing's relay (`strelaysrv`, Debian's
//! `syncthing-relaysrv`), an existing maintained server. Its protocol routes by *device id*,
//! the SHA-256 of a client's TLS certificate — which is exactly a practice id — so no
//! account, registration or extra key is needed.
//!
//! - A practice keeps one *protocol connection* open to its relay (TLS, ALPN `bep-relay`,
//!   its practice certificate as the client certificate, `JoinRelayRequest`), answering the
//!   relay's pings and pinging it (a dead connection, such as one a restarted NAT no longer
//!   maps, is noticed within seconds and joined again).
//! - To reach a peer, it opens a second TLS connection and sends `ConnectRequest{peer id}`;
//!   the relay answers with a `SessionInvitation` and sends the peer one over its protocol
//!   connection. Both open a plain TCP connection to the relay's session port and send
//!   `JoinSessionRequest{key}`; from then on the relay copies bytes between them.
//! - That byte stream becomes a relayed path of the endpoint's socket ([`crate::mux`]):
//!   QUIC runs over it unchanged, with the same pinned mutual TLS end to end. The relay sees
//!   only which practice ids talk, and how much.
//!
//! An invitation from a practice that is not paired is ignored. Messages are XDR, each with
//! a 12-byte header (magic, type, length).

use chartmesh_core::PracticeId;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::mux::Paths;
use crate::{Credentials, NetError, PinSet};

/// ALPN of Syncthing's relay protocol.
pub const ALPN: &[u8] = b"bep-relay";
const MAGIC: u32 = 0x9E79_BC40;
const PING: i32 = 0;
const PONG: i32 = 1;
const JOIN_RELAY: i32 = 2;
const JOIN_SESSION: i32 = 3;
const RESPONSE: i32 = 4;
const CONNECT: i32 = 5;
const INVITATION: i32 = 6;
const RELAY_FULL: i32 = 7;
/// The relay refuses longer messages; so do we.
const MAX_MESSAGE: usize = 1024;
/// How often this side pings the relay on its protocol connection; a relay that does not
/// answer within [`PING_TIMEOUT`] is given up and joined again.
const PING_EVERY: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(12);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an invited practice waits before joining the session (see where it is used).
const INVITED_JOIN_DELAY: Duration = Duration::from_millis(20);

/// Where the relay is and, optionally, the SHA-256 of its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// `host:port` of the relay's listener.
    pub addr: String,
    pub pin: Option<[u8; 32]>,
}

/// A relay message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ping,
    Pong,
    JoinRelayRequest,
    JoinSessionRequest { key: Vec<u8> },
    Response { code: i32, message: String },
    ConnectRequest { id: Vec<u8> },
    SessionInvitation(Invitation),
    RelayFull,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    pub from: Vec<u8>,
    pub key: Vec<u8>,
    /// The session's IP address (empty: the relay's own address).
    pub address: Vec<u8>,
    pub port: u16,
    pub server_socket: bool,
}

fn put_opaque(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
    out.resize(out.len() + (4 - b.len() % 4) % 4, 0);
}

struct Xdr<'a>(&'a [u8]);

impl Xdr<'_> {
    fn u32(&mut self) -> Result<u32, String> {
        if self.0.len() < 4 {
            return Err("truncated relay message".into());
        }
        let (h, t) = self.0.split_at(4);
        self.0 = t;
        Ok(u32::from_be_bytes(h.try_into().unwrap()))
    }
    fn opaque(&mut self, max: usize) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        let padded = n + (4 - n % 4) % 4;
        if n > max || self.0.len() < padded {
            return Err("bad field length in relay message".into());
        }
        let v = self.0[..n].to_vec();
        self.0 = &self.0[padded..];
        Ok(v)
    }
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let kind = match self {
            Message::Ping => PING,
            Message::Pong => PONG,
            Message::JoinRelayRequest => JOIN_RELAY,
            Message::JoinSessionRequest { key } => {
                put_opaque(&mut body, key);
                JOIN_SESSION
            }
            Message::Response { code, message } => {
                body.extend_from_slice(&(*code as u32).to_be_bytes());
                put_opaque(&mut body, message.as_bytes());
                RESPONSE
            }
            Message::ConnectRequest { id } => {
                put_opaque(&mut body, id);
                CONNECT
            }
            Message::SessionInvitation(i) => {
                put_opaque(&mut body, &i.from);
                put_opaque(&mut body, &i.key);
                put_opaque(&mut body, &i.address);
                body.extend_from_slice(&u32::from(i.port).to_be_bytes());
                body.extend_from_slice(&u32::from(i.server_socket).to_be_bytes());
                INVITATION
            }
            Message::RelayFull => RELAY_FULL,
        };
        let mut out = Vec::with_capacity(12 + body.len());
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&(kind as u32).to_be_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(kind: i32, body: &[u8]) -> Result<Message, String> {
        let mut x = Xdr(body);
        Ok(match kind {
            PING => Message::Ping,
            PONG => Message::Pong,
            JOIN_RELAY => Message::JoinRelayRequest,
            JOIN_SESSION => Message::JoinSessionRequest { key: x.opaque(32)? },
            RESPONSE => Message::Response {
                code: x.u32()? as i32,
                message: String::from_utf8_lossy(&x.opaque(MAX_MESSAGE)?).into_owned(),
            },
            CONNECT => Message::ConnectRequest { id: x.opaque(32)? },
            INVITATION => Message::SessionInvitation(Invitation {
                from: x.opaque(32)?,
                key: x.opaque(32)?,
                address: x.opaque(32)?,
                port: x.u32()? as u16,
                server_socket: x.u32()? != 0,
            }),
            RELAY_FULL => Message::RelayFull,
            k => return Err(format!("unknown relay message type {k}")),
        })
    }
}

async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, m: &Message) -> std::io::Result<()> {
    w.write_all(&m.encode()).await?;
    w.flush().await
}

async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, String> {
    let mut h = [0u8; 12];
    r.read_exact(&mut h)
        .await
        .map_err(|e| format!("relay connection: {e}"))?;
    let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
    let kind = u32::from_be_bytes(h[4..8].try_into().unwrap()) as i32;
    let len = u32::from_be_bytes(h[8..12].try_into().unwrap()) as usize;
    if magic != MAGIC {
        return Err("not a relay (wrong magic): is sync.relay the relay's address?".into());
    }
    if len > MAX_MESSAGE {
        return Err(format!("relay message too long ({len} bytes)"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .map_err(|e| format!("relay connection: {e}"))?;
    Message::decode(kind, &body)
}

/// What `status` and `doctor` say about the relay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStatus {
    pub addr: String,
    /// Joined and answering pings.
    pub connected: bool,
    pub last_error: Option<String>,
}

/// This practice's link to its relay: the protocol connection (kept by a task) and the
/// means to reach a peer through it.
pub struct Relay {
    config: RelayConfig,
    tls: Arc<rustls::ClientConfig>,
    paths: Paths,
    status: Arc<Mutex<RelayStatus>>,
}

impl Relay {
    pub(crate) fn new(
        config: RelayConfig,
        creds: &Credentials,
        paths: Paths,
    ) -> Result<Relay, NetError> {
        let tls = Arc::new(crate::tls::relay_client_config(creds, config.pin)?);
        let status = Arc::new(Mutex::new(RelayStatus {
            addr: config.addr.clone(),
            ..Default::default()
        }));
        Ok(Relay {
            config,
            tls,
            paths,
            status,
        })
    }

    pub fn status(&self) -> RelayStatus {
        self.status.lock().unwrap().clone()
    }

    async fn resolve(&self) -> Result<SocketAddr, String> {
        tokio::net::lookup_host(&self.config.addr)
            .await
            .map_err(|e| format!("cannot resolve the relay {}: {e}", self.config.addr))?
            .next()
            .ok_or_else(|| format!("the relay {} resolves to no address", self.config.addr))
    }

    async fn tls_connect(
        &self,
    ) -> Result<(SocketAddr, tokio_rustls::client::TlsStream<TcpStream>), String> {
        let addr = self.resolve().await?;
        let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("the relay {addr} did not answer within {IO_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot connect to the relay {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from("relay").expect("a valid name");
        let tls = tokio::time::timeout(
            IO_TIMEOUT,
            tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| format!("TLS with the relay {addr} timed out"))?
        .map_err(|e| format!("TLS with the relay {addr}: {e}"))?;
        Ok((addr, tls))
    }

    /// Keeps the protocol connection up (joining again with back-off when it fails) and
    /// joins the sessions paired practices invite us to. Runs until dropped.
    pub(crate) async fn run(self: Arc<Self>, pins: PinSet) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let started = Instant::now();
            let err = self.serve_once(&pins).await;
            {
                let mut s = self.status.lock().unwrap();
                s.connected = false;
                s.last_error = Some(err.clone());
            }
            tracing::info!(relay = %self.config.addr, error = %err, "relay connection ended");
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(250);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn serve_once(&self, pins: &PinSet) -> String {
        let (relay_addr, tls) = match self.tls_connect().await {
            Ok(x) => x,
            Err(e) => return e,
        };
        let (mut rd, mut wr) = tokio::io::split(tls);
        if let Err(e) = write_msg(&mut wr, &Message::JoinRelayRequest).await {
            return format!("joining the relay: {e}");
        }
        match tokio::time::timeout(IO_TIMEOUT, read_msg(&mut rd)).await {
            Ok(Ok(Message::Response { code: 0, .. })) => {}
            Ok(Ok(Message::Response { code, message })) => {
                return format!("the relay refused to let us join: {message} ({code})");
            }
            Ok(Ok(Message::RelayFull)) => return "the relay is full".into(),
            Ok(Ok(m)) => return format!("unexpected answer from the relay: {m:?}"),
            Ok(Err(e)) => return e,
            Err(_) => return "the relay did not answer the join".into(),
        }
        {
            let mut s = self.status.lock().unwrap();
            s.connected = true;
            s.last_error = None;
        }
        tracing::info!(relay = %relay_addr, "joined the relay");
        let (msg_tx, mut msg_rx) = tokio::sync::mpsc::channel::<Result<Message, String>>(16);
        let reader = tokio::spawn(async move {
            loop {
                let m = read_msg(&mut rd).await;
                let end = m.is_err();
                if msg_tx.send(m).await.is_err() || end {
                    return;
                }
            }
        });
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut last_heard = Instant::now();
        let why = loop {
            tokio::select! {
                _ = ping.tick() => {
                    if last_heard.elapsed() > PING_TIMEOUT {
                        break format!("the relay {relay_addr} stopped answering");
                    }
                    if let Err(e) = write_msg(&mut wr, &Message::Ping).await {
                        break format!("relay connection: {e}");
                    }
                }
                m = msg_rx.recv() => {
                    last_heard = Instant::now();
                    match m {
                        None => break "relay connection closed".into(),
                        Some(Err(e)) => break e,
                        Some(Ok(Message::Ping)) => {
                            if let Err(e) = write_msg(&mut wr, &Message::Pong).await {
                                break format!("relay connection: {e}");
                            }
                        }
                        Some(Ok(Message::Pong)) => {}
                        Some(Ok(Message::SessionInvitation(inv))) => {
                            let Ok(from) = <[u8; 32]>::try_from(inv.from.as_slice()) else {
                                continue;
                            };
                            let from = PracticeId::from_bytes(from);
                            if !pins.contains(&from) {
                                tracing::debug!(practice = %from.short(), "ignored a relay invitation from a practice that is not paired");
                                continue;
                            }
                            let paths = self.paths.clone();
                            tokio::spawn(async move {
                                // strelaysrv admits a session's second half only while its
                                // session task waits for one (a non-blocking hand-over):
                                // two halves arriving within the same instant, as the
                                // dialler's and ours do when both are close to the relay,
                                // make it refuse one as "already connected", and the
                                // dialler then waits 10 s for an answer. The dialler joins
                                // as soon as it has the invitation; we join a moment later.
                                tokio::time::sleep(INVITED_JOIN_DELAY).await;
                                match join_session(relay_addr, &inv).await {
                                    Ok(stream) => {
                                        let addr = paths.add(from, stream);
                                        tracing::debug!(practice = %from.short(), %addr, "joined a relayed session");
                                    }
                                    Err(e) => tracing::info!(practice = %from.short(), error = %e, "joining a relayed session failed"),
                                }
                            });
                        }
                        Some(Ok(m)) => tracing::debug!(message = ?m, "unexpected relay message"),
                    }
                }
            }
        };
        reader.abort();
        why
    }

    /// Asks the relay for a session with `peer` and joins it: returns the virtual address
    /// the peer is reachable at over the relay.
    pub(crate) async fn open(&self, peer: PracticeId) -> Result<SocketAddr, String> {
        let (relay_addr, mut tls) = self.tls_connect().await?;
        write_msg(
            &mut tls,
            &Message::ConnectRequest {
                id: peer.as_bytes().to_vec(),
            },
        )
        .await
        .map_err(|e| format!("relay connection: {e}"))?;
        let answer = tokio::time::timeout(IO_TIMEOUT, read_msg(&mut tls))
            .await
            .map_err(|_| "the relay did not answer the connect request".to_string())??;
        let inv = match answer {
            Message::SessionInvitation(inv) => inv,
            Message::Response { code: 1, .. } => {
                return Err(format!(
                    "the peer is not connected to the relay {} (is it running, and is its sync.relay this relay?)",
                    self.config.addr
                ));
            }
            Message::Response { code, message } => {
                return Err(format!("the relay refused: {message} ({code})"));
            }
            m => return Err(format!("unexpected answer from the relay: {m:?}")),
        };
        let _ = tls.shutdown().await;
        let stream = join_session(relay_addr, &inv).await?;
        Ok(self.paths.add(peer, stream))
    }
}

/// Joins the session an invitation names (plain TCP to the relay's session port).
async fn join_session(relay: SocketAddr, inv: &Invitation) -> Result<TcpStream, String> {
    let ip = match inv.address.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(inv.address.as_slice()).unwrap()),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(inv.address.as_slice()).unwrap()),
        _ => relay.ip(),
    };
    // Go writes IPv4 addresses in their 16-byte IPv4-mapped form.
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    let ip = if ip.is_unspecified() { relay.ip() } else { ip };
    let addr = SocketAddr::new(ip, inv.port);
    let mut tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("the relay's session port {addr} did not answer"))?
        .map_err(|e| format!("cannot connect to the relay's session port {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    write_msg(
        &mut tcp,
        &Message::JoinSessionRequest {
            key: inv.key.clone(),
        },
    )
    .await
    .map_err(|e| format!("joining the relayed session: {e}"))?;
    match tokio::time::timeout(IO_TIMEOUT, read_msg(&mut tcp)).await {
        Ok(Ok(Message::Response { code: 0, .. })) => Ok(tcp),
        Ok(Ok(Message::Response { code, message })) => {
            Err(format!("the relay refused the session: {message} ({code})"))
        }
        Ok(Ok(m)) => Err(format!("unexpected answer from the relay: {m:?}")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the relay did not confirm the session".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_in_the_relay_encoding() {
        let inv = Invitation {
            from: vec![7; 32],
            key: vec![9; 32],
            address: vec![10, 0, 0, 1],
            port: 22067,
            server_socket: true,
        };
        for m in [
            Message::Ping,
            Message::JoinRelayRequest,
            Message::JoinSessionRequest { key: vec![1; 32] },
            Message::Response {
                code: 1,
                message: "not found".into(),
            },
            Message::ConnectRequest { id: vec![3; 32] },
            Message::SessionInvitation(inv),
        ] {
            let bytes = m.encode();
            assert_eq!(&bytes[..4], &MAGIC.to_be_bytes());
            let len = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize;
            assert_eq!(len, bytes.len() - 12);
            assert_eq!(len % 4, 0, "XDR pads to 4 bytes");
            let kind = u32::from_be_bytes(bytes[4..8].try_into().unwrap()) as i32;
            assert_eq!(Message::decode(kind, &bytes[12..]).unwrap(), m);
        }
        // The 1.x relay's "not found" answer, byte for byte.
        let nf = Message::Response {
            code: 1,
            message: "not found".into(),
        }
        .encode();
        assert_eq!(
            &nf[12..],
            &[
                0, 0, 0, 1, 0, 0, 0, 9, b'n', b'o', b't', b' ', b'f', b'o', b'u', b'n', b'd', 0, 0,
                0
            ]
        );
        assert!(Message::decode(JOIN_SESSION, &[0, 0, 0, 40]).is_err());
    }
}
