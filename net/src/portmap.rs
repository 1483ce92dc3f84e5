//! Port mapping on the default gateway: asks the router in front of this practice to
//! forward a UDP port of its external address to the sync socket, so a peer can dial it
//! directly even where hole punching fails (a NAT that maps each destination anew).
//!
//! Three protocols, in this order: PCP (RFC 6887) and NAT-PMP (RFC 6886), both on UDP 5351 of
//! the default gateway, through the `crab_nat` crate; then UPnP IGD (SSDP discovery, then
//! AddPortMapping, or AddAnyPortMapping where the port is taken) through `igd-next`. Each is
//! given a short time (about 2 s for PCP/NAT-PMP, 3 s for the SSDP search), so a network
//! without port mapping costs a few seconds now and then and nothing else.
//!
//! Owns: the requests and their sockets (separate from the sync socket: a mapping names the
//! internal port, it need not come from it), reading the default gateway.
//! Must not touch: when to ask, renew or give up — `chartmesh_core::sync::portmap` decides
//! that; the daemon carries it out with this module.

use chartmesh_core::sync::portmap::{LEASE_SECS, Network, Protocol};
use crab_nat::{InternetProtocol, PortMappingOptions, PortMappingType, TimeoutConfig};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::time::Duration;

use crate::NetError;

/// PCP/NAT-PMP: 250 ms, then 500 ms, then 1 s for an answer (1.75 s in all).
const PMP_TIMEOUTS: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 2,
    max_retry_timeout: Some(Duration::from_secs(1)),
};
/// How long the SSDP search waits for an Internet Gateway Device.
const SSDP_WAIT: Duration = Duration::from_secs(3);
/// The description a UPnP mapping carries (shown in the router's list of mappings).
const DESCRIPTION: &str = "chartmesh sync";

/// A mapping a gateway granted. Give it back with [`Mapping::release`].
pub struct Mapping {
    pub protocol: Protocol,
    /// The gateway's external address and the mapped port.
    pub external: SocketAddr,
    /// The lease granted (seconds).
    pub lifetime_secs: u32,
    held: Held,
}

enum Held {
    Pmp(crab_nat::PortMapping),
    Upnp {
        gateway: igd_next::aio::Gateway<igd_next::aio::tokio::Tokio>,
        internal: SocketAddr,
    },
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("protocol", &self.protocol)
            .field("external", &self.external)
            .field("lifetime_secs", &self.lifetime_secs)
            .finish()
    }
}

/// The default IPv4 gateway (from the kernel's routing table; Linux only, None elsewhere)
/// and the local address towards it (or, without a gateway, the one a route to the
/// internet would use; no packet is sent to learn it).
pub fn network() -> Network {
    let gateway = default_gateway().map(IpAddr::V4);
    let towards = gateway.unwrap_or(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    Network {
        gateway,
        local: local_towards(towards),
    }
}

/// The local address the kernel would send from to reach `ip`.
fn local_towards(ip: IpAddr) -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    s.connect((ip, 5351)).ok()?;
    Some(s.local_addr().ok()?.ip()).filter(|a| !a.is_unspecified())
}

#[cfg(target_os = "linux")]
fn default_gateway() -> Option<Ipv4Addr> {
    parse_default_route(&std::fs::read_to_string("/proc/net/route").ok()?)
}

#[cfg(not(target_os = "linux"))]
fn default_gateway() -> Option<Ipv4Addr> {
    None
}

/// The gateway of the default route with the lowest metric in `/proc/net/route` (fields:
/// Iface Destination Gateway Flags RefCnt Use Metric Mask...; addresses in host-order hex).
pub fn parse_default_route(table: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            if flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
                return None;
            }
            let gw = u32::from_str_radix(f[2], 16).ok()?;
            let metric: u32 = f[6].parse().ok()?;
            Some((metric, Ipv4Addr::from(gw.swap_bytes())))
        })
        .filter(|(_, gw)| !gw.is_unspecified())
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, gw)| gw)
}

