//! The link to one peer: whether to dial, when (exponential back-off with jitter), which of
//! two simultaneous connections both sides keep, and when a connection has proven itself.
//!
//! Which connection is kept: a direct one (UDP, on the LAN or through hole-punched NATs)
//! beats a relayed one at both sides; between two of one kind, both keep the one dialled by
//! the smaller practice id — except that a peer which dials us again through the relay has
//! given up its previous relayed connection, so its new one replaces that one. The rules
//! depend only on what both sides see alike (the path of the connection, who dialled it),
//! so the two sides agree without talking.
//!
//! A connection counts as *good* only once the peer has spoken on it (a message read): a
//! connection the peer closes straight after the handshake — it has not paired us yet, or it
//! refuses us — is a failed dial, so the back-off keeps growing instead of redialling at once.

use super::{ConnId, Rng};

pub const BACKOFF_MIN_MS: u64 = 200;
pub const BACKOFF_MAX_MS: u64 = 30_000;
/// A connection older than this that a peer dials around has been lost at its end.
pub const SETTLED_MS: u64 = 5_000;
/// How soon to look for a peer that left on purpose (shut down, paused): it dials us when it
/// is back, but it may come back at another address.
pub const PEER_LEFT_RETRY_MS: u64 = 5_000;

/// Application close codes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// Shutting down.
    Shutdown,
    /// A protocol violation.
    Protocol,
    /// The other of two simultaneous connections is kept.
    Duplicate,
    /// Not paired (any more).
    Unpaired,
    /// Sync with the peer paused by an administrator.
    Paused,
}

impl CloseCode {
    pub fn code(self) -> u32 {
        match self {
            CloseCode::Shutdown => 0,
            CloseCode::Protocol => 1,
            CloseCode::Duplicate => 2,
            CloseCode::Unpaired => 3,
            CloseCode::Paused => 4,
        }
    }

    pub fn from_code(c: u64) -> Option<CloseCode> {
        Some(match c {
            0 => CloseCode::Shutdown,
            1 => CloseCode::Protocol,
            2 => CloseCode::Duplicate,
            3 => CloseCode::Unpaired,
            4 => CloseCode::Paused,
            _ => return None,
        })
    }

    pub fn reason(self) -> &'static [u8] {
        match self {
            CloseCode::Shutdown => b"shutting down",
            CloseCode::Protocol => b"protocol violation",
            CloseCode::Duplicate => b"duplicate",
            CloseCode::Unpaired => b"unpaired",
            CloseCode::Paused => b"paused",
        }
    }
}

/// Why a connection ended, as the driver learnt it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// The peer closed it on purpose (shut down or paused); it dials us when it is back.
    PeerLeft,
    /// The peer refused us (not paired there, or it saw a protocol violation).
    Refused,
    /// This side closed it (paused, unpaired, shutting down, a duplicate).
    Local,
    /// The peer closed it as the duplicate of another connection: if that one is not ours
    /// too, the two sides disagree, and we dial again soon (backing off while none of
    /// those connections is ever spoken on).
    Duplicate,
    /// Timed out, reset or a network error.
    Lost(String),
}

impl Closed {
    /// Classifies a close by the peer with an application code.
    pub fn by_peer(code: u64) -> Closed {
        match CloseCode::from_code(code) {
            Some(CloseCode::Shutdown | CloseCode::Paused) => Closed::PeerLeft,
            Some(CloseCode::Unpaired | CloseCode::Protocol) => Closed::Refused,
            Some(CloseCode::Duplicate) => Closed::Duplicate,
            None => Closed::Lost(format!("closed by the peer with code {code}")),
        }
    }
}

/// Exponential back-off with ±25 % jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    current_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            current_ms: BACKOFF_MIN_MS,
        }
    }
}

impl Backoff {
    /// The next wait (jittered) and doubles the base for the one after.
    pub fn next(&mut self, rng: &mut Rng) -> u64 {
        let wait = jitter(self.current_ms, rng);
        self.current_ms = (self.current_ms * 2).min(BACKOFF_MAX_MS);
        wait
    }

