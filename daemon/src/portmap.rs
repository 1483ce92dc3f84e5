//! Port mapping of the sync port on the default gateway (`sync.port_mapping`): the driver of
//! `chartmesh_core::sync::portmap::PortMap`, carrying out its steps with
//! `chartmesh_net::portmap` (PCP, NAT-PMP, UPnP IGD). The mapped external address becomes
//! one more direct candidate sent to peers (sync.rs asks [`PortMapper::candidate`]).
//!
//! Owns: one task that reads the network (gateway, local address) every 30 s, maps, renews
//! and — when the daemon's cancellation token fires — deletes the mapping; the view that
//! `status`, `doctor` and `/metrics` read. Must not touch: when to renew or retry (core
//! decides), peers or sessions (it only calls back when the candidate changed).

use chartmesh_core::sync::portmap::{Lease, PortMap, PortMapStatus, Step};
use chartmesh_net::portmap::{self, Mapping};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the network (default gateway, local address) is read again.
const CHECK_NETWORK: Duration = Duration::from_secs(30);
/// How long deleting the mapping may hold up shutdown.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

pub struct PortMapper {
    state: Mutex<PortMap>,
    started: Instant,
    /// Why port mapping does not run at all (configured off, a loopback listen address).
    off: Option<String>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl PortMapper {
    /// Port mapping that does not run, and why.
    pub fn off(why: impl Into<String>) -> Arc<PortMapper> {
        Arc::new(PortMapper {
            state: Mutex::new(PortMap::new(0)),
            started: Instant::now(),
            off: Some(why.into()),
            task: Mutex::new(None),
        })
    }

    /// Maps UDP `port` from now on, calling `changed` whenever the mapped address (the
    /// candidate) appears, changes or goes; deletes the mapping when `shutdown` fires.
    pub fn start(
        port: u16,
        shutdown: CancellationToken,
        changed: impl Fn() + Send + Sync + 'static,
    ) -> Arc<PortMapper> {
        let pm = Arc::new(PortMapper {
            state: Mutex::new(PortMap::new(0)),
            started: Instant::now(),
            off: None,
            task: Mutex::new(None),
        });
        let task = tokio::spawn(pm.clone().run(port, shutdown, changed));
        *pm.task.lock().unwrap() = Some(task);
        pm
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn run(
        self: Arc<Self>,
        port: u16,
        shutdown: CancellationToken,
        changed: impl Fn() + Send + Sync + 'static,
    ) {
        let mut held: Option<Mapping> = None;
        loop {
            let net = tokio::task::spawn_blocking(portmap::network)
                .await
                .unwrap_or(chartmesh_core::sync::portmap::Network {
                    gateway: None,
                    local: None,
                });
            let now = self.now_ms();
            let (moved, step) = {
                let mut st = self.state.lock().unwrap();
                (st.network(now, net), st.due(now))
            };
            if moved {
                changed();
            }
            let lapsed = held.is_some() && self.state.lock().unwrap().lease(now).is_none();
            if moved || lapsed {
                // On another network, or run out: the old mapping is worth nothing.
                if let Some(old) = held.take() {
                    let _ = tokio::time::timeout(RELEASE_WAIT, old.release()).await;
                }
            }
            if lapsed && !moved {
                changed();
            }
            let outcome = {
                let work = async {
                    match (step, held.as_mut()) {
                        (Some(Step::Renew), Some(m)) => Some(m.renew().await.map(|()| None)),
                        (Some(_), _) => Some(portmap::map(&net, port).await.map(Some)),
                        (None, _) => None,
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => None,
                    o = work => o,
                }
            };
            if shutdown.is_cancelled() {
                break;
            }
            let now = self.now_ms();
            match outcome {
                Some(Ok(fresh)) => {
                    if let Some(m) = fresh
                        && let Some(old) = held.replace(m)
                    {
                        let _ = tokio::time::timeout(RELEASE_WAIT, old.release()).await;
                    }
                    let m = held.as_ref().expect("a mapping is held");
                    let lease = Lease {
                        protocol: m.protocol,
                        external: m.external,
                        granted_ms: now,
                        lifetime_secs: m.lifetime_secs,
                    };
                    let new = self.state.lock().unwrap().granted(lease);
                    if new {
                        tracing::info!(
                            protocol = m.protocol.name(),
                            external = %m.external,
                            lease_s = m.lifetime_secs,
                            "the gateway maps the sync port"
                        );
                        changed();
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "no port mapping");
                    let why = match e {
                        chartmesh_net::NetError::PortMap(m) => m,
                        e => e.to_string(),
                    };
                    if self.state.lock().unwrap().failed(now, why) {
                        held = None;
                        changed();
                    }
                }
                None => {}
            }
            let wake = self.state.lock().unwrap().wake_at_ms();
            let wait = Duration::from_millis(wake.saturating_sub(self.now_ms())).min(CHECK_NETWORK);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(m) = held {
            let (protocol, external) = (m.protocol.name(), m.external);
            match tokio::time::timeout(RELEASE_WAIT, m.release()).await {
                Ok(Ok(())) => tracing::info!(protocol, %external, "port mapping deleted"),
                Ok(Err(e)) => tracing::debug!(error = %e, "port mapping not deleted"),
                Err(_) => tracing::debug!("port mapping not deleted: the gateway did not answer"),
            }
            self.state.lock().unwrap().released();
        }
    }

    /// Waits (a short while) for the mapping to be deleted after shutdown was asked for.
    pub async fn stopped(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(RELEASE_WAIT + Duration::from_millis(500), task).await;
        }
    }

    /// The mapped external address, while the lease runs.
    pub fn candidate(&self) -> Option<SocketAddr> {
        self.state.lock().unwrap().candidate(self.now_ms())
    }

    /// What `status` shows: the mapping (protocol, external address, lease left), or why
    /// there is none.
    pub fn status(&self) -> PortMapStatus {
        match &self.off {
            Some(why) => PortMapStatus {
                protocol: None,
                external: None,
                lease_left_s: None,
                reason: Some(why.clone()),
            },
            None => self.state.lock().unwrap().status(self.now_ms()),
        }
    }
}