/// Asks for UDP `port` of this machine to be mapped for [`LEASE_SECS`]: PCP, then NAT-PMP,
/// on `net`'s gateway; then UPnP IGD. The error names what each protocol answered.
pub async fn map(net: &Network, port: u16) -> Result<Mapping, NetError> {
    let Some(internal) = NonZeroU16::new(port) else {
        return Err(NetError::PortMap("the sync port is 0".into()));
    };
    let mut tried = Vec::new();
    let mut silent = true;
    match (net.gateway, net.local) {
        (Some(gw), Some(local)) if gw.is_ipv4() => match pmp_map(gw, local, internal).await {
            Ok(m) => return Ok(m),
            Err((answered, e)) => {
                silent &= !answered;
                tried.push(e);
            }
        },
        _ => tried.push("PCP/NAT-PMP: no default IPv4 gateway".to_string()),
    }
    match upnp_map(net.local, port).await {
        Ok(m) => return Ok(m),
        Err((answered, e)) => {
            silent &= !answered;
            tried.push(e);
        }
    }
    let detail = tried.join("; ");
    Err(NetError::PortMap(if silent {
        format!("no gateway answered ({detail})")
    } else {
        detail
    }))
}

fn options(port: NonZeroU16) -> PortMappingOptions {
    PortMappingOptions {
        external_port: Some(port),
        lifetime_seconds: Some(LEASE_SECS),
        timeout_config: Some(PMP_TIMEOUTS),
    }
}

/// Errors: whether the gateway answered at all, and what it said.
async fn pmp_map(
    gw: IpAddr,
    local: IpAddr,
    internal: NonZeroU16,
) -> Result<Mapping, (bool, String)> {
    let gateway = crab_nat::GatewayAddress::from(gw);
    let pcp = crab_nat::pcp::port_mapping(
        crab_nat::pcp::BaseMapRequest::new(gateway, local, InternetProtocol::Udp, internal),
        None,
        None,
        options(internal),
    )
    .await;
    let pcp_err = match pcp {
        Ok(m) => return pmp_mapping(m).await.map_err(|e| (true, e)),
        // Nothing answers on 5351: NAT-PMP would not be answered either.
        Err(crab_nat::pcp::Failure::Timeout) => {
            return Err((false, format!("PCP/NAT-PMP: {gw} did not answer")));
        }
        // The gateway's "port unreachable": nothing listens on 5351 there.
        Err(crab_nat::pcp::Failure::Socket(e))
            if e.kind() == std::io::ErrorKind::ConnectionRefused =>
        {
            return Err((false, format!("PCP/NAT-PMP: nothing listens on {gw}:5351")));
        }
        Err(e) => e,
    };
    match crab_nat::natpmp::port_mapping(
        gateway,
        InternetProtocol::Udp,
        internal,
        options(internal),
    )
    .await
    {
        Ok(m) => pmp_mapping(m).await.map_err(|e| (true, e)),
        Err(e) => Err((true, format!("PCP at {gw}: {pcp_err}; NAT-PMP: {e}"))),
    }
}

/// A PCP or NAT-PMP mapping with its external address (PCP's answer carries it; NAT-PMP
/// needs one more request).
async fn pmp_mapping(m: crab_nat::PortMapping) -> Result<Mapping, String> {
    let (protocol, ip) = match m.mapping_type() {
        PortMappingType::Pcp { external_ip, .. } => (Protocol::Pcp, unmap(external_ip)),
        PortMappingType::NatPmp => (
            Protocol::NatPmp,
            IpAddr::V4(
                crab_nat::natpmp::external_address(m.gateway(), Some(PMP_TIMEOUTS))
                    .await
                    .map_err(|e| format!("NAT-PMP external address: {e}"))?,
            ),
        ),
    };
    Ok(Mapping {
        protocol,
        external: SocketAddr::new(ip, m.external_port().get()),
        lifetime_secs: m.lifetime(),
        held: Held::Pmp(m),
    })
}

/// PCP carries IPv4 addresses as IPv4-mapped IPv6.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Errors: whether a gateway answered the search, and what went wrong.
async fn upnp_map(local: Option<IpAddr>, port: u16) -> Result<Mapping, (bool, String)> {
    let mut options = igd_next::SearchOptions::default();
    options.bind_addr = SocketAddr::new(
        local
            .filter(IpAddr::is_ipv4)
            .unwrap_or(Ipv4Addr::UNSPECIFIED.into()),
        0,
    );
    options.timeout = Some(SSDP_WAIT);
    options.single_search_timeout = Some(SSDP_WAIT);
    let gateway = igd_next::aio::tokio::search_gateway(options)
        .await
        .map_err(|e| match e {
            igd_next::SearchError::NoResponseWithinTimeout => (
                false,
                format!("UPnP: no Internet Gateway Device answered within {SSDP_WAIT:?}"),
            ),
            e => (false, format!("UPnP: {e}")),
        })?;
    upnp_add(gateway, local, port).await.map_err(|e| (true, e))
}

