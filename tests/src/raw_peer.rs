//! A hostile (or merely hand-driven) practice for the tests: it holds a real certificate and
//! speaks the sync protocol frame by frame to a real daemon, built on the project's own
//! `core` and `net` crates, so a test can send what an honest practice never would.

use chartmesh_core::PracticeId;
use chartmesh_core::sync::{MAX_MESSAGE, Msg};
use chartmesh_net::quinn;
use chartmesh_net::{Credentials, Endpoint, FrameReader, FrameWriter, PinSet};
use std::net::SocketAddr;
use std::time::Duration;

/// A fresh practice identity: a certificate and its key, and the id they give.
pub fn creds() -> (Credentials, PracticeId) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["chartmesh".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().to_vec();
    (
        Credentials {
            cert_der: der.clone(),
            key_der: key.serialize_der(),
        },
        PracticeId::from_certificate_der(&der),
    )
}

/// A practice that is not a daemon: an endpoint on 127.0.0.1 and its id.
pub struct RawPeer {
    pub id: PracticeId,
    pub endpoint: Endpoint,
}

impl RawPeer {
    /// A new identity on an ephemeral port, trusting `pins`.
    pub fn new(pins: impl IntoIterator<Item = PracticeId>) -> RawPeer {
        let (c, id) = creds();
        let endpoint =
            Endpoint::bind("127.0.0.1:0".parse().unwrap(), &c, PinSet::new(pins)).unwrap();
        RawPeer { id, endpoint }
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    /// Connects to the daemon of practice `to` at `addr`.
    pub async fn connect(&self, addr: SocketAddr, to: PracticeId) -> quinn::Connection {
        self.endpoint.pins().add(to);
        self.endpoint
            .connect(addr, to)
            .await
            .expect("the paired peer connects")
            .connection
    }
}

/// One stream of a connection, frame by frame.
pub struct Stream {
    pub w: FrameWriter,
    pub r: FrameReader,
}

impl Stream {
    pub async fn open(conn: &quinn::Connection) -> Stream {
        let (send, recv) = conn.open_bi().await.unwrap();
        Stream {
            w: FrameWriter::new(send),
            r: FrameReader::new(recv, MAX_MESSAGE),
        }
    }

    pub async fn accept(conn: &quinn::Connection) -> Stream {
        let (send, recv) = conn.accept_bi().await.unwrap();
        Stream {
            w: FrameWriter::new(send),
            r: FrameReader::new(recv, MAX_MESSAGE),
        }
    }

    pub async fn send(&mut self, m: &Msg) -> Result<(), String> {
        self.w.send(&m.encode()).await.map_err(|e| e.to_string())
    }

    /// The next message, None at the end of the stream; Err when the stream was reset or the
    /// connection failed; panics after 15 s of silence.
    pub async fn recv(&mut self) -> Result<Option<Msg>, String> {
        let got = tokio::time::timeout(Duration::from_secs(15), self.r.recv())
            .await
            .expect("an answer within 15 s");
        match got {
            Ok(Some(b)) => Ok(Some(
                Msg::decode(&b, MAX_MESSAGE).map_err(|e| e.to_string())?,
            )),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Reads until `last` matches a message (inclusive), the stream ends or fails.
    pub async fn recv_until(
        &mut self,
        last: impl Fn(&Msg) -> bool,
    ) -> (Vec<Msg>, Result<(), String>) {
        let mut out = Vec::new();
        loop {
            match self.recv().await {
                Ok(Some(m)) => {
                    let stop = last(&m);
                    out.push(m);
                    if stop {
                        return (out, Ok(()));
                    }
                }
                Ok(None) => return (out, Ok(())),
                Err(e) => return (out, Err(e)),
            }
        }
    }
}

/// The peak resident memory of a process, in bytes (Linux: VmHWM).
pub fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
