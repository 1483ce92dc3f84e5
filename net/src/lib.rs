//! # chartmesh-net
//!
//! The transport between practices: QUIC (quinn) with rustls mutual TLS where each side
//! accepts only certificates whose hash is a paired practice id (no CA, no trust on first
//! use), ALPN `chartmesh/1`, TLS 1.3 only, 0-RTT off (it is replayable), and length-prefixed
//! frames with a hard size limit.
//!
//! Owns: sockets, TLS configuration, certificate pinning, framing.
//! Must not touch: charts, consent or the store. What a frame means is the sync layer's
//! business; this crate only guarantees who is on the other end and how big a frame can be.
//! It is the only crate that imports quinn and rustls.

pub mod frame;
pub mod mux;
pub mod portmap;
pub mod relay;
pub mod stun;
pub mod tls;
pub mod transport;
pub mod wire;

use chartmesh_core::PracticeId;
use std::net::SocketAddr;
use std::sync::Arc;

pub use frame::{FrameError, MAX_FRAME, read_frame, write_frame};
pub use quinn;
pub use relay::{RelayConfig, RelayStatus};
pub use tls::{PinSet, Refusal};
pub use transport::{Congestion, Transport};
pub use wire::{FrameReader, FrameWriter, WireError};

/// The ALPN protocol id of chartmesh's sync protocol, version 1.
pub const ALPN: &[u8] = b"chartmesh/1";
/// How long a relayed path outlives its connection, so the connection's CONNECTION_CLOSE
/// (and quinn's answers to the peer's packets while it drains) still reach the peer.
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error(
        "cannot listen on {addr} (UDP): {source}; is another daemon using it? change sync.listen in config.toml"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the practice key or certificate is unusable: {0}")]
    Identity(String),
    #[error("connecting to {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("no relay is configured (sync.relay in config.toml)")]
    NoRelay,
    #[error("through the relay: {0}")]
    Relay(String),
    #[error("STUN: {0}")]
    Stun(String),
    #[error("port mapping: {0}")]
    PortMap(String),
    #[error("the peer did not present a paired certificate")]
    Unpaired,
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
}

/// This practice's certificate and private key (DER, PKCS#8).
#[derive(Clone)]
pub struct Credentials {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

/// A QUIC endpoint that both accepts and dials paired practices.
pub struct Endpoint {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    pins: PinSet,
    creds: Credentials,
    paths: mux::Paths,
    relay: std::sync::Mutex<Option<(Arc<relay::Relay>, tokio::task::JoinHandle<()>)>>,
    /// The real UDP socket under the mux, for STUN requests from quinn's own port.
    udp: Arc<dyn quinn::AsyncUdpSocket>,
    stun: mux::StunWaiters,
}

/// How a connection reaches its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// UDP to the peer's address.
    Direct,
    /// Through the relay server.
    Relayed,
}

impl PathKind {
    pub fn of(addr: SocketAddr) -> PathKind {
        if mux::is_relayed(addr) {
            PathKind::Relayed
        } else {
            PathKind::Direct
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Relayed => "relayed",
        }
    }
}

/// An established connection and the practice id proven by its TLS handshake.
pub struct PeerConnection {
    pub peer: PracticeId,
    pub connection: quinn::Connection,
}

impl Endpoint {
    /// Binds `addr` (UDP) with the default [`Transport`]. `pins` is shared: adding or
    /// removing a peer takes effect for the next handshake.
    pub fn bind(addr: SocketAddr, creds: &Credentials, pins: PinSet) -> Result<Endpoint, NetError> {
        Self::bind_with(addr, creds, pins, &Transport::default())
    }

