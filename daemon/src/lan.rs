//! LAN discovery: each practice announces its sync endpoint over mDNS
//! (`_chartmesh._udp.local.`, instance name = its practice id) and listens for others, so two
//! practices on one network reach each other after `peer add ID` with no address. An
//! announcement is only a hint of where to dial: the connection is still accepted only if
//! the TLS handshake proves the paired practice id, so a false announcement gains nothing.
//!
//! Runs only when `sync.listen` is not a loopback address (a loopback-only practice is not
//! reachable on the network, and must send nothing there) and `sync.lan_discovery` is on.
//!
//! Owns: the mDNS responder and the addresses it learnt. Must not touch: the store, the
//! sync protocol; it tells the sync service "this peer was seen" and nothing more.

use chartmesh_core::PracticeId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// The DNS-SD service type chartmesh announces.
pub const SERVICE: &str = "_chartmesh._udp.local.";

pub struct Lan {
    mdns: mdns_sd::ServiceDaemon,
    found: Arc<Mutex<HashMap<PracticeId, Vec<SocketAddr>>>>,
}

impl Lan {
    /// Announces `me` at `port` and browses for other practices; `seen` is called (on the
    /// responder's thread) with each practice found or found at a new address.
    pub fn start(
        me: PracticeId,
        port: u16,
        seen: impl Fn(PracticeId) + Send + 'static,
    ) -> Result<Lan, String> {
        let err = |e: mdns_sd::Error| format!("LAN discovery (mDNS): {e}");
        let mdns = mdns_sd::ServiceDaemon::new().map_err(err)?;
        let name = me.to_string().replace('-', "");
        let host = format!("chartmesh-{}.local.", name[..16].to_ascii_lowercase());
        let info = mdns_sd::ServiceInfo::new(
            SERVICE,
            &name,
            &host,
            "",
            port,
            None::<HashMap<String, String>>,
        )
        .map_err(err)?
        .enable_addr_auto();
        mdns.register(info).map_err(err)?;
        let events = mdns.browse(SERVICE).map_err(err)?;
        let found: Arc<Mutex<HashMap<PracticeId, Vec<SocketAddr>>>> = Arc::default();
        let f = found.clone();
        std::thread::Builder::new()
            .name("lan-discovery".into())
            .spawn(move || {
                while let Ok(ev) = events.recv() {
                    match ev {
                        mdns_sd::ServiceEvent::ServiceResolved(s) => {
                            let Some(id) = instance_id(s.get_fullname()) else {
                                continue;
                            };
                            if id == me {
                                continue;
                            }
                            let mut addrs: Vec<SocketAddr> = s
                                .get_addresses()
                                .iter()
                                .map(|ip| SocketAddr::new(ip.to_ip_addr(), s.get_port()))
                                .filter(|a| !a.ip().is_loopback())
                                .collect();
                            // IPv4 first: the sync endpoint usually listens on 0.0.0.0.
                            addrs.sort_by_key(|a| !a.is_ipv4());
                            let new = {
                                let mut f = f.lock().unwrap();
                                let old = f.insert(id, addrs.clone());
                                old.as_ref() != Some(&addrs)
                            };
                            if new {
                                tracing::info!(practice = %id.short(), addrs = ?addrs, "practice seen on the LAN");
                                seen(id);
                            }
                        }
                        mdns_sd::ServiceEvent::ServiceRemoved(_, fullname) => {
                            if let Some(id) = instance_id(&fullname) {
                                f.lock().unwrap().remove(&id);
                            }
                        }
                        _ => {}
                    }
                }
            })
            .map_err(|e| format!("LAN discovery: {e}"))?;
        Ok(Lan { mdns, found })
    }

    /// Where `peer` was last seen on the LAN (empty: not seen).
    pub fn addrs(&self, peer: &PracticeId) -> Vec<SocketAddr> {
        self.found
            .lock()
            .unwrap()
            .get(peer)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `addr` is where `peer` was seen on the LAN.
    pub fn is_lan(&self, peer: &PracticeId, addr: SocketAddr) -> bool {
        self.addrs(peer)
            .iter()
            .any(|a| a.port() == addr.port() && a.ip().to_canonical() == addr.ip().to_canonical())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = self.mdns.shutdown();
    }
}

/// The practice id an instance's full name (`ID._chartmesh._udp.local.`) announces.
fn instance_id(fullname: &str) -> Option<PracticeId> {
    let name = fullname.strip_suffix(SERVICE)?.strip_suffix('.')?;
    name.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_carry_the_practice_id() {
        let id = PracticeId::from_bytes([42; 32]);
        let name = id.to_string().replace('-', "");
        assert!(name.len() <= 63, "an mDNS label holds at most 63 bytes");
        assert_eq!(instance_id(&format!("{name}.{SERVICE}")), Some(id));
        assert_eq!(instance_id(&format!("printer.{SERVICE}")), None);
        assert_eq!(instance_id("x._http._tcp.local."), None);
    }
}
