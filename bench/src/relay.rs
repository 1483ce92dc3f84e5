//! A counting UDP relay on loopback: each practice's peers reach it through its own relay
//! port, so every byte between the two daemons is counted outside both processes (UDP
//! payload bytes, both directions).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

pub struct Relay {
    pub addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Listens on 127.0.0.1 (a free port) and forwards to `target`.
    pub fn start(target: SocketAddr) -> std::io::Result<Relay> {
        let front = UdpSocket::bind("127.0.0.1:0")?;
        front.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = front.local_addr()?;
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (bytes.clone(), stop.clone());
        std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || run(front, target, b, s))?;
        Ok(Relay { addr, bytes, stop })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run(front: UdpSocket, target: SocketAddr, bytes: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let front = Arc::new(front);
    // One upstream socket per client address, with a thread carrying replies back.
    let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match front.recv_from(&mut buf) {
            Ok(x) => x,
            Err(_) => continue,
        };
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        let up = upstream.entry(from).or_insert_with(|| {
            let s = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("upstream socket"));
            s.set_read_timeout(Some(Duration::from_millis(50))).ok();
            let (s2, f2, b2, st2) = (s.clone(), front.clone(), bytes.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !st2.load(Ordering::Relaxed) {
                    if let Ok(n) = s2.recv(&mut buf) {
                        b2.fetch_add(n as u64, Ordering::Relaxed);
                        let _ = f2.send_to(&buf[..n], from);
                    }
                }
            });
            s
        });
        let _ = up.send_to(&buf[..n], target);
    }
}