async fn upnp_add(
    gateway: igd_next::aio::Gateway<igd_next::aio::tokio::Tokio>,
    local: Option<IpAddr>,
    port: u16,
) -> Result<Mapping, String> {
    use igd_next::{AddPortError, PortMappingProtocol::UDP};
    let local = match local {
        Some(l) => l,
        None => local_towards(gateway.addr.ip())
            .ok_or_else(|| format!("UPnP: no local address towards {}", gateway.addr))?,
    };
    let internal = SocketAddr::new(local, port);
    let mut lifetime = LEASE_SECS;
    let mut r = gateway
        .add_port(UDP, port, internal, lifetime, DESCRIPTION)
        .await;
    if matches!(r, Err(AddPortError::OnlyPermanentLeasesSupported)) {
        // Kept until released at shutdown (and re-added at each renewal).
        lifetime = 0;
        r = gateway.add_port(UDP, port, internal, 0, DESCRIPTION).await;
    }
    let ext_port = match r {
        Ok(()) => port,
        // Taken by another client, or the gateway wants to choose: any free port.
        Err(_) => gateway
            .add_any_port(UDP, internal, lifetime, DESCRIPTION)
            .await
            .map_err(|e| format!("UPnP at {}: {e}", gateway.addr))?,
    };
    let ip = gateway
        .get_external_ip()
        .await
        .map_err(|e| format!("UPnP external address: {e}"))?;
    Ok(Mapping {
        protocol: Protocol::Upnp,
        external: SocketAddr::new(ip, ext_port),
        lifetime_secs: if lifetime == 0 { LEASE_SECS } else { lifetime },
        held: Held::Upnp { gateway, internal },
    })
}

impl Mapping {
    /// Renews the lease (the same external port asked for), and reads the external address
    /// again (the router's own address may have changed).
    pub async fn renew(&mut self) -> Result<(), NetError> {
        let err = |e: String| NetError::PortMap(e);
        match &mut self.held {
            Held::Pmp(m) => {
                m.renew()
                    .await
                    .map_err(|e| err(format!("{} renewal: {e}", self.protocol.name())))?;
                let fresh = pmp_mapping(m.clone()).await.map_err(err)?;
                self.external = fresh.external;
                self.lifetime_secs = fresh.lifetime_secs;
            }
            Held::Upnp { gateway, internal } => {
                let port = self.external.port();
                let lease = match gateway
                    .add_port(
                        igd_next::PortMappingProtocol::UDP,
                        port,
                        *internal,
                        LEASE_SECS,
                        DESCRIPTION,
                    )
                    .await
                {
                    Err(igd_next::AddPortError::OnlyPermanentLeasesSupported) => 0,
                    Err(e) => return Err(err(format!("UPnP renewal: {e}"))),
                    Ok(()) => LEASE_SECS,
                };
                if lease == 0 {
                    gateway
                        .add_port(
                            igd_next::PortMappingProtocol::UDP,
                            port,
                            *internal,
                            0,
                            DESCRIPTION,
                        )
                        .await
                        .map_err(|e| err(format!("UPnP renewal: {e}")))?;
                }
                let ip = gateway
                    .get_external_ip()
                    .await
                    .map_err(|e| err(format!("UPnP external address: {e}")))?;
                self.external = SocketAddr::new(ip, port);
                self.lifetime_secs = LEASE_SECS;
            }
        }
        Ok(())
    }

    /// Deletes the mapping on the gateway.
    pub async fn release(self) -> Result<(), NetError> {
        match self.held {
            Held::Pmp(m) => m
                .try_drop()
                .await
                .map_err(|(e, _)| NetError::PortMap(format!("releasing: {e}"))),
            Held::Upnp { gateway, .. } => gateway
                .remove_port(igd_next::PortMappingProtocol::UDP, self.external.port())
                .await
                .map_err(|e| NetError::PortMap(format!("releasing: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            eth0\t00000000\t010AA8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t000AA8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            parse_default_route(table),
            Some(Ipv4Addr::new(192, 168, 10, 1))
        );
        // No default route, a route without a gateway, garbage: none.
        assert_eq!(
            parse_default_route(&table.lines().take(1).collect::<String>()),
            None
        );
        assert_eq!(
            parse_default_route("h\nwg0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\n"),
            None
        );
        assert_eq!(parse_default_route("h\nx y z\n"), None);
    }

    #[test]
    fn pcp_addresses_are_unmapped_to_ipv4() {
        let v6: IpAddr = "::ffff:203.0.113.9".parse().unwrap();
        assert_eq!(unmap(v6), "203.0.113.9".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(unmap(v4), v4);
    }
}
