//! A counting UDP relay on loopback: each practice's peers reach it through its own relay
//! port, so every byte between the two daemons is counted outside both processes (UDP
//! payload bytes, both directions).
//!
//! It can also impair the link it carries ([`Impairment`]): drop, delay and duplicate
//! datagrams independently in each direction, like a lossy long-distance mobile link. This
//! stands in for `tc netem` where the kernel has no netem (the lossy-link test and the lossy
//! bench run use it; docs/PERFORMANCE.md).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

/// What the relay does to each datagram, in each direction separately.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Added one-way delay.
    pub delay: Duration,
    /// Probability that a (delivered) datagram is delivered twice.
    pub duplicate: f64,
    /// Seed of the relay's random choices (a run is reproducible up to thread timing).
    pub seed: u64,
}

impl Impairment {
    /// The rural link of issue 14: 15 % loss and 80 ms delay each way (160 ms RTT), 2 %
    /// duplicates.
    pub fn rural(seed: u64) -> Impairment {
        Impairment {
            loss: 0.15,
            delay: Duration::from_millis(80),
            duplicate: 0.02,
            seed,
        }
    }
}

pub struct Relay {
    pub addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
}

/// Datagrams the relay dropped and duplicated (both directions).
#[derive(Debug, Default)]
pub struct Stats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    /// The link is down: every datagram is dropped (a flapping link).
    pub down: AtomicBool,
}

impl Relay {
    /// Listens on 127.0.0.1 (a free port) and forwards to `target`.
    pub fn start(target: SocketAddr) -> std::io::Result<Relay> {
        Self::start_impaired(target, None)
    }

    /// [`Relay::start`], impairing the link both ways as `imp` says.
    pub fn start_impaired(target: SocketAddr, imp: Option<Impairment>) -> std::io::Result<Relay> {
        let front = UdpSocket::bind("127.0.0.1:0")?;
        front.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = front.local_addr()?;
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let (b, s, st) = (bytes.clone(), stop.clone(), stats.clone());
        std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || run(front, target, b, s, imp, st))?;
        Ok(Relay {
            addr,
            bytes,
            stop,
            stats,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Takes the link down (every datagram dropped, both ways) or brings it back up.
    pub fn set_down(&self, down: bool) {
        self.stats.down.store(down, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// xorshift64*: enough randomness for dropping datagrams, no dependency.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One direction of the link: decides each datagram's fate and delivers it after the delay
/// (a constant delay keeps the queue in order, so one thread sleeping to the head suffices).
struct Direction {
    imp: Option<Impairment>,
    rng: Rng,
    queue: Option<mpsc::Sender<(Instant, Vec<u8>)>>,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    stats: Arc<Stats>,
}

impl Direction {
    fn new(
        imp: Option<Impairment>,
        salt: u64,
        socket: Arc<UdpSocket>,
        to: SocketAddr,
        stats: Arc<Stats>,
    ) -> Direction {
        let queue = imp.filter(|i| !i.delay.is_zero()).map(|_| {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let s = socket.clone();
            std::thread::spawn(move || {
                while let Ok((due, d)) = rx.recv() {
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let _ = s.send_to(&d, to);
                }
            });
            tx
        });
        let seed = imp.map_or(1, |i| i.seed) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Direction {
            imp,
            rng: Rng(seed.max(1)),
            queue,
            socket,
            to,
            stats,
        }
    }

    fn carry(&mut self, d: &[u8]) {
        if self.stats.down.load(Ordering::Relaxed) {
            return;
        }
        let Some(imp) = self.imp else {
            let _ = self.socket.send_to(d, self.to);
            return;
        };
        if self.rng.unit() < imp.loss {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let copies = if self.rng.unit() < imp.duplicate {
            self.stats.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        for _ in 0..copies {
            match &self.queue {
                Some(q) => {
                    let _ = q.send((Instant::now() + imp.delay, d.to_vec()));
                }
                None => {
                    let _ = self.socket.send_to(d, self.to);
                }
            }
        }
    }
}

fn run(
    front: UdpSocket,
    target: SocketAddr,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    imp: Option<Impairment>,
    stats: Arc<Stats>,
) {
    let front = Arc::new(front);
    // One upstream socket per client address, with a thread carrying replies back.
    let mut upstream: HashMap<SocketAddr, Direction> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    let mut salt = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match front.recv_from(&mut buf) {
            Ok(x) => x,
            Err(_) => continue,
        };
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        let up = upstream.entry(from).or_insert_with(|| {
            let s = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("upstream socket"));
            s.set_read_timeout(Some(Duration::from_millis(50))).ok();
            salt += 2;
            let mut back = Direction::new(imp, salt + 1, front.clone(), from, stats.clone());
            let (s2, b2, st2) = (s.clone(), bytes.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !st2.load(Ordering::Relaxed) {
                    if let Ok(n) = s2.recv(&mut buf) {
                        b2.fetch_add(n as u64, Ordering::Relaxed);
                        back.carry(&buf[..n]);
                    }
                }
            });
            Direction::new(imp, salt, s, target, stats.clone())
        });
        up.carry(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The impairment does what it says, measured over real UDP on loopback.
    #[test]
    fn impaired_relay_drops_delays_and_duplicates_about_as_configured() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let relay = Relay::start_impaired(echo_addr, Some(Impairment::rural(7))).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(600)))
            .unwrap();
        let reader = client.try_clone().unwrap();
        let t = Instant::now();
        let counter = std::thread::spawn(move || {
            let (mut got, mut first) = (0u32, None);
            let mut buf = [0u8; 64];
            while reader.recv(&mut buf).is_ok() {
                first.get_or_insert_with(|| t.elapsed());
                got += 1;
            }
            (got, first)
        });
        // Paced (10 a millisecond), so no socket buffer on the way overflows.
        let sent = 2000u32;
        for i in 0..sent {
            client.send_to(&i.to_be_bytes(), relay.addr).unwrap();
            if i % 10 == 9 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let (got, first) = counter.join().unwrap();
        // Each echo crosses the relay twice: delivered ≈ (0.85 · 1.02)² ≈ 75 %.
        let ratio = got as f64 / sent as f64;
        assert!((0.68..0.82).contains(&ratio), "delivered {got} of {sent}");
        assert!(relay.stats().duplicated.load(Ordering::Relaxed) > 20);
        let rtt = first.unwrap();
        assert!(rtt >= Duration::from_millis(160), "round trip {rtt:?}");
    }
}