    pub fn reset(&mut self) {
        self.current_ms = BACKOFF_MIN_MS;
    }

    pub fn current_ms(&self) -> u64 {
        self.current_ms
    }
}

fn jitter(ms: u64, rng: &mut Rng) -> u64 {
    (ms as f64 * (0.75 + rng.unit() * 0.5)) as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Down,
    Dialing,
    Up,
}

#[derive(Debug, Clone)]
enum State {
    Down {
        next_dial: Option<u64>,
    },
    Dialing,
    Up {
        conn: ConnId,
        dialed: bool,
        good: bool,
        /// When it came up (monotonic ms).
        since: u64,
        /// Through the relay (else direct: UDP to the peer's own address).
        relayed: bool,
    },
}

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Keep,
    /// Keep the new one and close the old one (a duplicate).
    Replace(ConnId),
    /// Close the new one with this code.
    Reject(super::CloseCode),
}

#[derive(Debug, Clone)]
pub(crate) struct Link {
    state: State,
    pub paused: bool,
    backoff: Backoff,
    /// Whether this practice's id is the smaller: then both sides keep the connection it dialled.
    me_preferred: bool,
    pub last_error: Option<String>,
}

impl Link {
    pub fn new(me_preferred: bool, now: u64) -> Link {
        Link {
            state: State::Down {
                next_dial: Some(now),
            },
            paused: false,
            backoff: Backoff::default(),
            me_preferred,
            last_error: None,
        }
    }

    pub fn state(&self) -> LinkState {
        match self.state {
            State::Down { .. } => LinkState::Down,
            State::Dialing => LinkState::Dialing,
            State::Up { .. } => LinkState::Up,
        }
    }

    pub fn conn(&self) -> Option<ConnId> {
        match self.state {
            State::Up { conn, .. } => Some(conn),
            _ => None,
        }
    }

    /// Whether the live connection runs through the relay (None: no live connection).
    pub fn relayed(&self) -> Option<bool> {
        match self.state {
            State::Up { relayed, .. } => Some(relayed),
            _ => None,
        }
    }

    pub fn backoff_ms(&self) -> u64 {
        self.backoff.current_ms()
    }

    /// When the link wants attention next (a dial), if ever.
    pub fn next_timeout(&self) -> Option<u64> {
        match self.state {
            State::Down { next_dial } if !self.paused => next_dial,
            _ => None,
        }
    }

    /// Whether to dial now; if so the link is dialling.
    pub fn poll_dial(&mut self, now: u64) -> bool {
        match self.state {
            State::Down {
                next_dial: Some(at),
            } if !self.paused && at <= now => {
                self.state = State::Dialing;
                true
            }
            _ => false,
        }
    }

    /// Dial as soon as possible (the peer's address changed, it was paired again, resumed).
    pub fn dial_soon(&mut self, now: u64) {
        if let State::Down { next_dial } = &mut self.state {
            *next_dial = Some(now);
            self.backoff.reset();
        }
    }

    pub fn dial_failed(&mut self, now: u64, rng: &mut Rng, why: String) {
        if let State::Dialing = self.state {
            let wait = self.backoff.next(rng);
            self.state = State::Down {
                next_dial: Some(now + wait),
            };
        }
        self.last_error = Some(why);
    }

