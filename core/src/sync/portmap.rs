//! Port mapping decisions, without I/O: when to ask the default gateway (PCP, NAT-PMP or
//! UPnP IGD) to map the sync port, when to renew the mapping, how rarely to try again where
//! no gateway answers, and whether the mapped external address is a direct candidate.
//!
//! Owns: the lease and retry schedule of one mapping, and the reason there is none.
//! Must not touch: sockets or clocks. The driver (the daemon's `portmap` module) tells a
//! [`PortMap`] what the network looks like ([`PortMap::network`]), asks it what to do now
//! ([`PortMap::due`]), carries it out with `chartmesh_net::portmap` and reports the outcome
//! ([`PortMap::granted`], [`PortMap::failed`]); times are monotonic milliseconds.

use serde::Serialize;
use std::net::{IpAddr, SocketAddr};

/// The lease asked for: two hours (RFC 6886's recommendation), renewed at half-life.
pub const LEASE_SECS: u32 = 7200;
/// A renewal that failed is tried again this soon while the mapping still holds.
pub const RENEW_RETRY_MS: u64 = 30_000;
/// After the first attempt where no gateway answered, the next comes this much later,
/// doubling up to [`RETRY_MAX_MS`]: a network without port mapping is asked rarely.
pub const RETRY_FIRST_MS: u64 = 60_000;
pub const RETRY_MAX_MS: u64 = 30 * 60_000;
/// A lease renewed sooner than this is renewed at this age instead (a gateway that grants
/// a few seconds is not asked every second).
pub const RENEW_MIN_MS: u64 = 10_000;

/// The protocol a gateway granted the mapping through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    /// Port Control Protocol (RFC 6887).
    #[serde(rename = "PCP")]
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886).
    #[serde(rename = "NAT-PMP")]
    NatPmp,
    /// UPnP Internet Gateway Device (AddPortMapping / AddAnyPortMapping).
    #[serde(rename = "UPnP")]
    Upnp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pcp => "PCP",
            Protocol::NatPmp => "NAT-PMP",
            Protocol::Upnp => "UPnP",
        }
    }
}

/// A mapping the gateway granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub protocol: Protocol,
    /// The gateway's external address and the mapped port: where peers reach the sync port.
    pub external: SocketAddr,
    /// When it was granted (or last renewed).
    pub granted_ms: u64,
    /// For how long (the gateway may grant less than [`LEASE_SECS`]).
    pub lifetime_secs: u32,
}

impl Lease {
    pub fn expires_ms(&self) -> u64 {
        self.granted_ms + u64::from(self.lifetime_secs) * 1000
    }
    /// Half-life, but never sooner than [`RENEW_MIN_MS`] after it was granted (nor after it
    /// expires).
    pub fn renew_at_ms(&self) -> u64 {
        let half = u64::from(self.lifetime_secs) * 500;
        (self.granted_ms + half.max(RENEW_MIN_MS)).min(self.expires_ms())
    }
}

/// Where the practice sits: the default gateway (None where it cannot be read) and the
/// address of the interface towards it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    pub gateway: Option<IpAddr>,
    pub local: Option<IpAddr>,
}

/// What the driver should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Ask for a new mapping.
    Map,
    /// Renew the mapping held.
    Renew,
}

/// One mapping of the sync port: held, being retried, or none and why.
#[derive(Debug, Clone)]
pub struct PortMap {
    network: Option<Network>,
    lease: Option<Lease>,
    failures: u32,
    next_ms: u64,
    why_none: String,
}