    /// [`Endpoint::bind`] with chosen transport settings.
    pub fn bind_with(
        addr: SocketAddr,
        creds: &Credentials,
        pins: PinSet,
        options: &Transport,
    ) -> Result<Endpoint, NetError> {
        let server = tls::server_config(creds, pins.clone())?;
        let client = tls::client_config(creds, pins.clone())?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server)
                .map_err(|e| NetError::Identity(e.to_string()))?,
        ));
        let transport = options.quinn_config();
        let transport = Arc::new(transport);
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client)
                .map_err(|e| NetError::Identity(e.to_string()))?,
        ));
        client.transport_config(transport);
        let bind_err = |e| NetError::Bind { addr, source: e };
        let socket = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
        let runtime = Arc::new(quinn::TokioRuntime);
        let udp = quinn::Runtime::wrap_udp_socket(&*runtime, socket).map_err(bind_err)?;
        let paths = mux::Paths::default();
        let stun = mux::StunWaiters::default();
        let socket = Arc::new(mux::MuxSocket::new(
            udp.clone(),
            paths.clone(),
            stun.clone(),
        ));
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(bind_err)?;
        Ok(Endpoint {
            endpoint,
            client,
            pins,
            creds: creds.clone(),
            paths,
            relay: std::sync::Mutex::new(None),
            udp,
            stun,
        })
    }

    /// Asks the STUN server at `server` (RFC 8489 Binding) for the public address of this
    /// endpoint's UDP socket: the request leaves from the port QUIC uses, so the answer is
    /// the NAT mapping QUIC packets get (towards that server). Retransmits after 0.5 s and
    /// 1 s; gives up after 3.5 s.
    pub async fn observe_public_addr(&self, server: SocketAddr) -> Result<SocketAddr, NetError> {
        let id: stun::TransactionId = rand::random();
        let Some(mut answer) = self.stun.expect(id, server) else {
            return Err(NetError::Stun(format!(
                "too many STUN requests to {server} waiting"
            )));
        };
        let request = stun::binding_request(&id);
        let mut wait = std::time::Duration::from_millis(500);
        let mut last_err = None;
        for _ in 0..3 {
            let t = quinn::udp::Transmit {
                destination: server,
                ecn: None,
                contents: &request,
                segment_size: None,
                src_ip: None,
            };
            if let Err(e) = self.udp.try_send(&t) {
                last_err = Some(e);
            }
            match tokio::time::timeout(wait, &mut answer).await {
                Ok(Ok(addr)) => return Ok(addr),
                Ok(Err(_)) => break,
                Err(_) => wait *= 2,
            }
        }
        self.stun.forget(&id);
        Err(NetError::Stun(match last_err {
            Some(e) => format!("cannot send to the STUN server {server}: {e}"),
            None => format!("the STUN server {server} did not answer within 3.5 s"),
        }))
    }

    /// Keeps a connection to `config`'s relay server from now on (replacing any other), so
    /// paired practices can reach this one through it, and this one them
    /// ([`Endpoint::connect_relayed`]).
    pub fn start_relay(&self, config: RelayConfig) -> Result<(), NetError> {
        let relay = Arc::new(relay::Relay::new(config, &self.creds, self.paths.clone())?);
        let task = tokio::spawn(relay.clone().run(self.pins.clone()));
        if let Some((_, old)) = self.relay.lock().unwrap().replace((relay, task)) {
            old.abort();
        }
        Ok(())
    }

    /// The relay's state, if one is configured.
    pub fn relay_status(&self) -> Option<RelayStatus> {
        self.relay.lock().unwrap().as_ref().map(|(r, _)| r.status())
    }

    /// Reaches `peer` through the relay: a relayed path, then the usual QUIC handshake
    /// with the pinned certificate over it.
    pub async fn connect_relayed(&self, peer: PracticeId) -> Result<PeerConnection, NetError> {
        let relay = self.relay.lock().unwrap().as_ref().map(|(r, _)| r.clone());
        let Some(relay) = relay else {
            return Err(NetError::NoRelay);
        };
        let addr = relay.open(peer).await.map_err(NetError::Relay)?;
        match self.connect(addr, peer).await {
            Ok(pc) => {
                self.track(&pc);
                Ok(pc)
            }
            Err(e) => {
                self.paths.remove(addr);
                Err(e)
            }
        }
    }

    /// Closes the relayed path of a connection once the connection ends (a no-op for a
    /// direct one), [`CLOSE_GRACE`] later: a connection closed here resolves `closed()` at
    /// once, before quinn has sent its CONNECTION_CLOSE, and a path removed then drops that
    /// datagram. The peer would not learn that the connection ended (a relay does not pass
    /// one end's close of its TCP connection on to the other), hold it as live until the
    /// idle timeout, and refuse our next connection as its duplicate meanwhile.
    pub fn track(&self, pc: &PeerConnection) {
        let addr = pc.connection.remote_address();
        if !mux::is_relayed(addr) {
            return;
        }
        let (paths, conn) = (self.paths.clone(), pc.connection.clone());
        tokio::spawn(async move {
            conn.closed().await;
            tokio::time::sleep(CLOSE_GRACE).await;
            paths.remove(addr);
        });
    }

    /// Resolves when the relayed path a connection runs over ends (a relay restart, a NAT
    /// that dropped the relay's TCP connection); never for a direct connection.
    pub async fn path_lost(&self, addr: SocketAddr) {
        match self.paths.watch_closed(addr) {
            Some(mut rx) => {
                let _ = rx.wait_for(|closed| *closed).await;
            }
            None if mux::is_relayed(addr) => {}
            None => std::future::pending().await,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("bound endpoint has an address")
    }

    pub fn pins(&self) -> &PinSet {
        &self.pins
    }

    /// Dials `addr` and completes the handshake only if the server's certificate is `peer`'s.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer: PracticeId,
    ) -> Result<PeerConnection, NetError> {
        // The server name is not used for trust (the certificate hash is); it only has to parse.
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, "chartmesh")
            .map_err(|e| NetError::Connect {
                addr,
                message: e.to_string(),
            })?;
        let connection = tokio::time::timeout(std::time::Duration::from_secs(10), connecting)
            .await
            .map_err(|_| NetError::Connect {
                addr,
                message: "no answer within 10 s".into(),
            })?
            .map_err(|e| NetError::Connect {
                addr,
                message: e.to_string(),
            })?;
        let got = peer_id(&connection).ok_or(NetError::Unpaired)?;
        if got != peer {
            connection.close(quinn::VarInt::from_u32(1), b"unexpected practice");
            return Err(NetError::Connect {
                addr,
                message: format!(
                    "the practice at {addr} is {}, not {}",
                    got.short(),
                    peer.short()
                ),
            });
        }
        Ok(PeerConnection { peer, connection })
    }

    /// Waits for the next connection attempt (None once the endpoint is closed). Complete it
    /// with [`Endpoint::handshake`] on a task of its own: handshakes must never wait behind
    /// each other, or one stalled client (a bare Initial packet) holds up every practice.
    pub async fn incoming(&self) -> Option<quinn::Incoming> {
        self.endpoint.accept().await
    }

    /// Waits for the next connection whose handshake succeeds, one handshake at a time (for
    /// tests and tools; a daemon completes each handshake on its own task).
    pub async fn accept(&self) -> Option<PeerConnection> {
        loop {
            let incoming = self.incoming().await?;
            match Self::handshake(incoming, std::time::Duration::from_secs(10)).await {
                Ok(pc) => return Some(pc),
                Err(e) => tracing::debug!(error = %e, "incoming handshake failed"),
            }
        }
    }

    /// Completes an incoming handshake within `timeout`, and names the practice it proved.
    /// Unpaired certificates are refused during the handshake and reported through the pin
    /// set's refusal log.
    pub async fn handshake(
        incoming: quinn::Incoming,
        timeout: std::time::Duration,
    ) -> Result<PeerConnection, NetError> {
        let addr = incoming.remote_address();
        let connecting = incoming.accept().map_err(|e| NetError::Connect {
            addr,
            message: e.to_string(),
        })?;
        let connection = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(NetError::Connect {
                    addr,
                    message: e.to_string(),
                });
            }
            Err(_) => {
                return Err(NetError::Connect {
                    addr,
                    message: format!("handshake not completed within {timeout:?}"),
                });
            }
        };
        match peer_id(&connection) {
            Some(peer) => Ok(PeerConnection { peer, connection }),
            None => {
                connection.close(quinn::VarInt::from_u32(1), b"no certificate");
                Err(NetError::Unpaired)
            }
        }
    }

    /// Closes every connection and stops accepting.
    pub async fn shutdown(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"shutting down");
        self.endpoint.wait_idle().await;
    }
}

/// The practice id proven by the connection's TLS handshake.
pub fn peer_id(connection: &quinn::Connection) -> Option<PracticeId> {
    let certs = connection
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs
        .first()
        .map(|c| PracticeId::from_certificate_der(c.as_ref()))
}