    /// A connection was established (dialled by us or accepted; `relayed`: through the
    /// relay). Of two, both sides keep a direct one over a relayed one, and of two of one
    /// kind the one dialled by the practice with the smaller id, so they agree without
    /// talking.
    pub fn connected(&mut self, now: u64, conn: ConnId, dialed: bool, relayed: bool) -> Verdict {
        if self.paused {
            return Verdict::Reject(super::CloseCode::Paused);
        }
        let preferred = |dialed: bool| dialed == self.me_preferred;
        let verdict = match self.state {
            // A peer that dials us while we hold a connection it has spoken on has lost that
            // one (it restarted, its side timed out, its direct path died and it came back
            // through the relay): the new one replaces it, or we would keep a dead
            // connection until the idle timeout. (A peer dials only when it has no
            // connection.) Not within the first seconds of a connection: two practices that
            // dialled each other at once get their two connections within a round trip.
            State::Up {
                conn: existing,
                good: true,
                since,
                ..
            } if !dialed && since + SETTLED_MS <= now => Verdict::Replace(existing),
            // A direct connection (hole punched, or on the LAN) replaces a relayed one:
            // faster, and it spares the relay. Both sides see the same two paths.
            State::Up {
                conn: existing,
                relayed: true,
                ..
            } if !relayed => Verdict::Replace(existing),
            State::Up { relayed: false, .. } if relayed => {
                return Verdict::Reject(super::CloseCode::Duplicate);
            }
            // A second relayed connection dialled by the peer while we hold one it dialled
            // too: the peer dials only when it holds no connection, so it has given up the
            // older one (its relayed session ended at its end, or its dial never saw our
            // answer) even if we have not noticed yet. A relay ends a session's two halves
            // independently, and the close of a QUIC connection over a relayed path is
            // often lost with the path, so the older one can look alive here for the 30 s
            // idle timeout: keeping it would refuse every redial as a duplicate all along.
            State::Up {
                conn: existing,
                dialed: false,
                relayed: true,
                ..
            } if !dialed && relayed => Verdict::Replace(existing),
            // Two fresh connections of one kind (both sides dialled at once): both keep the
            // one dialled by the smaller id.
            State::Up {
                conn: existing,
                dialed: ex_dialed,
                ..
            } => {
                if preferred(dialed) && !preferred(ex_dialed) {
                    Verdict::Replace(existing)
                } else {
                    return Verdict::Reject(super::CloseCode::Duplicate);
                }
            }
            _ => Verdict::Keep,
        };
        self.state = State::Up {
            conn,
            dialed,
            good: false,
            since: now,
            relayed,
        };
        verdict
    }

    /// The peer spoke on the live connection: it has proven itself.
    pub fn proven(&mut self) {
        if let State::Up { good, .. } = &mut self.state
            && !*good
        {
            *good = true;
            self.backoff.reset();
            self.last_error = None;
        }
    }

    /// A connection ended. Returns whether it was the live one.
    pub fn lost(&mut self, now: u64, rng: &mut Rng, conn: ConnId, why: &Closed) -> bool {
        let State::Up { conn: c, good, .. } = self.state else {
            return false;
        };
        if c != conn {
            return false;
        }
        let next_dial = match why {
            Closed::Local => None,
            // The two sides disagree on which connection to keep: dial again soon, but a
            // connection refused as a duplicate before the peer spoke on it is a failed
            // dial too, so redials grow apart (200 ms, 400 ms, ...) instead of storming
            // every 200 ms while the peer holds on to a connection it believes live.
            Closed::Duplicate if good => {
                self.backoff.reset();
                Some(now + self.backoff.next(rng))
            }
            Closed::Duplicate => Some(now + self.backoff.next(rng)),
            Closed::PeerLeft => Some(now + jitter(PEER_LEFT_RETRY_MS, rng)),
            // A connection the peer refused, or that never carried a message, is a failed
            // dial: back off like an unreachable peer.
            Closed::Refused => Some(now + self.backoff.next(rng)),
            Closed::Lost(_) if !good => Some(now + self.backoff.next(rng)),
            Closed::Lost(_) => {
                self.backoff.reset();
                Some(now + self.backoff.next(rng))
            }
        };
        match why {
            Closed::Refused => self.last_error = Some("the peer refused the connection: has it paired this practice (`chartmesh peer add`)?".into()),
            Closed::Lost(e) => self.last_error = Some(format!("connection lost: {e}")),
            _ => {}
        }
        self.state = State::Down {
            next_dial: if self.paused { None } else { next_dial },
        };
        true
    }

    /// Pauses (returns the live connection to close) or resumes (dials at once).
    pub fn set_paused(&mut self, now: u64, paused: bool) -> Option<ConnId> {
        self.paused = paused;
        if paused {
            let conn = self.conn();
            self.state = State::Down { next_dial: None };
            conn
        } else {
            if let State::Down { .. } = self.state {
                self.state = State::Down {
                    next_dial: Some(now),
                };
                self.backoff.reset();
            }
            None
        }
    }