/// What `status`, `doctor` and `/metrics` show of the mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// The mapped external address (a direct candidate for peers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<SocketAddr>,
    /// Seconds until the lease runs out (it is renewed at half-life).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_left_s: Option<u64>,
    /// Why there is no mapping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl PortMap {
    /// Nothing held yet; the first attempt is due at `now_ms`.
    pub fn new(now_ms: u64) -> PortMap {
        PortMap {
            network: None,
            lease: None,
            failures: 0,
            next_ms: now_ms,
            why_none: "not asked yet".into(),
        }
    }

    /// The network as read now. A different gateway or local address makes the mapping
    /// held worthless (it points at the old address, or lives on another router): it is
    /// dropped and a new one asked for at once. Returns whether the candidate changed.
    pub fn network(&mut self, now_ms: u64, net: Network) -> bool {
        if self.network == Some(net) {
            return false;
        }
        let first = self.network.is_none();
        self.network = Some(net);
        let had = self.lease.take().is_some();
        self.failures = 0;
        if !first {
            self.next_ms = now_ms;
            self.why_none = "the network changed; asking the new gateway".into();
        }
        had
    }

    /// What to do at `now_ms`, if anything. Drops a lease that ran out first.
    pub fn due(&mut self, now_ms: u64) -> Option<Step> {
        self.expire(now_ms);
        if now_ms < self.next_ms {
            return None;
        }
        Some(if self.lease.is_some() {
            Step::Renew
        } else {
            Step::Map
        })
    }

    /// When [`PortMap::due`] next has something to do (or a lease runs out).
    pub fn wake_at_ms(&self) -> u64 {
        match &self.lease {
            Some(l) => self.next_ms.min(l.expires_ms()),
            None => self.next_ms,
        }
    }

    /// The gateway granted (or renewed) `lease`. Returns whether the candidate changed.
    pub fn granted(&mut self, lease: Lease) -> bool {
        let changed = self.lease.as_ref().map(|l| l.external) != Some(lease.external);
        self.failures = 0;
        self.next_ms = lease.renew_at_ms();
        self.lease = Some(lease);
        changed
    }

    /// The attempt at `now_ms` failed (`why`: no gateway answered, it refused...). A lease
    /// still running is renewed again soon; otherwise the next attempt waits, doubling from
    /// [`RETRY_FIRST_MS`] to [`RETRY_MAX_MS`]. Returns whether the candidate changed.
    pub fn failed(&mut self, now_ms: u64, why: impl Into<String>) -> bool {
        let had = self.expire(now_ms);
        self.why_none = why.into();
        if let Some(l) = &self.lease {
            self.next_ms = (now_ms + RENEW_RETRY_MS).min(l.expires_ms());
            return false;
        }
        let wait = RETRY_FIRST_MS
            .saturating_mul(1 << self.failures.min(16))
            .min(RETRY_MAX_MS);
        self.failures += 1;
        self.next_ms = now_ms + wait;
        had
    }

    /// Drops the lease if it ran out; whether it did.
    fn expire(&mut self, now_ms: u64) -> bool {
        match &self.lease {
            Some(l) if now_ms >= l.expires_ms() => {
                self.lease = None;
                self.why_none = "the mapping ran out and was not renewed".into();
                true
            }
            _ => false,
        }
    }

    /// The lease held at `now_ms`, if it still runs.
    pub fn lease(&self, now_ms: u64) -> Option<&Lease> {
        self.lease.as_ref().filter(|l| now_ms < l.expires_ms())
    }

    /// The mapped external address as a direct candidate for peers: while the lease runs,
    /// and only if a peer could dial it ([`super::dialable`]).
    pub fn candidate(&self, now_ms: u64) -> Option<SocketAddr> {
        self.lease(now_ms)
            .map(|l| l.external)
            .filter(super::dialable)
    }

    /// What `status` shows at `now_ms`.
    pub fn status(&self, now_ms: u64) -> PortMapStatus {
        match self.lease(now_ms) {
            Some(l) => PortMapStatus {
                protocol: Some(l.protocol),
                external: Some(l.external),
                lease_left_s: Some((l.expires_ms() - now_ms) / 1000),
                reason: None,
            },
            None => PortMapStatus {
                protocol: None,
                external: None,
                lease_left_s: None,
                reason: Some(self.why_none.clone()),
            },
        }
    }

    /// The mapping was given back (graceful shutdown).
    pub fn released(&mut self) {
        self.lease = None;
        self.why_none = "released at shutdown".into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(at: u64, secs: u32) -> Lease {
        Lease {
            protocol: Protocol::NatPmp,
            external: "203.0.113.7:7361".parse().unwrap(),
            granted_ms: at,
            lifetime_secs: secs,
        }
    }

    fn net(gw: &str, local: &str) -> Network {
        Network {
            gateway: Some(gw.parse().unwrap()),
            local: Some(local.parse().unwrap()),
        }
    }

    #[test]
    fn maps_at_once_then_renews_at_half_life_and_keeps_the_candidate() {
        let mut m = PortMap::new(0);
        assert!(!m.network(0, net("192.168.1.1", "192.168.1.5")));
        assert_eq!(m.due(0), Some(Step::Map));
        assert!(m.granted(lease(1_000, LEASE_SECS)));
        let half = 1_000 + 3_600_000;
        assert_eq!(m.wake_at_ms(), half);
        assert_eq!(m.due(half - 1), None);
        assert_eq!(
            m.candidate(half - 1),
            Some("203.0.113.7:7361".parse().unwrap())
        );
        assert_eq!(m.due(half), Some(Step::Renew));
        // Renewed with the same address: the candidate did not change.
        assert!(!m.granted(lease(half, LEASE_SECS)));
        assert_eq!(m.wake_at_ms(), half + 3_600_000);
        let s = m.status(half + 1_000);
        assert_eq!(s.protocol, Some(Protocol::NatPmp));
        assert_eq!(s.lease_left_s, Some(7199));
        assert_eq!(s.reason, None);
    }

    #[test]
    fn a_failed_renewal_is_retried_soon_and_the_candidate_goes_when_the_lease_runs_out() {
        let mut m = PortMap::new(0);
        m.granted(lease(0, 100));
        // Renew at 50 s; the gateway does not answer.
        assert_eq!(m.due(50_000), Some(Step::Renew));
        assert!(!m.failed(50_000, "no gateway answered"));
        assert_eq!(m.wake_at_ms(), 50_000 + RENEW_RETRY_MS);
        assert!(m.candidate(90_000).is_some());
        assert_eq!(m.due(80_000), Some(Step::Renew));
        assert!(!m.failed(80_000, "no gateway answered"));
        // The retry would come after the lease ran out: it comes at expiry instead.
        assert_eq!(m.wake_at_ms(), 100_000);
        assert_eq!(m.candidate(100_000), None);
        assert_eq!(m.due(100_000), Some(Step::Map));
        assert!(m.status(100_000).reason.unwrap().contains("ran out"));
    }

    #[test]
    fn where_no_gateway_answers_attempts_grow_rare() {
        let mut m = PortMap::new(0);
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            assert_eq!(m.due(now), Some(Step::Map));
            assert!(!m.failed(now, "no gateway answered"));
            let next = m.wake_at_ms();
            assert_eq!(m.due(next - 1), None);
            waits.push(next - now);
            now = next;
        }
        assert_eq!(waits[0], RETRY_FIRST_MS);
        assert_eq!(waits[1], 2 * RETRY_FIRST_MS);
        assert_eq!(*waits.last().unwrap(), RETRY_MAX_MS);
        assert_eq!(m.status(now).reason.as_deref(), Some("no gateway answered"));
        assert_eq!(m.candidate(now), None);
    }

    #[test]
    fn a_new_gateway_or_address_drops_the_mapping_and_asks_at_once() {
        let mut m = PortMap::new(0);
        m.network(0, net("192.168.1.1", "192.168.1.5"));
        m.granted(lease(0, LEASE_SECS));
        // The same network read again changes nothing.
        assert!(!m.network(60_000, net("192.168.1.1", "192.168.1.5")));
        assert_eq!(m.due(60_000), None);
        // A new local address (DHCP) makes the mapping point nowhere.
        assert!(m.network(120_000, net("192.168.1.1", "192.168.1.9")));
        assert_eq!(m.candidate(120_000), None);
        assert_eq!(m.due(120_000), Some(Step::Map));
        // After failures, a network change resets the back-off.
        m.failed(120_000, "no gateway answered");
        m.failed(m.wake_at_ms(), "no gateway answered");
        assert!(m.wake_at_ms() > 200_000);
        assert!(!m.network(200_000, net("10.0.0.1", "10.0.0.2")));
        assert_eq!(m.due(200_000), Some(Step::Map));
    }

    #[test]
    fn an_undialable_external_address_is_no_candidate_and_short_leases_are_not_hammered() {
        let mut m = PortMap::new(0);
        m.granted(Lease {
            external: "0.0.0.0:7361".parse().unwrap(),
            ..lease(0, 4)
        });
        assert_eq!(m.candidate(1_000), None);
        // 4 s lease: renewal at half-life would be 2 s; it is never sooner than 10 s, nor
        // after expiry.
        assert_eq!(m.wake_at_ms(), 4_000);
        m.granted(lease(0, 60));
        assert_eq!(m.wake_at_ms(), 30_000);
        m.granted(lease(0, 15));
        assert_eq!(m.wake_at_ms(), RENEW_MIN_MS);
    }
}