    /// Stops for good (unpaired, shutting down): returns the live connection to close.
    pub fn stop(&mut self) -> Option<ConnId> {
        let conn = self.conn();
        self.state = State::Down { next_dial: None };
        self.paused = true;
        conn
    }
}

/// A way to reach a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// QUIC over UDP to the address the peer was paired with.
    Direct,
    /// QUIC over UDP to where the peer announced itself on the LAN (mDNS).
    Lan,
    /// QUIC through the configured relay server, found by practice id.
    Relay,
}

/// The routes to try when dialling, in order: the peer's address first when it has one
/// (a direct path is faster and spares the relay), then where it was seen on the LAN, then
/// the relay when one is configured. Empty: the peer cannot be dialled at all (it can still
/// dial us).
pub fn routes(has_addr: bool, seen_on_lan: bool, has_relay: bool) -> Vec<Route> {
    let mut r = Vec::with_capacity(3);
    if has_addr {
        r.push(Route::Direct);
    }
    if seen_on_lan {
        r.push(Route::Lan);
    }
    if has_relay {
        r.push(Route::Relay);
    }
    r
}

/// What is known about the relay, for [`unreachable_reason`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayState {
    None,
    Up,
    Down(Option<String>),
}

/// Why a peer that is not connected cannot be reached, in words an administrator can act
/// on; None while it is connected.
pub fn unreachable_reason(
    connected: bool,
    has_addr: bool,
    relay: &RelayState,
    ever_connected: bool,
) -> Option<String> {
    if connected {
        return None;
    }
    let never = if ever_connected {
        ""
    } else {
        " It has never been reached since this daemon started: check that it has paired this practice too."
    };
    Some(match (has_addr, relay) {
        (false, RelayState::None) => format!(
            "no address, not seen on this network, and no relay configured: give its address (`chartmesh peer add ID --addr HOST:PORT`), set sync.relay in config.toml, or put both practices on one network.{never}"
        ),
        (_, RelayState::Down(e)) => format!(
            "the relay is down or unreachable ({}); {}.{never}",
            e.as_deref().unwrap_or("not joined yet"),
            if has_addr {
                "its address did not answer either"
            } else {
                "it has no direct address to try"
            }
        ),
        (true, RelayState::None) => format!(
            "its address does not answer and no relay is configured (sync.relay) to reach it behind a NAT.{never}"
        ),
        (_, RelayState::Up) => format!(
            "the relay is up but the peer is not connected to it: is it running, and is its sync.relay the same relay?{never}"
        ),
    })
}

#[cfg(test)]
mod route_tests {
    use super::*;

    #[test]
    fn direct_first_then_relay_and_reasons_name_the_missing_piece() {
        assert_eq!(routes(true, false, true), vec![Route::Direct, Route::Relay]);
        assert_eq!(
            routes(true, true, true),
            vec![Route::Direct, Route::Lan, Route::Relay]
        );
        assert_eq!(routes(false, true, true), vec![Route::Lan, Route::Relay]);
        assert_eq!(routes(false, false, true), vec![Route::Relay]);
        assert_eq!(routes(true, false, false), vec![Route::Direct]);
        assert!(routes(false, false, false).is_empty());
        assert_eq!(
            unreachable_reason(true, false, &RelayState::None, true),
            None
        );
        let r = unreachable_reason(false, false, &RelayState::None, false).unwrap();
        assert!(
            r.contains("no relay configured") && r.contains("never"),
            "{r}"
        );
        let r = unreachable_reason(
            false,
            false,
            &RelayState::Down(Some("refused".into())),
            true,
        )
        .unwrap();
        assert!(r.contains("relay is down") && r.contains("refused"), "{r}");
        let r = unreachable_reason(false, false, &RelayState::Up, true).unwrap();
        assert!(r.contains("not connected to it"), "{r}");
    }
}
